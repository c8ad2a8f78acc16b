// CUDA primitives: launchers callable from plain C++ (bindings_cuda.cpp is compiled by the
// host compiler, so this header must not need nvcc — only cuda_runtime_api.h).
//
// Same conventions as cpu/primitives.h: S is an n x m block of scores, column stride 1,
// row stride `row_stride` elements, storage `dtype` (ncl::DType). Logits scale * S are
// formed in float (double for F64), and every vector (f, g, LSEs, coefficients, outputs)
// is float (double for F64); `scale` is passed as a double and rounded to that type. exp is
// the special-function unit's ex2.approx for float (2 ulp; device_utils.cuh, fast_exp),
// the correctly rounded one for double. All
// pointers are device pointers. Launchers enqueue on `stream`, never synchronize, and
// return the first launch error (cudaGetLastError; faults inside a kernel surface at the
// next synchronizing call). cudaErrorInvalidValue: unknown dtype or inconsistent sizes.
// Every result is deterministic: fixed reduction orders, no atomics.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace ncl {
namespace cuda {

// out[i] = log sum_j exp(scale * S[i, j] + g[j]);  g == nullptr means g = 0.
cudaError_t row_lse_cuda(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                         double scale, const void* g, void* out, cudaStream_t stream);

// out[j] = log sum_i exp(scale * S[i, j] + f[i]);  f == nullptr means f = 0.
// Rows are split into n_slabs slabs (use col_lse_slabs); with n_slabs > 1, `work` holds
// 2 * n_slabs * m accumulator values (partial max and sum per slab and column).
int64_t col_lse_slabs(int64_t n, int64_t m, int dtype, int sm_count);
cudaError_t col_lse_cuda(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                         double scale, const void* f, void* out, void* work, int64_t n_slabs,
                         cudaStream_t stream);

// The gradient pass (docs/math.md section 3; ncl_kernels/backends/base.py Backend.ncl_grad_):
//   G_ij = coef_row_i (exp(l + g_j - lse_row_i) - [j == y_i])
//        + coef_col_j (exp(l + f_i - lse_col_j) - [row_offset + i == z_j]),  l = scale S_ij
//   *ds = sum_ij G_ij S_ij over entries with S_ij != -inf;  out[i, j] = scale * G_ij
// out == nullptr: only *ds; out == S: in place; otherwise out has S's storage type and its
// own row stride. y (n) and z (m) are int64 (-1 or out of range: no target). `work` holds
// ncl_grad_blocks(n, m) accumulator values (per-block partial sums of a grid of at most
// 2048 blocks, whatever the device); work_capacity is its length. f, g, lse_row, lse_col,
// coef_row, coef_col, y, z, ds and work are required.
struct GradPtrs {
  const void* S;
  void* out;
  const void *f, *g, *lse_row, *lse_col, *coef_row, *coef_col;
  const int64_t *y, *z;
  void* ds;
  void* work;
};
int64_t ncl_grad_blocks(int64_t n, int64_t m);
cudaError_t ncl_grad_cuda(const GradPtrs& p, int64_t n, int64_t m, int64_t row_stride,
                          int64_t out_row_stride, int dtype, double scale, int64_t row_offset,
                          int64_t work_capacity, cudaStream_t stream);

// S[i, j] <- scale * S[i, j] + f[i] + g[j] in place (rounded to the storage type);
// f or g == nullptr means 0.
cudaError_t apply_biases_cuda(void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                              double scale, const void* f, const void* g, cudaStream_t stream);

}  // namespace cuda
}  // namespace ncl
