// The CPU kernels' small SIMD layer: vectors of the full width of the ISA level a file is
// compiled for (kexue/cpu_dispatch.h), written once with GCC/Clang vector extensions, plus the
// few operations those do not express (square root, the 32 × 32 → 64-bit multiply, float16
// conversions, non-temporal stores), each mapped to the level's instruction. Included only by
// csrc/cpu/ (everything here lives in the level's own namespace, so the copies compiled for
// different levels never meet in the linker). Torch-free.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef KEXUE_CPU_NS
#error "csrc/cpu/ files are compiled once per ISA level with KEXUE_CPU_NS set (CMakeLists.txt)"
#endif

namespace kexue {
namespace KEXUE_CPU_NS {

// Bytes per vector register of this level.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <class T, int Bytes>
struct VectorOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
// A full-width vector of T, and one of half the width (e.g. the 16-bit values that widen into
// a Vec<float>). Comparisons give lane masks of all ones (-1) or zeros; C-style casts between
// vector types of one size reinterpret the bits.
template <class T>
using Vec = typename VectorOf<T, kVectorBytes>::type;
template <class T>
using HalfVec = typename VectorOf<T, kVectorBytes / 2>::type;
// Lanes of a Vec<T>.
template <class T>
constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(T));

template <class V, class T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V, class T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// The sum of the lanes of a vector of `Bytes` bytes, by halves: log2(lanes) vector additions
// instead of a serial chain of lanes − 1 scalar ones.
template <class A, int Bytes = kVectorBytes>
inline A lane_sum(typename VectorOf<A, Bytes>::type v) {
  if constexpr (Bytes == 2 * sizeof(A)) {
    return v[0] + v[1];
  } else {
    typename VectorOf<A, Bytes / 2>::type low, high;
    std::memcpy(&low, &v, sizeof low);
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
    return lane_sum<A, Bytes / 2>(low + high);
  }
}

// Every lane `value`: one broadcast (`Vec<T>{} + value` would add 0.0, which the compiler must
// keep, as -0.0 + 0.0 is +0.0).
template <class V, class T, size_t... I>
constexpr V splat_lanes(T value, std::index_sequence<I...>) {
  return V{((void)I, value)...};
}
template <class T>
inline Vec<T> splat(T value) {
  return splat_lanes<Vec<T>>(value, std::make_index_sequence<kLanes<T>>{});
}

// The largest lane of a vector of `Bytes` bytes, by halves like lane_sum (a NaN lane may or may
// not win: callers that care test for NaN separately).
template <class A, int Bytes = kVectorBytes>
inline A lane_max(typename VectorOf<A, Bytes>::type v) {
  if constexpr (Bytes == 2 * sizeof(A)) {
    return v[0] > v[1] ? v[0] : v[1];
  } else {
    typename VectorOf<A, Bytes / 2>::type low, high;
    std::memcpy(&low, &v, sizeof low);
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
    return lane_max<A, Bytes / 2>(low > high ? low : high);
  }
}

// A vector of the integer constants f(0), f(1), ..., f(lanes − 1) (shuffle masks).
template <class V, class F, size_t... I>
constexpr V iota_vector(F f, std::index_sequence<I...>) {
  return V{f(I)...};
}
template <class V, int Lanes, class F>
constexpr V lane_constants(F f) {
  return iota_vector<V>(f, std::make_index_sequence<Lanes>{});
}

// AVX-512 intrinsics are called in their zero-masking form with every lane selected: the same
// instruction, but gcc 12's headers build the plain forms from an "undefined" register and then
// warn about it wherever they are inlined.

inline Vec<float> sqrt(Vec<float> v) {
#if defined(__AVX512F__)
  return _mm512_maskz_sqrt_ps(0xffff, v);
#elif defined(__AVX2__)
  return _mm256_sqrt_ps(v);
#elif defined(__SSE2__)
  return _mm_sqrt_ps(v);
#else
  for (int k = 0; k < kLanes<float>; ++k) v[k] = std::sqrt(v[k]);
  return v;
#endif
}

// (a mod 2³²)·m per 64-bit lane (the high half of each lane of `a` is ignored): one vpmuludq
// (compilers turn the portable form into a full 64 × 64-bit multiply).
inline Vec<uint64_t> mul_low32(Vec<uint64_t> a, uint32_t m) {
#if defined(__AVX512F__)
  return (Vec<uint64_t>)_mm512_maskz_mul_epu32(0xff, (__m512i)a, _mm512_set1_epi64(m));
#elif defined(__AVX2__)
  return (Vec<uint64_t>)_mm256_mul_epu32((__m256i)a, _mm256_set1_epi64x(m));
#elif defined(__SSE2__)
  return (Vec<uint64_t>)_mm_mul_epu32((__m128i)a, _mm_set1_epi64x(m));
#else
  return (a & 0xffffffffu) * m;
#endif
}

// The 16-bit lanes of a half vector zero-extended to 32 bits: one vpmovzxwd (gcc 12 splits the
// portable __builtin_convertvector into two 256-bit halves and a merge at the AVX-512 width).
inline Vec<uint32_t> widen_u16(HalfVec<uint16_t> v) {
#if defined(__AVX512F__)
  return (Vec<uint32_t>)_mm512_maskz_cvtepu16_epi32(0xffff, (__m256i)v);
#elif defined(__AVX2__)
  return (Vec<uint32_t>)_mm256_cvtepu16_epi32((__m128i)v);
#else
  return __builtin_convertvector(v, Vec<uint32_t>);
#endif
}

// Stores a full or a half vector to an address aligned to its size without reading the line
// into the cache first; a thread that streams calls finish_streaming() before its results are used.
template <class V>
inline void stream_store(void* aligned, V v) {
  static_assert(sizeof(V) == kVectorBytes || 2 * sizeof(V) == kVectorBytes);
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64)
    _mm512_stream_si512(static_cast<__m512i*>(aligned), (__m512i)v);
  else
    _mm256_stream_si256(static_cast<__m256i*>(aligned), (__m256i)v);
#elif defined(__AVX2__)
  if constexpr (sizeof(V) == 32)
    _mm256_stream_si256(static_cast<__m256i*>(aligned), (__m256i)v);
  else
    _mm_stream_si128(static_cast<__m128i*>(aligned), (__m128i)v);
#elif defined(__SSE2__)
  if constexpr (sizeof(V) == 16) {
    _mm_stream_si128(static_cast<__m128i*>(aligned), (__m128i)v);
  } else {
    long long bits;
    std::memcpy(&bits, &v, sizeof bits);
    _mm_stream_si64(static_cast<long long*>(aligned), bits);
  }
#else
  std::memcpy(aligned, &v, sizeof v);
#endif
}

inline void finish_streaming() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// kLanes<float> float16 values (their bits) <-> floats, rounding to nearest even: single
// instructions where the level has them (KEXUE_VECTOR_FLOAT16 defined); elsewhere gcc 12
// converts _Float16 one element at a time through a library call, and callers use scalar loops.
#if defined(__AVX512F__) || defined(__F16C__)
#define KEXUE_VECTOR_FLOAT16 1
inline Vec<float> widen_float16(HalfVec<uint16_t> bits) {
#if defined(__AVX512F__)
  return _mm512_maskz_cvtph_ps(0xffff, (__m256i)bits);
#else
  return _mm256_cvtph_ps((__m128i)bits);
#endif
}
inline HalfVec<uint16_t> narrow_float16(Vec<float> v) {
#if defined(__AVX512F__)
  return (HalfVec<uint16_t>)_mm512_maskz_cvtps_ph(0xffff, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  return (HalfVec<uint16_t>)_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
}
#endif

// kLanes<float> floats -> the bits of bfloat16 values, rounded to nearest even with a NaN kept
// quiet (torch's rounding, as from_acc in kexue/cpu_types.h): eight integer operations per
// vector, or on the avx512bf16 level one vcvtneps2bf16. That instruction differs from torch's
// rounding on subnormal inputs only (compared over all 2³² floats): it flushes them to zero, so
// a vector that holds one takes the integer path.
inline HalfVec<uint16_t> narrow_bfloat16(Vec<float> v) {
  const auto u = (Vec<uint32_t>)v;
#if defined(__AVX512BF16__)
  const __mmask16 subnormal =
      _mm512_mask_cmplt_epu32_mask(0xffff, (__m512i)((u & 0x7fffffffu) - 1u), _mm512_set1_epi32(0x007fffff));
  if (__builtin_expect(subnormal == 0, 1)) return (HalfVec<uint16_t>)_mm512_maskz_cvtneps_pbh(0xffff, v);
#endif
  const auto rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  const auto is_nan = (Vec<uint32_t>)((u & 0x7fffffffu) > 0x7f800000u);
  return __builtin_convertvector((rounded & ~is_nan) | (((u >> 16) | 0x40u) & is_nan), HalfVec<uint16_t>);
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
