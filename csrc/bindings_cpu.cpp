// pybind11 module ncl_kernels._C_cpu — the CPU primitives.
//
// No torch headers: tensors cross the boundary as raw pointers (tensor.data_ptr(), a
// Python int) plus shape, row stride (in elements) and a dtype code. The build therefore
// needs no torch and one built module survives torch upgrades. Checking that pointers,
// shapes and dtypes actually match the tensors is the Python side's job
// (ncl_kernels/_validate.py); bindings_common.h refuses what would certainly crash.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings_common.h"
#include "cpu/primitives.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

#ifndef NCL_VERSION
#define NCL_VERSION "unknown"
#endif
#ifndef NCL_COMPILER
#define NCL_COMPILER "unknown"
#endif

namespace {

template <typename T>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

void row_lse(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
             uintptr_t g_ptr, uintptr_t out_ptr, uintptr_t sum_ptr, int n_threads) {
  ncl::bindings::check_dtype(dtype);
  ncl::bindings::check_row_block(n, m, row_stride, s_ptr, out_ptr);
  py::gil_scoped_release no_gil;
  ncl::cpu::row_lse(cptr<void>(s_ptr), n, m, row_stride, dtype, scale, cptr<void>(g_ptr),
                    mptr(out_ptr), mptr(sum_ptr), n_threads);
}

void col_lse(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype, double scale,
             uintptr_t f_ptr, uintptr_t out_ptr, uintptr_t sum_ptr, int n_threads) {
  ncl::bindings::check_dtype(dtype);
  ncl::bindings::check_block(n, m, row_stride, s_ptr);
  ncl::bindings::check_vector("output", out_ptr, m);
  py::gil_scoped_release no_gil;
  ncl::cpu::col_lse(cptr<void>(s_ptr), n, m, row_stride, dtype, scale, cptr<void>(f_ptr),
                    mptr(out_ptr), mptr(sum_ptr), n_threads);
}

void sinkhorn_step(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype,
                   double scale, uintptr_t g_ptr, uintptr_t log_r_ptr, uintptr_t f_ptr,
                   uintptr_t lse_row_ptr, uintptr_t col_max_ptr, uintptr_t col_sum_ptr,
                   int n_threads) {
  namespace b = ncl::bindings;
  b::check_dtype(dtype);
  b::check_block(n, m, row_stride, s_ptr);
  b::check_vector("g", g_ptr, m);
  b::check_vector("log_r", log_r_ptr, n);
  b::check_vector("f", f_ptr, n);
  b::check_vector("lse_row", lse_row_ptr, n);
  b::check_vector("col_max", col_max_ptr, m);
  py::gil_scoped_release no_gil;
  ncl::cpu::sinkhorn_step(cptr<void>(s_ptr), n, m, row_stride, dtype, scale, cptr<void>(g_ptr),
                          cptr<void>(log_r_ptr), mptr(f_ptr), mptr(lse_row_ptr),
                          mptr(col_max_ptr), mptr(col_sum_ptr), n_threads);
}

void ncl_grad(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype,
              double scale, uintptr_t f_ptr, uintptr_t g_ptr, uintptr_t lse_row_ptr,
              uintptr_t lse_col_ptr, uintptr_t coef_row_ptr, uintptr_t coef_col_ptr,
              uintptr_t y_ptr, uintptr_t z_ptr, uintptr_t ds_ptr, int64_t row_offset,
              uintptr_t out_ptr, int64_t out_row_stride, int n_threads) {
  ncl::bindings::check_grad(n, m, row_stride, dtype, s_ptr, f_ptr, g_ptr, lse_row_ptr,
                            lse_col_ptr, coef_row_ptr, coef_col_ptr, y_ptr, z_ptr, out_ptr,
                            out_row_stride, ds_ptr);
  py::gil_scoped_release no_gil;
  const double ds = ncl::cpu::ncl_grad(
      cptr<void>(s_ptr), n, m, row_stride, dtype, scale, cptr<void>(f_ptr), cptr<void>(g_ptr),
      cptr<void>(lse_row_ptr), cptr<void>(lse_col_ptr), cptr<void>(coef_row_ptr),
      cptr<void>(coef_col_ptr), cptr<int64_t>(y_ptr), cptr<int64_t>(z_ptr), row_offset,
      mptr(out_ptr), out_row_stride, n_threads);
  // dscale in the accumulator type, like the vectors
  if (dtype == ncl::F64) *reinterpret_cast<double*>(ds_ptr) = ds;
  else *reinterpret_cast<float*>(ds_ptr) = float(ds);
}

void apply_biases(uintptr_t s_ptr, int64_t n, int64_t m, int64_t row_stride, int dtype,
                  double scale, uintptr_t f_ptr, uintptr_t g_ptr, int n_threads) {
  ncl::bindings::check_dtype(dtype);
  ncl::bindings::check_block(n, m, row_stride, s_ptr);
  py::gil_scoped_release no_gil;
  ncl::cpu::apply_biases(mptr(s_ptr), n, m, row_stride, dtype, scale, cptr<void>(f_ptr),
                         cptr<void>(g_ptr), n_threads);
}

template <typename Fn>
auto value_errors(Fn&& fn) {  // the C++ layer's invalid_argument as a Python ValueError
  try {
    return fn();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

void exp_f32(uintptr_t in_ptr, uintptr_t out_ptr, int64_t n, const std::string& isa) {
  if (n < 0) throw py::value_error("negative n=" + std::to_string(n));
  ncl::bindings::check_vector("in", in_ptr, n);
  ncl::bindings::check_vector("out", out_ptr, n);
  value_errors([&] {
    py::gil_scoped_release no_gil;
    ncl::cpu::exp_f32(cptr<float>(in_ptr), reinterpret_cast<float*>(out_ptr), n, isa);
  });
}

double read_sum(uintptr_t ptr, int64_t n, int n_threads) {
  if (n < 0) throw py::value_error("negative n=" + std::to_string(n));
  ncl::bindings::check_vector("x", ptr, n);
  py::gil_scoped_release no_gil;
  return ncl::cpu::read_sum(cptr<float>(ptr), n, n_threads);
}

double exp_sum(uintptr_t ptr, int64_t n, double shift, int64_t reps, int n_threads) {
  if (n < 0 || reps < 0) throw py::value_error("negative n or reps");
  ncl::bindings::check_vector("x", ptr, n);
  py::gil_scoped_release no_gil;
  return ncl::cpu::exp_sum(cptr<float>(ptr), n, float(shift), reps, n_threads);
}

void set_isa(const std::string& name) {
  value_errors([&] { ncl::cpu::set_isa(name); });
}

py::dict build_info() {
  py::dict d;
  d["version"] = NCL_VERSION;
  d["compiler"] = NCL_COMPILER;
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_version"] = _OPENMP;  // yyyymm of the spec the compiler implements
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_version"] = 0;
  d["openmp_max_threads"] = 1;
#endif
  d["isa"] = ncl::cpu::isa();
  d["available_isas"] = ncl::cpu::available_isas();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cpu, mod) {
  mod.doc() = "ncl_kernels CPU primitives (raw-pointer interface; see ncl_kernels.backends.cpu)";

  ncl::bindings::add_dtype_codes(mod);

  // Every primitive takes keyword arguments only, with the names _C_cuda uses too
  // (bindings_common.h); n_threads <= 0 is the OpenMP default.
  mod.def("row_lse", &row_lse, py::kw_only(), NCL_BLOCK_KWARGS, py::arg("g_ptr") = 0,
          py::arg("out_ptr"), py::arg("sum_ptr") = 0, py::arg("n_threads") = 0,
          R"doc(out[i] = log sum_j exp(scale * S[i, j] + g[j]) for an n x m block of scores.

S: pointer to storage of `dtype` (DTYPE_F32/F64/F16/BF16), column stride 1, row stride
`row_stride` elements (>= m). g_ptr: m float values (double for F64), or 0 for g = 0.
out_ptr: n float values (double for F64). Logits are formed and accumulated in float
(double for F64). -inf entries are masks; an all -inf row gives -inf.
With sum_ptr != 0 (n more values) the LSE comes back unfinished: out = max logit,
sum = sum exp(logit - max), LSE = out + log(sum), for the caller to finish with its own
log. Releases the GIL.)doc");

  mod.def("col_lse", &col_lse, py::kw_only(), NCL_BLOCK_KWARGS, py::arg("f_ptr") = 0,
          py::arg("out_ptr"), py::arg("sum_ptr") = 0, py::arg("n_threads") = 0,
          R"doc(out[j] = log sum_i exp(scale * S[i, j] + f[i]); arguments as in row_lse, with
f_ptr: n values (or 0 for f = 0), out_ptr (and sum_ptr): m values. S is streamed
row-major.)doc");

  mod.def("sinkhorn_step", &sinkhorn_step, py::kw_only(), NCL_BLOCK_KWARGS, py::arg("g_ptr"),
          py::arg("log_r_ptr"), py::arg("f_ptr"), py::arg("lse_row_ptr"), py::arg("col_max_ptr"),
          py::arg("col_sum_ptr") = 0, py::arg("n_threads") = 0,
          R"doc(One Sinkhorn iteration with one read of S (docs/math.md section 2).

Writes lse_row[i] = log sum_j exp(scale * S[i, j] + g[j]) (n values), f[i] = log_r[i] -
lse_row[i] (-inf where log_r[i] = -inf), and the state of the column LSE with that f:
col_max[j] (the max logit), col_sum[j] (sum exp(logit - max)), m values each; with
col_sum_ptr = 0 col_max gets the finished LSE. g, log_r: accumulator values. Releases
the GIL.)doc");

  mod.def("ncl_grad", &ncl_grad, py::kw_only(), NCL_GRAD_KWARGS, py::arg("n_threads") = 0,
          R"doc(The NCL gradient pass over an n x m block of scores (docs/math.md section 3).

Writes dscale = sum_ij G_ij S_ij (over unmasked S) as one accumulator value at ds_ptr and,
when out_ptr != 0, scale * G in `dtype` at out_ptr (row stride out_row_stride; out_ptr ==
s_ptr is in place). f, lse_row, coef_row: n accumulator values; g, lse_col, coef_col: m;
y: n int64 target columns, z: m int64 target rows (global: row_offset is the index of the
block's first row), -1 for none. Releases the GIL.)doc");

  mod.def("apply_biases", &apply_biases, py::kw_only(), NCL_BLOCK_KWARGS, py::arg("f_ptr") = 0,
          py::arg("g_ptr") = 0, py::arg("n_threads") = 0,
          R"doc(In place S <- scale * S + f[i] + g[j] (f_ptr/g_ptr 0: zero), computed in the
accumulator type and rounded once to `dtype`. Releases the GIL.)doc");

  mod.def("one_exp", &ncl::cpu::one_exp_enabled,
          "whether ncl_grad may use one exponential per element where that is safe");
  mod.def("set_one_exp", &ncl::cpu::set_one_exp, py::arg("on"),
          "allow (True, the default) or forbid the one-exponential gradient (process-wide)");

  mod.def("exp_f32", &exp_f32, py::arg("in_ptr"), py::arg("out_ptr"), py::arg("n"),
          py::arg("isa") = "",
          "out[k] = exp(in[k]) for n float32 values with the kernels' vectorized exp of the "
          "named instruction set ('' = the one in use)");
  mod.def("read_sum", &read_sum, py::arg("ptr"), py::arg("n"), py::arg("n_threads") = 0,
          "sum of n float32 values with the kernels' vector loads (the read-bandwidth roof)");
  mod.def("exp_sum", &exp_sum, py::arg("ptr"), py::arg("n"), py::arg("shift"), py::arg("reps"),
          py::arg("n_threads") = 0,
          "reps sweeps of sum_k exp(x[k] - shift) over n float32 values on every thread: the "
          "exp-sum sweep of the LSE passes alone (the exp-throughput roof); returns the sum");

  mod.def("isa", &ncl::cpu::isa, "the instruction set whose kernels run: avx512, avx2, generic");
  mod.def("available_isas", &ncl::cpu::available_isas,
          "comma-separated instruction sets this build has and this CPU runs, best first");
  mod.def("set_isa", &set_isa, py::arg("name"),
          "use the kernels of the named instruction set from now on (process-wide)");

  mod.def("build_info", &build_info,
          "dict: version, compiler, openmp (bool), openmp_version, openmp_max_threads, isa, "
          "available_isas");
}
