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
};

#define NCL_CPU_KERNEL_DECLS                                                                 \
  void row_lse(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,          \
               double scale, const void* g, void* out, void* out_sum, int n_threads);       \
  void col_lse(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,          \
               double scale, const void* f, void* out, void* out_sum, int n_threads);       \
  void ncl_grad(const GradArgs& a);                                                          \
  void apply_biases(void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,           \
                    double scale, const void* f, const void* g, int n_threads);

namespace generic { NCL_CPU_KERNEL_DECLS }
#ifdef NCL_HAVE_AVX2
namespace avx2 { NCL_CPU_KERNEL_DECLS }
#endif
#ifdef NCL_HAVE_AVX512
namespace avx512 { NCL_CPU_KERNEL_DECLS }
#endif

}  // namespace cpu
}  // namespace ncl
