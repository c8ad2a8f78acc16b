// col_lse on the GPU: out[j] = log sum_i exp(scale * S[i, j] + f[i]).
//
// Layout. A block owns a tile of kTile = 32 * kN consecutive columns (kN elements of one
// 16-byte vector per lane, so a warp reads 512 contiguous bytes of a row: coalesced) and
// a slab of rows. Its 8 warps take the slab's rows round-robin (warp w: rows w, w + 8, ...,
// rows_per_step() rows per step, all loads issued before any is used), each lane keeping one
// online (max, sum) state per column it owns. A step's logits of a column are
// folded in with push_tile: one tile max, one rescale, ex2 per element, no branch. The 8
// warp states of a column are then merged in warp order through shared memory.
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

// Rows per warp per step: 4 x 16 B of loads in flight per thread, and one rescale of a
// column's sum per 4 elements (2 for float64, whose exp is long).
template <typename Storage>
__host__ __device__ constexpr int rows_per_step() { return sizeof(Storage) == 8 ? 2 : 4; }
// A slab is at least this many rows: its partial states (8 bytes per column, written and
// read back once) then cost at most about 3% of the bytes it reads.
constexpr int64_t kMinRowsPerSlab = 256;
constexpr int64_t kMaxSlabs = 65535;  // gridDim.y limit
// The blocks of a launch (all of equal work) run in waves of stream_min_blocks (4 per SM
// on aligned rows in float accumulation); a launch of at most kMaxWaves waves (it bounds
// the workspace, 2 * slabs * m values) is sized so that its last wave is as full as it can
// be.
constexpr int kBlocksPerSm = 4;
constexpr int kMaxWaves = 4;

template <typename Storage>
__host__ __device__ constexpr int tile_cols() { return 32 * Vec<Storage>::kN; }

template <typename Storage, typename Acc, bool VEC>
__global__ void __launch_bounds__(kThreads, stream_min_blocks<Storage, VEC>())
col_lse_kernel(const Storage* __restrict__ S, int64_t n, int64_t m, int64_t row_stride,
               Acc scale, const Acc* __restrict__ f, int64_t rows_per_slab,
               Acc* __restrict__ out, Acc* __restrict__ work_m, Acc* __restrict__ work_s) {
  constexpr int kN = Vec<Storage>::kN;
  constexpr int kTile = tile_cols<Storage>();
  constexpr int U = rows_per_step<Storage>();
  __shared__ Acc sm_m[kWarps][kTile], sm_s[kWarps][kTile];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t tile0 = int64_t(blockIdx.x) * kTile;
  const int64_t r_begin = int64_t(blockIdx.y) * rows_per_slab;
  const int64_t r_end = r_begin + rows_per_slab < n ? r_begin + rows_per_slab : n;

  // st[k]: column chunk_col(tile0, lane, k) (columns past m stay empty: -inf pads)
  LseState<Acc> st[kN];
  const auto walk = [&](auto whole) {  // whole: the tile lies below m (no bound checks)
    constexpr bool W = decltype(whole)::value;
    int64_t i = r_begin + warp;
    for (; i + (U - 1) * kWarps < r_end; i += U * kWarps) {
      Vec<Storage> x[U];
      Acc fu[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        x[u] = load_chunk<VEC, W, 32>(S + (i + u * kWarps) * row_stride, tile0, lane, m);
        fu[u] = f ? f[i + u * kWarps] : Acc(0);
      }
      Acc xa[U][kN];
#pragma unroll
      for (int u = 0; u < U; ++u) to_acc(x[u], xa[u]);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        Acc l[U];
#pragma unroll
        for (int u = 0; u < U; ++u) l[u] = add_rn(mul_rn(scale, xa[u][k]), fu[u]);
        push_tile(st[k], l);
      }
    }
    for (; i < r_end; i += kWarps) {  // the slab's last rows, one per step
      const Vec<Storage> x = load_chunk<VEC, W, 32>(S + i * row_stride, tile0, lane, m);
      const Acc fi = f ? f[i] : Acc(0);
      Acc xa[kN];
      to_acc(x, xa);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const Acc l[1] = {add_rn(mul_rn(scale, xa[k]), fi)};
        push_tile(st[k], l);
      }
    }
  };
  if (tile0 + kTile <= m)  // uniform over the block
    walk(std::true_type{});
  else
    walk(std::false_type{});

  // merge the kWarps states of each column, in warp order
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    const int c = int(chunk_col<VEC, 32, kN>(0, lane, k));  // column - tile0
    sm_m[warp][c] = st[k].m;
    sm_s[warp][c] = st[k].s;
  }
  __syncthreads();
  static_assert(kTile <= kThreads, "one thread per column of the tile");
  const int c = threadIdx.x;
  const int64_t j = tile0 + c;
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

template <typename Storage>
int64_t slabs_for(int64_t n, int64_t m, int sm_count) {
  if (n <= 0 || m <= 0) return 1;
  const int64_t tiles = ceil_div(m, tile_cols<Storage>());
  const int64_t slots = int64_t(sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  int64_t most = slots * kMaxWaves / tiles;
  const int64_t by_rows = ceil_div(n, kMinRowsPerSlab);
  if (most > by_rows) most = by_rows;
  if (most > kMaxSlabs) most = kMaxSlabs;
  // the slab count whose last wave is fullest (waves / ceil(waves)); more slabs on a tie
  int64_t best = 1;
  double best_use = 0.0;
  for (int64_t slabs = 1; slabs <= most; ++slabs) {
    const int64_t blocks = tiles * slabs;
    const double use = double(blocks) / double(ceil_div(blocks, slots) * slots);
    if (use >= best_use) {
      best = slabs;
      best_use = use;
    }
  }
  return best;
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
  const Acc* fp = static_cast<const Acc*>(f);
  const cudaError_t e = with_flags(
      [&](auto vec) {
        return launch_kernel(col_lse_kernel<Storage, Acc, decltype(vec)::value>, grid,
                             dim3(kThreads), stream, s, n, m, row_stride, Acc(scale), fp,
                             rows_per_slab, o, wm, ws);
      },
      rows_aligned16<Storage>(S, row_stride));
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
