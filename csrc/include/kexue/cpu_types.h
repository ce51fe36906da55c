// CPU-side number types: 16-bit floats with exact torch bit layouts, accumulator types, and the
// dtype dispatch. Torch-free.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kexue/common.h"

#ifdef __AVX__
#include <immintrin.h>
#endif

namespace kexue {

// bfloat16 as stored by torch: the top 16 bits of a float32.
struct BFloat16 {
  uint16_t bits;
};
// IEEE binary16; gcc converts with F16C instructions where the target has them.
using Float16 = _Float16;

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }
inline float to_float(Float16 v) { return static_cast<float>(v); }
inline float to_float(BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Accumulation type: float for every float type but double.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rounds an accumulator value to T (bfloat16: round to nearest even, NaN kept quiet).
template <class T>
inline T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    // Branch-free so that loops of conversions vectorise.
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
    return BFloat16{static_cast<uint16_t>(is_nan ? quiet_nan : rounded)};
  } else {
    return static_cast<T>(v);
  }
}

// Calls fn(T{}) with T the C++ type of `dtype`.
template <class Fn>
void dispatch_float_types(DType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(float{}); return;
    case DType::Float64: fn(double{}); return;
    case DType::Float16: fn(Float16{}); return;
    case DType::BFloat16: fn(BFloat16{}); return;
  }
  fail(std::string(what) + ": unsupported dtype code " + std::to_string(static_cast<int>(dtype)));
}

// Converts n values to float, eight at a time with AVX2/F16C where the target has them (gcc 12
// calls a library routine per float16 element otherwise), the rest one by one.
template <class T>
inline void widen_row(const T* src, int64_t n, acc_t<T>* dst) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX2__)
  const auto load8 = [&](int64_t j) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)); };
  if constexpr (std::is_same_v<T, Float16>) {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(load8(i)));
  } else if constexpr (std::is_same_v<T, BFloat16>) {  // the bits are the float's top half
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load8(i)), 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

// Rounds n accumulator values to T (to nearest even).
template <class T>
inline void narrow_row(const acc_t<T>* src, int64_t n, T* dst) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX2__)
  const auto store8 = [&](int64_t j, __m128i v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), v); };
  if constexpr (std::is_same_v<T, Float16>) {
    for (; i + 8 <= n; i += 8) store8(i, _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  } else if constexpr (std::is_same_v<T, BFloat16>) {  // from_acc<BFloat16>, eight lanes at once
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff);
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    for (; i + 8 <= n; i += 8) {
      const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(src + i));
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(half, odd)), 16);
      const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
      const __m256i bits = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
      store8(i, _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = from_acc<T>(src[i]);
}

// Returns `src` viewed as accumulator values: the pointer itself when T is already the
// accumulator type, else `buf` filled with the converted values.
template <class T>
inline const acc_t<T>* as_acc(const T* src, int64_t n, acc_t<T>* buf) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return src;
  } else {
    widen_row(src, n, buf);
    return buf;
  }
}

}  // namespace kexue

namespace kexue {

// Outputs larger than this bypass the cache on their way to memory (see write_row).
constexpr int64_t kStreamingBytes = int64_t(8) << 20;

// Copies one finished output row to `dst`. With `streaming`, the aligned body goes out with
// non-temporal stores: a large output is not read again soon, and a normal store would first
// read every destination line (a third memory stream next to the input and the output).
// Threads that stream must call finish_streaming() before their results are used.
inline void write_row(void* dst, const void* src, int64_t bytes, bool streaming) {
#ifdef __AVX__
  if (streaming) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    const int64_t head = std::min<int64_t>(bytes, (32 - reinterpret_cast<uintptr_t>(d) % 32) % 32);
    std::memcpy(d, s, head);
    int64_t i = head;
    for (; i + 32 <= bytes; i += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    std::memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  (void)streaming;
  std::memcpy(dst, src, bytes);
}

inline void finish_streaming() {
#ifdef __AVX__
  _mm_sfence();
#endif
}

}  // namespace kexue
