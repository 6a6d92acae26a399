// Shared pieces of the row-wise CPU kernels: fp32 vectors loaded from and stored to float or bfloat16 memory
// with an exact tail, row loops and sums, the two GELU forms with their derivatives, dtype and GELU dispatch, and
// the LayerNorm row forward and backward that bias_residual_layer_norm and bias_gelu_layer_norm share.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <new>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "phi_polynomials.h"

namespace mtbert_fast::cpu {

// Allocates on 64-byte boundaries, so that a buffer's vectors of 64 bytes each sit in one cache line: malloc aligns to
// 16 bytes, and a 64-byte load or store across two lines costs two accesses.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};

  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}  // NOLINT(google-explicit-constructor): std containers rebind

  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }

  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

// The kernels' scratch buffers, read and written a vector at a time.
template <typename T>
using LineVector = std::vector<T, CacheLineAllocator<T>>;

using fVec = at::vec::Vectorized<float>;
using bVec = at::vec::Vectorized<at::BFloat16>;
constexpr int64_t kVec = fVec::size();

// Marks a whole vector; a tail is passed as its lane count instead, so one loop body serves both.
struct Full {};

// A tail load fills the lanes past the tail with zeros.
inline fVec load(const float* p, Full) { return fVec::loadu(p); }
inline fVec load(const float* p, int64_t n) { return fVec::loadu(p, n); }
inline fVec load(const at::BFloat16* p, Full) {
  fVec v;
  at::vec::load_fp32_from_bf16(p, v);
  return v;
}
inline fVec load(const at::BFloat16* p, int64_t n) {
  return std::get<0>(at::vec::convert_to_float<at::BFloat16>(bVec::loadu(p, n)));
}

inline void store(float* p, const fVec& v, Full) { v.store(p); }
inline void store(float* p, const fVec& v, int64_t n) { v.store(p, n); }
#if defined(CPU_CAPABILITY_AVX512)
// Whether the CPU has AVX512-BF16 (the bf16 stores below, the bf16 dot-product tiles of cpu_tiles.h): checked once,
// when the library loads (__builtin_cpu_init first, since this may run before libgcc's own constructor has read the
// CPU's features).
inline const bool kCpuHasAvx512Bf16 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16"));

// One 16-lane conversion (round to nearest even, NaN kept) instead of ATen's two-vector one. Where the CPU has
// AVX512-BF16, its single instruction (which also flushes fp32 denormals to zero), written as assembly because this
// build does not assume the extension; elsewhere ATen's rounding, 8 integer operations a vector.
inline __m256i to_bf16_bits(const fVec& v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  if (kCpuHasAvx512Bf16) {
    __m256i bits;
    asm("vcvtneps2bf16 %1, %0" : "=v"(bits) : "v"(__m512(v)));
    return bits;
  }
  return at::vec::cvtfp32_bf16(__m512(v));
#endif
}
inline void store(at::BFloat16* p, const fVec& v, Full) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v));
}
inline void store(at::BFloat16* p, const fVec& v, int64_t n) {
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), to_bf16_bits(v));
}
#else
inline void store(at::BFloat16* p, const fVec& v, Full) {
  at::vec::convert_from_float<at::BFloat16>(v, v).store(p, kVec);
}
inline void store(at::BFloat16* p, const fVec& v, int64_t n) {
  at::vec::convert_from_float<at::BFloat16>(v, v).store(p, n);
}
#endif

// v rounded to bf16 as store() rounds it, kept in fp32 lanes: what a bf16 store and load give back.
inline fVec round_to_bf16(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(v)), 16));
#else
  return std::get<0>(at::vec::convert_to_float<at::BFloat16>(at::vec::convert_from_float<at::BFloat16>(v, v)));
#endif
}

// Zeroes the lanes past a tail so that they drop out of row sums.
inline fVec keep_lanes(const fVec& v, Full) { return v; }
inline fVec keep_lanes(const fVec& v, int64_t n) { return fVec::set(fVec(0.f), v, n); }

// Calls f(d, Full{}) for each whole vector of a row of D and f(d, lanes) once for the tail.
template <typename F>
inline void for_each_vec(int64_t D, const F& f) {
  int64_t d = 0;
  for (; d + kVec <= D; d += kVec) f(d, Full{});
  if (d < D) f(d, D - d);
}

// A [D] parameter as fp32: the tensor's own memory when it is fp32, else a copy converted once per parallel task,
// so that the row loops read it without converting it again for every row.
template <typename T>
class ParamF32 {
 public:
  ParamF32(const T* p, int64_t D) {
    if constexpr (std::is_same_v<T, float>) {
      data_ = p;
    } else {
      copy_.resize(D);
      for_each_vec(D, [&](int64_t d, auto n) { store(copy_.data() + d, load(p + d, n), n); });
      data_ = copy_.data();
    }
  }
  const float* data() const { return data_; }

 private:
  LineVector<float> copy_;
  const float* data_;
};

// Like for_each_vec, but also hands f(d, lanes, acc) one of four accumulators in turn, so that a row sum runs as
// four interleaved add chains instead of one (a single chain would bound the LayerNorm kernels by add latency).
// Returns the four accumulators added together.
template <typename Acc, typename F>
inline Acc reduce_vecs(int64_t D, const Acc& zero, const F& f) {
  Acc a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  int64_t d = 0;
  for (; d + 4 * kVec <= D; d += 4 * kVec) {
    f(d, Full{}, a0);
    f(d + kVec, Full{}, a1);
    f(d + 2 * kVec, Full{}, a2);
    f(d + 3 * kVec, Full{}, a3);
  }
  for (; d + kVec <= D; d += kVec) f(d, Full{}, a0);
  if (d < D) f(d, D - d, a1);
  return (a0 + a1) + (a2 + a3);
}

// min and max of two vectors for callers that need not propagate NaN (or track it apart): one instruction each,
// where at::vec::minimum and maximum add a compare and a blend.
inline fVec min_ignoring_nan(const fVec& a, const fVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_min_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_min_ps(a, b);
#else
  return at::vec::minimum(a, b);
#endif
}
inline fVec max_ignoring_nan(const fVec& a, const fVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// Sum of a vector's lanes.
inline float lane_sum(const fVec& v) { return at::vec::vec_reduce_all<float>(std::plus<fVec>(), v); }
// The largest lane, NaN lanes left out (as max_ignoring_nan): a NaN score gives a NaN output anyway.
inline float lane_max(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return max_ignoring_nan(a, b); }, v);
}

// Two row sums carried together through reduce_vecs.
struct SumPair {
  fVec first;
  fVec second;
  SumPair operator+(const SumPair& o) const { return {first + o.first, second + o.second}; }
};

// The vector helpers from here to gelu_and_grad are always inlined: GCC left normal_cdf out of line in the unrolled
// tile epilogues, where each of the tile's calls (through the PLT) spilled every live accumulator to the stack.

// 1 / v to full fp32 precision: one Newton step on the 14-bit estimate is far cheaper than a divide.
C10_ALWAYS_INLINE fVec reciprocal(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = _mm512_rcp14_ps(v);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(v, r, _mm512_set1_ps(2.f)));
#elif defined(CPU_CAPABILITY_AVX2)
  // the 12-bit estimate, whose Newton step leaves about 23 bits
  const __m256 r = _mm256_rcp_ps(v);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(v, r, _mm256_set1_ps(2.f)));
#else
  return v.reciprocal();
#endif
}

// exp of a finite v: 2^n e^r with n = round(v / ln2) and r = v - n ln2 in one fused step (fp32 ln2 costs
// |n| * 2e-9 relative, under 3e-7 for the arguments used here), and e^r by a degree-5 minimax polynomial on
// [-ln2/2, ln2/2] (relative error 1.5e-7). AVX-512's scalef applies 2^n and gives 0 below the fp32 range and inf
// above it, so no special cases are needed (the general exp spends much of its time on them).
C10_ALWAYS_INLINE fVec exp_finite(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  const fVec x = v;
#else
  // Without scalef, 2^n is built in the exponent bits, for v clamped to [kLo, kHi] where n stays in [-126, 127]
  // (a normal fp32); below kLo the result is 0 and above kHi inf (e^v is under 2^-126 or past 2^127 there, which
  // the arguments used here never approach: GELU's are in [-113, 80]).
  constexpr float kLo = -87.33654f, kHi = 88.02969f;
  const fVec x = at::vec::clamp(v, fVec(kLo), fVec(kHi));
#endif
  const fVec n = (x * fVec(1.44269504088896341f)).round();
  const fVec r = at::vec::fnmadd(n, fVec(0.693147180559945309f), x);
  fVec p = at::vec::fmadd(fVec(0.008290315f), r, fVec(0.04189793f));
  p = at::vec::fmadd(p, r, fVec(0.16667636f));
  p = at::vec::fmadd(p, r, fVec(0.4999915f));
  p = at::vec::fmadd(p, r, fVec(0.9999997f));
  p = at::vec::fmadd(p, r, fVec(1.f));
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const fVec y = p * fVec(_mm256_castsi256_ps(bits));
  const fVec low = fVec::blendv(y, fVec(0.f), v < fVec(kLo));
  return fVec::blendv(low, fVec(INFINITY), v > fVec(kHi));
#endif
#else
  return v.exp();
#endif
}

// if_negative where x < 0, otherwise 1 - if_negative.
C10_ALWAYS_INLINE fVec one_minus_unless_negative(const fVec& x, const fVec& if_negative) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 not_negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NLT_UQ);
  return _mm512_mask_sub_ps(if_negative, not_negative, _mm512_set1_ps(1.f), if_negative);
#else
  return fVec::blendv(fVec(1.f) - if_negative, if_negative, x < fVec(0.f));
#endif
}

// Standard normal CDF Phi(x); also returns exp(-x^2 / 2), which the GELU derivative reuses.
// erfc(a) ~= t * poly(t) * exp(-a^2) with t = 1 / (1 + p a), a = |x| / sqrt(2) (Abramowitz & Stegun 7.1.26,
// |error| < 1.5e-7, the approximation ATen's vectorized erf uses); the 1 / sqrt(2) and Phi's factor 1/2 are folded
// into the constants. Taking Phi from erfc on either side keeps the far negative tail accurate instead of
// cancelling 1 + erf. Past |x| = kCdfCap the tail (Phi(-12.5) ~ 4e-36) is taken as 0, so Phi is exactly 0 or 1 and
// exp(-x^2 / 2) is 0 there: computed, the tail would pass through subnormal numbers (or underflow from them), whose
// microcode assists ran a GELU pass over such inputs 10-20x slower. |x| is capped at kCdfCap before the arithmetic,
// so that infinite inputs reach neither the Newton step nor exp.
constexpr float kCdfCap = 12.5f;

// v where |x| <= kCdfCap, else 0 (NaN x too).
C10_ALWAYS_INLINE fVec zero_past_cap(const fVec& x, const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.abs(), _mm512_set1_ps(kCdfCap), _CMP_LE_OQ), v);
#else
  return v & (x.abs() <= fVec(kCdfCap));
#endif
}

C10_ALWAYS_INLINE fVec normal_cdf(const fVec& x, fVec& gauss) {
  const fVec ax = at::vec::clamp_max(x.abs(), fVec(kCdfCap));
  const fVec t = reciprocal(at::vec::fmadd(fVec(0.3275911f * 0.70710678118654752f), ax, fVec(1.f)));
  fVec half_poly = at::vec::fmadd(fVec(0.5f * 1.061405429f), t, fVec(0.5f * -1.453152027f));
  half_poly = at::vec::fmadd(half_poly, t, fVec(0.5f * 1.421413741f));
  half_poly = at::vec::fmadd(half_poly, t, fVec(0.5f * -0.284496736f));
  half_poly = at::vec::fmadd(half_poly, t, fVec(0.5f * 0.254829592f));
  gauss = zero_past_cap(x, exp_finite(ax * fVec(-0.5f) * ax));
  return one_minus_unless_negative(x, t * half_poly * gauss);
}

// Logistic sigmoid; exp takes the argument clamped to [-80, 80], where exp stays finite. Above 80 that gives 1, as
// fp32 does; below -80 the result is set to 0 (the true value is under 1.8e-35), since the clamped 1.8e-35 would
// make x * sigmoid(u) grow with x. (at::vec's clamp and clamp_max keep a NaN argument, and so does the blend.)
C10_ALWAYS_INLINE fVec sigmoid(const fVec& u) {
  const fVec e = exp_finite(at::vec::clamp(u.neg(), fVec(-80.f), fVec(80.f)));
  return fVec::blendv(reciprocal(e + fVec(1.f)), fVec(0.f), u < fVec(-80.f));
}

// tanh form: 0.5 x (1 + tanh(k (x + c x^3))) = x * sigmoid(2 k (x + c x^3)).
constexpr float kTanhK2 = 2.f * 0.7978845608028654f;  // 2 sqrt(2 / pi)
constexpr float kTanhC = 0.044715f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

#if defined(CPU_CAPABILITY_AVX512)
// x Phi(x) with Phi from the polynomials of phi_polynomials.h, for x >= -kPhiEdge (+inf included: past the edge, x
// takes the last interval's end, where Phi is 1 in fp32). About 20 vector operations against normal_cdf's 30, and a
// far shorter chain of dependent ones (no reciprocal or exp), with a smaller error where |GELU| > 1e-3 (relative 5e-7,
// against 2e-4 for the erfc form). Lanes below -kPhiEdge get a value without meaning.
C10_ALWAYS_INLINE fVec gelu_erf_polynomial(const fVec& x) {
  constexpr float kInvWidth = kPhiIntervals / (2 * kPhiEdge);  // intervals per unit of x
  constexpr int kOffset = static_cast<int>(kPhiEdge * kInvWidth);  // x's position s = x * kInvWidth + kOffset
  static_assert(kPhiIntervals == 32 && kInvWidth == 2.f, "two registers of 16 lanes hold a coefficient's table, and "
                "the intervals' width must be a power of 2, so that v below is exact");
  // x capped where s stays under kPhiIntervals in fp32 (s = 32 - 2^-19 at the cap), so that the index does too
  const __m512 t = _mm512_min_ps(x, _mm512_set1_ps(kPhiEdge - 0x1p-19f / kInvWidth));
  const __m512i i = _mm512_cvttps_epi32(_mm512_fmadd_ps(t, _mm512_set1_ps(kInvWidth), _mm512_set1_ps(kOffset)));
  // v = s - i in one rounding: kOffset - i is exact, and the product is not rounded before the sum
  const __m512 start = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(kOffset), i));
  const __m512 v = _mm512_fmadd_ps(t, _mm512_set1_ps(kInvWidth), start);
  const auto coefficient = [&](int d) {
    return _mm512_permutex2var_ps(_mm512_load_ps(kPhiPoly[d]), i, _mm512_load_ps(kPhiPoly[d] + 16));
  };
  __m512 p = coefficient(kPhiDegree);
  for (int d = kPhiDegree - 1; d >= 0; --d) p = _mm512_fmadd_ps(p, v, coefficient(d));
  return _mm512_mul_ps(x, p);
}
#endif

template <GeluKind K>
C10_ALWAYS_INLINE fVec gelu(const fVec& x) {
  if constexpr (K == GeluKind::Erf) {
#if defined(CPU_CAPABILITY_AVX512)
    // the polynomials where every lane is at least -kPhiEdge; a lane further down (Phi under 7e-16 there), or NaN,
    // takes the erfc form, the others the polynomials still, so that each lane's result depends on its x alone
    const __mmask16 far = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-kPhiEdge), _CMP_NGE_UQ);
    if (C10_LIKELY(far == 0)) return gelu_erf_polynomial(x);
    fVec gauss;
    const fVec tail = x * normal_cdf(x, gauss);
    return far == 0xFFFF ? tail : fVec(_mm512_mask_blend_ps(far, gelu_erf_polynomial(x), tail));
#else
    fVec gauss;
    return x * normal_cdf(x, gauss);
#endif
  } else {
    const fVec x2 = x * x;
    return x * sigmoid(fVec(kTanhK2) * x * at::vec::fmadd(fVec(kTanhC), x2, fVec(1.f)));
  }
}

// GELU and its derivative together, sharing the exp (the erf form's y is gelu's, from the polynomials on AVX-512).
//   erf:  d/dx x Phi(x) = Phi(x) + x phi(x)
//   tanh: d/dx x s(u) = s + x s (1 - s) u',  u = 2k(x + c x^3), u' = 2k(1 + 3c x^2)
template <GeluKind K>
C10_ALWAYS_INLINE void gelu_and_grad(const fVec& x, fVec& y, fVec& dy) {
  if constexpr (K == GeluKind::Erf) {
    fVec gauss;
    const fVec cdf = normal_cdf(x, gauss);
    // the forward's value bit for bit (a backward that recomputes it, LayerNorm's, must see the same): the polynomials
    // on AVX-512, elsewhere gelu's erfc form, x times the cdf already at hand
#if defined(CPU_CAPABILITY_AVX512)
    y = gelu<K>(x);
#else
    y = x * cdf;
#endif
    dy = at::vec::fmadd(x * fVec(kInvSqrt2Pi), gauss, cdf);
  } else {
    const fVec x2 = x * x;
    const fVec s = sigmoid(fVec(kTanhK2) * x * at::vec::fmadd(fVec(kTanhC), x2, fVec(1.f)));
    const fVec du = fVec(kTanhK2) * at::vec::fmadd(fVec(3.f * kTanhC), x2, fVec(1.f));
    y = x * s;
    dy = at::vec::fmadd(y * (fVec(1.f) - s), du, s);
  }
}

template <GeluKind K>
inline fVec gelu_grad(const fVec& x) {
  fVec y, dy;
  gelu_and_grad<K>(x, y, dy);
  return dy;
}

// Calls f(T{}) with T = float or at::BFloat16 for the tensors' dtype (checked by the caller).
template <typename F>
inline void dispatch_float_bf16(at::ScalarType dtype, const F& f) {
  if (dtype == at::kBFloat16) {
    f(at::BFloat16{});
  } else {
    f(float{});
  }
}

// Calls f(T{}, W{}) for a LayerNorm's activation dtype T (float or at::BFloat16) and the dtype W of its weight and
// beta: T, or float (the fp32 parameters of mixed precision); both checked by the caller.
template <typename F>
inline void dispatch_layer_norm_types(at::ScalarType x_dtype, at::ScalarType param_dtype, const F& f) {
  dispatch_float_bf16(x_dtype, [&](auto t) {
    using T = decltype(t);
    if (param_dtype == at::kFloat) {
      f(T{}, float{});
    } else {
      f(T{}, T{});
    }
  });
}

template <GeluKind K>
using GeluTag = std::integral_constant<GeluKind, K>;

// Calls f(GeluTag<K>{}) so that the GELU form is a compile-time constant inside the row loop.
template <typename F>
inline void dispatch_gelu(GeluKind kind, const F& f) {
  if (kind == GeluKind::Erf) {
    f(GeluTag<GeluKind::Erf>{});
  } else {
    f(GeluTag<GeluKind::Tanh>{});
  }
}

// Rows per parallel task: about 32K elements (ATen's grain), so small inputs stay on one thread.
constexpr int64_t kGrainElems = 32768;
inline int64_t row_grain(int64_t D) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(D, 1)); }

// Rows per parallel task of the LayerNorm forwards (the residual and GELU LayerNorms, the embeddings): about 128K
// elements, so a full batch's LayerNorm ([1024, 384] and up) runs on both threads and a short input's on one. On a
// 2-core AMD EPYC (Zen 4), all-MiniLM-L6-v2 at B=8, L=128 ran 1.04x faster in bf16 and 1.02x in fp32 than with its
// LayerNorms on one thread, bert-base 1.02x (about 0.2 ms a LayerNorm inside the forward, where its input comes
// from both cores' caches). Each split adds a parallel region: under OMP_WAIT_POLICY=PASSIVE its thread wake ate the
// gain (0.99-1.01x), and with the default policy on a machine whose other jobs hold the cores it cost 10% (where
// the same forward ran 1.4x slower than under PASSIVE anyway). At 128 tokens of 768 (98K elements) splitting saved
// under 1%, less than a wake: such inputs stay on one thread.
constexpr int64_t kLayerNormGrainElems = int64_t{1} << 17;
inline int64_t layer_norm_row_grain(int64_t D) {
  return std::max<int64_t>(1, kLayerNormGrainElems / std::max<int64_t>(D, 1));
}

// Rows before the last dim (1 for a 1-D tensor), without dividing by a last dim that may be 0.
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  return rows;
}

// ---- LayerNorm rows ----

// Normalizes one row from its fp32 pre-norm values s, two-pass (the row is in L1, and the two passes avoid the
// cancellation of E[s^2] - mean^2): out = (s - mean) * rstd * weight + beta, rstd = 1 / sqrt(var + eps) with the
// biased variance. The second pass also sums the deviations from the first mean, sum(s) / D, whose rounding it
// corrects (the corrected two-pass algorithm): a constant row's deviations are then exactly 0 and its output beta,
// where with eps 1e-12 rstd (up to 1e6) turned the first mean's rounding into outputs of the weights' size.
template <typename T>
inline void layer_norm_row(
    const float* s,       // [D]
    float sum,            // sum of s
    const float* weight,  // [D]
    const float* beta,    // [D]
    double eps,
    T* out,               // [D]
    float* mean,          // [1]
    float* rstd,          // [1]
    int64_t D) {
  const float mu0 = sum / static_cast<float>(D);
  const SumPair sums = reduce_vecs(D, SumPair{fVec(0.f), fVec(0.f)}, [&](int64_t d, auto n, SumPair& acc) {
    const fVec c = keep_lanes(load(s + d, n) - fVec(mu0), n);
    acc.first += c;
    acc.second = at::vec::fmadd(c, c, acc.second);
  });
  double sum_c = lane_sum(sums.first);
  double sum_sq = lane_sum(sums.second);
  if (std::isinf(sum_sq)) {  // the fp32 squares overflowed (|s - mean| past ~1e19): again in double, this row only
    sum_c = sum_sq = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double c = static_cast<double>(s[d]) - mu0;
      sum_c += c;
      sum_sq += c * c;
    }
  }
  const double shift = sum_c / D;
  const float mu = static_cast<float>(mu0 + shift);
  const float rs = static_cast<float>(1.0 / std::sqrt(std::max(sum_sq / D - shift * shift, 0.0) + eps));
  for_each_vec(D, [&](int64_t d, auto n) {
    const fVec xhat = (load(s + d, n) - fVec(mu)) * fVec(rs);
    store(out + d, at::vec::fmadd(xhat, load(weight + d, n), load(beta + d, n)), n);
  });
  *mean = mu;
  *rstd = rs;
}

// Row blocks of the LayerNorm backward. The block size is fixed, so each block's partial sums of grad_weight and
// grad_beta, and their in-order reduction, are the same whatever the number of threads.
constexpr int64_t kRowsPerBlock = 32;

inline int64_t num_row_blocks(int64_t N) { return (N + kRowsPerBlock - 1) / kRowsPerBlock; }

// LayerNorm backward over rows [begin, end) of one block, given s_of(row, d, lanes) -> s (the pre-norm values,
// recomputed from the saved inputs) and put(row, d, lanes, grad_s) to finish and store the input gradient.
//   xhat = (s - mean) * rstd, g = grad_out * weight, grad_s = rstd * (g - mean(g) - xhat * mean(g * xhat))
// dw and db gain the block's sums of grad_out * xhat and of grad_out.
template <typename T, typename SOf, typename Put>
inline void layer_norm_backward_block(
    const T* grad_out,    // [N, D]
    const float* weight,  // [D]
    const float* mean,    // [N]
    const float* rstd,    // [N]
    float* xhat,          // [D] scratch
    float* g,             // [D] scratch
    float* dw,            // [D]
    float* db,            // [D]
    int64_t begin,
    int64_t end,
    int64_t D,
    const SOf& s_of,
    const Put& put) {
  for (int64_t row = begin; row < end; ++row) {
    const T* dy_row = grad_out + row * D;
    const fVec mu(mean[row]);
    const fVec rs(rstd[row]);
    // first: sum of g, second: sum of g * xhat.
    const SumPair sums = reduce_vecs(D, SumPair{fVec(0.f), fVec(0.f)}, [&](int64_t d, auto n, SumPair& acc) {
      const fVec xh = (s_of(row, d, n) - mu) * rs;
      const fVec dy = load(dy_row + d, n);
      const fVec gv = dy * load(weight + d, n);
      store(xhat + d, xh, n);
      store(g + d, gv, n);
      acc.first += gv;
      acc.second = at::vec::fmadd(gv, xh, acc.second);
      store(dw + d, at::vec::fmadd(dy, xh, load(dw + d, n)), n);
      store(db + d, load(db + d, n) + dy, n);
    });
    // g - mean(g) first: it is exactly 0 where the row is constant, so rstd (large there) amplifies no rounding.
    const fVec mean_g(lane_sum(sums.first) / static_cast<float>(D));
    const fVec mean_gx(lane_sum(sums.second) / static_cast<float>(D));
    for_each_vec(D, [&](int64_t d, auto n) {
      put(row, d, n, rs * at::vec::fnmadd(load(xhat + d, n), mean_gx, load(g + d, n) - mean_g));
    });
  }
}

// grad_weight and grad_beta from the per-block partial sums, each column summed over the blocks in order in fp32
// and rounded once to the parameters' dtype W.
template <typename W>
inline void reduce_row_blocks(
    const float* partial,  // [blocks, 2, D]: sums of grad_out * xhat, then of grad_out
    int64_t blocks,
    int64_t D,
    W* grad_weight,        // [D]
    W* grad_beta) {        // [D]
  const int64_t grain = std::max<int64_t>(kVec, kGrainElems / std::max<int64_t>(blocks, 1));
  at::parallel_for(0, D, grain, [&](int64_t c0, int64_t c1) {
    for_each_vec(c1 - c0, [&](int64_t j, auto n) {
      const int64_t d = c0 + j;
      fVec w(0.f);
      fVec b(0.f);
      for (int64_t k = 0; k < blocks; ++k) {
        w += load(partial + (2 * k) * D + d, n);
        b += load(partial + (2 * k + 1) * D + d, n);
      }
      store(grad_weight + d, w, n);
      store(grad_beta + d, b, n);
    });
  });
}

}  // namespace mtbert_fast::cpu
