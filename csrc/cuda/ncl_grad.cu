// ncl_grad on the GPU: G = dloss/dlogits element by element (docs/math.md section 3),
// written as scale * G into `out` (which may be S itself) and reduced to
// dscale_sum = sum_ij G_ij S_ij over the unmasked entries.
//
// Layout: the block is cut into units of a tile of kTile = 32 * kN columns by a slab of
// kRowsPerSlab rows. A persistent grid (2 blocks per SM) walks the units in a fixed order
// (block b: units b, b + gridDim.x, ...; consecutive units are neighbouring tiles of the
// same rows). Per unit, the tile's per-column values (g_j, -lse_col_j, coef_col_j and the
// target row z_j) are read once into shared memory, so the only per-element traffic is S
// and out (a row-wise walk would re-read 20 bytes of column vectors per element from L2),
// and the block's 8 warps take the slab's rows round-robin, rows_per_step() rows per step
// (all loads of a step issued before any is used, the stores after).
//
//   G_ij = coef_row_i (exp(l + g_j - lse_row_i) - [j == y_i])
//        + coef_col_j (exp(l + f_i - lse_col_j) - [row_offset + i == z_j]),  l = scale S_ij
//
// with exp by ex2 (fast_exp) and the -LSE rule of neg_lse (an LSE of -inf: probability
// 0), no branch per element. l + g_j and l + f_i are rounded as row_lse and col_lse
// rounded them, so a softmax that must be exactly 1 is exactly 1.
//
// The sum is deterministic: the units a block takes depend on the grid size only (so the
// bits repeat on a device, and on any device with as many SMs), each thread accumulates
// its elements in a fixed order, each block reduces its threads in a fixed tree (one
// partial per block, in a workspace sized by ncl_grad_blocks), and one final block adds
// the partials in block order. No atomics. The gradient itself is element-wise: its bits
// do not depend on the grid at all.
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
// (sm_80's code for 6 rows spills a few bytes: it takes 4.)
template <typename Storage, bool VEC>
__host__ __device__ constexpr int rows_per_step() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return VEC && sizeof(Storage) < 8 ? 4 : 2;
#else
  return VEC && sizeof(Storage) < 8 ? 6 : 2;
#endif
}
constexpr int kMinBlocks = 2;
// Rows per unit: enough for the column values a unit loads to be negligible, and a
// multiple of the 48 rows of a block's step.
constexpr int64_t kRowsPerSlab = 384;
// Grid cap: it bounds the partials workspace (ncl_grad_blocks) whatever the device.
constexpr int64_t kMaxBlocks = 2048;

template <typename Acc>
struct GradArgs {
  Acc scale;
  const Acc *f, *g, *lse_row, *lse_col, *coef_row, *coef_col;
  const int64_t *y, *z;
  int64_t row_offset;  // global index of row 0 (for the column targets z)
};

// The work: tiles x slabs units.
struct GradUnits {
  int64_t tiles, slabs;
  __host__ __device__ int64_t count() const { return tiles * slabs; }
};
inline GradUnits grad_units(int64_t n, int64_t m, int64_t tile) {
  if (n <= 0 || m <= 0) return {0, 0};
  return {ceil_div(m, tile), ceil_div(n, kRowsPerSlab)};
}
inline int64_t grad_blocks(const GradUnits& u, int64_t most) {
  return u.count() < most ? u.count() : most;
}

// A column's values, shared by the block's warps (they all walk the same columns).
template <typename Acc>
struct ColVals {
  Acc g, nlse, coef;
  int z;  // z_j as a row of the unit's slab (row_offset + r_begin + z == z_j), else -1
};

// S and out may alias (in place), hence no __restrict__ on them.
template <typename Storage, typename Acc, bool VEC, bool WRITE>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
ncl_grad_kernel(const Storage* S, Storage* out, int64_t n, int64_t m, int64_t row_stride,
                int64_t out_row_stride, GradArgs<Acc> a, GradUnits units,
                Acc* __restrict__ partials) {
  constexpr int kN = Vec<Storage>::kN;
  constexpr int kTile = 32 * kN;
  constexpr int U = rows_per_step<Storage, VEC>();
  // cols[k][lane]: column chunk_col(tile0, lane, k); lane-minor, so that a warp's reads of
  // one k hit consecutive 16-byte words (no bank conflict)
  __shared__ ColVals<Acc> cols[kN][32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  Acc ds = Acc(0);

  // The loop bounds depend on blockIdx only: every thread reaches the barriers.
  for (int64_t unit = blockIdx.x; unit < units.count(); unit += gridDim.x) {
    const int64_t tile0 = unit % units.tiles * kTile;
    const int64_t r_begin = unit / units.tiles * kRowsPerSlab;
    const int64_t r_end = r_begin + kRowsPerSlab < n ? r_begin + kRowsPerSlab : n;
    const int slab_rows = int(r_end - r_begin);

    __syncthreads();  // the previous unit's reads of cols[] are done
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

    // the NU rows i + u kWarps (u < NU) of one step; whole: the tile lies below m (no bound
    // checks)
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
                        p.y, p.z, row_offset};
  Acc* partials = static_cast<Acc*>(p.work);
  Acc* ds = static_cast<Acc*>(p.ds);
  const GradUnits units = grad_units(n, m, 32 * Vec<Storage>::kN);
  // persistent: as many blocks as fit on the device at once (the register budget's 2 per
  // SM), or fewer units
  const int64_t blocks = grad_blocks(units, std::min(int64_t(current_sm_count()) * kMinBlocks,
                                                     kMaxBlocks));
  if (blocks > capacity) return cudaErrorInvalidValue;
  if (blocks > 0) {
    const Storage* s = static_cast<const Storage*>(p.S);
    Storage* o = static_cast<Storage*>(p.out);
    const bool write = o != nullptr;
    const bool vec = rows_aligned16<Storage>(p.S, row_stride) &&
                     (!write || rows_aligned16<Storage>(p.out, out_row_stride));
    const cudaError_t e = with_flags(
        [&](auto v, auto w) {
          return launch_kernel(
              ncl_grad_kernel<Storage, Acc, decltype(v)::value, decltype(w)::value>,
              dim3(unsigned(blocks)), dim3(kThreads), stream, s, o, n, m, row_stride,
              out_row_stride, a, units, partials);
        },
        vec, write);
    if (e != cudaSuccess) return e;
  }
  return launch_kernel(sum_partials_kernel<Acc>, dim3(1), dim3(kThreads), stream,
                       static_cast<const Acc*>(partials), blocks, ds);
}

}  // namespace

// The workspace bound for every storage type (tiles of 64, 128 or 256 columns) and device.
int64_t ncl_grad_blocks(int64_t n, int64_t m) {
  int64_t most = 0;
  for (const int64_t tile : {64, 128, 256}) {
    const int64_t b = grad_blocks(grad_units(n, m, tile), kMaxBlocks);
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
