// The CPU kernels, written once in portable C++ and compiled once per instruction set:
// kernels_generic.cpp (baseline), kernels_avx2.cpp (-mavx2 -mfma -mf16c) and
// kernels_avx512.cpp (-mavx512f ...) each define NCL_ISA and include this file.
//
// How they are fast without intrinsics: every element loop is a counted loop over
// contiguous memory whose body is branch-free (exp_poly from ncl_math.h, ternaries for the
// -inf rules), marked `omp simd`, so the compiler turns it into SSE2/AVX2/AVX-512 code
// depending on the flags of the including file. Only fp16 <-> float conversion uses F16C
// intrinsics where available (the portable bit-twiddling version does not vectorize).
//
// Determinism: a row is always reduced by one thread in a fixed block order; the column
// pass splits the matrix into tasks that depend on the shape only (never on the thread
// count) and merges their partial states in task order. So results are bitwise identical
// for any number of threads (they may differ between instruction sets in the last bits:
// vector reductions group their sums by lane count).
//
// Everything here lives in namespace ncl::cpu::NCL_ISA, and no std:: container is used, so
// no out-of-line function compiled with AVX-512 flags can be shared (by the linker's
// merging of identical inline definitions) with the portable kernels.
#ifndef NCL_ISA
#error "define NCL_ISA (generic, avx2, avx512) before including kernels_impl.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/ncl_math.h"
#include "cpu/kernels.h"

namespace ncl {
namespace cpu {
namespace NCL_ISA {
namespace {

// Columns per block of a row: 1024 accumulators (4 KiB of float) stay in L1, so the
// looks a block needs (convert, max, exp-sum) cost one read of S from memory.
constexpr int64_t kBlock = 1024;
// Column pass tiles: kTileRows rows x kColBlock columns of logits (64 KiB float, in L2).
constexpr int64_t kColBlock = 512;
constexpr int64_t kTileRows = 32;
// The column pass is split into at least this many tasks (when the shape allows), enough to
// balance a few threads dynamically; a constant, so the split never depends on threads.
constexpr int64_t kMinColTasks = 64;
// Rows are handed out dynamically in chunks of this many: a thread that the OS
// descheduled (this machine is shared) does not hold up the others at the end of a pass.
// Which thread reduces a row never changes its result, so determinism is kept.
constexpr int kRowChunk = 16;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

template <typename A>
inline A vexp(A x);
template <>
inline float vexp<float>(float x) { return exp_poly(x); }
template <>
inline double vexp<double>(double x) { return std::exp(x); }  // float64: exactness first

template <typename A>
constexpr A kNegInf = -static_cast<A>(INFINITY);

template <typename A>
struct VExp {
  NCL_HD A operator()(A x) const { return vexp<A>(x); }
};

int threads_for(int n_threads, int64_t work) {
#ifdef _OPENMP
  const int nt = n_threads > 0 ? n_threads : omp_get_max_threads();
  return work >= kMinParallelWork ? nt : 1;
#else
  (void)n_threads;
  (void)work;
  return 1;
#endif
}

// Scratch memory without std:: containers (see the header comment); throws bad_alloc.
template <typename T>
T* scratch(int64_t count) {
  void* p = std::malloc(sizeof(T) * size_t(count > 0 ? count : 1));
  if (!p) throw std::bad_alloc();
  return static_cast<T*>(p);
}

// ---------------------------------------------------------------- load / store blocks
// dst[k] = S[k] as accumulator values.
inline void load_raw(const float* src, int64_t len, float* dst) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) dst[k] = src[k];
}
inline void load_raw(const double* src, int64_t len, double* dst) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) dst[k] = src[k];
}
inline void load_raw(const bf16_t* src, int64_t len, float* dst) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) dst[k] = to_float(src[k]);
}
inline void load_raw(const f16_t* src, int64_t len, float* dst) {
  int64_t k = 0;
#if defined(__F16C__)
  for (; k + 8 <= len; k += 8)
    _mm256_storeu_ps(dst + k,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
#endif
  for (; k < len; ++k) dst[k] = to_float(src[k]);
}

// The block as accumulator values: storage that already is the accumulator type is read
// in place; bf16/fp16 are converted into `buf`.
template <typename A>
inline const A* as_acc(const A* src, int64_t, A*) { return src; }
inline const float* as_acc(const bf16_t* src, int64_t len, float* buf) {
  load_raw(src, len, buf);
  return buf;
}
inline const float* as_acc(const f16_t* src, int64_t len, float* buf) {
  load_raw(src, len, buf);
  return buf;
}

// out[k] = scale * x[k] + add_vec[k] (or + add), one fused sweep that also returns the max
// (a NaN never wins it). x may be out. The rounding order (scale * S, then + the potential)
// is the PyTorch backend's and the reference's.
template <typename A>
inline A logits_max(const A* x, int64_t len, A scale, const A* add_vec, A add, A* out) {
  A mx = kNegInf<A>;
  if (add_vec) {
#pragma omp simd reduction(max : mx)
    for (int64_t k = 0; k < len; ++k) {
      const A v = scale * x[k] + add_vec[k];
      out[k] = v;
      mx = v > mx ? v : mx;
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t k = 0; k < len; ++k) {
      const A v = scale * x[k] + add;
      out[k] = v;
      mx = v > mx ? v : mx;
    }
  }
  return mx;
}

// Round an accumulator block into storage.
inline void store_block(const float* src, int64_t len, float* dst) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) dst[k] = src[k];
}
inline void store_block(const double* src, int64_t len, double* dst) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) dst[k] = src[k];
}
inline void store_block(const float* src, int64_t len, bf16_t* dst) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) dst[k] = to_bf16(src[k]);
}
inline void store_block(const float* src, int64_t len, f16_t* dst) {
  int64_t k = 0;
#if defined(__F16C__)
  // imm 0: round to nearest even, as to_f16 and torch do
  for (; k + 8 <= len; k += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + k), 0));
#endif
  for (; k < len; ++k) dst[k] = to_f16(src[k]);
}

// Ask for `count` elements from p into the cache (nothing for count <= 0).
template <typename St>
inline void prefetch(const St* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < count * int64_t(sizeof(St)); off += 64) __builtin_prefetch(c + off);
}

// ---------------------------------------------------------------- block reductions
template <typename A>
inline bool block_has_nan(const A* x, int64_t len) {
  for (int64_t k = 0; k < len; ++k)
    if (x[k] != x[k]) return true;
  return false;
}

// sum_k exp(x[k] - shift), shift finite; -inf elements add exactly 0, NaN gives NaN.
template <typename A>
inline A sum_exp(const A* x, int64_t len, A shift) {
  A s = A(0);
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < len; ++k) s += vexp<A>(x[k] - shift);
  return s;
}

// ---------------------------------------------------------------- row_lse
// Output of an LSE: finished (out = m + log s), or as the state (out = m, out_sum = s) so
// that the caller can finish with the log of its own library (see primitives.h).
template <typename A>
inline void put_lse(A m, A s, A* out, A* out_sum, int64_t i) {
  if (out_sum) {
    out[i] = m;
    out_sum[i] = s;
  } else {
    out[i] = s == A(0) ? kNegInf<A> : m + std::log(s);
  }
}

template <typename St, typename A>
LseState<A> row_lse_one(const St* row, int64_t m, A scale, const A* g, A* buf) {
  LseState<A> state;
  for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
    const int64_t len = m - j0 < kBlock ? m - j0 : kBlock;
    const A bmax = logits_max(as_acc(row + j0, len, buf), len, scale, g ? g + j0 : nullptr,
                              A(0), buf);
    // the exp sweep below is compute-bound: have the next block on its way meanwhile
    prefetch(row + j0 + kBlock, (m - j0 - kBlock < kBlock ? m - j0 - kBlock : kBlock));
    // A fully masked block adds nothing; skipping it keeps (-inf) - (-inf) out of exp.
    // The max ignores NaN, so look for one first: a NaN input gives a NaN result.
    if (bmax == kNegInf<A>) {
      if (block_has_nan(buf, len)) state.merge(LseState<A>(A(0), A(NAN)));
      continue;
    }
    state.merge(LseState<A>(bmax, sum_exp(buf, len, bmax)));
  }
  return state;
}

template <typename St, typename A>
void row_lse_typed(const void* S, int64_t n, int64_t m, int64_t rs, double scale, const void* g,
                   void* out, void* out_sum, int n_threads) {
  const St* s = static_cast<const St*>(S);
  const A* gp = static_cast<const A*>(g);
  A* o = static_cast<A*>(out);
  A* os = static_cast<A*>(out_sum);
  const A sc = static_cast<A>(scale);  // logits are formed in accumulator precision
  const int nt = threads_for(n_threads, n * m);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    alignas(64) A buf[kBlock];
#pragma omp for schedule(dynamic, kRowChunk)
    for (int64_t i = 0; i < n; ++i) {
      const LseState<A> st = row_lse_one(s + i * rs, m, sc, gp, buf);
      put_lse(st.m, st.s, o, os, i);
    }
  }
}

// ---------------------------------------------------------------- col_lse
// Running (max, sum) of columns j0 .. j0+len over rows i0 .. i1, streamed row-major in
// tiles of kTileRows rows: per tile, one max look and one exp per element, plus one
// rescaling exp per column (not per element).
template <typename St, typename A>
void col_lse_task(const St* S, int64_t rs, int64_t i0, int64_t i1, int64_t j0, int64_t len,
                  A scale, const A* f, A* run_m, A* run_s, A* tile) {
  alignas(64) A tmax[kColBlock];
  alignas(64) A shift[kColBlock];
  for (int64_t k = 0; k < len; ++k) {
    run_m[k] = kNegInf<A>;
    run_s[k] = A(0);
  }
  for (int64_t ii = i0; ii < i1; ii += kTileRows) {
    const int64_t rows = i1 - ii < kTileRows ? i1 - ii : kTileRows;
    for (int64_t k = 0; k < len; ++k) tmax[k] = kNegInf<A>;
    for (int64_t r = 0; r < rows; ++r) {
      A* t = tile + r * kColBlock;
      const A fi = f ? f[ii + r] : A(0);
      const A* x = as_acc(S + (ii + r) * rs + j0, len, t);
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) {
        const A v = scale * x[k] + fi;
        t[k] = v;
        tmax[k] = v > tmax[k] ? v : tmax[k];
      }
    }
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      const A mo = run_m[k];
      const A mn = tmax[k] > mo ? tmax[k] : mo;
      // (-inf) - (-inf) must not reach exp: a column still all -inf keeps sum 0
      const A fac = mn == kNegInf<A> ? A(0) : vexp<A>(mo - mn);
      run_s[k] *= fac;
      run_m[k] = mn;
      shift[k] = mn == kNegInf<A> ? A(0) : mn;
    }
    const int64_t next_rows = i1 - (ii + rows) < kTileRows ? i1 - (ii + rows) : kTileRows;
    for (int64_t r = 0; r < rows; ++r) {
      // the exp sweep is compute-bound: fetch the next tile meanwhile, a row per row
      if (r < next_rows) prefetch(S + (ii + rows + r) * rs + j0, len);
      const A* t = tile + r * kColBlock;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) run_s[k] += vexp<A>(t[k] - shift[k]);
    }
  }
}

template <typename St, typename A>
void col_lse_typed(const void* S, int64_t n, int64_t m, int64_t rs, double scale, const void* f,
                   void* out, void* out_sum, int n_threads) {
  const St* s = static_cast<const St*>(S);
  const A* fp = static_cast<const A*>(f);
  A* o = static_cast<A*>(out);
  A* os = static_cast<A*>(out_sum);
  const A sc = static_cast<A>(scale);
  if (m == 0) return;
  // Tasks: column blocks x row groups; the number of row groups depends on the shape only.
  const int64_t n_cb = (m + kColBlock - 1) / kColBlock;
  const int64_t n_tiles = (n + kTileRows - 1) / kTileRows;
  int64_t groups = (kMinColTasks + n_cb - 1) / n_cb;
  if (groups > n_tiles) groups = n_tiles;
  if (groups < 1) groups = 1;
  const int64_t rows_per_group = ((n_tiles + groups - 1) / groups) * kTileRows;
  groups = n > 0 ? (n + rows_per_group - 1) / rows_per_group : 1;

  const int nt = threads_for(n_threads, n * m);
  // all scratch is allocated here: an exception must not escape a parallel region
  A* part_m = scratch<A>(groups * m);
  A* part_s = scratch<A>(groups * m);
  A* tiles = scratch<A>(int64_t(nt) * kTileRows * kColBlock);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    A* tile = tiles + int64_t(omp_get_thread_num()) * kTileRows * kColBlock;
#else
    A* tile = tiles;
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < groups * n_cb; ++t) {
      const int64_t grp = t / n_cb, cb = t % n_cb;
      const int64_t i0 = grp * rows_per_group;
      const int64_t i1 = i0 + rows_per_group < n ? i0 + rows_per_group : n;
      const int64_t j0 = cb * kColBlock;
      const int64_t len = m - j0 < kColBlock ? m - j0 : kColBlock;
      col_lse_task(s, rs, i0, i1, j0, len, sc, fp, part_m + grp * m + j0,
                   part_s + grp * m + j0, tile);
    }
    // Merge the row groups of each column in group order (fixed, so deterministic).
#pragma omp for schedule(static)
    for (int64_t j = 0; j < m; ++j) {
      A mm = kNegInf<A>;
      for (int64_t grp = 0; grp < groups; ++grp) {
        const A pm = part_m[grp * m + j];
        mm = pm > mm ? pm : mm;
      }
      A sum = A(0);
      for (int64_t grp = 0; grp < groups; ++grp) {
        const A pm = part_m[grp * m + j];
        // a group with no finite logit adds 0 * its sum (0, or NaN if it saw a NaN)
        sum += part_s[grp * m + j] * (pm == kNegInf<A> ? A(0) : vexp<A>(pm - mm));
      }
      put_lse(mm, sum, o, os, j);
    }
  }
  std::free(part_m);
  std::free(part_s);
  std::free(tiles);
}

// ---------------------------------------------------------------- ncl_grad
// Row i of G (SPEC.md section 3), block by block, with ncl_math.h's gradient element:
//   G_ij = cr_i * exp((l + g_j) + b_i) + cc_j * exp((l + f_i) + h_j) - [j = y_i] cr_i
//          - [i = z_j] cc_j
// with l = scale * S_ij, b_i = neg_lse(LSE_row_i), h_j = neg_lse(LSE_col_j) (-inf where the
// LSE is -inf: such a row/column gets probability 0, never NaN). The logits are rounded as
// in row_lse/col_lse, so a probability that should be exactly 1 is.
template <typename St, typename A>
void grad_typed(const GradArgs& a) {
  const St* S = static_cast<const St*>(a.S);
  St* out = static_cast<St*>(a.out);
  const A* f = static_cast<const A*>(a.f);
  const A* g = static_cast<const A*>(a.g);
  const A* lse_row = static_cast<const A*>(a.lse_row);
  const A* lse_col = static_cast<const A*>(a.lse_col);
  const A* coef_row = static_cast<const A*>(a.coef_row);
  const A* coef_col = static_cast<const A*>(a.coef_col);
  const A sc = static_cast<A>(a.scale);
  const int64_t n = a.n, m = a.m;

  A* h = scratch<A>(m);
  for (int64_t j = 0; j < m; ++j) h[j] = neg_lse(lse_col[j]);

  const int nt = threads_for(a.n_threads, n * m);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    alignas(64) A sbuf[kBlock];
    alignas(64) A gv[kBlock];
#pragma omp for schedule(dynamic, kRowChunk)
    for (int64_t i = 0; i < n; ++i) {
      const St* row = S + i * a.row_stride;
      St* orow = out ? out + i * a.out_row_stride : nullptr;
      const A cr = coef_row[i], fi = f[i];
      const A bi = neg_lse(lse_row[i]);
      const int64_t yi = a.y[i];
      double ds = 0.0;
      for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
        const int64_t len = m - j0 < kBlock ? m - j0 : kBlock;
        // every element of the block is read (two sweeps below) before `out`, which may be
        // S itself, is written (the last sweep)
        const A* sv = as_acc(row + j0, len, sbuf);
        const A* gb = g + j0;
        const A* hb = h + j0;
        const A* cb = coef_col + j0;
#pragma omp simd
        for (int64_t k = 0; k < len; ++k)
          gv[k] = ncl_grad_soft(sc * sv[k], fi, gb[k], bi, hb[k], cr, cb[k], VExp<A>());
        if (yi >= j0 && yi < j0 + len) gv[yi - j0] -= cr;
        for (int64_t q = a.z_start[i]; q < a.z_start[i + 1]; ++q) {
          const int64_t j = a.z_cols[q];
          if (j >= j0 && j < j0 + len) gv[j - j0] -= coef_col[j];
        }
        // masked (-inf) scores do not depend on the scale: they add nothing to dscale
        A dsb = A(0);
#pragma omp simd reduction(+ : dsb)
        for (int64_t k = 0; k < len; ++k) dsb += sv[k] == kNegInf<A> ? A(0) : gv[k] * sv[k];
        ds += double(dsb);
        if (orow) {
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) gv[k] *= sc;
          store_block(gv, len, orow + j0);
        }
      }
      a.row_ds[i] = ds;
    }
  }
  std::free(h);
}

// ---------------------------------------------------------------- apply_biases
template <typename St, typename A>
void apply_biases_typed(void* S, int64_t n, int64_t m, int64_t rs, double scale, const void* f,
                        const void* g, int n_threads) {
  St* s = static_cast<St*>(S);
  const A* fp = static_cast<const A*>(f);
  const A* gp = static_cast<const A*>(g);
  const A sc = static_cast<A>(scale);
  const int nt = threads_for(n_threads, n * m);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    alignas(64) A buf[kBlock];
#pragma omp for schedule(dynamic, kRowChunk)
    for (int64_t i = 0; i < n; ++i) {
      St* row = s + i * rs;
      const A fi = fp ? fp[i] : A(0);
      for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
        const int64_t len = m - j0 < kBlock ? m - j0 : kBlock;
        const A* x = as_acc(row + j0, len, buf);
        // same operations in the same order as the PyTorch backend: (s * S + f_i) + g_j,
        // with an absent potential not added at all (adding 0 would turn -0 into +0)
        const A* gb = gp ? gp + j0 : nullptr;
        if (fp && gb) {
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) buf[k] = (sc * x[k] + fi) + gb[k];
        } else if (fp) {
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) buf[k] = sc * x[k] + fi;
        } else if (gb) {
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) buf[k] = sc * x[k] + gb[k];
        } else {
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) buf[k] = sc * x[k];
        }
        store_block(buf, len, row + j0);
      }
    }
  }
}

[[noreturn]] void bad_dtype(const char* what, int dtype) {
  throw std::invalid_argument(std::string(what) + ": unknown dtype code " +
                              std::to_string(dtype));
}

}  // namespace

// ---------------------------------------------------------------- entry points
#define NCL_DISPATCH_DTYPE(what, dtype, FN, ...) \
  NCL_DTYPE_SWITCH(dtype, FN, bad_dtype(what, dtype), __VA_ARGS__)

void row_lse(const void* S, int64_t n, int64_t m, int64_t rs, int dtype, double scale,
             const void* g, void* out, void* out_sum, int n_threads) {
  NCL_DISPATCH_DTYPE("row_lse", dtype, row_lse_typed, S, n, m, rs, scale, g, out, out_sum,
                     n_threads)
}

void col_lse(const void* S, int64_t n, int64_t m, int64_t rs, int dtype, double scale,
             const void* f, void* out, void* out_sum, int n_threads) {
  NCL_DISPATCH_DTYPE("col_lse", dtype, col_lse_typed, S, n, m, rs, scale, f, out, out_sum,
                     n_threads)
}

void ncl_grad(const GradArgs& a) { NCL_DISPATCH_DTYPE("ncl_grad", a.dtype, grad_typed, a) }

void apply_biases(void* S, int64_t n, int64_t m, int64_t rs, int dtype, double scale,
                  const void* f, const void* g, int n_threads) {
  NCL_DISPATCH_DTYPE("apply_biases", dtype, apply_biases_typed, S, n, m, rs, scale, f, g,
                     n_threads)
}

#undef NCL_DISPATCH_DTYPE

}  // namespace NCL_ISA
}  // namespace cpu
}  // namespace ncl
