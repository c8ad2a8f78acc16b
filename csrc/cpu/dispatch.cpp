// Run-time choice of the kernel set (kernels_impl.h compiled per instruction set), and the
// parts of the primitives that are not per-element work: the column-target lists of the
// gradient pass and the ordered sum of its per-row dscale parts.
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

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
  call_grad(a);
  double ds = 0.0;  // in row order: independent of the thread count
  for (int64_t i = 0; i < n; ++i) ds += row_ds[size_t(i)];
  return ds;
}

std::string isa() { return isa_name(Isa(current().load())); }

std::string available_isas() {
  std::string out;
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Generic})
    if (cpu_has(isa)) out += std::string(out.empty() ? "" : ",") + isa_name(isa);
  return out;
}

void set_isa(const std::string& name) {
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Generic}) {
    if (name == isa_name(isa)) {
      if (!cpu_has(isa))
        throw std::invalid_argument("instruction set '" + name + "' is not available here "
                                    "(available: " + available_isas() + ")");
      current().store(int(isa));
      return;
    }
  }
  throw std::invalid_argument("unknown instruction set '" + name + "' (expected avx512, avx2 "
                              "or generic)");
}

}  // namespace cpu
}  // namespace ncl
