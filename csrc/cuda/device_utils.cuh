// device_utils.cuh — device-side helpers shared by the CUDA kernels (nvcc only).
//
// * the launch ladder (run-time flags -> kernel template arguments) and grid shapes, once;
// * storage <-> accumulator conversion (to_float and store_acc come from
//   common/ncl_math.h, shared with the CPU kernels);
// * logits formed with explicitly rounded multiply/add, so that every kernel (row_lse,
//   col_lse, ncl_grad, apply_biases) and PyTorch round them identically: nvcc would
//   otherwise contract `scale * x + g` into one FMA in one kernel and not in another, and
//   a softmax that must be exactly 1 (a 1 x 1 block) would come out as 1 - 1 ulp;
// * the exp of the LSE sums and softmaxes (ex2.approx, see fast_exp) and the batched,
//   branch-free online LSE update (push_tile);
// * 16-byte streaming loads and stores of a thread's chunk of a row, with the element
//   path for misaligned rows and for the ragged end of a row.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/ncl_math.h"

namespace ncl {
namespace cuda {

constexpr int kThreads = 256;  // threads per block in every kernel
constexpr int kWarps = kThreads / 32;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// The multiprocessor count of the current device, for launchers that size a persistent
// grid by it (a host query that does not synchronize); 132 (an H200) where it cannot be
// read. The host emulation reports ncl_emu::sm_count() instead.
inline int current_sm_count() {
#ifdef NCL_HOST_EMULATION
  return ncl_emu::sm_count();
#else
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      sms < 1) {
    (void)cudaGetLastError();  // not this launcher's error to report
    return 132;
  }
  return sms;
#endif
}

// The launch ladder, written once: with_flags(fn, b0, b1, ...) calls
// fn(std::integral_constant<bool, b0>{}, ...), so a launcher picks its kernel variant with
// `decltype(flag)::value` as a template argument instead of a nest of if/else.
template <typename Fn>
inline cudaError_t with_flags(Fn&& fn) {
  return fn();
}
template <typename Fn, typename... Rest>
inline cudaError_t with_flags(Fn&& fn, bool b, Rest... rest) {
  if (b) return with_flags([&](auto... more) { return fn(std::true_type{}, more...); }, rest...);
  return with_flags([&](auto... more) { return fn(std::false_type{}, more...); }, rest...);
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

// -inf in each storage type: the pad of a ragged chunk (it adds nothing to an LSE).
template <typename Storage> __device__ __forceinline__ Storage storage_neg_inf();
template <> __device__ __forceinline__ float storage_neg_inf<float>() { return -INFINITY; }
template <> __device__ __forceinline__ double storage_neg_inf<double>() { return -INFINITY; }
template <> __device__ __forceinline__ bf16_t storage_neg_inf<bf16_t>() { return {0xff80u}; }
template <> __device__ __forceinline__ f16_t storage_neg_inf<f16_t>() { return {0xfc00u}; }

// Rounded separately, never fused (the intrinsics are exempt from FMA contraction).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// a * b + c rounded once, on the device and in the host emulation alike
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return fma(a, b, c); }

__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }

// ---------------------------------------------------------------- exp
// exp(x) = 2^(x log2 e) on the special-function unit: ex2.approx.ftz.f32, one MUFU.EX2
// (expf is about 8 instructions). Its error is that of the CUDA math library's exp2f,
// 2 ulp, which nvcc builds from the same instruction (the .ftz form differs only in
// flushing subnormals: an input below 2^-126 gives 2^0 = 1 exactly, a result below
// 2^-126 gives 0; such a term is below 2^-126 of the largest term of its sum, which is at
// least 1). x log2 e adds at most 1/2 ulp of the exponent, |x| 2^-24 relative in the
// result: terms that matter to an LSE have x in about [-17, 0]. Exact cases the kernels
// rely on: x = 0 gives 1 (a softmax of a single logit is exactly 1, a rescale by an
// unchanged max is exactly 1), -inf gives 0, NaN stays NaN. Measured in the host
// emulation (host_emulation.h models the 2 ulp, tests/test_cuda_emulated.py) against
// the docs/math.md section 5 bounds. float64 keeps the correctly rounded exp.
__device__ __forceinline__ float ex2_approx(float x) {
#ifdef NCL_HOST_EMULATION
  return ncl_emu::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}
__device__ __forceinline__ float fast_exp(float x) { return ex2_approx(x * 1.44269504088896341f); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// ---------------------------------------------------------------- batched online LSE
// st <- st merged with the K logits l[0..K): one tile max, one rescale of the running sum,
// K exps, no branch. The logits are shifted by the new max (or by 0 while every value so
// far is -inf, so that -inf - -inf never forms a NaN); -inf entries add exp(-inf) = 0.
// A NaN logit makes the sum NaN (fmax ignores it, its exp does not), as LseState::push.
template <typename Acc, int K>
__device__ __forceinline__ void push_tile(LseState<Acc>& st, const Acc (&l)[K]) {
  Acc mt = l[0];
#pragma unroll
  for (int k = 1; k < K; ++k) mt = max_of(mt, l[k]);
  const Acc m_new = max_of(st.m, mt);
  const Acc m_use = m_new == neg_inf<Acc>() ? Acc(0) : m_new;
  Acc e[K];
#pragma unroll
  for (int k = 0; k < K; ++k) e[k] = fast_exp(l[k] - m_use);
#pragma unroll
  for (int w = 1; w < K; w *= 2)  // pairwise: a short dependency chain
#pragma unroll
    for (int k = 0; k + w < K; k += 2 * w) e[k] += e[k + w];
  st.s = st.s * fast_exp(st.m - m_use) + e[0];
  st.m = m_new;
}

// ---------------------------------------------------------------- 16-byte vectors
template <typename Storage>
struct Vec {
  static constexpr int kN = 16 / int(sizeof(Storage));  // elements per 16-byte vector
  union {
    uint4 raw;
    Storage e[kN];
  };
};

// The kN values of a vector as accumulators. bf16 straight from the 32-bit words (the
// low element is w << 16, the high one w & 0xffff0000: one instruction each, where the
// element-wise path extracts and shifts); the same bits as to_float.
template <typename Storage, typename Acc>
__device__ __forceinline__ void to_acc(const Vec<Storage>& v, Acc (&out)[Vec<Storage>::kN]) {
#pragma unroll
  for (int k = 0; k < Vec<Storage>::kN; ++k) out[k] = load_acc(v.e[k]);
}
__device__ __forceinline__ void to_acc(const Vec<bf16_t>& v, float (&out)[8]) {
  const uint32_t w[4] = {v.raw.x, v.raw.y, v.raw.z, v.raw.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    out[2 * q] = bits_as_float(w[q] << 16);
    out[2 * q + 1] = bits_as_float(w[q] & 0xffff0000u);
  }
}

// The reverse: accumulators rounded to the storage type (round to nearest even, as
// store_as), two per conversion instruction for bf16 and fp16 on the device.
template <typename Storage, typename Acc>
__device__ __forceinline__ void from_acc(const Acc (&x)[Vec<Storage>::kN], Vec<Storage>& v) {
#pragma unroll
  for (int k = 0; k < Vec<Storage>::kN; ++k) v.e[k] = store_as<Storage>(x[k]);
}
#ifndef NCL_HOST_EMULATION
template <typename Storage, typename Cvt>
__device__ __forceinline__ void pack_pairs(const float (&x)[8], Vec<Storage>& v, Cvt cvt) {
  uint32_t w[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const auto h = cvt(x[2 * q], x[2 * q + 1]);
    memcpy(&w[q], &h, 4);
  }
  v.raw = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void from_acc(const float (&x)[8], Vec<bf16_t>& v) {
  pack_pairs(x, v, [](float a, float b) { return __floats2bfloat162_rn(a, b); });
}
__device__ __forceinline__ void from_acc(const float (&x)[8], Vec<f16_t>& v) {
  pack_pairs(x, v, [](float a, float b) { return __floats2half2_rn(a, b); });
}
#endif

// Streaming (evict-first) 16-byte accesses: S is touched once per pass, so it should not
// push the vectors that every row reads again (g, f) out of the caches.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
#ifdef NCL_HOST_EMULATION
  return *p;
#else
  return __ldcs(p);
#endif
}
__device__ __forceinline__ void store_stream(uint4* p, uint4 v) {
#ifdef NCL_HOST_EMULATION
  *p = v;
#else
  __stcs(p, v);
#endif
}

// Both the base pointer and the row stride keep every row 16-byte aligned.
template <typename Storage>
inline bool rows_aligned16(const void* p, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 &&
         (row_stride * int64_t(sizeof(Storage))) % 16 == 0;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------- chunks
// The unit of work of every kernel: thread t of a group of G threads owns kN columns of a
// row segment starting at `base` (kN = one 16-byte vector of the storage type):
//   VEC (rows 16-byte aligned): base + t kN + k, one vector load;
//   otherwise:                   base + t + k G, element loads that are coalesced across
//                                the group (lane t next to lane t + 1).
// WHOLE: the caller knows that the group's whole segment (G kN columns) lies below m, so
// there is no bound to check; the kernels run every step but a row's last this way.
// Otherwise columns at or past m are not read (a loaded chunk holds -inf there, which
// adds nothing to an LSE) and nothing is stored there.
template <bool VEC, int G, int kN>
__device__ __forceinline__ int64_t chunk_col(int64_t base, int t, int k) {
  return VEC ? base + int64_t(t) * kN + k : base + t + int64_t(k) * G;
}

template <bool VEC, bool WHOLE, int G, int kN>
__device__ __forceinline__ bool chunk_whole(int64_t base, int t, int64_t m) {
  return WHOLE || (VEC && base + int64_t(t + 1) * kN <= m);
}

template <bool VEC, bool WHOLE, int G, typename Storage>
__device__ __forceinline__ Vec<Storage> load_chunk(const Storage* row, int64_t base, int t,
                                                   int64_t m) {
  constexpr int kN = Vec<Storage>::kN;
  Vec<Storage> v;
  if (VEC && chunk_whole<VEC, WHOLE, G, kN>(base, t, m)) {
    v.raw = load_stream(reinterpret_cast<const uint4*>(row + base + int64_t(t) * kN));
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const int64_t j = chunk_col<VEC, G, kN>(base, t, k);
      v.e[k] = WHOLE || j < m ? row[j] : storage_neg_inf<Storage>();
    }
  }
  return v;
}

template <bool VEC, bool WHOLE, int G, typename Storage>
__device__ __forceinline__ void store_chunk(Storage* row, int64_t base, int t, int64_t m,
                                            const Vec<Storage>& v) {
  constexpr int kN = Vec<Storage>::kN;
  if (VEC && chunk_whole<VEC, WHOLE, G, kN>(base, t, m)) {
    store_stream(reinterpret_cast<uint4*>(row + base + int64_t(t) * kN), v.raw);
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const int64_t j = chunk_col<VEC, G, kN>(base, t, k);
      if (WHOLE || j < m) row[j] = v.e[k];
    }
  }
}

// The kN values of a per-column vector p (g) for a chunk; 0 where p is null or past m.
// GVEC (VEC rows, and p null or 16-byte aligned, so that p + base + t kN is too): a whole
// chunk is two or one 16-byte loads; otherwise one load per element. The launcher picks
// GVEC, so a loop holds one way of reading p, not a predicated second one. These vectors
// are read by every row and stay in the caches (plain loads, not streaming ones).
template <bool VEC, bool GVEC, bool WHOLE, int G, int kN, typename T>
__device__ __forceinline__ void load_cols(const T* p, int64_t base, int t, int64_t m,
                                          T (&out)[kN]) {
  static_assert((kN * sizeof(T)) % 16 == 0, "whole 16-byte vectors");
  static_assert(VEC || !GVEC, "vector column loads need the vector chunk layout");
  if (p == nullptr) {
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = T(0);
  } else if (GVEC && chunk_whole<VEC, WHOLE, G, kN>(base, t, m)) {
    const uint4* q = reinterpret_cast<const uint4*>(p + base + int64_t(t) * kN);
#pragma unroll
    for (int w = 0; w < int(kN * sizeof(T) / 16); ++w) {
      const uint4 r = q[w];
      memcpy(reinterpret_cast<char*>(out) + 16 * w, &r, 16);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const int64_t j = chunk_col<VEC, G, kN>(base, t, k);
      out[k] = WHOLE || j < m ? p[j] : T(0);
    }
  }
}

// Walks the segments [base, base + G kN) of a row of m columns: fn(whole, base), with
// whole a std::integral_constant, true for every segment but a ragged last one.
template <int G, int kN, typename Fn>
__device__ __forceinline__ void walk_row(int64_t m, Fn&& fn) {
  constexpr int64_t kSeg = int64_t(G) * kN;
  int64_t base = 0;
  for (; base + kSeg <= m; base += kSeg) fn(std::true_type{}, base);
  if (base < m) fn(std::false_type{}, base);
}

// ---------------------------------------------------------------- row-wise launch shape
// row_lse and apply_biases: a group of threads (a warp, or the whole block for rows of at
// least kBlockPerRowMin elements) walks rows_per_group rows side by side, so that each
// thread has that many 16-byte loads in flight per step and reads each chunk of the
// per-column vector g once for all of them (2 for float64, whose exp is a long inlined
// function: 4 would spill). The grid is capped at max_blocks; the kernels stride over the
// remaining rows.
constexpr int64_t kBlockPerRowMin = 4096;
template <typename Storage>
__host__ __device__ constexpr int rows_per_group() { return sizeof(Storage) == 8 ? 2 : 4; }
// The register budget of the streaming kernels (row_lse, col_lse, apply_biases): 4 blocks
// of 256 threads per SM (at most 64 registers), 64 KB of loads in flight per SM. The
// element-wise path of misaligned rows (an address and a bound per element) gets 3,
// float64 (its exp needs the registers) 2: what each fits without spilling.
template <typename Storage, bool VEC>
__host__ __device__ constexpr int stream_min_blocks() {
  return sizeof(Storage) == 8 ? 2 : VEC ? 4 : 3;
}

struct RowGrid {
  bool block_per_row;  // a block per group of rows (else a warp per group of rows)
  unsigned blocks;
};
template <typename Storage>
inline RowGrid row_grid(int64_t n, int64_t m, int64_t max_blocks) {
  const bool bpr = m >= kBlockPerRowMin;
  const int64_t rows_per_block = int64_t(rows_per_group<Storage>()) * (bpr ? 1 : kWarps);
  int64_t blocks = ceil_div(n, rows_per_block);
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return {bpr, unsigned(blocks)};
}

// The launch of a row-wise kernel (row_lse, apply_biases), written once: the group shape
// from row_grid, and the chunk layout from the alignment of S's rows (VEC) and of g
// (GVEC, only with VEC). kernel_for(wpg, vec, gvec), given them as integral constants,
// names the kernel instantiation; args are the kernel's arguments. The grid is capped at
// kRowMaxBlocks (the kernels stride over further rows; far below the gridDim.x limit).
constexpr int64_t kRowMaxBlocks = 1 << 16;
template <typename Storage, typename KernelFor, typename... Args>
inline cudaError_t launch_rows(KernelFor kernel_for, const void* S, int64_t n, int64_t m,
                               int64_t row_stride, const void* g, cudaStream_t stream,
                               Args... args) {
  const RowGrid rg = row_grid<Storage>(n, m, kRowMaxBlocks);
  const bool rows_vec = rows_aligned16<Storage>(S, row_stride);
  const bool g_vec = rows_vec && (g == nullptr || aligned16(g));
  return with_flags(
      [&](auto block_per_row, auto vec, auto gvec) {
        if constexpr (decltype(gvec)::value && !decltype(vec)::value) {
          return cudaErrorInvalidValue;  // never chosen (g_vec implies rows_vec)
        } else {
          constexpr int kWpg = decltype(block_per_row)::value ? kWarps : 1;
          return launch_kernel(kernel_for(std::integral_constant<int, kWpg>{}, vec, gvec),
                               dim3(rg.blocks), dim3(kThreads), stream, args...);
        }
      },
      rg.block_per_row, rows_vec, g_vec);
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
