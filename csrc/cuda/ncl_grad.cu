// ncl_grad on the GPU: G = dloss/dlogits element by element (common/ncl_math.h's
// ncl_grad_elem), written as scale * G into `out` (which may be S itself) and reduced to
// dscale_sum = sum_ij G_ij S_ij over the unmasked entries.
//
// Rows are walked like row_lse (a warp per short row, a block per long row, grid-stride).
// The sum is deterministic: each thread accumulates its elements in a fixed order, each
// block reduces its threads in a fixed tree (one partial per block, in a workspace sized
// by ncl_grad_blocks), and one final block adds the partials in block order. No atomics.
#include <cstdint>

#include <cuda_runtime.h>

#include "common/ncl_math.h"
#include "cuda/device_utils.cuh"
#include "cuda/primitives.cuh"

namespace ncl {
namespace cuda {
namespace {

// Grid cap: it bounds the partials workspace; 2048 blocks of 256 threads still fill an
// H200 (132 SMs x 8 resident blocks) about twice.
constexpr int64_t kMaxBlocks = 2048;

template <typename Acc>
struct GradArgs {
  Acc scale;
  const Acc *f, *g, *lse_row, *lse_col, *coef_row, *coef_col;
  const int64_t *y, *z;
  int64_t row_offset;  // global index of row 0 (for the column targets z)
  bool cols_aligned;   // g, lse_col, coef_col and z all 16-byte aligned (load_cols)
};

// One element: returns scale * G_ij and adds G_ij * S_ij to ds (masked entries add 0:
// their logit does not depend on the scale).
template <typename Acc_>
struct GradElem {
  using Acc = Acc_;
  const GradArgs<Acc> a;  // by value: a reference to a kernel parameter forces a local copy
  Acc f_i, lse_row_i, crow_i;
  int64_t y_i, i_global;
  Acc& ds;

  __device__ __forceinline__ Acc elem(int64_t j, Acc x, Acc g_j, Acc lse_col_j, Acc ccol_j,
                                      int64_t z_j) {
    // l rounded on its own (mul_rn), as in row_lse/col_lse, so that l + g_j and l + f_i
    // below equal the values those kernels pushed (a softmax that must be 1 is exactly 1)
    const Acc l = mul_rn(a.scale, x);
    const Acc G = ncl_grad_elem(l, f_i, g_j, lse_row_i, lse_col_j, j == y_i, i_global == z_j,
                                crow_i, ccol_j);
    if (x != neg_inf<Acc>()) ds += G * x;
    return G * a.scale;
  }
  __device__ __forceinline__ Acc operator()(int64_t j, Acc x) {
    return elem(j, x, a.g[j], a.lse_col[j], a.coef_col[j], a.z[j]);
  }
  template <int K>
  __device__ __forceinline__ void vec(int64_t j0, Acc (&x)[K]) {
    Acc gv[K], lc[K], cc[K];
    int64_t zv[K];
    load_cols(a.g, j0, a.cols_aligned, gv);
    load_cols(a.lse_col, j0, a.cols_aligned, lc);
    load_cols(a.coef_col, j0, a.cols_aligned, cc);
    load_cols(a.z, j0, a.cols_aligned, zv);
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = elem(j0 + k, x[k], gv[k], lc[k], cc[k], zv[k]);
  }
};

// S and out may alias (in place), hence no __restrict__ on them.
template <typename Storage, typename Acc, int WARPS_PER_ROW, bool VEC, bool WRITE>
__global__ void __launch_bounds__(kThreads)
ncl_grad_kernel(const Storage* S, Storage* out, int64_t n, int64_t m, int64_t row_stride,
                int64_t out_row_stride, GradArgs<Acc> a, Acc* __restrict__ partials) {
  constexpr int kRowsPerBlock = kWarps / WARPS_PER_ROW;
  constexpr int kGroup = 32 * WARPS_PER_ROW;
  const int warp = threadIdx.x / 32;
  const int t = threadIdx.x % kGroup;

  Acc ds = Acc(0);
  for (int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock; row0 < n;
       row0 += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t i = row0 + warp / WARPS_PER_ROW;
    if (i >= n) continue;
    GradElem<Acc> fn{a, a.f[i], a.lse_row[i], a.coef_row[i], a.y[i], a.row_offset + i, ds};
    if (WRITE)
      update_row<Storage, kGroup, VEC>(S + i * row_stride, out + i * out_row_stride, m, t, fn);
    else
      read_row<Storage, kGroup, VEC>(S + i * row_stride, m, t, fn);
  }
  const Acc total = block_sum(ds);  // every thread gets here (no early return above)
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// One block: *ds = sum of partials[0 .. count) in a fixed order (0 when count == 0).
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
sum_partials_kernel(const Acc* __restrict__ partials, int64_t count, Acc* __restrict__ ds) {
  Acc x = Acc(0);
  for (int64_t b = threadIdx.x; b < count; b += kThreads) x += partials[b];
  const Acc total = block_sum(x);
  if (threadIdx.x == 0) *ds = total;
}

template <typename Storage, typename Acc>
cudaError_t launch(const GradPtrs& p, int64_t n, int64_t m, int64_t row_stride,
                   int64_t out_row_stride, double scale, int64_t row_offset, int64_t capacity,
                   cudaStream_t stream) {
  const GradArgs<Acc> a{Acc(scale),
                        static_cast<const Acc*>(p.f), static_cast<const Acc*>(p.g),
                        static_cast<const Acc*>(p.lse_row), static_cast<const Acc*>(p.lse_col),
                        static_cast<const Acc*>(p.coef_row), static_cast<const Acc*>(p.coef_col),
                        p.y, p.z, row_offset,
                        aligned16(p.g) && aligned16(p.lse_col) && aligned16(p.coef_col) &&
                            aligned16(p.z)};
  Acc* partials = static_cast<Acc*>(p.work);
  Acc* ds = static_cast<Acc*>(p.ds);
  int64_t count = 0;
  if (n > 0 && m > 0) {
    const RowGrid rg = row_grid(n, m, kMaxBlocks);
    if (int64_t(rg.blocks) > capacity) return cudaErrorInvalidValue;
    count = rg.blocks;
    const Storage* s = static_cast<const Storage*>(p.S);
    Storage* o = static_cast<Storage*>(p.out);
    const bool write = o != nullptr;
    const bool vec = rows_aligned16<Storage>(p.S, row_stride) &&
                     (!write || rows_aligned16<Storage>(p.out, out_row_stride));
#define NCL_LAUNCH(WPR, VEC, WRITE)                                                   \
  e = launch_kernel(ncl_grad_kernel<Storage, Acc, WPR, VEC, WRITE>, dim3(rg.blocks),     \
                    dim3(kThreads), stream, s, o, n, m, row_stride, out_row_stride, a,     \
                    partials)
#define NCL_LAUNCH_W(WPR, VEC) \
  if (write) NCL_LAUNCH(WPR, VEC, true); else NCL_LAUNCH(WPR, VEC, false)
    cudaError_t e;
    if (rg.block_per_row) {
      if (vec) { NCL_LAUNCH_W(kWarps, true); } else { NCL_LAUNCH_W(kWarps, false); }
    } else {
      if (vec) { NCL_LAUNCH_W(1, true); } else { NCL_LAUNCH_W(1, false); }
    }
#undef NCL_LAUNCH_W
#undef NCL_LAUNCH
    if (e != cudaSuccess) return e;
  }
  return launch_kernel(sum_partials_kernel<Acc>, dim3(1), dim3(kThreads), stream,
                       static_cast<const Acc*>(partials), count, ds);
}

}  // namespace

int64_t ncl_grad_blocks(int64_t n, int64_t m) { return row_grid(n, m, kMaxBlocks).blocks; }

cudaError_t ncl_grad_cuda(const GradPtrs& p, int64_t n, int64_t m, int64_t row_stride,
                          int64_t out_row_stride, int dtype, double scale, int64_t row_offset,
                          int64_t work_capacity, cudaStream_t stream) {
  NCL_DTYPE_SWITCH(dtype, launch, return cudaErrorInvalidValue,
                   p, n, m, row_stride, out_row_stride, scale, row_offset, work_capacity, stream)
}

}  // namespace cuda
}  // namespace ncl
