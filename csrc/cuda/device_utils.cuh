// device_utils.cuh — device-side helpers shared by the CUDA kernels (nvcc only).
//
// * storage <-> accumulator conversion (to_float and store_acc come from
//   common/ncl_math.h, shared with the CPU kernels);
// * logits formed with explicitly rounded multiply/add, so that every kernel (row_lse,
//   col_lse, ncl_grad, apply_biases) and PyTorch round them identically: nvcc would
//   otherwise contract `scale * x + g` into one FMA in one kernel and not in another, and
//   a softmax that must be exactly 1 (a 1 x 1 block) would come out as 1 - 1 ulp;
// * 16-byte vector loads/stores of a row segment, and the warp/block row-walk shape shared
//   by the row-wise kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/ncl_math.h"

namespace ncl {
namespace cuda {

constexpr int kThreads = 256;  // threads per block in every kernel
constexpr int kWarps = kThreads / 32;

// Row-wise kernels (row_lse, ncl_grad, apply_biases): rows at least this long get a whole
// block each (more loads in flight per row); shorter rows get one warp each, kWarps rows
// per block.
constexpr int64_t kBlockPerRowMin = 4096;

// ---------------------------------------------------------------- launches
// Every kernel is launched through here: on the GPU, a launch on `stream` and the launch
// error; compiled for the CPU (host_emulation.h, tests only), a run of the whole grid.
template <typename... KArgs, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block,
                                 cudaStream_t stream, Args... args) {
#ifdef NCL_HOST_EMULATION
  (void)stream;
  return ncl_emu::launch(grid, block, [&] { kernel(args...); });
#else
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
#endif
}

// ---------------------------------------------------------------- conversions
// store_as<Storage>(x): the accumulator value rounded to the storage type (store_acc of
// common/ncl_math.h: the device's round-to-nearest-even conversions).
template <typename Storage, typename Acc>
__device__ __forceinline__ Storage store_as(Acc x) {
  Storage out;
  store_acc(x, &out);
  return out;
}

template <typename Storage>
__device__ __forceinline__ auto load_acc(const Storage& x) -> decltype(to_float(x)) {
  return to_float(x);
}

// Rounded separately, never fused (the intrinsics are exempt from FMA contraction).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// ---------------------------------------------------------------- 16-byte vectors
template <typename Storage>
struct Vec {
  static constexpr int kN = 16 / int(sizeof(Storage));  // elements per 16-byte vector
  union {
    uint4 raw;
    Storage e[kN];
  };
};

template <typename Storage>
__device__ __forceinline__ Vec<Storage> load_vec(const Storage* p) {  // p 16-byte aligned
  Vec<Storage> v;
  v.raw = *reinterpret_cast<const uint4*>(p);
  return v;
}

template <typename Storage>
__device__ __forceinline__ void store_vec(Storage* p, const Vec<Storage>& v) {
  *reinterpret_cast<uint4*>(p) = v.raw;
}

// Both the base pointer and the row stride keep every row 16-byte aligned.
template <typename Storage>
inline bool rows_aligned16(const void* p, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 &&
         (row_stride * int64_t(sizeof(Storage))) % 16 == 0;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// out[k] = p[j0 + k] for the K columns of one vector (j0 a multiple of K). Per-column
// vectors (g, lse_col, coefficients, targets) are read alongside each 16-byte vector of S;
// element by element, a warp's lanes would touch 32 sectors spread over 1 KB per load and
// the L1 traffic, not HBM, would bound the row kernels. `aligned` (p is 16-byte aligned,
// so every p + j0 is): 16-byte loads; otherwise one load per element.
template <int K, typename T>
__device__ __forceinline__ void load_cols(const T* p, int64_t j0, bool aligned, T (&out)[K]) {
  static_assert((K * sizeof(T)) % 16 == 0, "whole 16-byte vectors");
  if (aligned) {
    const uint4* q = reinterpret_cast<const uint4*>(p + j0);
#pragma unroll
    for (int w = 0; w < int(K * sizeof(T) / 16); ++w) {
      const uint4 r = q[w];
      memcpy(reinterpret_cast<char*>(out) + 16 * w, &r, 16);
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = p[j0 + k];
  }
}

// ---------------------------------------------------------------- row walk
// Visits the elements of one row [0, m) that thread t (of the kGroup threads sharing the
// row) owns: whole 16-byte vectors v = t, t + kGroup, ... when VEC, then the m % kN tail
// one element at a time. A functor Fn (with a member type Acc) gets
//   fn.vec(j0, x)  x: the kN values (as Acc) of the vector at columns j0 .. j0 + kN - 1
//   fn(j, x)       one element (the tail, and every element when !VEC)
// read_row ignores what fn does to x; update_row (read-modify-write) stores it.
template <typename Storage, int kGroup, bool VEC, typename Fn>
__device__ __forceinline__ void read_row(const Storage* row, int64_t m, int t, Fn& fn) {
  using Acc = typename Fn::Acc;
  constexpr int kN = Vec<Storage>::kN;
  int64_t j_tail = 0;
  if (VEC) {
    const int64_t nvec = m / kN;
    for (int64_t v = t; v < nvec; v += kGroup) {
      const Vec<Storage> x = load_vec(row + v * kN);
      Acc xa[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) xa[k] = load_acc(x.e[k]);
      fn.vec(v * kN, xa);
    }
    j_tail = nvec * kN;
  }
  for (int64_t j = j_tail + t; j < m; j += kGroup) fn(j, load_acc(row[j]));
}

// Like read_row, but out[j] = the value fn leaves (rounded to Storage). in == out is
// allowed: each element is read before it is written, by the same thread.
template <typename Storage, int kGroup, bool VEC, typename Fn>
__device__ __forceinline__ void update_row(const Storage* in, Storage* out, int64_t m, int t,
                                           Fn& fn) {
  using Acc = typename Fn::Acc;
  constexpr int kN = Vec<Storage>::kN;
  int64_t j_tail = 0;
  if (VEC) {
    const int64_t nvec = m / kN;
    for (int64_t v = t; v < nvec; v += kGroup) {
      Vec<Storage> x = load_vec(in + v * kN);
      Acc xa[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) xa[k] = load_acc(x.e[k]);
      fn.vec(v * kN, xa);
#pragma unroll
      for (int k = 0; k < kN; ++k) x.e[k] = store_as<Storage>(xa[k]);
      store_vec(out + v * kN, x);
    }
    j_tail = nvec * kN;
  }
  for (int64_t j = j_tail + t; j < m; j += kGroup) out[j] = store_as<Storage>(fn(j, load_acc(in[j])));
}

// Launch shape of the row-wise kernels: a warp per row (kWarps rows per block) or a block
// per row, and a grid capped at max_blocks (the kernels stride over the remaining rows).
struct RowGrid {
  bool block_per_row;
  unsigned blocks;
};
inline RowGrid row_grid(int64_t n, int64_t m, int64_t max_blocks) {
  const bool bpr = m >= kBlockPerRowMin;
  const int64_t rows_per_block = bpr ? 1 : kWarps;
  int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return {bpr, unsigned(blocks)};
}

// ---------------------------------------------------------------- reductions
template <typename Acc>
__device__ __forceinline__ LseState<Acc> warp_merge(LseState<Acc> st) {
  // Butterfly: every lane ends up with the merge of all 32 states, in a fixed order.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const Acc om = __shfl_xor_sync(0xffffffffu, st.m, off);
    const Acc os = __shfl_xor_sync(0xffffffffu, st.s, off);
    st.merge(LseState<Acc>(om, os));
  }
  return st;
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Sum over the block (all kThreads threads must call it); the result is valid in thread 0.
// Fixed order, so the same inputs give the same bits.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc x) {
  __shared__ Acc part[kWarps];
  x = warp_sum(x);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = x;
  __syncthreads();
  Acc total = Acc(0);
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) total += part[w];
  __syncthreads();  // part[] may be reused by a later call
  return total;
}

}  // namespace cuda
}  // namespace ncl
