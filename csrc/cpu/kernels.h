// The CPU kernels as compiled once per instruction set (kernels_impl.h, included by
// kernels_generic.cpp, kernels_avx2.cpp and kernels_avx512.cpp), and the arguments they take.
// dispatch.cpp picks one set at run time; primitives.h is the interface the bindings use.
#pragma once

#include <cstdint>

namespace ncl {
namespace cpu {

// Arguments of the gradient pass (see primitives.h: ncl_grad). Vectors are in the
// accumulation type (float, double for F64). The column targets arrive as a per-row list
// (CSR) so the kernel finds "i == z_j" without scanning z for every row.
struct GradArgs {
  const void* S;
  int64_t n, m, row_stride;
  int dtype;
  double scale;
  const void *f, *g, *lse_row, *lse_col, *coef_row, *coef_col;
  const int64_t* y;           // n: target column of each row, or -1
  const int64_t* z_start;     // n + 1: row i's columns are z_cols[z_start[i] .. z_start[i+1])
  const int64_t* z_cols;      // columns j (ascending) whose target row z_j is this row
  void* out;                  // nullptr, S itself, or another n x m block of `dtype`
  int64_t out_row_stride;
  double* row_ds;             // n: sum_j G_ij S_ij of each row (summed by the caller in order)
  int n_threads;
  // The one-exponential form (dispatch.cpp decides): u_row (n) and v_col (m) such that
  // coef_col_j * p_col_ij = p_row_ij * u_row_i * v_col_j; nullptr: two exponentials.
  const void* u_row = nullptr;
  const void* v_col = nullptr;
};

// Arguments of the fused Sinkhorn step (see primitives.h: sinkhorn_step).
struct StepArgs {
  const void* S;
  int64_t n, m, row_stride;
  int dtype;
  double scale;
  const void* g;      // m
  const void* log_r;  // n
  void* f;            // n, out
  void* lse_row;      // n, out
  void* col_max;      // m, out
  void* col_sum;      // m, out (nullptr: col_max gets the finished LSE)
  int n_threads;
};

#define NCL_CPU_KERNEL_DECLS                                                                 \
  void row_lse(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,          \
               double scale, const void* g, void* out, void* out_sum, int n_threads);       \
  void col_lse(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,          \
               double scale, const void* f, void* out, void* out_sum, int n_threads);       \
  void sinkhorn_step(const StepArgs& a);                                                     \
  void ncl_grad(const GradArgs& a);                                                          \
  void apply_biases(void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,           \
                    double scale, const void* f, const void* g, int n_threads);             \
  void exp_f32(const float* in, float* out, int64_t n);                                      \
  double read_sum(const float* x, int64_t n, int n_threads);                                 \
  double exp_sum(const float* x, int64_t n, float shift, int64_t reps, int n_threads);

namespace generic { NCL_CPU_KERNEL_DECLS }
#ifdef NCL_HAVE_AVX2
namespace avx2 { NCL_CPU_KERNEL_DECLS }
#endif
#ifdef NCL_HAVE_AVX512
namespace avx512 { NCL_CPU_KERNEL_DECLS }
#endif

}  // namespace cpu
}  // namespace ncl
