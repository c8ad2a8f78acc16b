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

template <typename Storage, typename Acc, int WARPS_PER_GROUP, bool VEC, bool GVEC>
__global__ void __launch_bounds__(kThreads, stream_min_blocks<Storage, VEC>())
apply_biases_kernel(Storage* __restrict__ S, int64_t n, int64_t m, int64_t row_stride,
                    Acc scale, const Acc* __restrict__ f, const Acc* __restrict__ g) {
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
    // rows first + r (r < NR) side by side
    const auto run = [&](auto nr, int64_t first) {
      constexpr int NR = decltype(nr)::value;
      Storage* rows[NR];
      Acc fi[NR];
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        rows[r] = S + (first + r) * row_stride;
        fi[r] = has_f ? f[first + r] : Acc(0);
      }
      walk_row<G, kN>(m, [&](auto whole, int64_t base) {
        constexpr bool W = decltype(whole)::value;
        Vec<Storage> x[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) x[r] = load_chunk<VEC, W, G>(rows[r], base, t, m);
        Acc gv[kN];
        load_cols<VEC, GVEC, W, G>(g, base, t, m, gv);
#pragma unroll
        for (int r = 0; r < NR; ++r) {
          Acc v[kN];
          to_acc(x[r], v);
#pragma unroll
          for (int k = 0; k < kN; ++k) {
            // the same roundings and order as the PyTorch backend: (s * x + f_i) + g_j
            v[k] = mul_rn(scale, v[k]);
            if (has_f) v[k] = add_rn(v[k], fi[r]);
            if (has_g) v[k] = add_rn(v[k], gv[k]);
          }
          from_acc(v, x[r]);
          store_chunk<VEC, W, G>(rows[r], base, t, m, x[r]);
        }
      });
    };
    if (i0 + R <= n) {
      run(std::integral_constant<int, R>{}, i0);
    } else {  // the last rows, one at a time (no row may be updated twice)
      for (int64_t i = i0; i < n; ++i) run(std::integral_constant<int, 1>{}, i);
    }
  }
}

template <typename Storage, typename Acc>
cudaError_t launch(void* S, int64_t n, int64_t m, int64_t row_stride, double scale,
                   const void* f, const void* g, cudaStream_t stream) {
  Storage* s = static_cast<Storage*>(S);
  const Acc* fp = static_cast<const Acc*>(f);
  const Acc* gp = static_cast<const Acc*>(g);
  return launch_rows<Storage>(
      [](auto wpg, auto vec, auto gvec) {
        return apply_biases_kernel<Storage, Acc, decltype(wpg)::value, decltype(vec)::value,
                                   decltype(gvec)::value>;
      },
      S, n, m, row_stride, g, stream, s, n, m, row_stride, Acc(scale), fp, gp);
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
