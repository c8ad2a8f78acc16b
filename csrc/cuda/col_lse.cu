// col_lse on the GPU: out[j] = log sum_i exp(scale * S[i, j] + f[i]).
//
// Layout. A block owns a tile of kTile = 32 * kN consecutive columns (kN elements of one
// 16-byte vector per lane, so a warp reads 512 contiguous bytes of a row: coalesced) and
// a slab of rows. Its 8 warps take the slab's rows round-robin (warp w: rows w, w + 8, ...,
// kUnroll rows per step so several loads are in flight), each lane keeping one online
// (max, sum) state per column it owns. The 8 warp states of a column are then merged in
// warp order through shared memory.
//
// Two stages when M is small. With few column tiles the grid would not fill the GPU, so
// the rows are split into n_slabs slabs (gridDim.y); each block writes its per-column
// partial state to a workspace, and a second kernel merges the slabs of each column in
// slab order. With one slab the first kernel writes the result directly. Every merge
// order is fixed, so the result does not depend on scheduling (deterministic).
#include <cstdint>

#include <cuda_runtime.h>

#include "common/ncl_math.h"
#include "cuda/device_utils.cuh"
#include "cuda/primitives.cuh"

namespace ncl {
namespace cuda {
namespace {

// Rows per warp per step: the loads issued before any is consumed. 2 x 16 B per thread
// with 2048 resident threads is 64 KB in flight per SM, about twice what HBM latency
// needs on an H200; 4 made ptxas spill (sm_80/90, 2-byte storage).
constexpr int kUnroll = 2;
constexpr int64_t kMinRowsPerSlab = 64;  // below this a slab is not worth a partial
constexpr int64_t kMaxSlabs = 65535;     // gridDim.y limit
constexpr int kBlocksPerSm = 8;        // resident 256-thread blocks per SM we aim for

template <typename Storage>
__host__ __device__ constexpr int tile_cols() { return 32 * Vec<Storage>::kN; }

// st[k].push(scale * x[k] + f[i]) for the kN columns of one vector of row i
template <typename Storage, typename Acc>
__device__ __forceinline__ void push_vec(LseState<Acc> (&st)[Vec<Storage>::kN],
                                         const Vec<Storage>& x, Acc scale, const Acc* f,
                                         int64_t i) {
  const Acc fi = f ? f[i] : Acc(0);
#pragma unroll
  for (int k = 0; k < Vec<Storage>::kN; ++k) {
    const Acc l = mul_rn(scale, Acc(load_acc(x.e[k])));
    st[k].push(f ? add_rn(l, fi) : l);
  }
}

template <typename Storage, typename Acc, bool VEC>
__global__ void __launch_bounds__(kThreads)
col_lse_kernel(const Storage* __restrict__ S, int64_t n, int64_t m, int64_t row_stride,
               Acc scale, const Acc* __restrict__ f, int64_t rows_per_slab,
               Acc* __restrict__ out, Acc* __restrict__ work_m, Acc* __restrict__ work_s) {
  constexpr int kN = Vec<Storage>::kN;
  constexpr int kTile = tile_cols<Storage>();
  __shared__ Acc sm_m[kWarps][kTile], sm_s[kWarps][kTile];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t c0 = int64_t(blockIdx.x) * kTile + int64_t(lane) * kN;  // first own column
  const int64_t r_begin = int64_t(blockIdx.y) * rows_per_slab;
  const int64_t r_end = r_begin + rows_per_slab < n ? r_begin + rows_per_slab : n;
  // whole vector in bounds (VEC also guarantees alignment: c0 is a multiple of kN)
  const bool full = VEC && c0 + kN <= m;

  LseState<Acc> st[kN];

  if (full) {
    int64_t i = r_begin + warp;
    // kUnroll rows per step: issue all loads, then reduce
    for (; i + (kUnroll - 1) * kWarps < r_end; i += kUnroll * kWarps) {
      Vec<Storage> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load_vec(S + (i + u * kWarps) * row_stride + c0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) push_vec(st, v[u], scale, f, i + u * kWarps);
    }
    for (; i < r_end; i += kWarps) {
      push_vec(st, load_vec(S + i * row_stride + c0), scale, f, i);
    }
  } else if (c0 < m) {  // unaligned rows or the last, partial tile: element loads
    for (int64_t i = r_begin + warp; i < r_end; i += kWarps) {
      const Storage* row = S + i * row_stride;
      const Acc fi = f ? f[i] : Acc(0);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if (c0 + k < m) {
          const Acc l = mul_rn(scale, Acc(load_acc(row[c0 + k])));
          st[k].push(f ? add_rn(l, fi) : l);
        }
      }
    }
  }

  // merge the kWarps states of each column, in warp order
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    sm_m[warp][lane * kN + k] = st[k].m;
    sm_s[warp][lane * kN + k] = st[k].s;
  }
  __syncthreads();
  static_assert(kTile <= kThreads, "one thread per column of the tile");
  const int c = threadIdx.x;
  const int64_t j = int64_t(blockIdx.x) * kTile + c;
  if (c < kTile && j < m) {
    LseState<Acc> col(sm_m[0][c], sm_s[0][c]);
    for (int w = 1; w < kWarps; ++w) col.merge(LseState<Acc>(sm_m[w][c], sm_s[w][c]));
    if (gridDim.y == 1) {
      out[j] = col.finish();
    } else {
      const int64_t at = int64_t(blockIdx.y) * m + j;
      work_m[at] = col.m;
      work_s[at] = col.s;
    }
  }
}

// Second stage: out[j] = finish(merge over slabs 0, 1, ... of the partial states).
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
col_lse_merge_kernel(int64_t m, int64_t n_slabs, const Acc* __restrict__ work_m,
                     const Acc* __restrict__ work_s, Acc* __restrict__ out) {
  for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < m;
       j += int64_t(gridDim.x) * kThreads) {
    LseState<Acc> st;
    for (int64_t b = 0; b < n_slabs; ++b) st.merge(LseState<Acc>(work_m[b * m + j], work_s[b * m + j]));
    out[j] = st.finish();
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Storage>
int64_t slabs_for(int64_t n, int64_t m, int sm_count) {
  if (n <= 0 || m <= 0) return 1;
  const int64_t tiles = ceil_div(m, tile_cols<Storage>());
  const int64_t target = int64_t(sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  int64_t slabs = ceil_div(target, tiles);
  const int64_t most = ceil_div(n, kMinRowsPerSlab);
  if (slabs > most) slabs = most;
  if (slabs > kMaxSlabs) slabs = kMaxSlabs;
  return slabs < 1 ? 1 : slabs;
}

template <typename Storage, typename Acc>
cudaError_t launch(const void* S, int64_t n, int64_t m, int64_t row_stride, double scale,
                   const void* f, void* out, void* work, int64_t n_slabs, cudaStream_t stream) {
  if (n_slabs < 1 || n_slabs > kMaxSlabs || (n_slabs > 1 && work == nullptr))
    return cudaErrorInvalidValue;
  const int64_t tiles = ceil_div(m, tile_cols<Storage>());
  if (tiles > 0x7fffffff) return cudaErrorInvalidValue;
  // no empty slab: recompute the count from the rows per slab (n = 0 keeps one slab,
  // which finishes every column to -inf)
  const int64_t rows_per_slab = n > 0 ? ceil_div(n, n_slabs) : 0;
  const int64_t slabs = n > 0 ? ceil_div(n, rows_per_slab) : 1;

  const Storage* s = static_cast<const Storage*>(S);
  Acc* o = static_cast<Acc*>(out);
  Acc* wm = static_cast<Acc*>(work);
  Acc* ws = wm ? wm + slabs * m : nullptr;
  const dim3 grid{unsigned(tiles), unsigned(slabs), 1u};
  const bool vec = rows_aligned16<Storage>(S, row_stride);
  const Acc* fp = static_cast<const Acc*>(f);
  const cudaError_t e =
      vec ? launch_kernel(col_lse_kernel<Storage, Acc, true>, grid, dim3(kThreads), stream, s,
                          n, m, row_stride, Acc(scale), fp, rows_per_slab, o, wm, ws)
          : launch_kernel(col_lse_kernel<Storage, Acc, false>, grid, dim3(kThreads), stream, s,
                          n, m, row_stride, Acc(scale), fp, rows_per_slab, o, wm, ws);
  if (e != cudaSuccess || slabs == 1) return e;

  int64_t blocks = ceil_div(m, kThreads);
  if (blocks > (1 << 16)) blocks = 1 << 16;
  return launch_kernel(col_lse_merge_kernel<Acc>, dim3(unsigned(blocks)), dim3(kThreads),
                       stream, m, slabs, static_cast<const Acc*>(wm),
                       static_cast<const Acc*>(ws), o);
}

}  // namespace

int64_t col_lse_slabs(int64_t n, int64_t m, int dtype, int sm_count) {
  switch (dtype) {
    case F32: return slabs_for<float>(n, m, sm_count);
    case F64: return slabs_for<double>(n, m, sm_count);
    case F16: return slabs_for<f16_t>(n, m, sm_count);
    case BF16: return slabs_for<bf16_t>(n, m, sm_count);
    default: return 1;
  }
}

cudaError_t col_lse_cuda(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                         double scale, const void* f, void* out, void* work, int64_t n_slabs,
                         cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  NCL_DTYPE_SWITCH(dtype, launch, return cudaErrorInvalidValue,
                   S, n, m, row_stride, scale, f, out, work, n_slabs, stream)
}

}  // namespace cuda
}  // namespace ncl
