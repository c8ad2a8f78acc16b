// The CPU kernels, written once and compiled once per instruction set:
// kernels_generic.cpp (baseline), kernels_avx2.cpp (-mavx2 -mfma -mf16c) and
// kernels_avx512.cpp (-mavx512f ...) each define NCL_ISA and include this file.
//
// How they are fast: every element loop runs on the vector type of csrc/cpu/simd.h (16
// lanes of AVX-512, 8 of AVX2, 4 portable ones), with simd.h's exp, so a pass is one
// branch-free sweep in registers: storage (bf16/fp16 included) is converted as it is
// loaded, the -inf rules are blends, never a branch per element. A row block is swept
// twice while it sits in L1 (its max, then its exp-sum), which is cheaper than an online
// rescale per element.
//
// Determinism: a row is always reduced by one thread in a fixed block order and lane
// order; the column pass splits the matrix into tasks that depend on the shape only
// (never on the thread count) and merges their partial states in task order. So results
// are bitwise identical for any number of threads (they may differ between instruction
// sets in the last bits: sums are grouped by lane count).
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
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>

#if defined(__AVX2__) || defined(__AVX512F__)
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

#include "cpu/simd.h"

// Columns per block of a row: 1024 logits (4 KiB of float) stay in L1 between the two
// sweeps a block needs (convert + max, exp-sum), so they cost one read of S from memory.
constexpr int64_t kBlock = 1024;
// Column pass tiles: kTileRows rows x kColBlock columns of logits (64 KiB float, in L2).
constexpr int64_t kColBlock = 512;
constexpr int64_t kTileRows = 32;
// The column pass is split into at least this many tasks (when the shape allows), enough to
// balance a few threads dynamically; a constant, so the split never depends on threads.
constexpr int64_t kMinColTasks = 64;
// The fused Sinkhorn step splits the rows into at most this many groups (its tasks; each
// keeps m partial column sums).
constexpr int64_t kFusedGroups = 32;
// Rows are handed out dynamically in chunks of this many: a thread that the OS
// descheduled (this machine is shared) does not hold up the others at the end of a pass.
// Which thread reduces a row never changes its result, so determinism is kept.
constexpr int kRowChunk = 16;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

template <typename A>
constexpr A kNegInf = -static_cast<A>(INFINITY);

template <typename A>
using Vec = typename VecOf<A>::type;
template <typename A>
constexpr int kLanes = VecOf<A>::width;

// n rounded up to whole vectors
template <typename A>
inline int64_t padded(int64_t n) {
  return (n + kLanes<A> - 1) / kLanes<A> * kLanes<A>;
}

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

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Scratch memory without std:: containers (see the header comment); throws bad_alloc.
// (std::malloc, not std::aligned_alloc, which MSVC lacks: the kernels load unaligned.)
template <typename T>
T* scratch(int64_t count) {
  void* p = std::malloc(sizeof(T) * size_t(count > 0 ? count : 1));
  if (!p) throw std::bad_alloc();
  return static_cast<T*>(p);
}

// Ask for `count` elements from p into the cache (nothing for count <= 0).
template <typename St>
inline void prefetch(const St* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < count * int64_t(sizeof(St)); off += 64) __builtin_prefetch(c + off);
}

// ---------------------------------------------------------------- block sweeps
// out[k] = scale * x[k] + add_vec[k] (or + add_s when add_vec is null) for k < len, and -inf
// for the lanes up to padded(len); returns the max (a NaN never wins it). The rounding
// order (scale * S, then + the potential) is the PyTorch backend's and the reference's.
template <typename St, typename A>
inline A logits_max(const St* x, int64_t len, A scale, const A* add_vec, A add_s, A* out) {
  using V = Vec<A>;
  constexpr int W = kLanes<A>;
  const V sc = set1(scale), a = set1(add_s), ninf = set1(kNegInf<A>);
  V mx = ninf;
  int64_t k = 0;
  for (; k + W <= len; k += W) {
    const V v = add_vec ? add(mul(sc, load_acc(x + k)), loadu(add_vec + k))
                        : add(mul(sc, load_acc(x + k)), a);
    storeu(out + k, v);
    mx = max_(v, mx);
  }
  if (k < len) {
    const int64_t n = len - k;
    V v = add_vec ? add(mul(sc, load_acc_n(x + k, n)), load_acc_n(add_vec + k, n))
                  : add(mul(sc, load_acc_n(x + k, n)), a);
    v = select(VecOf<A>::first(n), v, ninf);
    storeu(out + k, v);
    mx = max_(v, mx);
  }
  return hmax(mx);
}

// sum_k exp(x[k] - shift) over padded(len) elements, shift finite; -inf elements add
// exactly 0, NaN gives NaN.
template <typename A>
inline A sum_exp(const A* x, int64_t len, A shift) {
  using V = Vec<A>;
  const V sh = set1(shift);
  V s = set1(A(0));
  for (int64_t k = 0; k < padded<A>(len); k += kLanes<A>)
    s = add(s, vexp_le0(sub(loadu(x + k), sh)));
  return hsum(s);
}

template <typename A>
inline bool block_has_nan(const A* x, int64_t len) {
  for (int64_t k = 0; k < len; ++k)
    if (x[k] != x[k]) return true;
  return false;
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

// buf: kBlock + kLanes accumulators
template <typename St, typename A>
LseState<A> row_lse_one(const St* row, int64_t m, A scale, const A* g, A* buf) {
  LseState<A> state;
  for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
    const int64_t len = m - j0 < kBlock ? m - j0 : kBlock;
    const A bmax = logits_max(row + j0, len, scale, g ? g + j0 : nullptr, A(0), buf);
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
    alignas(64) A buf[kBlock + 16];
#pragma omp for schedule(dynamic, kRowChunk)
    for (int64_t i = 0; i < n; ++i) {
      const LseState<A> st = row_lse_one(s + i * rs, m, sc, gp, buf);
      put_lse(st.m, st.s, o, os, i);
    }
  }
}

// ---------------------------------------------------------------- col_lse
// Fold rows i0 .. i0+rows of columns j0 .. j0+len into the running column states
// run_m/run_s (padded(len) entries each): the rows' logits scale * S + f_i go into `tile`
// (rows x kColBlock) with their column max, then the states are rescaled once per column
// (one exp per column per tile, not per element) and the tile's exps are added.
template <typename St, typename A>
void col_tile(const St* S, int64_t rs, int64_t i0, int64_t rows, int64_t j0, int64_t len,
              A scale, const A* f, A* run_m, A* run_s, A* tile, const St* next, int64_t next_rows) {
  using V = Vec<A>;
  constexpr int W = kLanes<A>;
  const int64_t plen = padded<A>(len);
  const V ninf = set1(kNegInf<A>), zero = set1(A(0));
  alignas(64) A tmax[kColBlock];
  alignas(64) A shift[kColBlock];
  for (int64_t k = 0; k < plen; k += W) storeu(tmax + k, ninf);
  for (int64_t r = 0; r < rows; ++r) {
    A* t = tile + r * kColBlock;
    logits_max(S + (i0 + r) * rs + j0, len, scale, static_cast<const A*>(nullptr),
               f ? f[i0 + r] : A(0), t);
    for (int64_t k = 0; k < plen; k += W) storeu(tmax + k, max_(loadu(t + k), loadu(tmax + k)));
  }
  for (int64_t k = 0; k < plen; k += W) {
    const V mo = loadu(run_m + k), tm = loadu(tmax + k);
    const V mn = max_(tm, mo);
    // (-inf) - (-inf) must not count: a column still all -inf keeps sum 0
    const auto empty = eq(mn, ninf);
    storeu(run_s + k, mul(loadu(run_s + k), select(empty, zero, vexp_le0(sub(mo, mn)))));
    storeu(run_m + k, mn);
    storeu(shift + k, select(empty, zero, mn));
  }
  for (int64_t r = 0; r < rows; ++r) {
    // the exp sweep is compute-bound: fetch the next tile meanwhile, a row per row
    if (next && r < next_rows) prefetch(next + r * rs, len);
    const A* t = tile + r * kColBlock;
    for (int64_t k = 0; k < plen; k += W)
      storeu(run_s + k, add(loadu(run_s + k), vexp_le0(sub(loadu(t + k), loadu(shift + k)))));
  }
}

template <typename A>
void init_states(A* run_m, A* run_s, int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    run_m[k] = kNegInf<A>;
    run_s[k] = A(0);
  }
}

// Merge the row groups' states of each column in group order (fixed, so deterministic).
// part_m/part_s: groups x stride.
template <typename A>
void merge_groups(const A* part_m, const A* part_s, int64_t groups, int64_t stride, int64_t m,
                  A* out, A* out_sum) {
#pragma omp for schedule(static)
  for (int64_t j = 0; j < m; ++j) {
    A mm = kNegInf<A>;
    for (int64_t grp = 0; grp < groups; ++grp) {
      const A pm = part_m[grp * stride + j];
      mm = pm > mm ? pm : mm;
    }
    A sum = A(0);
    for (int64_t grp = 0; grp < groups; ++grp) {
      const A pm = part_m[grp * stride + j];
      // a group with no finite logit adds 0 * its sum (0, or NaN if it saw a NaN)
      sum += part_s[grp * stride + j] * (pm == kNegInf<A> ? A(0) : sexp(pm - mm));
    }
    put_lse(mm, sum, out, out_sum, j);
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
  const int64_t stride = padded<A>(m);

  const int nt = threads_for(n_threads, n * m);
  // all scratch is allocated here: an exception must not escape a parallel region
  A* part_m = scratch<A>(groups * stride);
  A* part_s = scratch<A>(groups * stride);
  A* tiles = scratch<A>(int64_t(nt) * kTileRows * kColBlock);
  init_states(part_m, part_s, groups * stride);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    A* tile = tiles + int64_t(thread_id()) * kTileRows * kColBlock;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < groups * n_cb; ++t) {
      const int64_t grp = t / n_cb, cb = t % n_cb;
      const int64_t i0 = grp * rows_per_group;
      const int64_t i1 = i0 + rows_per_group < n ? i0 + rows_per_group : n;
      const int64_t j0 = cb * kColBlock;
      const int64_t len = m - j0 < kColBlock ? m - j0 : kColBlock;
      for (int64_t ii = i0; ii < i1; ii += kTileRows) {
        const int64_t rows = i1 - ii < kTileRows ? i1 - ii : kTileRows;
        const int64_t next_rows = i1 - (ii + rows) < kTileRows ? i1 - (ii + rows) : kTileRows;
        col_tile(s, rs, ii, rows, j0, len, sc, fp, part_m + grp * stride + j0,
                 part_s + grp * stride + j0, tile, s + (ii + rows) * rs + j0, next_rows);
      }
    }
    merge_groups(part_m, part_s, groups, stride, m, o, os);
  }
  std::free(part_m);
  std::free(part_s);
  std::free(tiles);
}

// ---------------------------------------------------------------- sinkhorn_step
// One Sinkhorn iteration with one read of S and one exponential per element. Row i is
// held in a buffer while its logits t_ij = scale * S_ij + g_j are swept three times:
// their max m_i, then e_ij = exp(t_ij - m_i) (in place) and s_i = sum_j e_ij, which give
// LSE_row_i = m_i + log s_i and f_i = log r_i - LSE_row_i, then the row's share of every
// column sum. The column pass needs no exponential of its own because
//   exp(scale * S_ij + f_i) = e_ij * (r_i / s_i) * exp(-g_j),
// so acc_j = sum_i w_i e_ij with w_i = r_i / s_i is the column's sum and
// LSE_col_j = log(acc_j) - g_j, returned as the state (-g_j, acc_j).
//
// Where that loses accuracy, the column is done again exactly (col_lse's way):
//   * e_ij below the normal range (t_ij < m_i - 87) carries at most denorm_min of error,
//     so a column whose acc_j is not above (n + sum_i w_i) * denorm_min * 2^30 (a
//     relative error of 2^-30) could be made of underflowed terms: it is flagged;
//   * a zero-mass column (g_j = -inf) has e_ij = 0; its sum uses exp(scale * S_ij - m_i)
//     instead (offset 0 in place of g_j), computed only for chunks that hold such a
//     column; an overflow there (inf) is flagged too.
// Flagged columns are recomputed by a strided online LSE when there are few of them,
// else by a whole col_lse pass with the f just computed. Row groups (the tasks) and
// their merge order depend on the shape only, so the result does not depend on threads.
constexpr int64_t kMaxFixColumns = 16;

template <typename St, typename A>
void sinkhorn_step_typed(const StepArgs& a) {
  using V = Vec<A>;
  constexpr int W = kLanes<A>;
  const St* s = static_cast<const St*>(a.S);
  const A* g = static_cast<const A*>(a.g);
  const A* log_r = static_cast<const A*>(a.log_r);
  A* f = static_cast<A*>(a.f);
  A* lse_row = static_cast<A*>(a.lse_row);
  A* col_max = static_cast<A*>(a.col_max);
  A* col_sum = static_cast<A*>(a.col_sum);
  const A sc_s = static_cast<A>(a.scale);
  const int64_t n = a.n, m = a.m, rs = a.row_stride;
  if (n == 0 || m == 0) {  // every LSE is over nothing
    for (int64_t i = 0; i < n; ++i) {
      lse_row[i] = kNegInf<A>;
      f[i] = log_r[i] == kNegInf<A> ? kNegInf<A> : log_r[i] - kNegInf<A>;
    }
    for (int64_t j = 0; j < m; ++j) put_lse(kNegInf<A>, A(0), col_max, col_sum, j);
    return;
  }
  const int64_t stride = padded<A>(m);
  int64_t groups = n < kFusedGroups ? n : kFusedGroups;
  const int64_t cap = (int64_t(1) << 22) / stride;  // groups x m partial sums: <= 16 MiB
  if (groups > cap) groups = cap;
  if (groups < 1) groups = 1;
  const int64_t rows_per_group = (n + groups - 1) / groups;
  groups = (n + rows_per_group - 1) / rows_per_group;

  const int nt = threads_for(a.n_threads, n * m);
  // all scratch is allocated here: an exception must not escape a parallel region
  A* gz = scratch<A>(stride);       // g, 0 past m
  A* offset = scratch<A>(stride);   // g_j, or 0 for a zero-mass column
  unsigned char* zm_chunk = scratch<unsigned char>(stride / W);
  unsigned char* flagged = scratch<unsigned char>(m);
  A* acc = scratch<A>(groups * stride);
  A* wsum = scratch<A>(groups);
  A* bufs = scratch<A>(int64_t(nt) * stride);
  bool any_zero_mass = false;
  for (int64_t j = 0; j < stride; ++j) {
    const bool zm = j < m && g[j] == kNegInf<A>;
    gz[j] = j < m ? g[j] : A(0);
    offset[j] = j < m && !zm ? g[j] : A(0);
    if (j % W == 0) zm_chunk[j / W] = 0;
    if (zm) zm_chunk[j / W] = 1;
    any_zero_mass = any_zero_mass || zm;
  }
  for (int64_t k = 0; k < groups * stride; ++k) acc[k] = A(0);
  int64_t n_flagged = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    A* buf = bufs + int64_t(thread_id()) * stride;
    const V sc = set1(sc_s), ninf = set1(kNegInf<A>);
#pragma omp for schedule(dynamic, 1)
    for (int64_t grp = 0; grp < groups; ++grp) {
      A* ag = acc + grp * stride;
      A w_total = A(0);
      const int64_t i1 = (grp + 1) * rows_per_group < n ? (grp + 1) * rows_per_group : n;
      for (int64_t i = grp * rows_per_group; i < i1; ++i) {
        const St* row = s + i * rs;
        const A mx = logits_max(row, m, sc_s, gz, A(0), buf);
        if (i + 1 < i1) prefetch(row + rs, m);  // compute-bound from here: fetch the next row
        if (mx == kNegInf<A>) {  // no finite logit: LSE -inf (NaN if there is a NaN)
          const A lse = block_has_nan(buf, m) ? A(NAN) : kNegInf<A>;
          lse_row[i] = lse;
          f[i] = log_r[i] == kNegInf<A> ? kNegInf<A> : log_r[i] - lse;
          continue;  // adds nothing to any column (an infeasible row if r_i > 0)
        }
        const V shift = set1(mx);
        V sv = set1(A(0));
        for (int64_t k = 0; k < stride; k += W) {
          const V e = vexp_le0(sub(loadu(buf + k), shift));
          storeu(buf + k, e);
          sv = add(sv, e);
        }
        const A s_i = hsum(sv);
        const A lse = mx + std::log(s_i);
        lse_row[i] = lse;
        f[i] = log_r[i] == kNegInf<A> ? kNegInf<A> : log_r[i] - lse;
        // w_i = r_i / s_i (0 for zero mass; NaN propagates)
        const A w_s = log_r[i] == kNegInf<A> ? A(0) : A(std::exp(double(log_r[i])) / double(s_i));
        w_total += w_s;
        const V w = set1(w_s);
        for (int64_t k = 0; k < stride; k += W) {
          V e = loadu(buf + k);
          if (any_zero_mass && zm_chunk[k / W]) {
            const int64_t n_in = m - k < W ? m - k : W;
            const V l = mul(sc, n_in == W ? load_acc(row + k) : load_acc_n(row + k, n_in));
            e = select(eq(loadu(gz + k), ninf), vexp(sub(l, shift)), e);
          }
          storeu(ag + k, fmadd(w, e, loadu(ag + k)));
        }
      }
      wsum[grp] = w_total;
    }
    // sum_i w_i, in group order; then each column's groups, in group order
    A w_all = A(0);
    for (int64_t grp = 0; grp < groups; ++grp) w_all += wsum[grp];
    const A bound = (A(n) + w_all) * std::numeric_limits<A>::denorm_min() * A(1 << 30);
#pragma omp for schedule(static) reduction(+ : n_flagged)
    for (int64_t j = 0; j < m; ++j) {
      A total = A(0);
      for (int64_t grp = 0; grp < groups; ++grp) total += acc[grp * stride + j];
      const bool bad = !(total > bound) || total == A(INFINITY);  // NaN is bad too
      flagged[j] = bad;
      n_flagged += bad;
      if (!bad) {
        if (col_sum) {
          col_max[j] = -offset[j];
          col_sum[j] = total;
        } else {
          col_max[j] = std::log(total) - offset[j];
        }
      }
    }
  }
  if (n_flagged > kMaxFixColumns) {
    col_lse_typed<St, A>(a.S, n, m, rs, a.scale, f, col_max, col_sum, a.n_threads);
  } else if (n_flagged > 0) {
    for (int64_t j = 0; j < m; ++j) {
      if (!flagged[j]) continue;
      LseState<A> st;
      for (int64_t i = 0; i < n; ++i) {
        st.push(sc_s * to_float(s[i * rs + j]) + f[i]);  // a NaN propagates
      }
      put_lse(st.m, st.s, col_max, col_sum, j);
    }
  }
  std::free(gz);
  std::free(offset);
  std::free(zm_chunk);
  std::free(flagged);
  std::free(acc);
  std::free(wsum);
  std::free(bufs);
}

// ---------------------------------------------------------------- ncl_grad
// Row i of G (docs/math.md section 3), chunk by chunk in registers:
//   G_ij = cr_i * exp((l + g_j) + b_i) + cc_j * exp((l + f_i) + h_j) - [j = y_i] cr_i
//          - [i = z_j] cc_j
// with l = scale * S_ij, b_i = -LSE_row_i, h_j = -LSE_col_j (-inf where the LSE is -inf:
// such a row/column gets probability 0, never NaN). The logits are rounded as in
// row_lse/col_lse, so a probability that should be exactly 1 is.
//
// With the one-exp factors (a.u_row, a.v_col; see dispatch.cpp for when they are used):
//   cc_j exp((l + f_i) + h_j) = exp((l + g_j) + b_i) * u_i * v_j,
//   u_i = exp(f_i + LSE_row_i - sigma), v_j = cc_j exp(sigma - g_j - LSE_col_j),
// so G_ij = p_ij (cr_i + u_i v_j) - indicators with one exponential per element.
template <typename St, typename A>
void grad_typed(const GradArgs& a) {
  using V = Vec<A>;
  constexpr int W = kLanes<A>;
  const St* S = static_cast<const St*>(a.S);
  St* out = static_cast<St*>(a.out);
  const A* f = static_cast<const A*>(a.f);
  const A* g = static_cast<const A*>(a.g);
  const A* lse_row = static_cast<const A*>(a.lse_row);
  const A* lse_col = static_cast<const A*>(a.lse_col);
  const A* coef_row = static_cast<const A*>(a.coef_row);
  const A* coef_col = static_cast<const A*>(a.coef_col);
  const A* u_row = static_cast<const A*>(a.u_row);
  const A* v_col = static_cast<const A*>(a.v_col);
  const bool one_exp = u_row != nullptr;
  const A sc_s = static_cast<A>(a.scale);
  const int64_t n = a.n, m = a.m;
  const int64_t mp = padded<A>(m);

  // per column, padded with zeros so that the tail chunk reads defined values
  A* h = scratch<A>(mp);
  A* gz = scratch<A>(mp);
  A* cz = scratch<A>(mp);
  for (int64_t j = 0; j < mp; ++j) {
    h[j] = j < m ? neg_lse(lse_col[j]) : A(0);
    gz[j] = j < m ? g[j] : A(0);
    cz[j] = j < m ? (one_exp ? v_col[j] : coef_col[j]) : A(0);
  }

  const int nt = threads_for(a.n_threads, n * m);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#pragma omp for schedule(dynamic, kRowChunk)
    for (int64_t i = 0; i < n; ++i) {
      const St* row = S + i * a.row_stride;
      St* orow = out ? out + i * a.out_row_stride : nullptr;
      const A cr_a = coef_row[i];
      const V cr = set1(cr_a), fi = set1(f[i]), bi = set1(neg_lse(lse_row[i]));
      const V ui = set1(one_exp ? u_row[i] : A(0));
      const V sc = set1(sc_s), ninf = set1(kNegInf<A>), zero = set1(A(0));
      const int64_t yi = a.y[i];
      int64_t q = a.z_start[i];
      const int64_t q_end = a.z_start[i + 1];
      double ds = 0.0;
      for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
        const int64_t jend = m - j0 < kBlock ? j0 + (m - j0) : j0 + kBlock;
        V dsb = zero;
        for (int64_t j = j0; j < jend; j += W) {
          const int64_t n_in = jend - j < W ? jend - j : W;
          const V sv = n_in == W ? load_acc(row + j) : load_acc_n(row + j, n_in);
          const V l = mul(sc, sv);
          const V p_row = vexp(add(add(l, loadu(gz + j)), bi));
          V G;
          if (one_exp) {
            G = mul(p_row, add(cr, mul(ui, loadu(cz + j))));
          } else {
            const V p_col = vexp(add(add(l, fi), loadu(h + j)));
            G = add(mul(cr, p_row), mul(loadu(cz + j), p_col));
          }
          // the indicator terms, where they fall in this chunk (a well-predicted branch)
          const bool has_y = yi >= j && yi < j + n_in;
          const bool has_z = q < q_end && a.z_cols[q] < j + n_in;
          if (has_y || has_z) {
            alignas(64) A t[W];
            storeu(t, G);
            if (has_y) t[yi - j] -= cr_a;
            for (; q < q_end && a.z_cols[q] < j + n_in; ++q) t[a.z_cols[q] - j] -= coef_col[a.z_cols[q]];
            G = loadu(t);
          }
          // masked (-inf) scores do not depend on the scale: they add nothing to dscale;
          // the lanes past the row's end are masked too
          const auto keep = VecOf<A>::first(n_in);
          dsb = add(dsb, select(keep, select(eq(sv, ninf), zero, mul(G, sv)), zero));
          if (orow) {
            // every element of the chunk was read above, before `out` (maybe S) is written
            if (n_in == W) store_st(orow + j, mul(G, sc));
            else store_st_n(orow + j, mul(G, sc), n_in);
          }
        }
        ds += double(hsum(dsb));
      }
      a.row_ds[i] = ds;
    }
  }
  std::free(h);
  std::free(gz);
  std::free(cz);
}

// ---------------------------------------------------------------- apply_biases
template <typename St, typename A>
void apply_biases_typed(void* S, int64_t n, int64_t m, int64_t rs, double scale, const void* f,
                        const void* g, int n_threads) {
  using V = Vec<A>;
  constexpr int W = kLanes<A>;
  St* s = static_cast<St*>(S);
  const A* fp = static_cast<const A*>(f);
  const A* gp = static_cast<const A*>(g);
  const A sc_s = static_cast<A>(scale);
  const int nt = threads_for(n_threads, n * m);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#pragma omp for schedule(dynamic, kRowChunk)
    for (int64_t i = 0; i < n; ++i) {
      St* row = s + i * rs;
      const V sc = set1(sc_s), fi = set1(fp ? fp[i] : A(0));
      for (int64_t j = 0; j < m; j += W) {
        const int64_t n_in = m - j < W ? m - j : W;
        V v = mul(sc, n_in == W ? load_acc(row + j) : load_acc_n(row + j, n_in));
        // same operations in the same order as the PyTorch backend: (s * S + f_i) + g_j,
        // with an absent potential not added at all (adding 0 would turn -0 into +0)
        if (fp) v = add(v, fi);
        if (gp) v = add(v, n_in == W ? loadu(gp + j) : load_acc_n(gp + j, n_in));
        if (n_in == W) store_st(row + j, v);
        else store_st_n(row + j, v, n_in);
      }
    }
  }
}

// ---------------------------------------------------------------- roofs
// sum of x over n floats (the read-bandwidth roof: the same vector loads the passes use)
double read_sum_f32(const float* x, int64_t n, int n_threads) {
  constexpr int W = kLanes<float>;
  const int nt = threads_for(n_threads, n);
  const int64_t per = (n / W + nt - 1) / nt * W;
  double total = 0.0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(+ : total)
  {
    const int64_t t = thread_id();
    const int64_t k0 = t * per, k1 = k0 + per < n ? k0 + per : n;
    VF s0 = zero_v(), s1 = zero_v(), s2 = zero_v(), s3 = zero_v();
    int64_t k = k0;
    for (; k + 4 * W <= k1; k += 4 * W) {
      s0 = add(s0, loadu(x + k));
      s1 = add(s1, loadu(x + k + W));
      s2 = add(s2, loadu(x + k + 2 * W));
      s3 = add(s3, loadu(x + k + 3 * W));
    }
    float rest = 0.0f;
    for (; k < k1; ++k) rest += x[k];
    total += double(hsum(add(add(s0, s1), add(s2, s3)))) + double(rest);
  }
  return total;
}

// sum of exp(x - shift) over n floats (kept in L1), `reps` times per thread: the exp-sum
// sweep of the LSE passes alone, i.e. their compute floor. Returns the last sum.
double exp_sum_f32(const float* x, int64_t n, float shift, int64_t reps, int n_threads) {
  const int nt = threads_for(n_threads, int64_t(1) << 20);
  double last = 0.0;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float s = 0.0f;
    for (int64_t r = 0; r < reps; ++r) {
#if defined(__GNUC__)
      asm volatile("" : : "r"(x) : "memory");  // x may have changed: no rep can be skipped
#endif
      s = sum_exp(x, n, shift);
    }
    if (thread_id() == 0) last = s;
  }
  return last;
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

void sinkhorn_step(const StepArgs& a) {
  NCL_DISPATCH_DTYPE("sinkhorn_step", a.dtype, sinkhorn_step_typed, a)
}

void ncl_grad(const GradArgs& a) { NCL_DISPATCH_DTYPE("ncl_grad", a.dtype, grad_typed, a) }

void apply_biases(void* S, int64_t n, int64_t m, int64_t rs, int dtype, double scale,
                  const void* f, const void* g, int n_threads) {
  NCL_DISPATCH_DTYPE("apply_biases", dtype, apply_biases_typed, S, n, m, rs, scale, f, g,
                     n_threads)
}

#undef NCL_DISPATCH_DTYPE

void exp_f32(const float* in, float* out, int64_t n) { exp_buffer(in, out, n); }

double read_sum(const float* x, int64_t n, int n_threads) { return read_sum_f32(x, n, n_threads); }

double exp_sum(const float* x, int64_t n, float shift, int64_t reps, int n_threads) {
  return exp_sum_f32(x, n, shift, reps, n_threads);
}

}  // namespace NCL_ISA
}  // namespace cpu
}  // namespace ncl
