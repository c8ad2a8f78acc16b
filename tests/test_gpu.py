"""The backend checks on CUDA tensors: skipped (by marker, not at import) without a GPU.

Every dense primitive of every GPU backend (``torch`` always, ``cuda`` and ``triton`` when
usable) against
the float64 oracle in ``python_ref``, with docs/math.md section 5 tolerances: every storage
dtype, awkward shapes (1, 7, 67, 1031; rows of >= 4096 elements take the block-per-row
path; tall-thin blocks take col_lse's two-stage path), three layouts (contiguous; a view
with 16-byte aligned rows; a view with a misaligned base and row stride, which takes the
scalar paths), -inf masks, in-place updates on fresh copies with the caller's padding
checked untouched. Then the properties a fast path must keep: determinism, the caller's
stream, no host synchronization, 64-bit indexing past 2^31 elements. ``backend="auto"``
(a mix of ``cuda`` and ``triton`` per primitive, ``registry.ROUTES``) joins the property
checks and the end-to-end checks against the oracle.

The ``check_*`` functions take a device, so the same checks can be run on CPU tensors with
the torch backend (a check of the checks).
"""

import pytest
import torch

import ncl_kernels as nk
import python_ref as ref
from ncl_kernels._dtypes import acc_dtype
from ncl_kernels.backends import get as get_backend

from conftest import (
    STORAGE_DTYPES,
    assert_close,
    oracle_loss_refs,
    random_embeddings,
    random_scores,
    rel_err,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NEG_INF = float("-inf")
SCALE = 7.0


def kernel_backends():
    """Our own GPU kernels (not the torch composition): the ones usable here."""
    report = nk.backends()
    return [name for name in ("cuda", "triton") if report[name]["usable"]]


def gpu_backends():
    return ["torch"] + kernel_backends()


def auto_backends():
    """``"auto"`` where it is the composite over our GPU kernels (without them it is the
    torch backend, checked already)."""
    return ["auto"] if kernel_backends() else []


# (1, 7) and (7, 1): single rows/columns; (3, 4099), (2, 8200): a block per row with a
# vector tail; (5000, 7), (1031, 67): col_lse over many row slabs (two-stage).
SHAPES = [(1, 1), (1, 7), (7, 1), (67, 45), (1031, 67), (7, 1031), (3, 4099), (2, 8200),
          (5000, 7), (130, 1031)]
LAYOUTS = ["contiguous", "aligned", "unaligned"]


# ---------------------------------------------------------------- inputs
def scores_on(device, n, m, dtype, *, seed=0, layout="contiguous", mask=None, scale=0.3):
    """``(S, wide)``: S is an n x m view of ``wide`` (its storage) on ``device``.

    layout: "contiguous" (S is wide), "aligned" (row stride a multiple of 16 bytes, not m),
    "unaligned" (row stride m + 13 and a base one element past a 16-byte boundary).
    mask: None, "scattered" (about 5% -inf, never a whole row or column, never a default
    target) or "lines" (scattered plus one whole row and one whole column of -inf).
    """
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        width, off = m, 0
    elif layout == "aligned":
        width, off = m + (-m % 8) + 8, 0  # a multiple of 8 elements: 16-byte rows for all
    else:
        width, off = m + 13, 1
    wide = (torch.randn(n, width, generator=gen) * scale).to(dtype)
    S = wide[:, off:off + m]
    if mask is not None and n * m > 1:
        hit = torch.rand(n, m, generator=gen) < 0.05
        idx = torch.arange(max(n, m))
        hit[idx % n, idx % m] = False  # every row and column keeps a finite entry
        S[hit] = NEG_INF
        if mask == "lines" and n > 2 and m > 2:
            S[1, :] = NEG_INF
            S[:, 2] = NEG_INF
    wide = wide.to(device)
    return wide[:, off:off + m], wide


def vector(length, dtype, device, seed, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(length, generator=gen) * scale).to(dtype).to(device)


def low_precision_view(ref32, dtype):
    """The float32 reference as the kernel has to deliver it: in the storage dtype."""
    return ref32 if dtype in (torch.float32, torch.float64) else ref32.to(dtype)


# ---------------------------------------------------------------- checks
def backend_for(backend, device):
    """A backend name (looked up for ``device``) or a kernel object (used as is)."""
    return get_backend(backend, torch.device(device)) if isinstance(backend, str) else backend


def check_row_lse(backend, device, dtype, shape, layout, with_bias):
    S, _ = scores_on(device, *shape, dtype, seed=shape[1], layout=layout, mask="lines")
    g = vector(shape[1], acc_dtype(dtype), device, 1) if with_bias else None
    be = backend_for(backend, S.device)
    out = be.row_lse(S, SCALE, g)
    assert out.dtype == acc_dtype(dtype) and out.shape == (shape[0],)
    gc = None if g is None else g.cpu()
    assert_close(out.cpu(), ref.row_lse(S.cpu(), SCALE, gc),
                 ref.row_lse(S.cpu(), SCALE, gc, dtype=torch.float32), dtype, "row_lse")


def check_col_lse(backend, device, dtype, shape, layout, with_bias):
    S, _ = scores_on(device, *shape, dtype, seed=shape[0], layout=layout, mask="lines")
    f = vector(shape[0], acc_dtype(dtype), device, 2) if with_bias else None
    be = backend_for(backend, S.device)
    out = be.col_lse(S, SCALE, f)
    assert out.dtype == acc_dtype(dtype) and out.shape == (shape[1],)
    fc = None if f is None else f.cpu()
    assert_close(out.cpu(), ref.col_lse(S.cpu(), SCALE, fc),
                 ref.col_lse(S.cpu(), SCALE, fc, dtype=torch.float32), dtype, "col_lse")


def grad_problem(device, dtype, shape, layout, seed=0, targets="default"):
    """Scores and every ncl_grad_ argument, plus the float64 and float32 references.

    targets: "default" (y_i = i, z_j = j below min(n, m)) or "random" (anywhere in the
    block, so that they fall in every row slab and column tile of a kernel); either way
    about a third of the rows and a quarter of the columns have none, and no target entry
    is masked.
    """
    n, m = shape
    acc = acc_dtype(dtype)
    S, wide = scores_on(device, n, m, dtype, seed=seed, layout=layout, mask="scattered")
    f, g = vector(n, acc, device, 3, 1.0), vector(m, acc, device, 4, 1.0)
    if targets == "default":
        y, z = ref.default_targets(n, m)
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        y, z = torch.randint(0, m, (n,), generator=gen), torch.randint(0, n, (m,), generator=gen)
    y[::3] = -1  # rows and columns without a loss term (a third of them)
    z[1::4] = -1
    if (y >= 0).sum() == 0:
        y[0] = 0
    if (z >= 0).sum() == 0:
        z[0] = 0
    if targets != "default":  # the default targets are never masked (scores_on)
        rows, cols = torch.arange(n)[y >= 0], y[y >= 0]
        S[rows.to(device), cols.to(device)] = 0.25
        rows, cols = z[z >= 0], torch.arange(m)[z >= 0]
        S[rows.to(device), cols.to(device)] = -0.25
    weights = (0.3, 0.7)
    coef_row = (weights[0] / int((y >= 0).sum())) * (y >= 0).to(acc)
    coef_col = (weights[1] / int((z >= 0).sum())) * (z >= 0).to(acc)
    Sc, fc, gc = S.cpu(), f.cpu(), g.cpu()
    # the LSEs as a pass in the accumulation dtype delivers them: a 1 x 1 block then has
    # softmaxes of exactly 1 and G = 0, which a rounded float64 LSE would not give
    lse_row = ref.row_lse(Sc, SCALE, gc, dtype=acc)
    lse_col = ref.col_lse(Sc, SCALE, fc, dtype=acc)
    refs = {}
    for rd in (torch.float64, torch.float32):
        G = ref.ncl_grad(Sc, SCALE, fc, gc, y, z, weights, dtype=rd)
        Sr = Sc.to(rd)
        ds = (G * Sr.masked_fill(Sr == NEG_INF, 0.0)).sum()
        refs[rd] = (SCALE * G, ds)
    args = (f, g, lse_row.to(device), lse_col.to(device), coef_row.to(device),
            coef_col.to(device), y.to(device), z.to(device))
    return S, wide, args, refs


def check_ncl_grad(backend, device, dtype, shape, layout, mode, targets="default"):
    S, wide, args, refs = grad_problem(device, dtype, shape, layout, targets=targets)
    (out64, ds64), (out32, ds32) = refs[torch.float64], refs[torch.float32]
    be = backend_for(backend, S.device)
    wide_before = wide.clone()
    if mode == "none":
        out = None
    elif mode == "inplace":
        out = S
    elif mode == "new":
        out = torch.empty(S.shape, dtype=S.dtype, device=S.device)
    else:  # a strided block of its own ("strided_out")
        out = torch.full((shape[0], shape[1] + 5), 9.0, dtype=S.dtype, device=S.device)
        out = out[:, 3:3 + shape[1]]
    ds = be.ncl_grad_(S, SCALE, *args, out=out)
    assert ds.dtype == acc_dtype(dtype) and ds.shape == ()
    assert_close(ds.cpu(), ds64, ds32, dtype, "dscale sum")
    if mode == "inplace":
        assert_close(S.cpu(), out64, low_precision_view(out32, dtype), dtype, "scale * G")
        # only S's elements were written: the rest of the caller's storage is untouched
        keep = torch.ones_like(wide, dtype=torch.bool)
        keep[:, (S.data_ptr() - wide.data_ptr()) // S.element_size():][:, :shape[1]] = False
        assert torch.equal(wide[keep], wide_before[keep])
    else:
        assert torch.equal(wide, wide_before), "S was written although out is not S"
        if out is not None:
            assert_close(out.cpu(), out64, low_precision_view(out32, dtype), dtype, "scale * G")
    if mode == "strided_out":
        base = out._base
        assert (base[:, :3] == 9.0).all() and (base[:, 3 + shape[1]:] == 9.0).all()


def check_ncl_grad_row_offset(backend, device, dtype, shape=(67, 45), targets="default"):
    """Chunks of rows with row_offset give the same rows as the whole block."""
    S, _, args, _ = grad_problem(device, dtype, shape, "contiguous", seed=5, targets=targets)
    f, g, lse_row, lse_col, coef_row, coef_col, y, z = args
    be = backend_for(backend, S.device)
    whole = torch.empty_like(S)
    ds_whole = be.ncl_grad_(S, SCALE, *args, out=whole)
    ds_parts = 0.0
    n = shape[0]
    cuts = [0, n * 3 // 10, n * 2 // 3, n]
    for a, b in zip(cuts[:-1], cuts[1:]):
        part = torch.empty_like(S[a:b])
        ds_parts += float(be.ncl_grad_(S[a:b], SCALE, f[a:b], g, lse_row[a:b], lse_col,
                                       coef_row[a:b], coef_col, y[a:b], z, out=part,
                                       row_offset=a))
        assert torch.equal(part, whole[a:b])
    assert abs(ds_parts - float(ds_whole)) <= 1e-5 * max(1.0, abs(float(ds_whole)))


def check_apply_biases(backend, device, dtype, shape, layout, which):
    S, wide = scores_on(device, *shape, dtype, seed=7, layout=layout, mask="lines")
    acc = acc_dtype(dtype)
    f = vector(shape[0], acc, device, 8) if "f" in which else None
    g = vector(shape[1], acc, device, 9) if "g" in which else None
    fc = None if f is None else f.cpu()
    gc = None if g is None else g.cpu()
    Sc = S.cpu()
    r64 = ref.apply_biases(Sc, SCALE, fc, gc)
    r32 = low_precision_view(ref.apply_biases(Sc, SCALE, fc, gc, dtype=torch.float32), dtype)
    wide_before = wide.clone()
    be = backend_for(backend, S.device)
    out = be.apply_biases_(S, SCALE, f, g)
    assert out is S
    assert_close(S.cpu(), r64, r32, dtype, "apply_biases_")
    keep = torch.ones_like(wide, dtype=torch.bool)
    keep[:, (S.data_ptr() - wide.data_ptr()) // S.element_size():][:, :shape[1]] = False
    assert torch.equal(wide[keep], wide_before[keep]), "wrote outside S"
    return S


def check_misaligned_column_vectors(backend, device, dtype):
    """g, lse_col, coef_col and z as views one element past a 16-byte boundary take the
    element-wise column loads; the results are the same bits as with aligned vectors."""
    S, _, args, _ = grad_problem(device, dtype, (67, 1031), "aligned")
    be = backend_for(backend, S.device)

    def shifted(v):  # the same values, at an address that is not 16-byte aligned
        w = torch.empty(v.numel() + 1, dtype=v.dtype, device=v.device)[1:]
        w.copy_(v)
        assert w.data_ptr() % 16 != 0
        return w

    f, g, lse_row, lse_col, coef_row, coef_col, y, z = args
    bad = (f, shifted(g), lse_row, shifted(lse_col), coef_row, shifted(coef_col), y, shifted(z))
    assert torch.equal(be.row_lse(S, SCALE, bad[1]), be.row_lse(S, SCALE, g))
    outs = []
    for a in (args, bad):
        out = torch.empty_like(S)
        outs.append((be.ncl_grad_(S, SCALE, *a, out=out), out))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    A, B = S.clone(), S.clone()
    be.apply_biases_(A, SCALE, f, g)
    be.apply_biases_(B, SCALE, f, bad[1])
    assert torch.equal(A, B)


# ---------------------------------------------------------------- the primitives
# The full dtype x shape x layout matrix (marked ``matrix``: about 4,000 cases with three
# backends, the bulk of a device run's test time; bench/run_device.sh runs them last).
@pytest.mark.matrix
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_row_lse(backend, dtype, shape, layout, with_bias):
    check_row_lse(backend, "cuda", dtype, shape, layout, with_bias)


@pytest.mark.matrix
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_col_lse(backend, dtype, shape, layout, with_bias):
    check_col_lse(backend, "cuda", dtype, shape, layout, with_bias)


@pytest.mark.matrix
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["none", "inplace", "new", "strided_out"])
def test_ncl_grad(backend, dtype, shape, layout, mode):
    check_ncl_grad(backend, "cuda", dtype, shape, layout, mode)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_ncl_grad_row_offset(backend, dtype):
    check_ncl_grad_row_offset(backend, "cuda", dtype)
    check_ncl_grad_row_offset(backend, "cuda", dtype, (900, 67), targets="random")


# The gradient over several row slabs and column tiles of the cuda kernel (at least 384
# rows per slab, 64-256 columns per tile) with targets in all of them.
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", [(900, 67), (1031, 4099)])
@pytest.mark.parametrize("layout", ["contiguous", "unaligned"])
def test_ncl_grad_targets_in_every_slab_and_tile(backend, dtype, shape, layout):
    for mode in ("new", "inplace"):
        check_ncl_grad(backend, "cuda", dtype, shape, layout, mode, targets="random")


# Rows that are whole multiples of every segment of the row kernels (no ragged step).
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", [(5, 256), (2, 4096), (40, 8192)])
@pytest.mark.parametrize("layout", ["contiguous", "unaligned"])
def test_rows_of_whole_segments(backend, dtype, shape, layout):
    check_row_lse(backend, "cuda", dtype, shape, layout, True)
    check_col_lse(backend, "cuda", dtype, shape, layout, True)
    check_ncl_grad(backend, "cuda", dtype, shape, layout, "new")
    check_apply_biases(backend, "cuda", dtype, shape, layout, "fg")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_long_rows_with_the_device_exp(backend, dtype):
    """The device's approximate exp (ex2.approx) over 32768-term sums and a 4096 x 32768
    gradient, against the float64 oracle evaluated on the GPU (docs/math.md section 5)."""
    n, m = 4096, 32768
    S, _ = scores_on("cuda", n, m, dtype, seed=21, mask="scattered")
    be = backend_for(backend, S.device)
    acc = acc_dtype(dtype)
    f, g = vector(n, acc, "cuda", 22, 1.0), vector(m, acc, "cuda", 23, 1.0)
    for got, fn, bias in ((be.row_lse(S, SCALE, g), ref.row_lse, g),
                          (be.col_lse(S, SCALE, f), ref.col_lse, f)):
        assert_close(got, fn(S, SCALE, bias), fn(S, SCALE, bias, dtype=torch.float32), dtype,
                     fn.__name__)
    y, z = ref.default_targets(n, m, device=S.device)
    coef_row = torch.full((n,), 0.5 / n, dtype=acc, device="cuda")
    coef_col = (0.5 / n) * (z >= 0).to(acc)
    lse_row = ref.row_lse(S, SCALE, g, dtype=acc)
    lse_col = ref.col_lse(S, SCALE, f, dtype=acc)
    out = torch.empty_like(S)
    ds = be.ncl_grad_(S, SCALE, f, g, lse_row, lse_col, coef_row, coef_col, y, z, out=out)
    for rd in (torch.float64, torch.float32):
        G = ref.ncl_grad(S, SCALE, f, g, y, z, dtype=rd)
        Sr = S.to(rd)
        if rd == torch.float64:
            G64, ds64 = SCALE * G, (G * Sr.masked_fill(Sr == NEG_INF, 0.0)).sum()
        else:
            G32, ds32 = SCALE * G, (G * Sr.masked_fill(Sr == NEG_INF, 0.0)).sum()
    assert_close(out, G64, low_precision_view(G32, dtype), dtype, "scale * G")
    assert_close(ds, ds64, ds32, dtype, "dscale sum")


@pytest.mark.matrix
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("which", ["", "f", "g", "fg"])
def test_apply_biases(backend, dtype, shape, layout, which):
    check_apply_biases(backend, "cuda", dtype, shape, layout, which)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", kernel_backends())
def test_apply_biases_rounds_like_pytorch(backend, dtype, layout):
    """The logits are rounded (s * x, + f_i, + g_j, to storage) exactly as PyTorch does."""
    ours = check_apply_biases(backend, "cuda", dtype, (67, 1031), layout, "fg")
    torch_be = check_apply_biases("torch", "cuda", dtype, (67, 1031), layout, "fg")
    assert torch.equal(ours, torch_be)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_misaligned_column_vectors(backend, dtype):
    check_misaligned_column_vectors(backend, "cuda", dtype)


@pytest.mark.parametrize("backend", kernel_backends() + auto_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_one_by_one_gradient_is_exactly_zero(backend, dtype):
    """A 1 x 1 block: both softmaxes are exactly 1, so G = 0 and dscale = 0 exactly (the
    logits in the gradient pass must round as in the LSE passes)."""
    S = torch.full((1, 1), 0.37, dtype=dtype, device="cuda")
    be = backend_for(backend, S.device)
    acc = acc_dtype(dtype)
    f = torch.tensor([0.25], dtype=acc, device="cuda")
    g = torch.tensor([-1.5], dtype=acc, device="cuda")
    lse_row, lse_col = be.row_lse(S, SCALE, g), be.col_lse(S, SCALE, f)
    one = torch.ones(1, dtype=acc, device="cuda")
    t = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = torch.empty_like(S)
    ds = be.ncl_grad_(S, SCALE, f, g, lse_row, lse_col, 0.5 * one, 0.5 * one, t, t, out=out)
    assert float(ds) == 0.0 and float(out) == 0.0


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("backend", kernel_backends() + auto_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5000, 7), (1031, 4099)])
def test_deterministic(backend, dtype, shape):
    S, _ = scores_on("cuda", *shape, dtype, seed=11, mask="scattered")
    be = backend_for(backend, S.device)
    _, _, args, _ = grad_problem("cuda", dtype, shape, "contiguous", seed=11)
    runs = [(be.row_lse(S, SCALE, args[1]), be.col_lse(S, SCALE, args[0]),
             be.ncl_grad_(S, SCALE, *args)) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", kernel_backends() + auto_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_outputs(backend, dtype):
    """The written results repeat bitwise too: ncl_grad_ into a new block and in place,
    apply_biases_, over several row slabs and column tiles."""
    S0, _, args, _ = grad_problem("cuda", dtype, (1031, 4099), "contiguous", seed=12)
    be = backend_for(backend, S0.device)
    runs = []
    for _ in range(3):
        new, inplace, biased = torch.empty_like(S0), S0.clone(), S0.clone()
        ds = (be.ncl_grad_(S0, SCALE, *args, out=new), be.ncl_grad_(inplace, SCALE, *args,
                                                                   out=inplace))
        be.apply_biases_(biased, SCALE, args[0], args[1])
        runs.append((*ds, new, inplace, biased))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", kernel_backends() + auto_backends())
def test_no_host_synchronization(backend):
    """No primitive synchronizes the host with the device (torch's sync debug mode raises
    on any synchronizing PyTorch call; the kernels' launchers never synchronize)."""
    S, _, args, _ = grad_problem("cuda", torch.bfloat16, (1031, 67), "unaligned")
    be = backend_for(backend, S.device)
    be.row_lse(S, SCALE, args[1])  # warm-up: first-call lazy initializations may sync
    be.col_lse(S, SCALE, args[0])
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        be.row_lse(S, SCALE, args[1])
        be.col_lse(S, SCALE, args[0])
        be.ncl_grad_(S, SCALE, *args, out=torch.empty_like(S))
        be.ncl_grad_(S, SCALE, *args, out=S)
        be.apply_biases_(S, SCALE, args[0], args[1])
    finally:
        torch.cuda.set_sync_debug_mode(before)


@pytest.mark.parametrize("backend", kernel_backends() + auto_backends())
def test_runs_on_the_callers_stream(backend):
    S, _, args, _ = grad_problem("cuda", torch.float32, (1031, 67), "contiguous")
    be = backend_for(backend, S.device)
    expect = (be.row_lse(S, SCALE, args[1]), be.col_lse(S, SCALE, args[0]),
              be.ncl_grad_(S, SCALE, *args))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # a long kernel first, so that work wrongly put on the default stream would race
        torch.cuda._sleep(10_000_000)
        got = (be.row_lse(S, SCALE, args[1]), be.col_lse(S, SCALE, args[0]),
               be.ncl_grad_(S, SCALE, *args))
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(expect, got):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("backend", kernel_backends())
def test_int64_indexing_past_2_31_elements(backend):
    """65539 x 32777 bfloat16 (2.1e9 elements > 2^31, 4.3 GB): rows past element 2^31 are
    reduced, updated and written correctly (a 32-bit index would wrap)."""
    n, m = 65539, 32777
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    S = torch.empty(n, m, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for a in range(0, n, 4096):
        S[a:a + 4096].normal_(0.0, 0.3, generator=gen)
    S[-1, -5:] = NEG_INF
    be, tb = get_backend(backend, S.device), get_backend("torch", S.device)
    g = torch.randn(m, device="cuda")
    f = torch.randn(n, device="cuda")
    assert rel_err(be.row_lse(S, SCALE, g), tb.row_lse(S, SCALE, g)) < 1e-6
    assert rel_err(be.col_lse(S, SCALE, f), tb.col_lse(S, SCALE, f)) < 1e-6
    tail = S[-3:].clone()
    be.apply_biases_(S, SCALE, f, g)
    expect = tail.float() * SCALE + f[-3:, None] + g
    assert torch.equal(S[-3:], expect.to(torch.bfloat16))


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("backend", gpu_backends() + auto_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (67, 45), (1031, 4099)])
def test_sinkhorn_on_cuda(backend, dtype, shape):
    S = random_scores(*shape, dtype, seed=shape[1], strided=True)
    out = nk.sinkhorn(S.cuda(), 10.0, n_iters=10, tol=None, backend=backend)
    r64 = ref.sinkhorn(S, 10.0, n_iters=10, tol=None)
    r32 = ref.sinkhorn(S, 10.0, n_iters=10, tol=None, dtype=torch.float32)
    assert_close(out.f.cpu(), r64.f, r32.f, dtype, "f")
    assert_close(out.g.cpu(), r64.g, r32.g, dtype, "g")


@pytest.mark.parametrize("backend", gpu_backends() + auto_backends())
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_loss_on_cuda(backend, dtype, inplace):
    S0 = random_scores(131, 77, dtype, seed=3)
    S = S0.cuda().requires_grad_()
    loss = nk.ncl_loss(S, 12.0, backend=backend, inplace_backward=inplace)
    loss.backward()
    (l64, g64), (l32, g32) = oracle_loss_refs(S0, 12.0, dtype)
    assert_close(loss.detach().cpu(), l64, l32, dtype, "loss")
    assert_close(S.grad.cpu(), g64, g32, dtype, "dS")


@pytest.mark.parametrize("backend", gpu_backends() + auto_backends())
def test_embeddings_and_retrieval_on_cuda(backend):
    x, y = random_embeddings(300, 200, 64, torch.float32, seed=4)
    loss = nk.ncl_loss_embeddings(x.cuda(), y.cuda(), 20.0, backend=backend)
    assert rel_err(loss.cpu(), ref.ncl_loss_embeddings(x, y, 20.0)) < 1e-5
    bias = nk.retrieval.gallery_bias(x.cuda(), y.cuda(), 20.0, n_iters=20, tol=None,
                                     backend=backend)
    assert rel_err(bias.cpu(), ref.gallery_bias(x, y, 20.0, n_iters=20, tol=None)) < 1e-5
    targets = torch.arange(200)
    ranks = nk.retrieval.ranks(y.cuda(), x.cuda(), targets.cuda(), 20.0)
    assert torch.equal(ranks.cpu(), ref.ranks(ref.scores(y, x, 20.0), targets))
