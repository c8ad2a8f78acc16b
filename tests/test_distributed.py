"""ncl_kernels.distributed on CPU with gloo, 2 and 3 ranks, against one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ncl_kernels as nk

from conftest import rel_err

N, M, D = 11, 9, 6
ROWS = {2: [5, 6], 3: [4, 1, 6]}      # uneven slices, one rank with a single row
COLS = {2: [6, 3], 3: [2, 4, 3]}


def _global_problem(case):
    gen = torch.Generator().manual_seed(7)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(M, D, generator=gen, dtype=torch.float64), dim=1)
    kw = dict(n_iters=5, weights=(0.6, 0.4))
    if case == "targets_masses":
        kw.update(row_targets=torch.randint(-1, M, (N,), generator=gen),
                  col_targets=torch.randint(-1, N, (M,), generator=gen),
                  row_mass=torch.rand(N, generator=gen, dtype=torch.float64) + 0.5)
    return x, y, kw


def _slices(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _run(fn, x, y, **kw):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(17.0, dtype=torch.float64, requires_grad=True)
    loss = fn(x, y, s, **kw)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad


def _worker(rank, world, init, out_dir, backend, compiled=False):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {}
        for case in ("default", "targets_masses"):
            x, y, kw = _global_problem(case)
            rs, cs = _slices(ROWS[world], rank), _slices(COLS[world], rank)
            local = {k: (v[rs] if k in ("row_targets", "row_mass") else
                         v[cs] if k == "col_targets" else v) for k, v in kw.items()}
            results[case] = _run(nk.distributed.ncl_loss_embeddings, x[rs], y[cs],
                                 backend=backend, **local)
        if compiled:  # the same step under torch.compile(fullgraph=True)
            x, y, kw = _global_problem("targets_masses")
            local = {k: (v[rs] if k in ("row_targets", "row_mass") else
                         v[cs] if k == "col_targets" else v) for k, v in kw.items()}
            step = torch.compile(nk.distributed.ncl_loss_embeddings, fullgraph=True)
            results["compiled"] = _run(step, x[rs], y[cs], backend=backend, **local)
        # one rank's bad input: every rank raises instead of hanging in a collective
        x, y, _ = _global_problem("default")
        x_bad = x[_slices(ROWS[world], rank)].clone()
        if rank == 1:
            x_bad[0, 0] = float("nan")
        try:
            nk.distributed.ncl_loss_embeddings(x_bad, y[_slices(COLS[world], rank)], 3.0)
            results["refusal"] = "none"
        except ValueError as exc:
            results["refusal"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_process(world, tmp_path, backend):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init, str(tmp_path), backend), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in ("default", "targets_masses"):
        x, y, kw = _global_problem(case)
        loss, dx, dy, ds = _run(nk.ncl_loss_embeddings, x, y, backend=backend, **kw)
        for rank, results in enumerate(per_rank):
            l_r, dx_r, dy_r, _ = results[case]
            assert rel_err(l_r, loss) < 1e-8, (case, rank)
            assert rel_err(dx_r, dx[_slices(ROWS[world], rank)]) < 1e-8, (case, rank)
            assert rel_err(dy_r, dy[_slices(COLS[world], rank)]) < 1e-8, (case, rank)
        # each rank holds its share of dscale; the shares sum to the full derivative
        assert rel_err(sum(res[case][3] for res in per_rank), ds) < 1e-8, case
    for rank, results in enumerate(per_rank):
        expect = "x_local contains NaN" if rank == 1 else "rank 1 refused its input"
        assert expect in results["refusal"], (rank, results["refusal"])


@pytest.mark.slow
def test_compiles_without_a_graph_break(tmp_path):
    world = 2
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init, str(tmp_path), "torch", True), nprocs=world,
             join=True)
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(results["compiled"], results["targets_masses"]):
            assert rel_err(a, b) < 1e-12, rank


def _opcheck_worker(rank, init, out_dir):
    from ncl_kernels import _library

    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        x, y, kw = _global_problem("targets_masses")
        x.requires_grad_()
        s = torch.tensor(17.0, dtype=torch.float64, requires_grad=True)
        name = dist.group.WORLD.group_name
        args = (x, y, s, 0.0, name, kw["row_targets"], kw["col_targets"], kw["row_mass"],
                None, 5, 0.6, 0.4)
        forward = _library.op("distributed_ncl_loss", "torch")
        # the fake's global sizes are data-dependent: opcheck all but the fake-tensor test
        torch.library.opcheck(forward, args, test_utils=("test_schema",
                                                         "test_autograd_registration"))
        out = forward(*args)
        backward = _library.op("distributed_ncl_loss_backward", "torch")
        torch.library.opcheck(backward, (torch.tensor(1.0, dtype=torch.float64),
                                         x.detach(), *out[1:], None, 17.0, name, M, True),
                              test_utils=("test_schema",))
        torch.save("ok", os.path.join(out_dir, "opcheck.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_opcheck_in_a_world_of_one(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_opcheck_worker, args=(init, str(tmp_path)), nprocs=1, join=True)
    assert torch.load(tmp_path / "opcheck.pt") == "ok"


def test_needs_an_initialized_group():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        nk.distributed.ncl_loss_embeddings(x, x)
