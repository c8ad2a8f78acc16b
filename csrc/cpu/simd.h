// The float vector the CPU kernels are written with, one definition per instruction set,
// and the vectorized exp built on it. Included by kernels_impl.h inside
// ncl::cpu::NCL_ISA::(anonymous), so every translation unit (generic, AVX2, AVX-512) gets
// its own copy, compiled with its own flags:
//
//   __AVX512F__          16 lanes, __m512; 2^k by vscalefps (rounds once, subnormal and
//                        overflow results included, in one instruction)
//   __AVX2__ + __FMA__   8 lanes, __m256; 2^k as two normal powers of two (below)
//   otherwise            4 lanes of plain C++ (the compiler vectorizes what it can: SSE2
//                        on x86-64, NEON on aarch64)
//
// The kernels only use the operations below, so each pass is written once for all sets.
// Conventions that the kernels rely on:
//   * max_(a, b) = a > b ? a : b and min_(a, b) = a < b ? a : b, lane by lane (x86's
//     maxps/minps semantics): a NaN in `a` is never returned, a NaN in `b` is. So
//     max_(v, running) ignores a NaN v, and max_(lo, x) lets a NaN x through.
//   * exp (vexp) is within 2 ulp of the correctly rounded exp over all of float32:
//     subnormal results rounded once, x < -104 (and -inf) -> 0, x > 88.73 (and +inf) -> inf,
//     NaN -> NaN (tests/test_exp.py checks a dense grid of inputs for every set).
//   * no operation is contracted: mul then add rounds twice, as in the PyTorch backend;
//     only fmadd() fuses (in exp's polynomial and reduction).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Constants of exp: x = k ln2 + r with k = round(x / ln2) (the 1.5 * 2^23 trick, valid
// for |k| < 2^22), r by Cody-Waite in two steps (ln2_hi * k is exact for |k| < 2^15), and
// exp(r) = 1 + r + r^2 q(r), q of degree 4 fitted on |r| <= ln2/2 (max relative error
// 3e-9, far below float32's 6e-8 half ulp). Inputs are clamped to [-104, 100] first:
// exp(-104) is below half the smallest subnormal, so it rounds to exactly 0 like every
// smaller input, and anything above 88.73 overflows to inf through the scaling anyway.
namespace expc {
constexpr float kLo = -104.0f, kHi = 100.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kC2 = 4.9999994040e-01f, kC3 = 1.6666519642e-01f, kC4 = 4.1668407619e-02f,
                kC5 = 8.3689140156e-03f, kC6 = 1.3814191334e-03f;
}  // namespace expc

#if defined(__AVX512F__)
// ---------------------------------------------------------------- AVX-512: 16 lanes
struct VF { __m512 v; };
constexpr int kW = 16;
using VMask = __mmask16;

inline VF set1(float x) { return {_mm512_set1_ps(x)}; }
inline VF loadu(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void storeu(float* p, VF a) { _mm512_storeu_ps(p, a.v); }
inline VF add(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VF sub(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VF mul(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VF fmadd(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VF max_(VF a, VF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VF min_(VF a, VF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VMask eq(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
// m ? a : b
inline VF select(VMask m, VF a, VF b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }
// the first n lanes (0 <= n <= kW)
inline VMask first_lanes(int n) { return VMask((1u << n) - 1u); }
inline float lane0(VF a) { return _mm512_cvtss_f32(a.v); }

// exp_le0 (x <= 0 or NaN, the LSE sweeps' arguments) skips the upper clamp
template <bool kLe0 = false>
inline VF vexp(VF x) {
  using namespace expc;
  __m512 xc = _mm512_max_ps(_mm512_set1_ps(kLo), x.v);
  if (!kLe0) xc = _mm512_min_ps(_mm512_set1_ps(kHi), xc);
  const __m512 k = _mm512_sub_ps(
      _mm512_fmadd_ps(xc, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kMagic)), _mm512_set1_ps(kMagic));
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kC6), r, _mm512_set1_ps(kC5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return {_mm512_scalef_ps(p, k)};  // p * 2^k, rounded once
}

// lane sums/maxima in a fixed order (the result must not depend on anything but the data)
inline float hsum(VF a) {
  alignas(64) float t[kW];
  _mm512_store_ps(t, a.v);
  float s = 0.0f;
  for (int l = 0; l < kW; ++l) s += t[l];
  return s;
}

inline float hmax(VF a) {
  alignas(64) float t[kW];
  _mm512_store_ps(t, a.v);
  float m = t[0];
  for (int l = 1; l < kW; ++l) m = t[l] > m ? t[l] : m;
  return m;
}

// storage <-> float, in registers
inline VF load_acc(const float* p) { return loadu(p); }
inline VF load_acc(const bf16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
inline VF load_acc(const f16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline void store_st(float* p, VF a) { storeu(p, a); }
inline __m512i bf16_bits(VF a) {  // round to nearest even in the top half; NaN stays quiet
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rnd = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
  const __m512i qnan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, rnd, qnan);
}
inline void store_st(bf16_t* p, VF a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(a)));
}
inline void store_st(f16_t* p, VF a) {
  // imm 0: round to nearest even, as to_f16 and torch do
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a.v, 0));
}

#elif defined(__AVX2__) && defined(__FMA__)
// ---------------------------------------------------------------- AVX2 + FMA: 8 lanes
struct VF { __m256 v; };
constexpr int kW = 8;
struct VMask { __m256 v; };

inline VF set1(float x) { return {_mm256_set1_ps(x)}; }
inline VF loadu(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void storeu(float* p, VF a) { _mm256_storeu_ps(p, a.v); }
inline VF add(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VF sub(VF a, VF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VF mul(VF a, VF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VF fmadd(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VF max_(VF a, VF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline VF min_(VF a, VF b) { return {_mm256_min_ps(a.v, b.v)}; }
inline VMask eq(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
inline VF select(VMask m, VF a, VF b) { return {_mm256_blendv_ps(b.v, a.v, m.v)}; }
inline VMask first_lanes(int n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx))};
}
inline float lane0(VF a) { return _mm256_cvtss_f32(a.v); }

template <bool kLe0 = false>
inline VF vexp(VF x) {
  using namespace expc;
  __m256 xc = _mm256_max_ps(_mm256_set1_ps(kLo), x.v);
  if (!kLe0) xc = _mm256_min_ps(_mm256_set1_ps(kHi), xc);
  const __m256 kb = _mm256_fmadd_ps(xc, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kMagic));
  const __m256 k = _mm256_sub_ps(kb, _mm256_set1_ps(kMagic));
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kC6), r, _mm256_set1_ps(kC5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^k without scalef: k spans [-150, 144], beyond the normal exponents, so it is split
  // into two normal powers of two 2^k1 * 2^k2 (k1 = k >> 1). p * 2^k1 is exact, and the
  // second product rounds once, so a subnormal result is rounded correctly and a large
  // one overflows to inf. The integer k sits in kb's low mantissa bits.
  const __m256i ki = _mm256_sub_epi32(_mm256_castps_si256(kb), _mm256_set1_epi32(0x4B400000));
  const __m256i k1 = _mm256_srai_epi32(ki, 1);
  const __m256i k2 = _mm256_sub_epi32(ki, k1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  return {_mm256_mul_ps(_mm256_mul_ps(p, s1), s2)};
}

inline float hsum(VF a) {
  alignas(32) float t[kW];
  _mm256_store_ps(t, a.v);
  float s = 0.0f;
  for (int l = 0; l < kW; ++l) s += t[l];
  return s;
}

inline float hmax(VF a) {
  alignas(32) float t[kW];
  _mm256_store_ps(t, a.v);
  float m = t[0];
  for (int l = 1; l < kW; ++l) m = t[l] > m ? t[l] : m;
  return m;
}

inline VF load_acc(const float* p) { return loadu(p); }
inline VF load_acc(const bf16_t* p) {
  // interleaving with zeros puts each bf16 in the top half of a 32-bit lane: no shift
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i zero = _mm_setzero_si128();
  return {_mm256_castsi256_ps(
      _mm256_set_m128i(_mm_unpackhi_epi16(zero, x), _mm_unpacklo_epi16(zero, x)))};
}
inline VF load_acc(const f16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void store_st(float* p, VF a) { storeu(p, a); }
inline void store_st(bf16_t* p, VF a) {  // round to nearest even; NaN stays quiet
  // rounded in the 32-bit lanes (a NaN only gets its quiet bit set), then the top halves
  // are gathered by a byte shuffle: one shift per vector (Zen 2 has one shift pipe)
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rnd = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
  const __m256i qnan = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  const __m256i w = _mm256_blendv_epi8(rnd, qnan, nan);
  const __m256i top = _mm256_shuffle_epi8(
      w, _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                          2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1));
  const __m256i packed = _mm256_permute4x64_epi64(top, 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void store_st(f16_t* p, VF a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, 0));
}

#else
// ---------------------------------------------------------------- portable: 4 lanes
constexpr int kW = 4;
struct VF { float v[kW]; };
struct VMask { bool v[kW]; };

#define NCL_LANES for (int l = 0; l < kW; ++l)
inline VF set1(float x) { VF r; NCL_LANES r.v[l] = x; return r; }
inline VF loadu(const float* p) { VF r; NCL_LANES r.v[l] = p[l]; return r; }
inline void storeu(float* p, VF a) { NCL_LANES p[l] = a.v[l]; }
inline VF add(VF a, VF b) { VF r; NCL_LANES r.v[l] = a.v[l] + b.v[l]; return r; }
inline VF sub(VF a, VF b) { VF r; NCL_LANES r.v[l] = a.v[l] - b.v[l]; return r; }
inline VF mul(VF a, VF b) { VF r; NCL_LANES r.v[l] = a.v[l] * b.v[l]; return r; }
// two roundings: there is no FMA to rely on here
inline VF fmadd(VF a, VF b, VF c) { VF r; NCL_LANES r.v[l] = a.v[l] * b.v[l] + c.v[l]; return r; }
inline VF max_(VF a, VF b) { VF r; NCL_LANES r.v[l] = a.v[l] > b.v[l] ? a.v[l] : b.v[l]; return r; }
inline VF min_(VF a, VF b) { VF r; NCL_LANES r.v[l] = a.v[l] < b.v[l] ? a.v[l] : b.v[l]; return r; }
inline VMask eq(VF a, VF b) { VMask m; NCL_LANES m.v[l] = a.v[l] == b.v[l]; return m; }
inline VF select(VMask m, VF a, VF b) { VF r; NCL_LANES r.v[l] = m.v[l] ? a.v[l] : b.v[l]; return r; }
inline VMask first_lanes(int n) { VMask m; NCL_LANES m.v[l] = l < n; return m; }
inline float lane0(VF a) { return a.v[0]; }

inline float lane_exp(float x) {
  using namespace expc;
  float xc = x < kLo ? kLo : x;  // NaN compares false and passes through
  xc = xc > kHi ? kHi : xc;
  const float kb = xc * kLog2e + kMagic;
  const float k = kb - kMagic;
  float r = xc - k * kLn2Hi;  // exact: k * kLn2Hi has at most 17 significant bits
  r = r - k * kLn2Lo;
  float p = kC6 * r + kC5;
  p = p * r + kC4;
  p = p * r + kC3;
  p = p * r + kC2;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t kbits;
  std::memcpy(&kbits, &kb, sizeof kbits);
  const int32_t ki = kbits - 0x4B400000;  // as in the AVX2 version
  const int32_t k1 = ki >> 1, k2 = ki - k1;
  const uint32_t b1 = uint32_t(k1 + 127) << 23, b2 = uint32_t(k2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof s1);
  std::memcpy(&s2, &b2, sizeof s2);
  return p * s1 * s2;
}
template <bool kLe0 = false>
inline VF vexp(VF x) { VF r; NCL_LANES r.v[l] = lane_exp(x.v[l]); return r; }
inline float hsum(VF a) {
  float s = 0.0f;
  NCL_LANES s += a.v[l];
  return s;
}
inline float hmax(VF a) {
  float m = a.v[0];
  for (int l = 1; l < kW; ++l) m = a.v[l] > m ? a.v[l] : m;
  return m;
}
template <typename St>
inline VF load_acc(const St* p) { VF r; NCL_LANES r.v[l] = to_float(p[l]); return r; }
inline void store_st(float* p, VF a) { storeu(p, a); }
inline void store_st(bf16_t* p, VF a) { NCL_LANES p[l] = to_bf16(a.v[l]); }
inline void store_st(f16_t* p, VF a) { NCL_LANES p[l] = to_f16(a.v[l]); }
#undef NCL_LANES
#endif

// ---------------------------------------------------------------- shared by all sets
// exp of x <= 0 (or NaN): what an LSE sweep takes, x - max; one clamp fewer
template <typename V>
inline V vexp_le0(V x) { return vexp<true>(x); }

inline VF neg_inf_v() { return set1(-INFINITY); }
inline VF zero_v() { return set1(0.0f); }

// The first n (0 < n <= kW) elements; the other lanes read as 0 (never as memory past p).
template <typename St>
inline VF load_acc_n(const St* p, int64_t n) {
  St t[kW] = {};
  std::memcpy(t, p, sizeof(St) * size_t(n));
  return load_acc(t);
}
template <typename St>
inline void store_st_n(St* p, VF a, int64_t n) {
  St t[kW];
  store_st(t, a);
  std::memcpy(p, t, sizeof(St) * size_t(n));
}

// The float64 kernels use the same code at one lane, with the libm exp (exactness first).
struct VD { double v; };
inline VD set1(double x) { return {x}; }
inline VD loadu(const double* p) { return {*p}; }
inline void storeu(double* p, VD a) { *p = a.v; }
inline VD add(VD a, VD b) { return {a.v + b.v}; }
inline VD sub(VD a, VD b) { return {a.v - b.v}; }
inline VD mul(VD a, VD b) { return {a.v * b.v}; }
inline VD fmadd(VD a, VD b, VD c) { return {a.v * b.v + c.v}; }
inline VD max_(VD a, VD b) { return {a.v > b.v ? a.v : b.v}; }
inline VD min_(VD a, VD b) { return {a.v < b.v ? a.v : b.v}; }
inline bool eq(VD a, VD b) { return a.v == b.v; }
inline VD select(bool m, VD a, VD b) { return m ? a : b; }
template <bool kLe0 = false>
inline VD vexp(VD x) { return {std::exp(x.v)}; }
inline double hsum(VD a) { return a.v; }
inline double hmax(VD a) { return a.v; }
inline double lane0(VD a) { return a.v; }
inline VD load_acc(const double* p) { return {*p}; }
inline void store_st(double* p, VD a) { *p = a.v; }
inline VD load_acc_n(const double* p, int64_t) { return {*p}; }
inline void store_st_n(double* p, VD a, int64_t) { *p = a.v; }

// The vector type of an accumulator type, its lane count, and its mask for the first n
// lanes.
template <typename A> struct VecOf;
template <> struct VecOf<float> {
  using type = VF;
  static constexpr int width = kW;
  static auto first(int64_t n) { return first_lanes(int(n)); }
};
template <> struct VecOf<double> {
  using type = VD;
  static constexpr int width = 1;
  static bool first(int64_t n) { return n > 0; }
};

// exp over a buffer (the `_C_cpu.exp_f32` test entry and the throughput roof)
inline void exp_buffer(const float* in, float* out, int64_t n) {
  int64_t k = 0;
  for (; k + kW <= n; k += kW) storeu(out + k, vexp(loadu(in + k)));
  if (k < n) {
    float t[kW] = {};
    for (int64_t q = k; q < n; ++q) t[q - k] = in[q];
    storeu(t, vexp(loadu(t)));
    for (int64_t q = k; q < n; ++q) out[q] = t[q - k];
  }
}

// exp of one value with the kernels' exp (float) or the libm's (double)
inline float sexp(float x) { return lane0(vexp(set1(x))); }
inline double sexp(double x) { return std::exp(x); }
