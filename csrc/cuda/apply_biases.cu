// apply_biases_ on the GPU: S <- scale * S + f_i + g_j in place, rounded back to S's
// storage type. Rows are walked like row_lse (rows_per_group() rows side by side per
// warp, or per block for long rows, grid-stride; 16-byte streaming loads and stores when the
// rows are aligned), so each chunk of g is read once for several rows.
#include <cstdint>

#include <cuda_runtime.h>

#include "common/ncl_math.h"
#include "cuda/device_utils.cuh"
#include "cuda/primitives.cuh"

namespace ncl {
namespace cuda {
namespace {

constexpr int64_t kMaxBlocks = 1 << 16;

template <typename Storage, typename Acc, int WARPS_PER_GROUP, bool VEC>
__global__ void __launch_bounds__(kThreads, stream_min_blocks<Storage, VEC>())
apply_biases_kernel(Storage* __restrict__ S, int64_t n, int64_t m, int64_t row_stride,
                    Acc scale, const Acc* __restrict__ f, const Acc* __restrict__ g,
                    bool g_aligned) {
  constexpr int kN = Vec<Storage>::kN;
  constexpr int R = rows_per_group<Storage>();
  constexpr int kGroups = kWarps / WARPS_PER_GROUP;
  constexpr int G = 32 * WARPS_PER_GROUP;
  const int t = threadIdx.x % G;
  const bool has_f = f != nullptr, has_g = g != nullptr;
  for (int64_t row0 = int64_t(blockIdx.x) * kGroups * R; row0 < n;
       row0 += int64_t(gridDim.x) * kGroups * R) {
    const int64_t i0 = row0 + int64_t(threadIdx.x / G) * R;
    if (i0 >= n) continue;  // no barrier in this kernel
    const int nr = n - i0 < R ? int(n - i0) : R;
    Storage* rows[R];
    Acc fi[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      rows[r] = S + (r < nr ? i0 + r : i0) * row_stride;
      fi[r] = has_f && r < nr ? f[i0 + r] : Acc(0);
    }
    for (int64_t base = 0; base < m; base += int64_t(G) * kN) {
      Vec<Storage> x[R];
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r < nr) x[r] = load_chunk<VEC, G>(rows[r], base, t, m);
      Acc gv[kN];
      load_cols<VEC, G>(g, base, t, m, g_aligned, gv);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r >= nr) continue;
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          // the same roundings and order as the PyTorch backend: (s * x + f_i) + g_j
          Acc v = mul_rn(scale, load_acc(x[r].e[k]));
          if (has_f) v = add_rn(v, fi[r]);
          if (has_g) v = add_rn(v, gv[k]);
          x[r].e[k] = store_as<Storage>(v);
        }
        store_chunk<VEC, G>(rows[r], base, t, m, x[r]);
      }
    }
  }
}

template <typename Storage, typename Acc>
cudaError_t launch(void* S, int64_t n, int64_t m, int64_t row_stride, double scale,
                   const void* f, const void* g, cudaStream_t stream) {
  Storage* s = static_cast<Storage*>(S);
  const Acc* fp = static_cast<const Acc*>(f);
  const Acc* gp = static_cast<const Acc*>(g);
  const RowGrid rg = row_grid<Storage>(n, m, kMaxBlocks);
  return with_flags(
      [&](auto block_per_row, auto vec) {
        return launch_kernel(
            apply_biases_kernel<Storage, Acc, decltype(block_per_row)::value ? kWarps : 1,
                                decltype(vec)::value>,
            dim3(rg.blocks), dim3(kThreads), stream, s, n, m, row_stride, Acc(scale), fp, gp,
            aligned16(gp));
      },
      rg.block_per_row, rows_aligned16<Storage>(S, row_stride));
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
