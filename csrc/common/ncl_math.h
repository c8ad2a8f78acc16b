// ncl_math.h — header-only math shared by the CPU (g++) and CUDA (nvcc) kernels.
//
// Everything numerically delicate lives here exactly once, so the two backends cannot
// drift apart: low-precision storage -> float conversion, the online log-sum-exp state,
// and the NCL gradient element (docs/math.md section 3).
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define NCL_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline on the host: the CPU backend compiles its kernels several times with
// different -m flags (csrc/cpu/kernels_*.cpp). An out-of-line copy of a helper would be
// merged by the linker across those translation units, so the portable kernels could end
// up calling an AVX-512 copy; inlining every call keeps each kernel to its own ISA.
#define NCL_HD inline __attribute__((always_inline))
#else
#define NCL_HD inline
#endif

namespace ncl {

// Storage dtype codes; the Python side passes these as plain ints (DTYPE_* constants).
enum DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// fp16 / bf16 storage as raw bits. Distinct structs (not bare uint16_t) so templates can
// overload on the storage type.
struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

// The dtype code -> (storage type, accumulation type) table of docs/math.md section 1, written
// once for every CPU and CUDA entry point: `return FN<Storage, Acc>(args...)`, or the
// statement ON_UNKNOWN for a code outside the table.
#define NCL_DTYPE_SWITCH(dtype, FN, ON_UNKNOWN, ...)                   \
  switch (dtype) {                                                    \
    case ::ncl::F32: return FN<float, float>(__VA_ARGS__);            \
    case ::ncl::F64: return FN<double, double>(__VA_ARGS__);          \
    case ::ncl::F16: return FN<::ncl::f16_t, float>(__VA_ARGS__);     \
    case ::ncl::BF16: return FN<::ncl::bf16_t, float>(__VA_ARGS__);   \
    default: ON_UNKNOWN;                                              \
  }

// INFINITY (a float constant) rather than std::numeric_limits, which is not callable from
// device code without --expt-relaxed-constexpr.
template <typename T> NCL_HD T neg_inf() { return T(-INFINITY); }

// exp/log overloads that pick the float or double version on host and device alike.
NCL_HD float ncl_exp(float x) { return expf(x); }
NCL_HD double ncl_exp(double x) { return exp(x); }
NCL_HD float ncl_log(float x) { return logf(x); }
NCL_HD double ncl_log(double x) { return log(x); }

NCL_HD float bits_as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// bf16 is the top half of a float32: the shift is exact for every value (subnormals,
// +-inf, NaN payloads included), on host and device.
NCL_HD float to_float(bf16_t x) { return bits_as_float(uint32_t(x.bits) << 16); }

// fp16 -> float32, exact.
NCL_HD float to_float(f16_t x) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t expo = (x.bits >> 10) & 0x1fu;
  const uint32_t mant = x.bits & 0x3ffu;
  if (expo == 0x1f)  // inf / NaN: max exponent, keep the payload
    return bits_as_float(sign | 0x7f800000u | (mant << 13));
  if (expo == 0) {  // zero / subnormal: mant * 2^-24, exact in float32
    const float v = float(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  // normal: rebias the exponent (15 -> 127) and widen the mantissa (10 -> 23 bits)
  return bits_as_float(sign | ((expo + 112u) << 23) | (mant << 13));
#endif
}

NCL_HD uint32_t float_as_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// float32 -> bf16, round to nearest even (as torch rounds); NaN stays a (quiet) NaN.
NCL_HD bf16_t to_bf16(float f) {
#ifdef __CUDA_ARCH__
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  const uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};
  return bf16_t{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
#endif
}

// float32 -> fp16, round to nearest even, subnormals and overflow to inf included
// (the branch-free float-arithmetic method of the FP16 library by M. Dukhan). It needs
// IEEE float arithmetic without contraction into FMA, which both builds guarantee
// (-ffp-contract=off on the CPU; on the device __float2half_rn is used instead).
NCL_HD f16_t to_f16(float f) {
#ifdef __CUDA_ARCH__
  return f16_t{__half_as_ushort(__float2half_rn(f))};
#else
  const float scale_to_inf = 5.192296858534828e+33f;   // 2^112
  const float scale_to_zero = 7.703719777548943e-34f;  // 2^-110
  const float a = f < 0.0f ? -f : f;
  float base = (a * scale_to_inf) * scale_to_zero;
  const uint32_t w = float_as_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_as_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_as_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
  return f16_t{uint16_t((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign))};
#endif
}

// Write an accumulator value into storage, rounded once.
NCL_HD void store_acc(float v, float* p) { *p = v; }
NCL_HD void store_acc(double v, double* p) { *p = v; }
NCL_HD void store_acc(float v, bf16_t* p) { *p = to_bf16(v); }
NCL_HD void store_acc(float v, f16_t* p) { *p = to_f16(v); }

NCL_HD float to_float(float x) { return x; }
NCL_HD double to_float(double x) { return x; }  // "accumulator type" for F64

// Online log-sum-exp: log sum_k exp(x_k) kept as (m = running max, s = sum exp(x_k - m)).
//
// The -inf rules: a -inf element contributes nothing and is skipped *before* any
// subtraction, so (-inf) - (-inf) = NaN never reaches exp. An empty / all -inf state is
// (m = -inf, s = 0) and finishes to -inf. NaN inputs propagate to a NaN result (they are
// rejected upstream anyway, but a NaN is a better symptom than a silent -inf).
template <typename T>
struct LseState {
  T m, s;

  NCL_HD LseState() : m(neg_inf<T>()), s(T(0)) {}
  NCL_HD LseState(T m_, T s_) : m(m_), s(s_) {}

  NCL_HD void push(T x) {
    if (x > m) {            // new max; exp(-inf) = 0 when this is the first finite element
      s = s * ncl_exp(m - x) + T(1);
      m = x;
    } else if (x != neg_inf<T>()) {  // x <= m, so m is finite here (or x is NaN)
      s += ncl_exp(x - m);
    }
  }

  NCL_HD void merge(const LseState& o) {
    if (o.m > m) {
      s = s * ncl_exp(m - o.m) + o.s;  // if m = -inf then s = 0 and exp(-inf) = 0
      m = o.m;
    } else if (o.m != neg_inf<T>()) {
      s += o.s * ncl_exp(o.m - m);
    }
  }

  NCL_HD T finish() const { return s == T(0) ? neg_inf<T>() : m + ncl_log(s); }
};

// exp(a - b) with exp((-inf) - (-inf)) := 0 (a row/column with no mass has probability 0).
template <typename T>
NCL_HD T exp_diff(T a, T b) {
  return a == neg_inf<T>() ? T(0) : ncl_exp(a - b);
}

// One element of the NCL gradient w.r.t. the logits (docs/math.md section 3):
//
//   G_ij = crow * (p_row - [j == y_i]) + ccol * (p_col - [i == z_j])
//   p_row = exp(l + g_j - lse_row_i),  p_col = exp(l + f_i - lse_col_j)
//
// crow = w_row/|R| for rows with a target and 0 otherwise (likewise ccol for columns), so
// rows/columns without a target need no branch here. l = s * S_ij in accumulator precision.
template <typename T>
NCL_HD T ncl_grad_elem(T l, T f_i, T g_j, T lse_row_i, T lse_col_j, bool j_is_y_i,
                       bool i_is_z_j, T crow, T ccol) {
  const T p_row = exp_diff(l + g_j, lse_row_i);
  const T p_col = exp_diff(l + f_i, lse_col_j);
  return crow * (p_row - (j_is_y_i ? T(1) : T(0))) + ccol * (p_col - (i_is_z_j ? T(1) : T(0)));
}

// -LSE for the CPU kernels' gradient (csrc/cpu/kernels_impl.h), with -inf standing for
// exp_diff's rule (an LSE of -inf means probability 0): exp((l + g_j) + neg_lse(lse_i))
// equals exp_diff(l + g_j, lse_i), since a - b and a + (-b) round alike.
template <typename T>
NCL_HD T neg_lse(T lse) {
  return lse == neg_inf<T>() ? neg_inf<T>() : -lse;
}

}  // namespace ncl
