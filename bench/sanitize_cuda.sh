#!/usr/bin/env bash
# compute-sanitizer on a small case of every CUDA primitive: memcheck (out-of-bounds and
# misaligned accesses) and racecheck (shared-memory hazards) by default; set
# TOOLS="memcheck racecheck initcheck synccheck" for more. Needs a GPU, the package built
# with _C_cuda, and compute-sanitizer (PATH, /usr/local/cuda*/bin or $COMPUTE_SANITIZER).
#
#   bash bench/sanitize_cuda.sh            exit 0: clean; 1: a tool reported an error or
#                                          a result was wrong; 77: cannot run here (skip)
#
# The case is small on purpose (instrumented kernels run 10-100x slower) but takes every
# code path: each storage dtype; aligned rows (16-byte vectors) and misaligned views
# (scalar paths); rows shorter and longer than 4096 (warp / block per row), rows of whole
# segments (no ragged step) and row counts that are not a multiple of 4 (a partial group);
# col_lse with one and with many row slabs; ncl_grad_ without output, in place and into a
# strided block, over several row slabs and column tiles with targets in all of them; a
# misaligned g (element-wise g loads beside 16-byte S loads).
# Every result is also compared with the PyTorch backend on the same GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

CS=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
if [ -z "$CS" ]; then
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    if [ -x "$c" ]; then CS=$c; break; fi
  done
fi
if [ -z "$CS" ]; then
  echo "SKIP: compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)"
  exit 77
fi
PY=${PYTHON:-python}
if ! "$PY" -c 'import ncl_kernels as nk, sys; sys.exit(not nk.backends()["cuda"]["usable"])'; then
  echo "SKIP: the cuda backend is not usable here:"
  "$PY" -c 'import ncl_kernels as nk; print(nk.backends()["cuda"]["why"])'
  exit 77
fi

case_py=$(mktemp --suffix=.py)
trap 'rm -f "$case_py"' EXIT
cat > "$case_py" <<'PY'
import torch

from ncl_kernels.backends import get

dev = torch.device("cuda")
cu, tb = get("cuda", dev), get("torch", dev)
acc_of = {torch.float64: torch.float64}
gen = torch.Generator(device=dev).manual_seed(0)


def check(a, b, what, tol):
    a, b = a.double(), b.double()
    same_inf = torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(b)
    err = float((a[fin] - b[fin]).abs().max()) if fin.any() else 0.0
    assert same_inf and err <= tol * (1 + float(b[fin].abs().max() if fin.any() else 0)), \
        f"{what}: max error {err:.3g}"


for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    acc = acc_of.get(dtype, torch.float32)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    for n, m in ((7, 45), (300, 7), (3, 4099), (5, 256), (900, 67), (1100, 300)):
        for off, pad in ((0, 8), (1, 13)):  # aligned rows; misaligned base and row stride
            wide = (torch.randn(n, m + pad, device=dev, generator=gen) * 0.3).to(dtype)
            S = wide[:, off:off + m]
            S[0, : m // 2] = float("-inf")
            f = torch.randn(n, device=dev, generator=gen).to(acc)
            g = torch.randn(m, device=dev, generator=gen).to(acc)
            check(cu.row_lse(S, 3.0, g), tb.row_lse(S, 3.0, g), "row_lse", tol)
            check(cu.col_lse(S, 3.0, f), tb.col_lse(S, 3.0, f), "col_lse", tol)
            g_mis = torch.empty(m + 1, dtype=acc, device=dev)[1:]  # not 16-byte aligned
            g_mis.copy_(g)
            check(cu.row_lse(S, 3.0, g_mis), tb.row_lse(S, 3.0, g), "row_lse (misaligned g)", tol)
            lr, lc = tb.row_lse(S, 3.0, g), tb.col_lse(S, 3.0, f)
            y = torch.randint(0, m, (n,), device=dev, generator=gen)  # targets anywhere
            z = torch.randint(0, n, (m,), device=dev, generator=gen)
            cr = torch.full((n,), 0.5 / n, dtype=acc, device=dev)
            cc = torch.full((m,), 0.5 / m, dtype=acc, device=dev)
            args = (f, g, lr, lc, cr, cc, y, z)
            ref_out = torch.empty_like(S)
            ds_ref = tb.ncl_grad_(S, 3.0, *args, out=ref_out)
            check(cu.ncl_grad_(S, 3.0, *args), ds_ref, "ncl_grad_ (sum only)", tol)
            strided = torch.empty(n, m + 3, dtype=dtype, device=dev)[:, 2:2 + m]
            check(cu.ncl_grad_(S, 3.0, *args, out=strided), ds_ref, "ncl_grad_ (out)", tol)
            check(strided, ref_out, "ncl_grad_ out", tol)
            T = S.clone()
            check(cu.ncl_grad_(T, 3.0, *args, out=T), ds_ref, "ncl_grad_ (in place)", tol)
            check(T, ref_out, "ncl_grad_ in place", tol)
            A, B = S.clone(), S.clone()
            check(cu.apply_biases_(A, 3.0, f, g), tb.apply_biases_(B, 3.0, f, g),
                  "apply_biases_", tol)
            A = S.clone()
            check(cu.apply_biases_(A, 3.0, f, g_mis), B, "apply_biases_ (misaligned g)", tol)
torch.cuda.synchronize()
print("case ok")
PY

status=0
for tool in ${TOOLS:-memcheck racecheck}; do
  echo "== compute-sanitizer --tool $tool"
  if ! "$CS" --tool "$tool" --error-exitcode 1 "$PY" "$case_py"; then
    echo "FAIL: $tool"
    status=1
  fi
done
exit $status
