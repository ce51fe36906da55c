// Counter-based Gaussian noise and the fused Langevin update on the CPU (SPEC §4; the
// definition is in kexue/langevin.h).
//
// Where the speed comes from: the noise is a pure function of the element index, so it is made
// eight groups (32 elements) per pair of SIMD vectors with GCC vector extensions (AVX2 here):
// Philox keeps each counter word in a 64-bit lane, so a round is two vpmuludq, two shifts and
// four xors per four groups, with the round keys precomputed per call; Box–Muller uses our own
// vectorisable float32 ln, sin and cos polynomials (accurate to a few ulp, well inside the SPEC's
// 1e-5); kVectors independent vectors are in flight to hide the multiply latency. Nothing
// branches, nothing leaves the registers until the 32 finished elements are stored.
// The Langevin step consumes each noise block while it is still in L1, in the same pass that
// reads x and grad and writes x. OpenMP threads take chunks of kChunk elements; the result does
// not depend on the thread count because every element depends only on its own index.
#include "kexue/langevin.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <string>

#include "kexue/cpu_types.h"

namespace kexue {
namespace {

constexpr int kLanes = 8;                         // float lanes per vector (groups per pair of Philox vectors)
constexpr int kBlock = 256;                       // noise elements per block (a multiple of 4·kLanes)
constexpr int64_t kChunk = int64_t(64) * kBlock;  // elements per unit of parallel work

// Eight-lane vectors (GCC vector extensions: one AVX2 register each here, lowered to whatever
// the target has elsewhere). Comparisons yield lane masks of all ones (-1) or zeros.
using u32x8 = uint32_t __attribute__((vector_size(32)));
using i32x8 = int32_t __attribute__((vector_size(32)));
using u64x4 = uint64_t __attribute__((vector_size(32)));
using f32x8 = float __attribute__((vector_size(32)));

inline f32x8 to_float(i32x8 v) { return __builtin_convertvector(v, f32x8); }
// C-style casts between vector types of one size reinterpret the bits.
inline f32x8 as_float(u32x8 v) { return (f32x8)v; }
inline u32x8 as_bits(f32x8 v) { return (u32x8)v; }

inline f32x8 sqrt8(f32x8 v) {
#ifdef __AVX__
  return _mm256_sqrt_ps(v);
#else
  for (int k = 0; k < kLanes; ++k) v[k] = std::sqrt(v[k]);
  return v;
#endif
}

// Philox works on 64-bit lanes: each lane holds one group's counter word in its low 32 bits
// (the high half is don't-care), so a 32 x 32 -> 64-bit product is one multiply (vpmuludq on
// x86) whose low half already is the low word, and its high word is one shift away. Eight
// groups are two such vectors: the even groups and the odd ones.
inline u64x4 mul_low32(u64x4 a, uint64_t m) {
#ifdef __AVX2__  // gcc 12 turns the portable form below into a full 64 x 64-bit multiply
  return (u64x4)_mm256_mul_epu32((__m256i)a, _mm256_set1_epi64x(static_cast<int64_t>(m)));
#else
  return (a & 0xffffffffu) * m;
#endif
}

// Round keys of the stream: round r uses (key0 + r·W0, key1 + r·W1) mod 2³², broadcast.
struct RoundKeys {
  u64x4 k0[10], k1[10];
};

// Philox4x32-10 of kVectors vectors of four counters (words c0..c3 in 64-bit lanes), in place.
// The vectors are independent chains; stepping them together round by round hides the
// multiply latency.
constexpr int kVectors = 2;
inline void philox(u64x4* c0, u64x4* c1, u64x4* c2, u64x4* c3, const RoundKeys& keys) {
  for (int round = 0; round < 10; ++round) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) {
      const u64x4 p0 = mul_low32(c0[v], kPhiloxM0), p1 = mul_low32(c2[v], kPhiloxM1);
      c0[v] = (p1 >> 32) ^ c1[v] ^ keys.k0[round];
      c2[v] = (p0 >> 32) ^ c3[v] ^ keys.k1[round];
      c1[v] = p1;
      c3[v] = p0;
    }
  }
}

// The low words of the even-group lanes and the odd-group lanes, in group order.
inline u32x8 interleave_low_words(u64x4 even, u64x4 odd) { return (u32x8)((even & 0xffffffffu) | (odd << 32)); }

// The uniform of SPEC §4: ((r >> 9) + 0.5)·2⁻²³, in (0, 1), exact in float.
inline f32x8 uniform(u32x8 r) {
  return to_float((i32x8)(r >> 9)) * (1.0f / 8388608.0f) + (1.0f / 16777216.0f);
}

// ln u for positive normal floats u: u = m·2^e with m in [√½, √2), f = m − 1, and
// ln(1 + f) = f − f²/2 + f³·Q(f) with Q a degree-6 polynomial, our least-squares fit (NumPy, on
// Chebyshev nodes of [√½ − 1, √2 − 1], weighted for relative error; 1.4e-7 relative in float32).
// ln 2 is split into a float with 16 significant bits (so e·kLn2Hi is exact) and the remainder.
inline f32x8 log8(f32x8 u) {
  const u32x8 bits = as_bits(u);
  const u32x8 mantissa_bits = (bits & 0x007fffffu) | 0x3f800000u;  // m in [1, 2)
  const i32x8 halve = (i32x8)(mantissa_bits > 0x3fb504f3u);  // -1 where m > √2: m/2, e + 1
  const f32x8 f = as_float(mantissa_bits + ((u32x8)(halve) << 23)) - 1.0f;
  const f32x8 e = to_float((i32x8)(bits >> 23) - 127 - halve);
  const f32x8 q = 0.333339721f + f * (-0.250009686f + f * (0.199605912f + f * (-0.165879339f +
                  f * (0.149510249f + f * (-0.141976282f + f * 0.0850703269f)))));
  const f32x8 f2 = f * f;
  const f32x8 ln_m = f - 0.5f * f2 + f2 * f * q;
  constexpr float kLn2Hi = 0.693145752f, kLn2Lo = 1.42860677e-06f;
  return e * kLn2Hi + (ln_m + e * kLn2Lo);
}

// cos(2πu) and sin(2πu) for u in [0, 1]: u = q/4 + r with |r| ≤ 1/8 (exact in float), Taylor
// polynomials of x = 2πr on [−π/4, π/4], then rotation by the quadrant q.
inline void sincos_two_pi8(f32x8 u, f32x8& cos_out, f32x8& sin_out) {
  const i32x8 q = __builtin_convertvector(u * 4.0f + 0.5f, i32x8);  // truncation = rounding here
  const f32x8 x = (u - 0.25f * to_float(q)) * 6.28318531f, x2 = x * x;
  const f32x8 sin_x = x + x * x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880))));
  const f32x8 cos_x =
      1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320 + x2 * (-1.0f / 3628800)))));
  const u32x8 swap = (u32x8)(-(q & 1));                // all ones in quadrants 1, 3
  const u32x8 cos_sign = (u32x8)((q + 1) & 2) << 30;   // negative in quadrants 1, 2
  const u32x8 sin_sign = (u32x8)(q & 2) << 30;         // negative in quadrants 2, 3
  const u32x8 sin_bits = as_bits(sin_x), cos_bits = as_bits(cos_x);
  cos_out = as_float(((sin_bits & swap) | (cos_bits & ~swap)) ^ cos_sign);
  sin_out = as_float(((cos_bits & swap) | (sin_bits & ~swap)) ^ sin_sign);
}

struct Stream {
  uint64_t offset_lo, offset_hi;
  RoundKeys keys;
  Stream(uint64_t seed, uint64_t offset) : offset_lo(offset & 0xffffffffu), offset_hi(offset >> 32) {
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round, k0 += kPhiloxW0, k1 += kPhiloxW1) {
      keys.k0[round] = u64x4{} + k0;
      keys.k1[round] = u64x4{} + k1;
    }
  }
};

// Noise elements [4·first_group, 4·first_group + kBlock) of `stream` into out[kBlock]:
// 4·kVectors groups at a time, Philox and Box–Muller in registers.
void noise_block(const Stream& stream, uint64_t first_group, float* out) {
  constexpr int kGroups = 4 * kVectors;
  static_assert(kVectors % 2 == 0 && kBlock % (4 * kGroups) == 0);
  const u64x4 even_lanes = {0, 2, 4, 6}, odd_lanes = {1, 3, 5, 7};
  for (int base = 0; base < kBlock; base += 4 * kGroups, first_group += kGroups) {
    u64x4 c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
    for (int v = 0; v < kVectors; ++v) {  // vector 2h + parity: groups first_group + 8h + (even|odd lanes)
      const u64x4 group = first_group + uint64_t{8} * (v / 2) + (v % 2 ? odd_lanes : even_lanes);
      c0[v] = group;  // the low word (the high half is don't-care)
      c1[v] = group >> 32;
      c2[v] = u64x4{} + stream.offset_lo;
      c3[v] = u64x4{} + stream.offset_hi;
    }
    philox(c0, c1, c2, c3, stream.keys);
    for (int h = 0; h < kVectors / 2; ++h) {
      const int e = 2 * h, o = 2 * h + 1;
      f32x8 cos01, sin01, cos23, sin23;
      const f32x8 radius01 = sqrt8(-2.0f * log8(uniform(interleave_low_words(c0[e], c0[o]))));
      const f32x8 radius23 = sqrt8(-2.0f * log8(uniform(interleave_low_words(c2[e], c2[o]))));
      sincos_two_pi8(uniform(interleave_low_words(c1[e], c1[o])), cos01, sin01);
      sincos_two_pi8(uniform(interleave_low_words(c3[e], c3[o])), cos23, sin23);
      const f32x8 lane0 = radius01 * cos01, lane1 = radius01 * sin01;
      const f32x8 lane2 = radius23 * cos23, lane3 = radius23 * sin23;
      // Element order 4g + lane: interleave (lane0, lane1) and (lane2, lane3) into pairs, then the pairs.
      const i32x8 low_pairs = {0, 8, 1, 9, 2, 10, 3, 11}, high_pairs = {4, 12, 5, 13, 6, 14, 7, 15};
      const f32x8 p01_lo = __builtin_shuffle(lane0, lane1, low_pairs), p01_hi = __builtin_shuffle(lane0, lane1, high_pairs);
      const f32x8 p23_lo = __builtin_shuffle(lane2, lane3, low_pairs), p23_hi = __builtin_shuffle(lane2, lane3, high_pairs);
      const i32x8 first_quads = {0, 1, 8, 9, 2, 3, 10, 11}, second_quads = {4, 5, 12, 13, 6, 7, 14, 15};
      const f32x8 quads[4] = {
          __builtin_shuffle(p01_lo, p23_lo, first_quads), __builtin_shuffle(p01_lo, p23_lo, second_quads),
          __builtin_shuffle(p01_hi, p23_hi, first_quads), __builtin_shuffle(p01_hi, p23_hi, second_quads)};
      std::memcpy(out + base + 4 * kLanes * h, quads, sizeof quads);
    }
  }
}

// Calls body(start, length, noise) for every block of [0, n), in parallel chunks; `noise` holds
// the block's noise elements (blocks start at multiples of kBlock, so at group boundaries).
template <class Body>
void for_each_noise_block(int64_t n, const Stream& stream, Body&& body) {
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    alignas(64) float noise[kBlock];
    const int64_t chunk_end = std::min(n, (chunk + 1) * kChunk);
    for (int64_t start = chunk * kChunk; start < chunk_end; start += kBlock) {
      noise_block(stream, static_cast<uint64_t>(start / 4), noise);
      body(start, std::min<int64_t>(kBlock, chunk_end - start), noise);
    }
  }
}

template <class T>
void fill_normal(T* out, int64_t n, const Stream& stream) {
  for_each_noise_block(n, stream, [&](int64_t start, int64_t length, const float* noise) {
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(out + start, noise, length * sizeof(float));
    } else if constexpr (std::is_same_v<T, double>) {
      for (int64_t k = 0; k < length; ++k) out[start + k] = noise[k];
    } else {
      narrow_row(noise, length, out + start);
    }
  });
}

// The update of `length` widened values: v = x − s·clip(g) (or v = x when s == 0), v += σ·ξ
// (or v += 0 without noise), then the bounds.
struct Update {
  float step, noise_std, clip, lo, hi;
  bool use_grad, use_noise;

  void operator()(float* x, const float* grad, const float* noise, int64_t length) const {
    if (use_grad) {
      use_noise ? apply<true, true>(x, grad, noise, length) : apply<true, false>(x, grad, noise, length);
    } else {
      use_noise ? apply<false, true>(x, grad, noise, length) : apply<false, false>(x, grad, noise, length);
    }
  }

  // clamp(v, lo, hi) written as max-then-min with v as the second operand, which keeps NaN
  // (torch.clamp's rule) and compiles to vmaxps/vminps.
  static float clamp(float v, float lo, float hi) {
    const float at_least_lo = lo > v ? lo : v;
    return hi < at_least_lo ? hi : at_least_lo;
  }

  template <bool kGrad, bool kNoise>
  void apply(float* x, const float* grad, const float* noise, int64_t length) const {
    const float step_ = step, noise_std_ = noise_std, clip_ = clip, lo_ = lo, hi_ = hi;  // not re-read per element
#pragma omp simd
    for (int64_t k = 0; k < length; ++k) {
      float v = x[k];
      if constexpr (kGrad) v = v - step_ * clamp(grad[k], -clip_, clip_);
      v = v + (kNoise ? noise_std_ * noise[k] : 0.0f);
      x[k] = clamp(v, lo_, hi_);
    }
  }
};

template <class T>
void langevin_step(T* x, const T* grad, int64_t n, const Update& update, const Stream& stream) {
  const auto apply = [&](int64_t start, int64_t length, const float* noise) {
    if constexpr (std::is_same_v<T, float>) {
      update(x + start, grad + start, noise, length);
    } else {
      alignas(64) float x_buf[kBlock], grad_buf[kBlock];
      widen_row(x + start, length, x_buf);
      if (update.use_grad) widen_row(grad + start, length, grad_buf);
      update(x_buf, grad_buf, noise, length);
      narrow_row(x_buf, length, x + start);
    }
  };
  if (update.use_noise) {
    for_each_noise_block(n, stream, apply);
  } else {
    const int64_t n_blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (n > kChunk)
    for (int64_t block = 0; block < n_blocks; ++block)
      apply(block * kBlock, std::min<int64_t>(kBlock, n - block * kBlock), nullptr);
  }
}

}  // namespace

// One block through the kernels' own rounds (philox above): every lane of every vector gets the
// counter, and lane 0 is read back.
void philox4x32_10_cpu(const uint32_t* ctr, const uint32_t* key, uint32_t* out) {
  const Stream stream(key[0] | uint64_t{key[1]} << 32, 0);
  u64x4 c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    c0[v] = u64x4{} + ctr[0], c1[v] = u64x4{} + ctr[1], c2[v] = u64x4{} + ctr[2], c3[v] = u64x4{} + ctr[3];
  }
  philox(c0, c1, c2, c3, stream.keys);
  const u64x4 words[4] = {c0[0], c1[0], c2[0], c3[0]};
  for (int k = 0; k < 4; ++k) out[k] = static_cast<uint32_t>(words[k][0]);
}

void philox_normal_cpu(DType dtype, void* out, int64_t n, uint64_t seed, uint64_t offset) {
  if (n < 0) fail("philox_normal: negative size");
  const Stream stream(seed, offset);
  dispatch_float_types(dtype, "philox_normal", [&](auto tag) {
    using T = decltype(tag);
    fill_normal(static_cast<T*>(out), n, stream);
  });
}

void langevin_step_cpu(DType dtype, void* x, const void* grad, int64_t n, double step_size, double noise_std,
                       uint64_t seed, uint64_t offset, double grad_clip, double lo, double hi) {
  if (n < 0) fail("langevin_step_: negative size");
  if (dtype == DType::Float64) fail("langevin_step_: x must be float32, float16 or bfloat16, got float64");
  const Update update{static_cast<float>(step_size), static_cast<float>(noise_std), static_cast<float>(grad_clip),
                      static_cast<float>(lo),        static_cast<float>(hi),        step_size != 0.0,
                      noise_std != 0.0};
  const Stream stream(seed, offset);
  dispatch_float_types(dtype, "langevin_step_", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>)
      langevin_step(static_cast<T*>(x), static_cast<const T*>(grad), n, update, stream);
  });
}

}  // namespace kexue
