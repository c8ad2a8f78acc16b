// row_lse on the GPU: out[i] = log sum_j exp(scale * S[i, j] + g[j]).
//
// A group of threads (one warp for short rows, the whole 256-thread block for rows of
// kBlockPerRowMin elements or more) reduces rows_per_group() rows side by side: per step
// each thread loads one 16-byte chunk of every row (as many loads in flight) and the
// matching chunk of g once, and folds each row's chunk into that row's (max, sum) state
// with push_tile (one tile max, one rescale, ex2 per element, no branch). The states of a
// row are then merged across the group in a fixed order: a warp butterfly, and for a
// block per row the warps in warp order through shared memory. Deterministic.
#include <cstdint>

#include <cuda_runtime.h>

#include "common/ncl_math.h"
#include "cuda/device_utils.cuh"
#include "cuda/primitives.cuh"

namespace ncl {
namespace cuda {
namespace {

// WARPS_PER_GROUP: 1 (a warp per group of rows, kWarps groups per block) or kWarps (a
// block per group). VEC: rows are 16-byte aligned (base pointer and row stride). GVEC: so
// is g (or it is null), read in 16-byte chunks too.
template <typename Storage, typename Acc, int WARPS_PER_GROUP, bool VEC, bool GVEC>
__global__ void __launch_bounds__(kThreads, stream_min_blocks<Storage, VEC>())
row_lse_kernel(const Storage* __restrict__ S, int64_t n, int64_t m, int64_t row_stride,
               Acc scale, const Acc* __restrict__ g, Acc* __restrict__ out) {
  static_assert(WARPS_PER_GROUP == 1 || WARPS_PER_GROUP == kWarps, "warp or block per row");
  constexpr int kN = Vec<Storage>::kN;
  constexpr int R = rows_per_group<Storage>();
  constexpr int kGroups = kWarps / WARPS_PER_GROUP;  // groups per block
  constexpr int G = 32 * WARPS_PER_GROUP;            // threads per group
  __shared__ Acc sm_m[R][kWarps], sm_s[R][kWarps];   // block per row only

  const int warp = threadIdx.x / 32;
  const int t = threadIdx.x % G;  // thread index within the group

  // Grid-stride over blocks of rows. The loop bounds depend on blockIdx only, so the
  // barriers below are reached by every thread of the block.
  for (int64_t row0 = int64_t(blockIdx.x) * kGroups * R; row0 < n;
       row0 += int64_t(gridDim.x) * kGroups * R) {
    const int64_t i0 = row0 + int64_t(warp / WARPS_PER_GROUP) * R;
    // rows past the last one re-read the last row (their results are dropped), so that
    // the loads stay unconditional
    const Storage* rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = S + (i0 + r < n ? i0 + r : n - 1) * row_stride;

    LseState<Acc> st[R];
    if (i0 < n) {  // uniform over the group
      walk_row<G, kN>(m, [&](auto whole, int64_t base) {
        constexpr bool W = decltype(whole)::value;
        Vec<Storage> x[R];
#pragma unroll
        for (int r = 0; r < R; ++r) x[r] = load_chunk<VEC, W, G>(rows[r], base, t, m);
        Acc gv[kN];
        load_cols<VEC, GVEC, W, G>(g, base, t, m, gv);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          Acc l[kN];
          to_acc(x[r], l);
#pragma unroll
          for (int k = 0; k < kN; ++k) l[k] = add_rn(mul_rn(scale, l[k]), gv[k]);
          push_tile(st[r], l);
        }
      });
    }

    // Every lane takes part in the shuffles, also those of groups past the last row.
#pragma unroll
    for (int r = 0; r < R; ++r) st[r] = warp_merge(st[r]);
    if (WARPS_PER_GROUP > 1) {
      if (threadIdx.x % 32 == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          sm_m[r][warp] = st[r].m;
          sm_s[r][warp] = st[r].s;
        }
      }
      __syncthreads();
      const int r = threadIdx.x;  // thread r finishes row i0 + r
      if (r < R && i0 + r < n) {
        LseState<Acc> acc(sm_m[r][0], sm_s[r][0]);
        for (int w = 1; w < kWarps; ++w) acc.merge(LseState<Acc>(sm_m[r][w], sm_s[r][w]));
        out[i0 + r] = acc.finish();
      }
      __syncthreads();  // the shared slots are reused by the next rows
    } else if (t == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (i0 + r < n) out[i0 + r] = st[r].finish();
    }
  }
}

template <typename Storage, typename Acc>
cudaError_t launch(const void* S, int64_t n, int64_t m, int64_t row_stride, double scale,
                   const void* g, void* out, cudaStream_t stream) {
  const Storage* s = static_cast<const Storage*>(S);
  const Acc* gp = static_cast<const Acc*>(g);
  Acc* o = static_cast<Acc*>(out);
  return launch_rows<Storage>(
      [](auto wpg, auto vec, auto gvec) {
        return row_lse_kernel<Storage, Acc, decltype(wpg)::value, decltype(vec)::value,
                              decltype(gvec)::value>;
      },
      S, n, m, row_stride, g, stream, s, n, m, row_stride, Acc(scale), gp, o);
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
