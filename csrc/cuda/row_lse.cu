// row_lse on the GPU: each row is reduced by one warp (short rows) or one 256-thread block
// (rows of kBlockPerRowMin elements or more), with the online LSE state of
// common/ncl_math.h per thread, then a warp-shuffle merge of the (max, sum) pairs.
#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include "common/ncl_math.h"
#include "cuda/primitives.cuh"

namespace ncl {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // threads per block
constexpr int kWarps = kThreads / 32;
// Rows at least this long get a whole block each (more loads in flight per row); shorter
// rows get one warp each, kWarps rows per block.
constexpr int64_t kBlockPerRowMin = 4096;
// Grid cap; more rows are covered by the grid-stride loop (also keeps us far below the
// 2^31 - 1 gridDim.x limit for any int64 n).
constexpr int64_t kMaxBlocks = 1 << 16;

template <typename Acc>
__device__ __forceinline__ LseState<Acc> warp_merge(LseState<Acc> st) {
  // Butterfly: every lane ends up holding the merge of all 32 states.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const Acc om = __shfl_xor_sync(0xffffffffu, st.m, off);
    const Acc os = __shfl_xor_sync(0xffffffffu, st.s, off);
    st.merge(LseState<Acc>(om, os));
  }
  return st;
}

// WARPS_PER_ROW: 1 (a warp per row, kWarps rows per block) or kWarps (a block per row).
// VEC: rows are 16-byte aligned (base pointer and row stride), so the bulk of each row is
// read with 16-byte loads and only the m % kVec tail element-wise.
template <typename Storage, typename Acc, int WARPS_PER_ROW, bool VEC>
__global__ void __launch_bounds__(kThreads)
row_lse_kernel(const Storage* __restrict__ S, int64_t n, int64_t m, int64_t row_stride,
               Acc scale, const Acc* __restrict__ g, Acc* __restrict__ out) {
  static_assert(WARPS_PER_ROW == 1 || WARPS_PER_ROW == kWarps, "warp or block per row");
  constexpr int kRowsPerBlock = kWarps / WARPS_PER_ROW;
  constexpr int kGroup = 32 * WARPS_PER_ROW;  // threads reducing one row
  constexpr int kVec = 16 / int(sizeof(Storage));
  __shared__ Acc sm_m[kWarps], sm_s[kWarps];  // block-per-row only

  const int warp = threadIdx.x / 32;
  const int t = threadIdx.x % kGroup;  // thread index within the row's group

  // Grid-stride over groups of rows. The loop bounds are uniform across the block, so the
  // __syncthreads below are reached by every thread.
  for (int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock; row0 < n;
       row0 += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t i = row0 + warp / WARPS_PER_ROW;
    LseState<Acc> st;
    if (i < n) {
      const Storage* row = S + i * row_stride;
      int64_t j_tail = 0;
      if (VEC) {
        const int64_t nvec = m / kVec;
        const uint4* row4 = reinterpret_cast<const uint4*>(row);
        for (int64_t v = t; v < nvec; v += kGroup) {
          union {
            uint4 raw;
            Storage e[kVec];
          } u;
          u.raw = row4[v];
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const int64_t j = v * kVec + k;
            st.push(scale * Acc(to_float(u.e[k])) + (g ? g[j] : Acc(0)));
          }
        }
        j_tail = nvec * kVec;
      }
      for (int64_t j = j_tail + t; j < m; j += kGroup)
        st.push(scale * Acc(to_float(row[j])) + (g ? g[j] : Acc(0)));
    }
    st = warp_merge(st);

    if (WARPS_PER_ROW > 1) {  // one row per block: merge the kWarps warp results
      if (threadIdx.x % 32 == 0) {
        sm_m[warp] = st.m;
        sm_s[warp] = st.s;
      }
      __syncthreads();
      if (threadIdx.x == 0)
        for (int w = 1; w < kWarps; ++w) st.merge(LseState<Acc>(sm_m[w], sm_s[w]));
      __syncthreads();  // the shared slots are reused by the next row
    }
    if (t == 0 && i < n) out[i] = st.finish();
  }
}

template <typename Storage, typename Acc>
cudaError_t launch(const void* S, int64_t n, int64_t m, int64_t row_stride, float scale,
                   const void* g, void* out, cudaStream_t stream) {
  const Storage* s = static_cast<const Storage*>(S);
  const Acc* gp = static_cast<const Acc*>(g);
  Acc* o = static_cast<Acc*>(out);
  const Acc sc = Acc(scale);

  const bool vec = reinterpret_cast<uintptr_t>(S) % 16 == 0 &&
                   (row_stride * int64_t(sizeof(Storage))) % 16 == 0;
  const bool block_per_row = m >= kBlockPerRowMin;
  const int64_t rows_per_block = block_per_row ? 1 : kWarps;
  const dim3 grid(unsigned(std::min((n + rows_per_block - 1) / rows_per_block, kMaxBlocks)));

#define NCL_LAUNCH(WPR, VEC)                                             \
  row_lse_kernel<Storage, Acc, WPR, VEC>                                  \
      <<<grid, kThreads, 0, stream>>>(s, n, m, row_stride, sc, gp, o)
  if (block_per_row) {
    if (vec) NCL_LAUNCH(kWarps, true); else NCL_LAUNCH(kWarps, false);
  } else {
    if (vec) NCL_LAUNCH(1, true); else NCL_LAUNCH(1, false);
  }
#undef NCL_LAUNCH
  return cudaGetLastError();
}

}  // namespace

cudaError_t row_lse_cuda(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                         float scale, const void* g, void* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;  // an empty grid is a launch error; nothing to do anyway
  switch (dtype) {
    case F32: return launch<float, float>(S, n, m, row_stride, scale, g, out, stream);
    case F64: return launch<double, double>(S, n, m, row_stride, scale, g, out, stream);
    case F16: return launch<f16_t, float>(S, n, m, row_stride, scale, g, out, stream);
    case BF16: return launch<bf16_t, float>(S, n, m, row_stride, scale, g, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ncl
