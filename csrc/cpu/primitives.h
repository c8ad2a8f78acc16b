// CPU primitives (see ARCHITECTURE.md "One seam, many backends").
//
// Conventions shared by every primitive:
//   * S is an n x m block of scores, column stride 1, row stride `row_stride` (>= m),
//     stored as `dtype` (ncl::DType: F32, F64, F16, BF16).
//   * Logits are formed as scale * S in float (double for F64); vectors such as g and the
//     outputs are float (double for F64).
//   * n_threads <= 0 means the OpenMP default. Rows are split statically, each row is
//     reduced by one thread, so results do not depend on the thread count.
#pragma once

#include <cstdint>

namespace ncl {
namespace cpu {

// out[i] = log sum_j exp(scale * S[i*row_stride + j] + g[j]);  g == nullptr means g = 0.
// -inf elements are masks; an all -inf (or empty, m == 0) row gives -inf. A NaN in a row
// gives NaN; +inf inputs are not supported (rejected upstream; the result may be NaN).
// Throws std::invalid_argument on an unknown dtype code.
void row_lse(const void* S, int64_t n, int64_t m, int64_t row_stride, int dtype,
             double scale, const void* g, void* out, int n_threads);

}  // namespace cpu
}  // namespace ncl
