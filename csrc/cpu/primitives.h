// CPU primitives: the seam of ncl_kernels/backends/cpu.py, over raw pointers.
//
// Conventions shared by every primitive:
//   * S is an n x m block of scores, column stride 1, row stride `row_stride` (>= m),
//     stored as `dtype` (ncl::DType: F32, F64, F16, BF16).
//   * Logits are formed as scale * S in float (double for F64); vectors (potentials, LSEs,
//     coefficients) and outputs are float (double for F64).
//   * -inf scores are masks; an LSE over an all -inf (or empty) line is -inf. NaN inputs give
//     NaN (they are rejected upstream); +inf inputs are not supported.
//   * n_threads <= 0 means the OpenMP default. Work is split in a way that depends on the
//     shape only and partial results are merged in a fixed order, so results are bitwise
//     identical for any thread count.
//   * Each primitive runs the kernels of the best instruction set this CPU has (AVX-512,
//     AVX2, or portable); set_isa() overrides that (tests use it to check every set).
//   * Throws std::invalid_argument on an unknown dtype code.
#pragma once

#include <cstdint>
#include <string>

namespace ncl {
namespace cpu {

// out[i] = log sum_j exp(scale * S[i, j] + g[j]);  g == nullptr means g = 0.
// With out_sum != nullptr the LSE is returned unfinished, as its online state: out[i] = the
// max logit, out_sum[i] = sum_j exp(logit - max) (>= 1, or 0 for an all -inf row). The
// Python backend finishes out + log(out_sum) with torch.log, the same log the Sinkhorn
// driver takes of the masses, so that log(c) - LSE cancels exactly where it should (e.g.
// a single column) instead of leaving one ulp of difference between two libms.
void row_lse(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
             double scale, const void* g, void* out, void* out_sum, int n_threads);

// out[j] = log sum_i exp(scale * S[i, j] + f[i]);  f == nullptr means f = 0; out_sum as in
// row_lse. Streams S row-major in tiles of columns (no strided column walk).
void col_lse(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
             double scale, const void* f, void* out, void* out_sum, int n_threads);

// The NCL gradient pass (docs/math.md section 3) over one block of rows whose first row has the
// global index row_offset. Returns sum_ij G_ij S_ij over unmasked S (in double) and, when
// out != nullptr, writes scale * G into out (S itself: each element is read before it is
// written; or another block of `dtype` with row stride out_row_stride).
// y: n target columns (-1 = none); z: m target rows in global indices (-1 = none).
// coef_row/coef_col: w/|R| (or 0) per row/column, times any upstream gradient.
double ncl_grad(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                double scale, const void* f, const void* g, const void* lse_row,
                const void* lse_col, const void* coef_row, const void* coef_col,
                const int64_t* y, const int64_t* z, int64_t row_offset, void* out,
                int64_t out_row_stride, int n_threads);

// One Sinkhorn iteration with one read of S: for every row
//   lse_row[i] = log sum_j exp(scale * S[i, j] + g[j])          (finished here, std::log)
//   f[i]       = log_r[i] - lse_row[i]   (-inf where log_r[i] = -inf: zero mass)
// and then, with that f, for every column the state of log sum_i exp(scale * S[i, j] + f[i]):
// col_max[j] = the max logit, col_sum[j] = sum exp(logit - max) (col_sum == nullptr:
// col_max gets the finished LSE). The column logits are formed exactly as col_lse forms
// them from the same f, so the result equals col_lse(S, f) up to the summation order.
// g: m values, log_r, f, lse_row: n, col_max, col_sum: m (accumulator type).
void sinkhorn_step(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
                   double scale, const void* g, const void* log_r, void* f, void* lse_row,
                   void* col_max, void* col_sum, int n_threads);

// In place: S[i, j] <- scale * S[i, j] + f[i] + g[j] (nullptr f or g: 0), computed in float
// (double for F64) and rounded once to the storage dtype.
void apply_biases(void* S, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
                  const void* f, const void* g, int n_threads);

// The gradient pass uses one exponential per element where that is safe (dispatch.cpp:
// one_exp_factors); off: always two (the tests compare both).
bool one_exp_enabled();
void set_one_exp(bool on);

// out[k] = exp(in[k]) with the kernels' vectorized exp of the named instruction set ("" =
// the one in use); throws std::invalid_argument if it is unknown or not available.
void exp_f32(const float* in, float* out, int64_t n, const std::string& isa);
// The roofs the benchmarks measure with the kernels' own loads and exp: the sum of x
// (n floats, split over n_threads), and `reps` sweeps of sum exp(x - shift) over an
// L1-resident x on every thread.
double read_sum(const float* x, int64_t n, int n_threads);
double exp_sum(const float* x, int64_t n, float shift, int64_t reps, int n_threads);

// Instruction sets: the one in use, and every one this build has and this CPU runs
// ("avx512", "avx2", "generic"; best first).
std::string isa();
std::string available_isas();  // comma-separated
// Use the named set from now on (process-wide); throws std::invalid_argument if this build
// or CPU lacks it.
void set_isa(const std::string& name);

}  // namespace cpu
}  // namespace ncl
