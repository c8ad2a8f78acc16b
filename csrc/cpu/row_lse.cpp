// row_lse on the CPU: one read of S, OpenMP over rows.
#include "cpu/primitives.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/ncl_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ncl {
namespace cpu {
namespace {

// A row is walked in blocks of kBlock elements. Each block's logits are staged in a small
// stack buffer (8 KiB of float) that stays in L1, so the two looks a stable LSE needs
// (block max, then sum of exp relative to it) cost one read of S from memory even for
// rows far longer than the cache. Blocks are merged into a running (max, sum) state.
constexpr int64_t kBlock = 2048;

template <typename Storage, typename Acc>
Acc lse_one_row(const Storage* row, int64_t m, Acc scale, const Acc* g) {
  Acc buf[kBlock];
  LseState<Acc> state;
  for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
    const int64_t len = std::min(kBlock, m - j0);

    // Look 1: convert to logits once, and take their max. Simple counted loops over
    // contiguous memory so the compiler may vectorize them.
    if (g) {
      const Acc* gb = g + j0;
      for (int64_t k = 0; k < len; ++k) buf[k] = scale * to_float(row[j0 + k]) + gb[k];
    } else {
      for (int64_t k = 0; k < len; ++k) buf[k] = scale * to_float(row[j0 + k]);
    }
    Acc bmax = neg_inf<Acc>();
#pragma omp simd reduction(max : bmax)
    for (int64_t k = 0; k < len; ++k) bmax = std::max(bmax, buf[k]);

    // A fully masked block adds nothing; skipping it also keeps (-inf) - (-inf) out of exp.
    // std::max ignores NaN, so look for one before skipping: a NaN input must give a NaN
    // result, never a silent -inf (with a finite bmax, exp(NaN - bmax) propagates it).
    if (bmax == neg_inf<Acc>()) {
      for (int64_t k = 0; k < len; ++k)
        if (std::isnan(buf[k])) state.merge(LseState<Acc>(Acc(0), std::nan("")));
      continue;
    }

    // Look 2: sum of exp relative to the block max (exp(-inf - bmax) = 0 for masks).
    Acc bsum = Acc(0);
#pragma omp simd reduction(+ : bsum)
    for (int64_t k = 0; k < len; ++k) bsum += std::exp(buf[k] - bmax);

    state.merge(LseState<Acc>(bmax, bsum));
  }
  return state.finish();
}

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

template <typename Storage, typename Acc>
void row_lse_typed(const void* S, int64_t n, int64_t m, int64_t row_stride, double scale,
                   const void* g, void* out, int n_threads) {
  const Storage* s = static_cast<const Storage*>(S);
  const Acc* gp = static_cast<const Acc*>(g);
  Acc* o = static_cast<Acc*>(out);
  const Acc sc = static_cast<Acc>(scale);  // logits are formed in Acc precision
#ifdef _OPENMP
  const int nt = n_threads > 0 ? n_threads : omp_get_max_threads();
  const bool par = nt > 1 && n > 1 && n * m >= kMinParallelWork;
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
#else
  (void)n_threads;
#endif
  for (int64_t i = 0; i < n; ++i) o[i] = lse_one_row(s + i * row_stride, m, sc, gp);
}

}  // namespace

void row_lse(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
             double scale, const void* g, void* out, int n_threads) {
  switch (dtype) {
    case F32: return row_lse_typed<float, float>(S, n, m, row_stride, scale, g, out, n_threads);
    case F64: return row_lse_typed<double, double>(S, n, m, row_stride, scale, g, out, n_threads);
    case F16: return row_lse_typed<f16_t, float>(S, n, m, row_stride, scale, g, out, n_threads);
    case BF16: return row_lse_typed<bf16_t, float>(S, n, m, row_stride, scale, g, out, n_threads);
    default: throw std::invalid_argument("row_lse: unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace cpu
}  // namespace ncl
