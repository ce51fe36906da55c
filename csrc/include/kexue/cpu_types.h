// CPU-side number types: 16-bit floats with exact torch bit layouts, accumulator types, the
// dtype dispatch, and row conversions at the full vector width of the ISA level (kexue/simd.h).
// Torch-free; included only by csrc/cpu/ (everything lives in the level's namespace).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kexue/common.h"
#include "kexue/simd.h"

namespace kexue {
namespace KEXUE_CPU_NS {

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
  dispatch_dtype<Float16, BFloat16>(dtype, what, static_cast<Fn&&>(fn));
}

// Whether load_widened can read T as vectors: float and double, bfloat16, and float16 where the
// level converts it in registers (KEXUE_VECTOR_FLOAT16).
template <class T>
constexpr bool kVectorWidening = std::is_same_v<T, acc_t<T>> || std::is_same_v<T, BFloat16>
#ifdef KEXUE_VECTOR_FLOAT16
                                 || std::is_same_v<T, Float16>
#endif
    ;

// The kLanes<acc_t<T>> values of T at p as one vector of accumulator values, converted in
// registers (bfloat16: the bits are the float's top half). Only where kVectorWidening<T>.
template <class T>
inline Vec<acc_t<T>> load_widened(const T* p) {
  static_assert(kVectorWidening<T>, "load_widened: this level converts T one value at a time");
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return load<Vec<T>>(p);
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    return (Vec<float>)(widen_u16(load<HalfVec<uint16_t>>(p)) << 16);
  } else {
#ifdef KEXUE_VECTOR_FLOAT16
    return widen_float16(load<HalfVec<uint16_t>>(p));
#endif
  }
}

// Converts n values to float, a vector at a time where load_widened can, the rest one by one.
template <class T>
inline void widen_row(const T* src, int64_t n, acc_t<T>* dst) {
  int64_t i = 0;
  constexpr int64_t L = kLanes<float>;
  if constexpr (kVectorWidening<T> && !std::is_same_v<T, acc_t<T>>) {
    for (; i + L <= n; i += L) store(dst + i, load_widened(src + i));
  }
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

// Whether store_vector can round a Vec<float> to T in vector registers (16-bit T).
template <class T>
constexpr bool kVectorRounding = std::is_same_v<T, BFloat16>
#ifdef KEXUE_VECTOR_FLOAT16
                                 || std::is_same_v<T, Float16>
#endif
    ;

// Stores the kLanes<acc_t<T>> values of `v` to dst[0..lanes) as T (16-bit: rounded to nearest
// even, bfloat16 exactly as from_acc); `streaming`: with a non-temporal store, dst aligned to
// the stored vector's size. Where !kVectorRounding<T> a 16-bit T goes one value at a time.
template <class T>
inline void store_vector(T* dst, Vec<acc_t<T>> v, bool streaming) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    streaming ? stream_store(dst, v) : store(dst, v);
  } else if constexpr (kVectorRounding<T>) {
    HalfVec<uint16_t> bits;
    if constexpr (std::is_same_v<T, BFloat16>) {
      bits = narrow_bfloat16(v);
    } else {
#ifdef KEXUE_VECTOR_FLOAT16
      bits = narrow_float16(v);
#endif
    }
    streaming ? stream_store(dst, bits) : store(dst, bits);
  } else {
    for (int k = 0; k < kLanes<float>; ++k) dst[k] = from_acc<T>(v[k]);
  }
}

// Rounds n accumulator values to T, a vector at a time where store_vector rounds in registers.
template <class T>
inline void narrow_row(const acc_t<T>* src, int64_t n, T* dst) {
  int64_t i = 0;
  if constexpr (kVectorRounding<T>) {
    constexpr int64_t L = kLanes<float>;
    for (; i + L <= n; i += L) store_vector(dst + i, load<Vec<float>>(src + i), false);
  }
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

// Outputs larger than this bypass the cache on their way to memory (store_vector's `streaming`):
// a large output is not read again soon, and a normal store would first read every destination
// line (a third memory stream next to the input and the output).
constexpr int64_t kStreamingBytes = int64_t(8) << 20;

// Row kernels with fewer elements than this in all run on one thread (OpenMP start-up costs more).
constexpr int64_t kParallelThreshold = 1 << 15;

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
