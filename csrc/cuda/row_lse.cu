// row_lse on the GPU: each row is reduced by one warp (short rows) or one 256-thread block
// (rows of kBlockPerRowMin elements or more), with the online LSE state of
// common/ncl_math.h per thread, then a warp-shuffle merge of the (max, sum) pairs and, for
// a block per row, a fixed-order merge of the warp results. Deterministic.
#include <cstdint>

#include <cuda_runtime.h>

#include "common/ncl_math.h"
#include "cuda/device_utils.cuh"
#include "cuda/primitives.cuh"

namespace ncl {
namespace cuda {
namespace {

// Grid cap; more rows are covered by the grid-stride loop (also far below the 2^31 - 1
// gridDim.x limit for any int64 n).
constexpr int64_t kMaxBlocks = 1 << 16;

template <typename Acc_>
struct PushLogit {  // st.push(scale * x + g[j]) with the logit rounded as everywhere else
  using Acc = Acc_;
  LseState<Acc>& st;
  Acc scale;
  const Acc* g;
  bool g_aligned;
  __device__ __forceinline__ void operator()(int64_t j, Acc x) {
    const Acc l = mul_rn(scale, x);
    st.push(g ? add_rn(l, g[j]) : l);
  }
  template <int K>
  __device__ __forceinline__ void vec(int64_t j0, Acc (&x)[K]) {
    if (g) {
      Acc gv[K];
      load_cols(g, j0, g_aligned, gv);
#pragma unroll
      for (int k = 0; k < K; ++k) st.push(add_rn(mul_rn(scale, x[k]), gv[k]));
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) st.push(mul_rn(scale, x[k]));
    }
  }
};

// WARPS_PER_ROW: 1 (a warp per row, kWarps rows per block) or kWarps (a block per row).
// VEC: rows are 16-byte aligned (base pointer and row stride).
template <typename Storage, typename Acc, int WARPS_PER_ROW, bool VEC>
__global__ void __launch_bounds__(kThreads)
row_lse_kernel(const Storage* __restrict__ S, int64_t n, int64_t m, int64_t row_stride,
               Acc scale, const Acc* __restrict__ g, bool g_aligned, Acc* __restrict__ out) {
  static_assert(WARPS_PER_ROW == 1 || WARPS_PER_ROW == kWarps, "warp or block per row");
  constexpr int kRowsPerBlock = kWarps / WARPS_PER_ROW;
  constexpr int kGroup = 32 * WARPS_PER_ROW;  // threads reducing one row
  __shared__ Acc sm_m[kWarps], sm_s[kWarps];   // block per row only

  const int warp = threadIdx.x / 32;
  const int t = threadIdx.x % kGroup;  // thread index within the row's group

  // Grid-stride over groups of rows. The loop bounds depend on blockIdx only, so the
  // __syncthreads below are reached by every thread of the block.
  for (int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock; row0 < n;
       row0 += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t i = row0 + warp / WARPS_PER_ROW;
    LseState<Acc> st;
    if (i < n) {
      PushLogit<Acc> fn{st, scale, g, g_aligned};
      read_row<Storage, kGroup, VEC>(S + i * row_stride, m, t, fn);
    }
    st = warp_merge(st);  // every lane takes part, also those past the last row

    if (WARPS_PER_ROW > 1) {
      if (threadIdx.x % 32 == 0) {
        sm_m[warp] = st.m;
        sm_s[warp] = st.s;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        st = LseState<Acc>(sm_m[0], sm_s[0]);
        for (int w = 1; w < kWarps; ++w) st.merge(LseState<Acc>(sm_m[w], sm_s[w]));
      }
      __syncthreads();  // the shared slots are reused by the next row
    }
    if (t == 0 && i < n) out[i] = st.finish();
  }
}

template <typename Storage, typename Acc>
cudaError_t launch(const void* S, int64_t n, int64_t m, int64_t row_stride, double scale,
                   const void* g, void* out, cudaStream_t stream) {
  const Storage* s = static_cast<const Storage*>(S);
  const Acc* gp = static_cast<const Acc*>(g);
  Acc* o = static_cast<Acc*>(out);
  const Acc sc = Acc(scale);
  const bool vec = rows_aligned16<Storage>(S, row_stride);
  const RowGrid rg = row_grid(n, m, kMaxBlocks);

#define NCL_LAUNCH(WPR, VEC)                                                      \
  return launch_kernel(row_lse_kernel<Storage, Acc, WPR, VEC>, dim3(rg.blocks),    \
                       dim3(kThreads), stream, s, n, m, row_stride, sc, gp, aligned16(gp), o)
  if (rg.block_per_row) {
    if (vec) NCL_LAUNCH(kWarps, true); else NCL_LAUNCH(kWarps, false);
  } else {
    if (vec) NCL_LAUNCH(1, true); else NCL_LAUNCH(1, false);
  }
#undef NCL_LAUNCH
}

}  // namespace

cudaError_t row_lse_cuda(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                         double scale, const void* g, void* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;  // an empty grid is a launch error; nothing to do anyway
  NCL_DTYPE_SWITCH(dtype, launch, return cudaErrorInvalidValue,
                   S, n, m, row_stride, scale, g, out, stream)
}

}  // namespace cuda
}  // namespace ncl
