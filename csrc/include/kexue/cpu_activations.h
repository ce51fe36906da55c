// The activations of the i-ResNet branch on full-width vectors (kexue/simd.h) — elu, relu, tanh,
// softplus, lipswish — with the vector exp/expm1/log1p they need, for float and double. Torch-free;
// included only by csrc/cpu/ (everything lives in the ISA level's namespace).
//
// Accuracy: expm1 and exp take x = n·ln2 + r (|r| ≤ ln2/2, Cody–Waite split of ln2), a Taylor
// polynomial for expm1(r) (degree 8 in float, 13 in double: truncation below 1e-9 / 5e-18 relative),
// and 2ⁿ from the exponent bits; log1p(t), t ∈ [0, 1], is 2·atanh(t/(2+t)) by its odd series
// (s² ≤ 1/9; 8 / 18 terms). Each is within a few ulps of libm. Inputs are clamped where 2ⁿ
// would leave the normal range (exp of below −87 / −708 gives its value at the clamp, which is
// what every activation here needs); NaN inputs give NaN outputs, as torch's activations do.
#pragma once
#include <cstdint>

#include "kexue/iresnet.h"
#include "kexue/simd.h"

namespace kexue {
namespace KEXUE_CPU_NS {

// The integer and unsigned vector types of T's size, and T's float layout.
template <class T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using Int = int32_t;
  static constexpr int kMantissaBits = 23;
  static constexpr Int kExponentBias = 127;
  static constexpr float kRoundMagic = 0x1.8p23f;  // x + magic rounds x to an integer held in its low bits
  static constexpr float kLo = -87.0f, kHi = 88.0f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr int kExpm1Degree = 8, kLog1pTerms = 8;
};
template <>
struct FloatBits<double> {
  using Int = int64_t;
  static constexpr int kMantissaBits = 52;
  static constexpr Int kExponentBias = 1023;
  static constexpr double kRoundMagic = 0x1.8p52;
  static constexpr double kLo = -708.0, kHi = 709.0;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  static constexpr int kExpm1Degree = 13, kLog1pTerms = 18;
};

template <class T>
[[gnu::always_inline]] inline Vec<T> clamp(Vec<T> x, T lo, T hi) {  // NaN stays NaN
  x = x < lo ? splat(lo) : x;
  return x > hi ? splat(hi) : x;
}

// x = n·ln2 + r: sets r and returns 2ⁿ (x already clamped to [kLo, kHi]).
template <class T>
[[gnu::always_inline]] inline Vec<T> split_exponent(Vec<T> x, Vec<T>& r) {
  using B = FloatBits<T>;
  using I = Vec<typename B::Int>;
  const Vec<T> shifted = x * T(1.4426950408889634) + B::kRoundMagic;  // round(x / ln2) in the low bits
  const Vec<T> n = shifted - B::kRoundMagic;
  r = (x - n * B::kLn2Hi) - n * B::kLn2Lo;
  const I n_bits = (I)shifted - (I)splat<T>(B::kRoundMagic);  // n as an integer (same exponent: the low bits)
  return (Vec<T>)((n_bits + B::kExponentBias) << B::kMantissaBits);
}

// expm1(r) for |r| ≤ ln2/2: r + r²/2! + … (Horner).
template <class T>
[[gnu::always_inline]] inline Vec<T> expm1_reduced(Vec<T> r) {
  constexpr int degree = FloatBits<T>::kExpm1Degree;
  // Horner in the coefficients 1/k!: one FMA per degree, r·(1/1! + r·(1/2! + … + r/degree!)).
  T factorial = 1;
  for (int k = 2; k <= degree; ++k) factorial *= T(k);
  Vec<T> p = splat<T>(T(1) / factorial);
  for (int k = degree - 1; k >= 1; --k) {
    factorial /= T(k + 1);  // k! (exact: the products of small integers are exact in float and double)
    p = p * r + T(1) / factorial;
  }
  return r * p;
}

template <class T>
[[gnu::always_inline]] inline Vec<T> vec_exp(Vec<T> x) {
  Vec<T> r;
  const Vec<T> scale = split_exponent<T>(clamp<T>(x, FloatBits<T>::kLo, FloatBits<T>::kHi), r);
  return scale + scale * expm1_reduced<T>(r);
}

template <class T>
[[gnu::always_inline]] inline Vec<T> vec_expm1(Vec<T> x) {
  Vec<T> r;
  const Vec<T> scale = split_exponent<T>(clamp<T>(x, FloatBits<T>::kLo, FloatBits<T>::kHi), r);
  return scale * expm1_reduced<T>(r) + (scale - T(1));
}

// log1p(t) for t in [0, 1]: 2·(s + s³/3 + s⁵/5 + …), s = t/(2+t).
template <class T>
[[gnu::always_inline]] inline Vec<T> log1p_unit(Vec<T> t) {
  const Vec<T> s = t / (t + T(2));
  const Vec<T> s2 = s * s;
  Vec<T> p = splat<T>(T(1) / T(2 * FloatBits<T>::kLog1pTerms - 1));
  for (int m = FloatBits<T>::kLog1pTerms - 2; m >= 0; --m) p = T(1) / T(2 * m + 1) + s2 * p;
  return T(2) * s * p;
}

template <class T>
[[gnu::always_inline]] inline Vec<T> vec_sigmoid(Vec<T> h) {
  return T(1) / (T(1) + vec_exp<T>(-h));
}

// a(h) for the activation `A` (kexue::Activation).
template <Activation A, class T>
[[gnu::always_inline]] inline Vec<T> activate(Vec<T> h) {
  if constexpr (A == Activation::Elu) {
    return h > T(0) ? h : vec_expm1<T>(h);
  } else if constexpr (A == Activation::Relu) {
    return h < T(0) ? splat<T>(T(0)) : h;
  } else if constexpr (A == Activation::Tanh) {
    const Vec<T> e = vec_expm1<T>(T(2) * clamp<T>(h, T(-20), T(20)));
    return e / (e + T(2));
  } else if constexpr (A == Activation::Softplus) {
    const Vec<T> positive = h > T(0) ? h : splat<T>(T(0));
    // log(1 + e^h) = max(h, 0) + log1p(e^-|h|)
    const Vec<T> smooth = positive + log1p_unit<T>(vec_exp<T>(h - T(2) * positive));
    return h > T(20) ? h : smooth;
  } else {
    return h * vec_sigmoid<T>(h) * T(1 / 1.1);
  }
}

// a(h), with a'(h) in `slope` and, if `curvature` is not null, a''(h) there, from the same
// exponentials — as torch differentiates `activate` once and twice: relu'(0) = 0, elu'(0) = 1,
// elu''(h) = exp(h) for h <= 0 and 0 above, softplus' = 1 and softplus'' = 0 above its threshold 20.
template <Activation A, class T>
[[gnu::always_inline]] inline Vec<T> activate_with_derivatives(Vec<T> h, Vec<T>& slope, Vec<T>* curvature = nullptr) {
  const Vec<T> zero = splat<T>(T(0)), one = splat<T>(T(1));
  if constexpr (A == Activation::Elu) {
    const Vec<T> em1 = vec_expm1<T>(h), below = em1 + one;  // e^h − 1, e^h
    slope = h > T(0) ? one : below;
    if (curvature != nullptr) *curvature = h > T(0) ? zero : below;
    return h > T(0) ? h : em1;
  } else if constexpr (A == Activation::Relu) {
    slope = h > T(0) ? one : zero;
    if (curvature != nullptr) *curvature = zero;
    return h < T(0) ? zero : h;
  } else if constexpr (A == Activation::Tanh) {
    const Vec<T> t = activate<A, T>(h);
    slope = one - t * t;
    if (curvature != nullptr) *curvature = T(-2) * t * slope;
    return t;
  } else if constexpr (A == Activation::Softplus) {
    const Vec<T> positive = h > T(0) ? h : zero;
    const Vec<T> e = vec_exp<T>(h - T(2) * positive);   // e^−|h|
    const Vec<T> s = (h > T(0) ? one : e) / (one + e);  // sigmoid(h)
    slope = h > T(20) ? one : s;
    if (curvature != nullptr) *curvature = h > T(20) ? zero : s * (one - s);
    return h > T(20) ? h : positive + log1p_unit<T>(e);
  } else {
    const Vec<T> s = vec_sigmoid<T>(h), ds = s * (one - s);
    slope = (s + h * ds) * T(1 / 1.1);
    if (curvature != nullptr) *curvature = ds * (T(2) + h * (one - T(2) * s)) * T(1 / 1.1);
    return h * s * T(1 / 1.1);
  }
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
