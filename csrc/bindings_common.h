// What both pybind11 modules share: the dtype constants they export and the argument
// checks they make before a kernel runs. The Python side (ncl_kernels/_validate.py) checks
// that pointers, shapes and dtypes match real tensors; here we only refuse what would
// certainly crash.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/ncl_math.h"

namespace ncl {
namespace bindings {

namespace py = pybind11;

inline void add_dtype_codes(py::module_& mod) {
  mod.attr("DTYPE_F32") = int(F32);
  mod.attr("DTYPE_F64") = int(F64);
  mod.attr("DTYPE_F16") = int(F16);
  mod.attr("DTYPE_BF16") = int(BF16);
}

inline void check_dtype(int dtype) {
  if (dtype < F32 || dtype > BF16)
    throw py::value_error("unknown dtype code " + std::to_string(dtype) +
                          " (expected DTYPE_F32=0, DTYPE_F64=1, DTYPE_F16=2, DTYPE_BF16=3)");
}

// An n x m block of scores at s_ptr with the given row stride, reduced into out_ptr (n).
inline void check_row_block(int64_t n, int64_t m, int64_t row_stride, uintptr_t s_ptr,
                            uintptr_t out_ptr) {
  if (n < 0 || m < 0)
    throw py::value_error("negative shape: n=" + std::to_string(n) + ", m=" + std::to_string(m));
  if (row_stride < m)
    throw py::value_error("row_stride=" + std::to_string(row_stride) + " < m=" + std::to_string(m));
  if (n > 0 && m > 0 && s_ptr == 0) throw py::value_error("null scores pointer");
  if (n > 0 && out_ptr == 0) throw py::value_error("null output pointer");
}

// An n x m block of scores at s_ptr with the given row stride (no output checked).
inline void check_block(int64_t n, int64_t m, int64_t row_stride, uintptr_t s_ptr) {
  if (n < 0 || m < 0)
    throw py::value_error("negative shape: n=" + std::to_string(n) + ", m=" + std::to_string(m));
  if (row_stride < m)
    throw py::value_error("row_stride=" + std::to_string(row_stride) + " < m=" + std::to_string(m));
  if (n > 0 && m > 0 && s_ptr == 0) throw py::value_error("null scores pointer");
}

// A vector argument of `count` elements that the kernel will read or write.
inline void check_vector(const char* what, uintptr_t ptr, int64_t count) {
  if (count > 0 && ptr == 0) throw py::value_error(std::string("null ") + what + " pointer");
}

}  // namespace bindings
}  // namespace ncl
