"""Arguments for every op of ``torch.ops.ncl_kernels``, for ``torch.library.opcheck``.

Shared by the CPU suites (``test_compile.py``), the Triton interpreter lane and the CUDA
host emulation, which run the same checks on their own backends' overloads.
"""

import torch

from conftest import random_embeddings, random_scores

OPS = torch.ops.ncl_kernels


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_inputs(n, m, dtype, seed):
    acc = _acc(dtype)
    gen = torch.Generator().manual_seed(seed)
    f, g = torch.randn(n, generator=gen).to(acc), torch.randn(m, generator=gen).to(acc)
    S = random_scores(n, m, dtype, seed=seed)
    lse_row = OPS.row_lse.torch(S, 3.0, g)
    lse_col = OPS.col_lse.torch(S, 3.0, f)
    coef_row = torch.full((n,), 0.5 / n, dtype=acc)
    coef_col = torch.full((m,), 0.5 / m, dtype=acc)
    y = torch.arange(n) % m
    z = torch.arange(m) % n
    z[-1] = -1
    return S, (3.0, f, g, lse_row, lse_col, coef_row, coef_col, y, z)


def primitive_cases(dtype=torch.float32, n=7, m=5, d=6, seed=1):
    """``{op name: [args, ...]}`` for the seam primitives (fresh tensors per call)."""
    acc = _acc(dtype)
    S = random_scores(n, m, dtype, seed=seed)
    strided = random_scores(n, m, dtype, seed=seed, strided=True)
    f, g = torch.randn(n).to(acc), torch.randn(m).to(acc)
    x, y = random_embeddings(n, m, d, dtype, seed=seed)
    Sg, grad = _grad_inputs(n, m, dtype, seed)
    xg, yg = random_embeddings(n, m, d, dtype, seed=seed)
    log_r = torch.log(torch.rand(n, generator=torch.Generator().manual_seed(seed)).to(acc) + 0.5)
    log_r[0] = float("-inf")  # a zero-mass row
    return {
        "sinkhorn_step": [(S, 3.0, g, log_r), (strided, 3.0, g, log_r)],
        "sinkhorn_step_xy": [(x, y, 3.0, g, log_r)],
        "target_logits_xy": [(xg, yg, 3.0, grad[7], grad[8])],
        "row_lse": [(S, 3.0, None), (strided, 3.0, g)],
        "col_lse": [(S, 3.0, None), (strided, 3.0, f)],
        "apply_biases_": [(S.clone(), 3.0, f, g), (strided.clone(), 2.0, None, g)],
        "ncl_grad": [(Sg, *grad, 0, True), (Sg, *grad, 0, False)],
        "ncl_grad_": [(Sg.clone(), *grad, 0)],
        "row_lse_xy": [(x, y, 3.0, None), (x, y, 3.0, g)],
        "col_lse_xy": [(x, y, 3.0, f)],
        "ncl_grad_xy": [(xg, yg, *grad, True, True), (xg, yg, *grad, False, True)],
    }


def entry_cases(dtype=torch.float64, seed=1):
    """``{op name: [args, ...]}`` for the ops behind the public functions."""
    S = random_scores(7, 5, dtype, seed=seed).requires_grad_()
    x, y = random_embeddings(7, 5, 6, dtype, seed=seed)
    x.requires_grad_(), y.requires_grad_()
    acc = _acc(dtype)
    s = torch.tensor(7.0, dtype=acc, requires_grad=True)
    rt = torch.tensor([0, 1, -1, 3, 4, 0, 2])
    ct = torch.tensor([6, -1, 2, 3, 0])
    rm = torch.rand(7, dtype=acc) + 0.5
    # (scale_t, scale_f, row_targets, col_targets, row_mass, col_mass, f, g, n_iters, w_row,
    #  w_col)
    default = (s, 0.0, None, None, None, None, None, None, 3, 0.5, 0.5)
    targets = (None, 7.0, rt, ct, rm, None, None, None, 3, 0.7, 0.5)
    sol = OPS.sinkhorn.torch(S.detach(), None, 7.0, None, None, None, 3, None, 1)
    given = (s, 0.0, None, None, None, None, sol[0], sol[1], 0, 0.5, 0.5)
    solve = (None, 7.0, None, None, None, 3, None, 1)
    solve_tol = (s.detach(), 0.0, rm, None, sol[1], 50, 1e-6, 5)
    _, f, g, lse_row, lse_col = OPS.ncl_loss.torch(S.detach(), *default, False)
    solved = (None, 7.0, None, None, f, g, lse_row, lse_col, 0.5, 0.5)
    grad = torch.tensor(1.5, dtype=acc)
    bank, gallery = random_embeddings(9, 5, 6, dtype, seed=seed + 1)
    return {
        "sinkhorn": [(S.detach(), *solve), (S.detach(), *solve_tol)],
        "sinkhorn_embeddings": [(x.detach(), y.detach(), *solve)],
        "ncl_loss": [(S, *default, False), (S, *targets, True), (S, *given, False)],
        "ncl_loss_backward": [(grad, S.detach(), *solved, True),
                              (grad, S.detach(), *solved, False)],
        "ncl_loss_backward_": [(grad, S.detach().clone(), *solved)],
        "ncl_loss_embeddings": [(x, y, *default), (x, y, *targets)],
        "ncl_loss_embeddings_backward": [(grad, x.detach(), y.detach(), *solved, True, False)],
        "qbnorm_bias": [(bank, gallery, None, 7.0)],
        "checked_product": [(x, y, "x", "y", True), (x, y, "x", "y", False)],
        "softmax_mass_xy": [(x.detach(), y.detach(), s.detach(), 0.0, f, torch.log(rm[:5])),
                            (x.detach(), y.detach(), None, 7.0, f, torch.log(rm[:5]))],
        "checked_product_backward": [(torch.randn(7, 5, dtype=acc), x.detach(), y.detach(),
                                      "x", "y", True, False)],
    }


#: opchecked in tests/test_distributed.py, inside a process group
DISTRIBUTED_OPS = ("distributed_ncl_loss", "distributed_ncl_loss_backward")
