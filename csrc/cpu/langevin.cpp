// Counter-based Gaussian noise and the fused Langevin update on the CPU (docs/langevin.md; the
// definition is in kexue/langevin.h).
//
// Where the speed comes from: the noise is a pure function of the element index, so it is made
// W groups (4·W elements) per pair of SIMD vectors, W = the float lanes of the ISA level
// (kexue/simd.h: 16 on AVX-512, 8 on AVX2, 4 on the SSE2 baseline). Philox keeps each counter
// word in a 64-bit lane, so a round is two vpmuludq, two shifts and four xors per W/2 groups; of
// the first two rounds only the products of the low group word are computed per group (the rest
// is the same for a whole block), and the round keys once per call. Box–Muller uses our own
// vectorisable float32 ln, sin and cos polynomials (a few 1e-7, well inside the 1e-5 of
// docs/langevin.md); the groups sit in the lanes so that the 4 × W transpose into element order
// needs only shuffles within 128-bit blocks. Nothing branches, nothing leaves the registers
// until the finished elements are stored. (An earlier AVX2 version with exact-range Taylor
// polynomials, a quadrant rotation, a cross-lane transpose and full first rounds took ~20%
// longer: on a Zen 3 the kernel is bound by the number of vector instructions, ~9 per element.)
// The Langevin step consumes each noise block while it is still in L1, in the same pass that
// reads x and grad and writes x. OpenMP threads take chunks of kChunk elements; the result does
// not depend on the thread count or the vector width because every element depends only on its
// own index. (The levels with FMA, avx2 and avx512, give the same bits; the baseline, without
// FMA, rounds the polynomials differently, by a few 1e-7.)
#include "kexue/langevin.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <string>

#include "kexue/cpu_types.h"

namespace kexue {
namespace KEXUE_CPU_NS {  // this ISA level's copy (kexue/cpu_dispatch.h)
namespace {

constexpr int kBlock = 256;                       // noise elements per block (a multiple of 4·W)
constexpr int64_t kChunk = int64_t(64) * kBlock;  // elements per unit of parallel work

// W float lanes (W groups per pair of Philox vectors of W/2 64-bit lanes).
constexpr int W = kLanes<float>;
using u32xW = Vec<uint32_t>;
using i32xW = Vec<int32_t>;
using u64xW2 = Vec<uint64_t>;
using f32xW = Vec<float>;

inline f32xW to_float(i32xW v) { return __builtin_convertvector(v, f32xW); }
// C-style casts between vector types of one size reinterpret the bits.
inline f32xW as_float(u32xW v) { return (f32xW)v; }
inline u32xW as_bits(f32xW v) { return (u32xW)v; }

// Philox works on 64-bit lanes: each lane holds one group's counter word in its low 32 bits
// (the high half is don't-care), so a 32 x 32 -> 64-bit product is one multiply (mul_low32)
// whose low half already is the low word, and its high word is one shift away. W groups are
// two such vectors: the groups of the even float lanes and those of the odd ones.

// The group of float lane p in Words: p = 4b + i (128-bit block b, position i) holds group
// i·W/4 + b, so that Box–Muller's 4 × 4 transposes within each block put the groups in order.
constexpr int lane_group(int p) { return (p % 4) * (W / 4) + p / 4; }

// The stream's round keys, once per call: round r uses (key0 + r·W0, key1 + r·W1) mod 2³².
struct Stream {
  uint32_t offset_lo, offset_hi, key0[10], key1[10];
  u64xW2 round_key0[10], round_key1[10];  // the same, broadcast
  Stream(uint64_t seed, uint64_t offset)
      : offset_lo(static_cast<uint32_t>(offset)), offset_hi(static_cast<uint32_t>(offset >> 32)) {
    key0[0] = static_cast<uint32_t>(seed), key1[0] = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round > 0) key0[round] = key0[round - 1] + kPhiloxW0, key1[round] = key1[round - 1] + kPhiloxW1;
      round_key0[round] = u64xW2{} + key0[round];
      round_key1[round] = u64xW2{} + key1[round];
    }
  }
};

// The counter is (g, h, offset_lo, offset_hi) and within a block only g, the group's low word,
// differs (blocks never straddle a multiple of 2³² groups). So per group, round 0 needs only
// the product M0·g (its M1 product is of offset_lo) and round 1 only the product M1·c2 (its M0
// product is of round 0's c0 = hi(M1·offset_lo) ^ h ^ key0[0]); FirstRounds holds the rest,
// computed once per block.
struct FirstRounds {
  u64xW2 round0_c2_key;  // offset_hi ^ key1[0]: after round 0, c2 = hi(M0·g) ^ this and c3 = lo(M0·g)
  u64xW2 round1_c0_key;  // lo(M1·offset_lo) ^ key0[1]: after round 1, c0 = hi(M1·c2) ^ this, c1 = lo(M1·c2)
  u64xW2 round1_c2_key;  // hi(M0·a) ^ key1[1], a = round 0's c0: after round 1, c2 = round 0's c3 ^ this
  u64xW2 round1_c3;      // lo(M0·a)

  FirstRounds(const Stream& stream, uint32_t h) {
    const uint64_t p1 = uint64_t{kPhiloxM1} * stream.offset_lo;
    const uint64_t p0 = uint64_t{kPhiloxM0} * (static_cast<uint32_t>(p1 >> 32) ^ h ^ stream.key0[0]);
    round0_c2_key = u64xW2{} + (stream.offset_hi ^ stream.key1[0]);
    round1_c0_key = u64xW2{} + (static_cast<uint32_t>(p1) ^ stream.key0[1]);
    round1_c2_key = u64xW2{} + (static_cast<uint32_t>(p0 >> 32) ^ stream.key1[1]);
    round1_c3 = u64xW2{} + static_cast<uint32_t>(p0);
  }
};

// The low words of two vectors' lanes, interleaved: (even[0], odd[0], even[1], odd[1], ...).
inline u32xW interleave_low_words(u64xW2 even, u64xW2 odd) {
  // Word 2k of `even`, word 2k + 1 of `odd << 32`: one blend.
  constexpr i32xW pick = lane_constants<i32xW, W>([](size_t p) { return int(p % 2 ? W + p : p); });
  return __builtin_shuffle((u32xW)even, (u32xW)(odd << 32), pick);
}

// The four Philox words of W groups, one vector per word, lanes in the order of lane_group.
struct Words {
  u32xW w0, w1, w2, w3;
};

// Philox4x32-10 of groups first_group + 0..W-1 (all with the high word of FirstRounds). They run
// as two vectors of 64-bit lanes, the groups of the even and of the odd float lanes, two
// independent chains stepped together round by round to hide the multiply latency.
inline Words philox_groups(uint64_t first_group, const FirstRounds& first, const Stream& stream) {
  constexpr u64xW2 lane_groups[2] = {
      lane_constants<u64xW2, W / 2>([](size_t k) { return uint64_t(lane_group(int(2 * k))); }),
      lane_constants<u64xW2, W / 2>([](size_t k) { return uint64_t(lane_group(int(2 * k + 1))); })};
  u64xW2 c0[2], c1[2], c2[2], c3[2];
  for (int v = 0; v < 2; ++v) {
    const u64xW2 p0 = mul_low32(first_group + lane_groups[v], kPhiloxM0);      // round 0
    const u64xW2 p1 = mul_low32((p0 >> 32) ^ first.round0_c2_key, kPhiloxM1);  // round 1
    c0[v] = (p1 >> 32) ^ first.round1_c0_key;
    c1[v] = p1;
    c2[v] = p0 ^ first.round1_c2_key;
    c3[v] = first.round1_c3;
  }
  for (int round = 2; round < 10; ++round) {
    for (int v = 0; v < 2; ++v) {
      const u64xW2 p0 = mul_low32(c0[v], kPhiloxM0), p1 = mul_low32(c2[v], kPhiloxM1);
      c0[v] = (p1 >> 32) ^ c1[v] ^ stream.round_key0[round];
      c2[v] = (p0 >> 32) ^ c3[v] ^ stream.round_key1[round];
      c1[v] = p1;
      c3[v] = p0;
    }
  }
  return {interleave_low_words(c0[0], c0[1]), interleave_low_words(c1[0], c1[1]), interleave_low_words(c2[0], c2[1]),
          interleave_low_words(c3[0], c3[1])};
}

// ρ = √(−2 ln u) for the uniform u = ((r >> 9) + 0.5)·2⁻²³ of docs/langevin.md, from v = 2²⁴·u =
// (r >> 8) | 1 (an odd integer below 2²⁴, so exact in float): v = m·2^e with m in [√½, √2),
// f = m − 1, ln u = ln(1 + f) + (e − 24)·ln 2, and −2 ln(1 + f) = −2f + f²·(1 + f·Q(f)) with Q
// of degree 5, our least-squares fit (NumPy, Chebyshev nodes of [√½ − 1, √2 − 1], weighted for
// relative error: 2.9e-7 relative). The term in e is one FMA.
inline f32xW radius(u32xW r) {
  const u32xW bits = as_bits(to_float((i32xW)((r >> 8) | 1u)));
  const u32xW mantissa_bits = (bits & 0x007fffffu) | 0x3f800000u;  // m in [1, 2)
  const i32xW halve = (i32xW)(mantissa_bits > 0x3fb504f3u);        // -1 where m > √2: m/2, e + 1
  const f32xW f = as_float(mantissa_bits + ((u32xW)(halve) << 23)) - 1.0f;
  const f32xW e = to_float((i32xW)(bits >> 23) - (127 + 24) - halve);
  const f32xW q =
      -0.66668421f +
      f * (0.499651015f + f * (-0.398561984f + f * (0.343099952f + f * (-0.319753468f + f * 0.201387763f))));
  const f32xW minus_two_ln_m = f * -2.0f + f * f * (1.0f + f * q);
  return sqrt(e * -1.38629436f + minus_two_ln_m);
}

// The uniform of docs/langevin.md: ((r >> 9) + 0.5)·2⁻²³, in (0, 1), exact in float.
inline f32xW uniform(u32xW r) { return to_float((i32xW)(r >> 9)) * (1.0f / 8388608.0f) + (1.0f / 16777216.0f); }

// cos(2πu) and sin(2πu) for u in (0, 1): u = k/2 + r with k = round(2u) (adding 1.5·2²³ rounds
// 2u to an integer whose low bit lands in the float's lowest mantissa bit) and |r| ≤ ¼, exact in
// float; cos(2πr) and sin(2πr) are polynomials in r, our least-squares fits (NumPy, Chebyshev
// nodes of [−¼, ¼]: 4.7e-8 and 3.4e-9 absolute), and both change sign for odd k.
inline void sincos_two_pi(f32xW u, f32xW& cos_out, f32xW& sin_out) {
  constexpr float kRound = 12582912.0f;  // 1.5·2²³
  const f32xW t = u * 2.0f + kRound;
  const f32xW r = u - 0.5f * (t - kRound), r2 = r * r;
  const u32xW sign = as_bits(t) << 31;
  const f32xW sin_r =
      r * (6.28318516f + r2 * (-41.3416549f + r2 * (81.6009982f + r2 * (-76.5496568f + r2 * 39.5358137f))));
  const f32xW cos_r = 0.99999995f + r2 * (-19.7391713f + r2 * (64.9345817f + r2 * (-85.2401004f + r2 * 56.2405404f)));
  cos_out = as_float(as_bits(cos_r) ^ sign);
  sin_out = as_float(as_bits(sin_r) ^ sign);
}

// Box–Muller of W groups' words into their 4·W noise elements, out[4·group + lane].
inline void box_muller(const Words& words, float* out) {
  f32xW cos01, sin01, cos23, sin23;
  const f32xW radius01 = radius(words.w0), radius23 = radius(words.w2);
  sincos_two_pi(uniform(words.w1), cos01, sin01);
  sincos_two_pi(uniform(words.w3), cos23, sin23);
  const f32xW lane0 = radius01 * cos01, lane1 = radius01 * sin01;
  const f32xW lane2 = radius23 * cos23, lane3 = radius23 * sin23;
  // A 4 × 4 transpose within each 128-bit block: pairs (lane0, lane1) and (lane2, lane3), then
  // quads. Block b of quad vector i is the group at lane 4b + i, i·W/4 + b (lane_group): the
  // quads are in order.
  const auto in_blocks = [](int a0, int a1, int b0, int b1) {  // (x[a0], y[a1], x[b0], y[b1]) per block, y = lanes W..
    return lane_constants<i32xW, W>([=](size_t p) {
      const int block = int(p) / 4 * 4, k = int(p) % 4;
      return block + (k == 0 ? a0 : k == 1 ? a1 : k == 2 ? b0 : b1);
    });
  };
  constexpr int Y = W;  // index offset of the second shuffle operand
  const i32xW low_pairs = in_blocks(0, Y + 0, 1, Y + 1), high_pairs = in_blocks(2, Y + 2, 3, Y + 3);
  const f32xW t0 = __builtin_shuffle(lane0, lane1, low_pairs), t1 = __builtin_shuffle(lane0, lane1, high_pairs);
  const f32xW t2 = __builtin_shuffle(lane2, lane3, low_pairs), t3 = __builtin_shuffle(lane2, lane3, high_pairs);
  const i32xW first_quads = in_blocks(0, 1, Y + 0, Y + 1), second_quads = in_blocks(2, 3, Y + 2, Y + 3);
  const f32xW quads[4] = {__builtin_shuffle(t0, t2, first_quads), __builtin_shuffle(t0, t2, second_quads),
                          __builtin_shuffle(t1, t3, first_quads), __builtin_shuffle(t1, t3, second_quads)};
  std::memcpy(out, quads, sizeof quads);
}

// Noise elements [4·first_group, 4·first_group + kBlock) of `stream` into out[kBlock], W
// groups at a time. Software-pipelined: the Philox rounds of the next W groups come before
// the Box–Muller of the current ones in program order, so the out-of-order core overlaps the
// two dependency chains (~5% faster here than Philox-then-Box–Muller).
void noise_block(const Stream& stream, uint64_t first_group, float* out) {
  constexpr int kStep = 4 * W;  // elements of W groups
  static_assert(kBlock % kStep == 0 && (uint64_t{1} << 32) % (kBlock / 4) == 0 && W % 4 == 0);
  const FirstRounds first(stream, static_cast<uint32_t>(first_group >> 32));  // one h per block
  Words next = philox_groups(first_group, first, stream);
  for (int start = 0; start < kBlock; start += kStep) {
    const Words words = next;
    if (start + kStep < kBlock) next = philox_groups(first_group + (start + kStep) / 4, first, stream);
    box_muller(words, out + start);
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
    finish_streaming();  // the chunk's non-temporal stores, if body made any, are visible after the loop
  }
}

// A float32 output of kBypassCacheBytes or more is written with non-temporal stores: it would
// not stay in cache anyway, and they skip reading each line before writing it (16M elements:
// 15-17 ms -> 12-13.6 ms here).
constexpr int64_t kBypassCacheBytes = int64_t(16) << 20;

template <class T>
void fill_normal(T* out, int64_t n, const Stream& stream) {
  const bool bypass_cache = n * int64_t(sizeof(T)) >= kBypassCacheBytes;
  for_each_noise_block(n, stream, [&](int64_t start, int64_t length, const float* noise) {
    if constexpr (std::is_same_v<T, float>) {
      if (bypass_cache && length == kBlock && reinterpret_cast<uintptr_t>(out + start) % kVectorBytes == 0) {
        for (int k = 0; k < kBlock; k += W) stream_store(out + start + k, load<f32xW>(noise + k));
        return;
      }
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
      update(x_buf, update.use_grad ? grad_buf : nullptr, noise, length);
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

// One counter through the kernel's own rounds (philox_groups, with its shortcut of the first two
// rounds, which here meets arbitrary high group and offset words): lane 0 is group ctr[0].
void philox4x32_10_cpu(const uint32_t* ctr, const uint32_t* key, uint32_t* out) {
  const Stream stream(key[0] | uint64_t{key[1]} << 32, ctr[2] | uint64_t{ctr[3]} << 32);
  const Words words = philox_groups(ctr[0], FirstRounds(stream, ctr[1]), stream);
  out[0] = words.w0[0], out[1] = words.w1[0], out[2] = words.w2[0], out[3] = words.w3[0];
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
  const Update update{static_cast<float>(step_size),
                      static_cast<float>(noise_std),
                      static_cast<float>(grad_clip),
                      static_cast<float>(lo),
                      static_cast<float>(hi),
                      step_size != 0.0,
                      noise_std != 0.0};
  const Stream stream(seed, offset);
  dispatch_float_types(dtype, "langevin_step_", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>)
      langevin_step(static_cast<T*>(x), static_cast<const T*>(grad), n, update, stream);
  });
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
