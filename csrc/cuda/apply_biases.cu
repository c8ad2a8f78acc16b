// apply_biases_ on the GPU: S <- scale * S + f_i + g_j in place, rounded back to S's
// storage type. Rows are walked like row_lse (a warp per short row, a block per long row,
// grid-stride, 16-byte loads and stores when the rows are aligned).
#include <cstdint>

#include <cuda_runtime.h>

#include "common/ncl_math.h"
#include "cuda/device_utils.cuh"
#include "cuda/primitives.cuh"

namespace ncl {
namespace cuda {
namespace {

constexpr int64_t kMaxBlocks = 1 << 16;

template <typename Acc_>
struct Bias {
  using Acc = Acc_;
  Acc scale, f_i;
  bool has_f;
  const Acc* g;
  bool g_aligned;
  // the same roundings and order as the PyTorch backend: (s * x + f_i) + g_j
  __device__ __forceinline__ Acc row_part(Acc x) const {
    const Acc l = mul_rn(scale, x);
    return has_f ? add_rn(l, f_i) : l;
  }
  __device__ __forceinline__ Acc operator()(int64_t j, Acc x) const {
    const Acc l = row_part(x);
    return g ? add_rn(l, g[j]) : l;
  }
  template <int K>
  __device__ __forceinline__ void vec(int64_t j0, Acc (&x)[K]) const {
    if (g) {
      Acc gv[K];
      load_cols(g, j0, g_aligned, gv);
#pragma unroll
      for (int k = 0; k < K; ++k) x[k] = add_rn(row_part(x[k]), gv[k]);
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) x[k] = row_part(x[k]);
    }
  }
};

template <typename Storage, typename Acc, int WARPS_PER_ROW, bool VEC>
__global__ void __launch_bounds__(kThreads)
apply_biases_kernel(Storage* __restrict__ S, int64_t n, int64_t m, int64_t row_stride,
                    Acc scale, const Acc* __restrict__ f, const Acc* __restrict__ g,
                    bool g_aligned) {
  constexpr int kRowsPerBlock = kWarps / WARPS_PER_ROW;
  constexpr int kGroup = 32 * WARPS_PER_ROW;
  const int warp = threadIdx.x / 32;
  const int t = threadIdx.x % kGroup;
  for (int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock; row0 < n;
       row0 += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t i = row0 + warp / WARPS_PER_ROW;
    if (i >= n) continue;
    Bias<Acc> fn{scale, f ? f[i] : Acc(0), f != nullptr, g, g_aligned};
    Storage* row = S + i * row_stride;
    update_row<Storage, kGroup, VEC>(row, row, m, t, fn);
  }
}

template <typename Storage, typename Acc>
cudaError_t launch(void* S, int64_t n, int64_t m, int64_t row_stride, double scale,
                   const void* f, const void* g, cudaStream_t stream) {
  Storage* s = static_cast<Storage*>(S);
  const Acc* fp = static_cast<const Acc*>(f);
  const Acc* gp = static_cast<const Acc*>(g);
  const bool vec = rows_aligned16<Storage>(S, row_stride);
  const RowGrid rg = row_grid(n, m, kMaxBlocks);
#define NCL_LAUNCH(WPR, VEC)                                                        \
  return launch_kernel(apply_biases_kernel<Storage, Acc, WPR, VEC>, dim3(rg.blocks),   \
                       dim3(kThreads), stream, s, n, m, row_stride, Acc(scale), fp, gp,    \
                       aligned16(gp))
  if (rg.block_per_row) {
    if (vec) NCL_LAUNCH(kWarps, true); else NCL_LAUNCH(kWarps, false);
  } else {
    if (vec) NCL_LAUNCH(1, true); else NCL_LAUNCH(1, false);
  }
#undef NCL_LAUNCH
}

}  // namespace

cudaError_t apply_biases_cuda(void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                              double scale, const void* f, const void* g, cudaStream_t stream) {
  if (n == 0 || m == 0) return cudaSuccess;
  NCL_DTYPE_SWITCH(dtype, launch, return cudaErrorInvalidValue,
                   S, n, m, row_stride, scale, f, g, stream)
}

}  // namespace cuda
}  // namespace ncl
