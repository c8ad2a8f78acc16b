// ncl_grad on the GPU: G = dloss/dlogits element by element (docs/math.md section 3),
// written as scale * G into `out` (which may be S itself) and reduced to
// dscale_sum = sum_ij G_ij S_ij over the unmasked entries.
//
// Layout (as col_lse's): a block owns a tile of kTile = 32 * kN columns and a slab of
// rows; its 8 warps take the slab's rows round-robin, rows_per_step() rows per step (all
// loads of a step issued before any is used, the stores after). The per-column values of
// the tile (g_j, -lse_col_j, coef_col_j and the target row z_j) are read once per block
// into shared memory, so the only per-element traffic is S and out: a row-wise walk would
// re-read 20 bytes of column vectors per element from L2.
//
//   G_ij = coef_row_i (exp(l + g_j - lse_row_i) - [j == y_i])
//        + coef_col_j (exp(l + f_i - lse_col_j) - [row_offset + i == z_j]),  l = scale S_ij
//
// with exp by ex2 (fast_exp) and the -LSE rule of neg_lse (an LSE of -inf: probability
// 0), no branch per element. l + g_j and l + f_i are rounded as row_lse and col_lse
// rounded them, so a softmax that must be exactly 1 is exactly 1.
//
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

// Rows per warp per step and the blocks per SM the register budget is set for: 6 rows
// (6 x 16 B of loads in flight per thread) in 2 blocks (at most 128 registers), 48 KB of
// loads in flight per SM. (4 rows in 3 blocks spills; 3 rows in 3 blocks holds 36 KB.)
// The element-wise path of misaligned rows (an address and a bound per element) and
// float64 (a long exp) take 2 rows, which they fit without spilling.
template <typename Storage, bool VEC>
__host__ __device__ constexpr int rows_per_step() { return VEC && sizeof(Storage) < 8 ? 6 : 2; }
constexpr int kMinBlocks = 2;
// Rows per slab: enough for the column values a block loads once to be negligible, few
// enough for many blocks (waves of equal blocks waste at most the last, partial one);
// a multiple of the 48 rows of a block's step.
constexpr int64_t kMinRowsPerSlab = 384;
constexpr int64_t kMaxSlabs = 65535;           // gridDim.y limit
constexpr int64_t kMaxPartials = int64_t(1) << 16;  // bounds the workspace (with the tiles)

template <typename Acc>
struct GradArgs {
  Acc scale;
  const Acc *f, *g, *lse_row, *lse_col, *coef_row, *coef_col;
  const int64_t *y, *z;
  int64_t row_offset;  // global index of row 0 (for the column targets z)
};

// The launch shape: column tiles x row slabs, one partial sum per block.
struct GradGrid {
  int64_t tiles, slabs, rows_per_slab;
  int64_t blocks() const { return tiles * slabs; }
};
inline GradGrid grad_grid(int64_t n, int64_t m, int64_t tile) {
  GradGrid gg{ceil_div(m, tile), 1, n};
  if (n <= 0 || m <= 0) return {0, 0, 0};
  int64_t rows = kMinRowsPerSlab;
  if (ceil_div(n, rows) > kMaxSlabs) rows = ceil_div(n, kMaxSlabs);
  const int64_t most = gg.tiles >= kMaxPartials ? 1 : kMaxPartials / gg.tiles;
  if (ceil_div(n, rows) > most) rows = ceil_div(n, most);
  gg.rows_per_slab = rows;
  gg.slabs = ceil_div(n, rows);
  return gg;
}

// A column's values, shared by the block's warps (they all walk the same columns).
template <typename Acc>
struct ColVals {
  Acc g, nlse, coef;
  int z;  // z_j as a row of this slab (row_offset + r_begin + z == z_j), else -1
};

// S and out may alias (in place), hence no __restrict__ on them.
template <typename Storage, typename Acc, bool VEC, bool WRITE>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
ncl_grad_kernel(const Storage* S, Storage* out, int64_t n, int64_t m, int64_t row_stride,
                int64_t out_row_stride, GradArgs<Acc> a, int64_t rows_per_slab,
                Acc* __restrict__ partials) {
  constexpr int kN = Vec<Storage>::kN;
  constexpr int kTile = 32 * kN;
  constexpr int U = rows_per_step<Storage, VEC>();
  // cols[k][lane]: column chunk_col(tile0, lane, k); lane-minor, so that a warp's reads of
  // one k hit consecutive 16-byte words (no bank conflict)
  __shared__ ColVals<Acc> cols[kN][32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t tile0 = int64_t(blockIdx.x) * kTile;
  const int64_t r_begin = int64_t(blockIdx.y) * rows_per_slab;
  const int64_t r_end = r_begin + rows_per_slab < n ? r_begin + rows_per_slab : n;
  const int slab_rows = int(r_end - r_begin);

  for (int c = threadIdx.x; c < kTile; c += kThreads) {  // past m: no mass, no target
    const int k = c / 32, ln = c % 32;
    const int64_t j = chunk_col<VEC, 32, kN>(tile0, ln, k);
    const bool in = j < m;
    const int64_t zr = in ? a.z[j] - a.row_offset - r_begin : -1;
    cols[k][ln] = {in ? a.g[j] : Acc(0), in ? neg_lse(a.lse_col[j]) : neg_inf<Acc>(),
                   in ? a.coef_col[j] : Acc(0), zr >= 0 && zr < slab_rows ? int(zr) : -1};
  }
  __syncthreads();

  // y_i as this lane's k (j_k == y_i), else -1
  const auto target_k = [&](int64_t y) -> int {
    const int64_t d = y - chunk_col<VEC, 32, kN>(tile0, lane, 0);
    if (VEC) return d >= 0 && d < kN ? int(d) : -1;
    return d >= 0 && d % 32 == 0 && d / 32 < kN ? int(d / 32) : -1;
  };

  Acc ds = Acc(0);
  // the NU rows i + u kWarps (u < NU) of one step
  // whole: the tile lies below m (no bound checks)
  const auto step = [&](auto whole, auto nu, int64_t i) {
    constexpr bool W = decltype(whole)::value;
    constexpr int NU = decltype(nu)::value;
    Vec<Storage> x[NU];
    Acc fi[NU], nlr[NU], cr[NU];
    int yk[NU];
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int64_t r = i + u * kWarps;
      x[u] = load_chunk<VEC, W, 32>(S + r * row_stride, tile0, lane, m);
      fi[u] = a.f[r];
      nlr[u] = neg_lse(a.lse_row[r]);
      cr[u] = a.coef_row[r];
      yk[u] = target_k(a.y[r]);
    }
    Acc xa[NU][kN];
#pragma unroll
    for (int u = 0; u < NU; ++u) to_acc(x[u], xa[u]);
    const int il = int(i - r_begin);
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const ColVals<Acc> cv = cols[k][lane];
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        const Acc xv = xa[u][k];
        const Acc l = mul_rn(a.scale, xv);
        const Acc p_row = fast_exp(add_rn(l, cv.g) + nlr[u]);
        const Acc p_col = fast_exp(add_rn(l, fi[u]) + cv.nlse);
        // coef (p - [target]) as one fma: exactly 0 when p is exactly 1 at the target
        const Acc G = fma_rn(cr[u], p_row, k == yk[u] ? -cr[u] : Acc(0)) +
                      fma_rn(cv.coef, p_col, il + u * kWarps == cv.z ? -cv.coef : Acc(0));
        // masked entries add 0: their logit does not depend on the scale
        if (xv != neg_inf<Acc>()) ds = fma_rn(G, xv, ds);
        xa[u][k] = G * a.scale;  // dloss/dS, stored below
      }
    }
    if (WRITE) {
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        from_acc(xa[u], x[u]);
        store_chunk<VEC, W, 32>(out + (i + u * kWarps) * out_row_stride, tile0, lane, m,
                                x[u]);
      }
    }
  };

  const auto walk = [&](auto whole) {
    int64_t i = r_begin + warp;
    for (; i + (U - 1) * kWarps < r_end; i += U * kWarps)
      step(whole, std::integral_constant<int, U>{}, i);
    for (; i < r_end; i += kWarps) step(whole, std::integral_constant<int, 1>{}, i);
  };
  if (tile0 + kTile <= m)  // uniform over the block
    walk(std::true_type{});
  else
    walk(std::false_type{});

  const Acc total = block_sum(ds);  // every thread gets here (no early return above)
  if (threadIdx.x == 0) partials[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = total;
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
                        p.y, p.z, row_offset};
  Acc* partials = static_cast<Acc*>(p.work);
  Acc* ds = static_cast<Acc*>(p.ds);
  const GradGrid gg = grad_grid(n, m, 32 * Vec<Storage>::kN);
  if (gg.blocks() > capacity) return cudaErrorInvalidValue;
  // (grid limits; the kernel indexes rows within a slab with 32-bit integers)
  if (gg.tiles > 0x7fffffff || gg.slabs > kMaxSlabs || gg.rows_per_slab > 0x7fffffff)
    return cudaErrorInvalidValue;
  if (gg.blocks() > 0) {
    const Storage* s = static_cast<const Storage*>(p.S);
    Storage* o = static_cast<Storage*>(p.out);
    const bool write = o != nullptr;
    const bool vec = rows_aligned16<Storage>(p.S, row_stride) &&
                     (!write || rows_aligned16<Storage>(p.out, out_row_stride));
    const cudaError_t e = with_flags(
        [&](auto v, auto w) {
          return launch_kernel(
              ncl_grad_kernel<Storage, Acc, decltype(v)::value, decltype(w)::value>,
              dim3(unsigned(gg.tiles), unsigned(gg.slabs)), dim3(kThreads), stream, s, o, n, m,
              row_stride, out_row_stride, a, gg.rows_per_slab, partials);
        },
        vec, write);
    if (e != cudaSuccess) return e;
  }
  return launch_kernel(sum_partials_kernel<Acc>, dim3(1), dim3(kThreads), stream,
                       static_cast<const Acc*>(partials), gg.blocks(), ds);
}

}  // namespace

// The workspace bound for every storage type (tiles of 64, 128 or 256 columns).
int64_t ncl_grad_blocks(int64_t n, int64_t m) {
  int64_t most = 0;
  for (const int64_t tile : {64, 128, 256}) {
    const int64_t b = grad_grid(n, m, tile).blocks();
    most = b > most ? b : most;
  }
  return most;
}

cudaError_t ncl_grad_cuda(const GradPtrs& p, int64_t n, int64_t m, int64_t row_stride,
                          int64_t out_row_stride, int dtype, double scale, int64_t row_offset,
                          int64_t work_capacity, cudaStream_t stream) {
  NCL_DTYPE_SWITCH(dtype, launch, return cudaErrorInvalidValue,
                   p, n, m, row_stride, out_row_stride, scale, row_offset, work_capacity, stream)
}

}  // namespace cuda
}  // namespace ncl
