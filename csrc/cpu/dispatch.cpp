// Run-time choice of the kernel set (kernels_impl.h compiled per instruction set), and the
// parts of the primitives that are not per-element work: the column-target lists of the
// gradient pass and the ordered sum of its per-row dscale parts.
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/ncl_math.h"
#include "cpu/kernels.h"
#include "cpu/primitives.h"

namespace ncl {
namespace cpu {
namespace {

enum class Isa : int { Generic = 0, Avx2 = 1, Avx512 = 2 };

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::Generic: return true;
#if defined(NCL_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
#endif
#if defined(NCL_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
#endif
    default: return false;
  }
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

Isa best_isa() {
  for (Isa isa : {Isa::Avx512, Isa::Avx2})
    if (cpu_has(isa)) return isa;
  return Isa::Generic;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{int(best_isa())};
  return isa;
}

// Call the kernel `fn` of the current instruction set with the given arguments.
#if defined(NCL_HAVE_AVX2)
#define NCL_CASE_AVX2(fn, ...) \
  case Isa::Avx2: return avx2::fn(__VA_ARGS__);
#else
#define NCL_CASE_AVX2(fn, ...)
#endif
#if defined(NCL_HAVE_AVX512)
#define NCL_CASE_AVX512(fn, ...) \
  case Isa::Avx512: return avx512::fn(__VA_ARGS__);
#else
#define NCL_CASE_AVX512(fn, ...)
#endif
#define NCL_CALL(fn, ...)                      \
  switch (Isa(current().load())) {             \
    NCL_CASE_AVX512(fn, __VA_ARGS__)           \
    NCL_CASE_AVX2(fn, __VA_ARGS__)             \
    default: return generic::fn(__VA_ARGS__);  \
  }

void call_grad(const GradArgs& a) { NCL_CALL(ncl_grad, a) }

// Calls the kernel `fn` of the named instruction set (the roofs and exp_f32 take one).
#define NCL_CALL_ISA(isa, fn, ...)                                \
  switch (isa) {                                                  \
    NCL_CASE_AVX512(fn, __VA_ARGS__)                              \
    NCL_CASE_AVX2(fn, __VA_ARGS__)                                \
    default: return generic::fn(__VA_ARGS__);                     \
  }

Isa isa_named(const std::string& name) {
  if (name.empty()) return Isa(current().load());
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Generic}) {
    if (name == isa_name(isa)) {
      if (!cpu_has(isa))
        throw std::invalid_argument("instruction set '" + name + "' is not available here "
                                    "(available: " + available_isas() + ")");
      return isa;
    }
  }
  throw std::invalid_argument("unknown instruction set '" + name + "' (expected avx512, avx2 "
                              "or generic)");
}

// The one-exponential gradient (kernels_impl.h, grad_typed): with
//   a_i = f_i + LSE_row_i,  b_j = -(g_j + LSE_col_j),
// the column probability is p_col_ij = p_row_ij * exp(a_i + b_j), so
//   cc_j p_col_ij = p_row_ij * u_i * v_j,  u_i = exp(a_i - sigma),  v_j = cc_j exp(b_j + sigma),
// computed here in double once per row and column. It is exact algebra; what it costs is
// that a p_row_ij below float's normal range (e^-87) carries a p_col_ij e^(a_i + b_j) times
// larger. Used only where that is harmless: every column with cc_j != 0 has finite g_j and
// LSE_col_j, no NaN anywhere, and max_i a_i + max_j b_j <= kOneExpSpan, so a lost p_row
// (at most 1.4e-45) loses at most 1.4e-45 * e^40 = 3e-28 of cc_j p_col. sigma = max a - 20
// keeps u_i <= e^20 and v_j <= cc_j e^20; a u_i or v_j that underflows belongs to a term
// below e^-67 cc_j. After Sinkhorn a_i ~ log r_i and b_j = -log c_j, well inside.
// Returns false (use two exponentials) otherwise; float accumulators only.
constexpr double kOneExpSpan = 40.0;

bool one_exp_factors(int64_t n, int64_t m, const float* f, const float* g, const float* lse_row,
                     const float* lse_col, const float* coef_col, std::vector<float>& u,
                     std::vector<float>& v) {
  const double ninf = -std::numeric_limits<double>::infinity();
  double amax = ninf, bmax = ninf;
  std::vector<double> a(static_cast<size_t>(n)), b(static_cast<size_t>(m));
  for (int64_t i = 0; i < n; ++i) {
    const double fi = f[i], li = lse_row[i];
    if (std::isnan(fi) || std::isnan(li) || fi == -ninf || li == -ninf) return false;
    // f = -inf: no column mass from this row; LSE_row = -inf: every l + g_j is -inf, and
    // with g finite wherever cc != 0 (below) every such l is -inf, so p_col is 0 there too
    a[size_t(i)] = (fi == ninf || li == ninf) ? ninf : fi + li;
    if (a[size_t(i)] > amax) amax = a[size_t(i)];
  }
  for (int64_t j = 0; j < m; ++j) {
    const double cc = coef_col[j];
    if (std::isnan(cc) || std::isinf(cc)) return false;
    if (cc == 0.0) {
      b[size_t(j)] = ninf;
      continue;
    }
    const double gj = g[j], lj = lse_col[j];
    if (!std::isfinite(gj) || !std::isfinite(lj)) return false;
    b[size_t(j)] = -(gj + lj);
    if (b[size_t(j)] > bmax) bmax = b[size_t(j)];
  }
  if (amax > ninf && bmax > ninf && amax + bmax > kOneExpSpan) return false;
  const double sigma = amax > ninf ? amax - 20.0 : 0.0;
  u.resize(size_t(n));
  v.resize(size_t(m));
  for (int64_t i = 0; i < n; ++i) u[size_t(i)] = float(std::exp(a[size_t(i)] - sigma));
  for (int64_t j = 0; j < m; ++j)
    v[size_t(j)] = coef_col[j] == 0.0f ? 0.0f : float(coef_col[j] * std::exp(b[size_t(j)] + sigma));
  return true;
}

}  // namespace

void row_lse(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
             const void* g, void* out, void* out_sum, int n_threads) {
  NCL_CALL(row_lse, S, n, m, row_stride, dtype, scale, g, out, out_sum, n_threads)
}

void col_lse(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
             const void* f, void* out, void* out_sum, int n_threads) {
  NCL_CALL(col_lse, S, n, m, row_stride, dtype, scale, f, out, out_sum, n_threads)
}

void apply_biases(void* S, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
                  const void* f, const void* g, int n_threads) {
  NCL_CALL(apply_biases, S, n, m, row_stride, dtype, scale, f, g, n_threads)
}

double ncl_grad(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                double scale, const void* f, const void* g, const void* lse_row,
                const void* lse_col, const void* coef_row, const void* coef_col,
                const int64_t* y, const int64_t* z, int64_t row_offset, void* out,
                int64_t out_row_stride, int n_threads) {
  if (n <= 0 || m <= 0) return 0.0;  // nothing to read or write
  // Columns grouped by their target row (counting sort; ascending columns within a row),
  // keeping only targets inside this block of rows: O(n + m) memory.
  std::vector<int64_t> z_start(size_t(n) + 1, 0), z_cols;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t i = z[j] - row_offset;
    if (z[j] >= 0 && i >= 0 && i < n) ++z_start[size_t(i) + 1];
  }
  for (int64_t i = 0; i < n; ++i) z_start[size_t(i) + 1] += z_start[size_t(i)];
  z_cols.resize(size_t(z_start[size_t(n)]));
  {
    std::vector<int64_t> fill(z_start.begin(), z_start.end() - 1);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = z[j] - row_offset;
      if (z[j] >= 0 && i >= 0 && i < n) z_cols[size_t(fill[size_t(i)]++)] = j;
    }
  }
  std::vector<double> row_ds(size_t(n > 0 ? n : 1));

  GradArgs a{S, n, m, row_stride, dtype, scale, f, g, lse_row, lse_col, coef_row, coef_col,
             y, z_start.data(), z_cols.data(), out, out_row_stride, row_ds.data(), n_threads};
  std::vector<float> u, v;
  if (dtype != ncl::F64 && one_exp_enabled() && n > 0 && m > 0 &&
      one_exp_factors(n, m, static_cast<const float*>(f), static_cast<const float*>(g),
                      static_cast<const float*>(lse_row), static_cast<const float*>(lse_col),
                      static_cast<const float*>(coef_col), u, v)) {
    a.u_row = u.data();
    a.v_col = v.data();
  }
  call_grad(a);
  double ds = 0.0;  // in row order: independent of the thread count
  for (int64_t i = 0; i < n; ++i) ds += row_ds[size_t(i)];
  return ds;
}

void sinkhorn_step(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                   double scale, const void* g, const void* log_r, void* f, void* lse_row,
                   void* col_max, void* col_sum, int n_threads) {
  const StepArgs a{S, n, m, row_stride, dtype, scale, g, log_r, f, lse_row, col_max, col_sum,
                   n_threads};
  NCL_CALL(sinkhorn_step, a)
}

std::atomic<bool>& one_exp_flag() {
  static std::atomic<bool> on{true};
  return on;
}
bool one_exp_enabled() { return one_exp_flag().load(); }
void set_one_exp(bool on) { one_exp_flag().store(on); }

void exp_f32(const float* in, float* out, int64_t n, const std::string& isa) {
  NCL_CALL_ISA(isa_named(isa), exp_f32, in, out, n)
}

double read_sum(const float* x, int64_t n, int n_threads) { NCL_CALL(read_sum, x, n, n_threads) }

double exp_sum(const float* x, int64_t n, float shift, int64_t reps, int n_threads) {
  NCL_CALL(exp_sum, x, n, shift, reps, n_threads)
}

std::string isa() { return isa_name(Isa(current().load())); }

std::string available_isas() {
  std::string out;
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Generic})
    if (cpu_has(isa)) out += std::string(out.empty() ? "" : ",") + isa_name(isa);
  return out;
}

void set_isa(const std::string& name) {
  if (name.empty()) throw std::invalid_argument("unknown instruction set '' (expected avx512, "
                                                "avx2 or generic)");
  current().store(int(isa_named(name)));
}

}  // namespace cpu
}  // namespace ncl
