// Counter-based Gaussian noise and the fused Langevin update on CUDA (docs/langevin.md; contract in
// kexue/langevin.h).
//
// Math
// ---------------------------------------------------------------------------------------------
// Noise element i of the stream (seed, offset) is lane i % 4 of group j = i / 4. Group j is one
// Philox4x32-10 block (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC'11 -- the Random123 paper, from which the round function and constants are taken) with
//     counter (j mod 2^32, j >> 32, offset mod 2^32, offset >> 32),  key (seed mod 2^32, seed >> 32).
// One round maps (c0, c1, c2, c3) to (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0));
// the key is bumped by (W0, W1) before every round but the first. The output words r_k become
// u_k = ((r_k >> 9) + 0.5) * 2^-23, exact floats in (0, 1), and the Box-Muller transform (Box &
// Muller, Ann. Math. Statist. 29, 1958) in float32 gives
//     lanes 0, 1 = rho cos(2 pi u1), rho sin(2 pi u1),  rho = sqrt(-2 ln u0);  lanes 2, 3 from (u2, u3).
// cos/sin come from sincospif(2 u1) (2 u1 is exact, and the pi-scaled form avoids rounding
// 2 pi u1 first); logf/sqrtf/sincospif are the accurate (non-intrinsic) versions, so every element
// is within a few float32 ulps of the definition. The noise depends only on (seed, offset, i):
// not on the block size, the grid or the alignment of the tensor.
//
// Langevin update, per element, every operation rounded separately (_rn intrinsics, no FMA):
//     gc = clamp(g, -c, c);   v = x - s * gc;   v = v + sigma * xi_i;   x <- clamp(v, lo, hi)
// with clamp(v, a, b) = v < a ? a : (v > b ? b : v), which keeps NaN. Shortcuts shared with the
// other backends: noise_std == 0 runs no Philox and adds +0.0f; step_size == 0 never reads grad
// (it may alias x) and takes v = x. x and grad share the storage dtype; 16-bit values are widened
// to float and rounded back to nearest even (kexue::cuda::to_acc / FromAcc).
//
// Kernel design
// ---------------------------------------------------------------------------------------------
// * The unit of work is a Philox group: one Philox call serves its 4 consecutive elements, which
//   move as whole words (a 16-byte word for float, an 8-byte word for 16-bit types, two 16-byte
//   words for double noise output).
// * A grid-stride loop over groups (the pattern of M. Harris, "CUDA Pro Tip: Write flexible
//   kernels with grid-stride loops", NVIDIA developer blog, 2013): the grid is at most as many
//   CTAs as are resident at once (SM count x occupancy of the kernel), fewer when the tensor is
//   small, so that then every thread has exactly one group. Each iteration of the Langevin
//   kernel handles kGroupsPerThread groups, one grid-stride apart, issuing all their loads before
//   any Philox math so that the memory latency overlaps (memory-level parallelism).
// * Group indices and element offsets are 64-bit throughout.
// * Vector words are used when every pointer the kernel touches is aligned to the word size
//   (decided on the host; a view at an odd offset takes the element-by-element instantiation).
//   Only the last group can be ragged (n not a multiple of 4): it computes all 4 lanes but loads
//   and stores only the elements < n, one by one.
// * Unsupported dtypes throw std::invalid_argument (kexue::fail) before anything touches the
//   device; launch failures (no GPU, bad stream) surface as std::runtime_error (check_cuda /
//   check_launch).
#include "kexue/langevin.h"
#include "kexue/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace kexue {
namespace {

constexpr int kThreads = 256;        // CTA size
constexpr int kGroupsPerThread = 2;  // Philox groups in flight per thread (Langevin kernel)
constexpr int kGroupSize = 4;        // elements per Philox group
constexpr int kPhiloxRounds = 10;

using cuda::FromAcc;
using cuda::to_acc;

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 and Box-Muller (host and device, so that a host program can check them)
// ---------------------------------------------------------------------------------------------

// The stream (seed, offset) split into the Philox key and the upper half of the counter.
struct NoiseStream {
  uint2 key;      // (seed mod 2^32, seed >> 32)
  uint2 counter;  // counter words 2 and 3: (offset mod 2^32, offset >> 32)
};

inline NoiseStream make_noise_stream(uint64_t seed, uint64_t offset) {
  return NoiseStream{make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)),
                     make_uint2(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32))};
}

// hi, lo = the upper and lower 32 bits of the 64-bit product a * b.
__host__ __device__ __forceinline__ void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#ifdef __CUDA_ARCH__
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
#endif
}

__host__ __device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {
      key.x += kPhiloxW0;
      key.y += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, ctr.x, hi0, lo0);
    mulhilo32(kPhiloxM1, ctr.z, hi1, lo1);
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
  }
  return ctr;
}

// ((r >> 9) + 0.5) * 2^-23: every step is exact, the result lies in (0, 1).
__host__ __device__ __forceinline__ float open_unit_uniform(uint32_t r) {
  return (static_cast<float>(r >> 9) + 0.5f) * 0x1p-23f;
}

// (rho cos theta, rho sin theta) with rho = sqrt(-2 ln u_radius), theta = 2 pi u_angle.
__host__ __device__ __forceinline__ void box_muller(float u_radius, float u_angle, float& cos_lane, float& sin_lane) {
  const float rho = sqrtf(-2.0f * logf(u_radius));
  float sin_theta, cos_theta;
  sincospif(2.0f * u_angle, &sin_theta, &cos_theta);
  cos_lane = rho * cos_theta;
  sin_lane = rho * sin_theta;
}

// The 4 noise elements of group `group` of the stream.
__host__ __device__ __forceinline__ void normal_group(uint64_t group, NoiseStream stream, float (&noise)[kGroupSize]) {
  const uint4 r = philox4x32_10(
      make_uint4(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), stream.counter.x, stream.counter.y),
      stream.key);
  box_muller(open_unit_uniform(r.x), open_unit_uniform(r.y), noise[0], noise[1]);
  box_muller(open_unit_uniform(r.z), open_unit_uniform(r.w), noise[2], noise[3]);
}

// ---------------------------------------------------------------------------------------------
// Moving one group of storage elements
// ---------------------------------------------------------------------------------------------

// A group of 4 elements of T as whole words: one 16-byte word (float), one 8-byte word (16-bit
// types) or two 16-byte words (double). The vector path needs pointers aligned to sizeof(Word).
template <typename T>
struct GroupWords {
  using Word = std::conditional_t<(kGroupSize * sizeof(T) >= 16), uint4, uint2>;
  static constexpr int kCount = static_cast<int>(kGroupSize * sizeof(T) / sizeof(Word));
  static_assert(kCount * sizeof(Word) == kGroupSize * sizeof(T), "a group must be whole words");
};

template <typename T>
bool group_vectorizable(const void* p) {
  return cuda::is_aligned(p, sizeof(typename GroupWords<T>::Word));
}

// Elements 4 group .. 4 group + 3 of p, widened to float; lanes at or past n read as 0.
template <typename T, bool kVector>
__device__ __forceinline__ void load_group(const T* p, int64_t group, int64_t n, float (&values)[kGroupSize]) {
  const int64_t first = group * kGroupSize;
  if (kVector && first + kGroupSize <= n) {
    using Words = GroupWords<T>;
    const auto* words = reinterpret_cast<const typename Words::Word*>(p + first);
    typename Words::Word raw[Words::kCount];
#pragma unroll
    for (int k = 0; k < Words::kCount; ++k) raw[k] = words[k];
    T elements[kGroupSize];
    memcpy(elements, raw, sizeof elements);
#pragma unroll
    for (int lane = 0; lane < kGroupSize; ++lane) values[lane] = to_acc(elements[lane]);
  } else {
#pragma unroll
    for (int lane = 0; lane < kGroupSize; ++lane) values[lane] = first + lane < n ? to_acc(p[first + lane]) : 0.0f;
  }
}

// Rounds the lanes to T (nearest even) and stores those whose element index is < n.
template <typename T, bool kVector>
__device__ __forceinline__ void store_group(T* p, int64_t group, int64_t n, const float (&values)[kGroupSize]) {
  const int64_t first = group * kGroupSize;
  T elements[kGroupSize];
#pragma unroll
  for (int lane = 0; lane < kGroupSize; ++lane) elements[lane] = FromAcc<T>::cast(values[lane]);
  if (kVector && first + kGroupSize <= n) {
    using Words = GroupWords<T>;
    typename Words::Word raw[Words::kCount];
    memcpy(raw, elements, sizeof raw);
    auto* words = reinterpret_cast<typename Words::Word*>(p + first);
#pragma unroll
    for (int k = 0; k < Words::kCount; ++k) words[k] = raw[k];
  } else {
#pragma unroll
    for (int lane = 0; lane < kGroupSize; ++lane)
      if (first + lane < n) p[first + lane] = elements[lane];
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    philox_normal_kernel(T* out, int64_t n, int64_t n_groups, NoiseStream stream) {
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; group < n_groups;
       group += grid_threads) {
    float noise[kGroupSize];
    normal_group(static_cast<uint64_t>(group), stream, noise);
    store_group<T, kVector>(out, group, n, noise);
  }
}

// Per-launch scalars of the Langevin update, already in float.
struct LangevinParams {
  float step_size;  // s
  float noise_std;  // sigma
  float grad_clip;  // c (+inf: no clip)
  float lo, hi;     // bounds of x (+-inf: unbounded)
  bool use_grad;    // step_size != 0: read grad and apply the gradient term
  bool use_noise;   // noise_std != 0: generate and add the noise
  NoiseStream stream;
};

// v < lo ? lo : (v > hi ? hi : v): a NaN v compares false both times and stays NaN.
__device__ __forceinline__ float clamp_keep_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    langevin_step_kernel(T* x, const T* grad, int64_t n, int64_t n_groups, LangevinParams p) {
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t first_group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; first_group < n_groups;
       first_group += kGroupsPerThread * grid_threads) {
    float xs[kGroupsPerThread][kGroupSize];
    float gs[kGroupsPerThread][kGroupSize];
#pragma unroll
    for (int u = 0; u < kGroupsPerThread; ++u) {  // all loads first
      const int64_t group = first_group + u * grid_threads;
      if (group < n_groups) {
        load_group<T, kVector>(x, group, n, xs[u]);
        if (p.use_grad) load_group<T, kVector>(grad, group, n, gs[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kGroupsPerThread; ++u) {
      const int64_t group = first_group + u * grid_threads;
      if (group >= n_groups) continue;
      float noise[kGroupSize];
      if (p.use_noise) normal_group(static_cast<uint64_t>(group), p.stream, noise);
#pragma unroll
      for (int lane = 0; lane < kGroupSize; ++lane) {
        float v = xs[u][lane];
        if (p.use_grad) {
          const float gc = clamp_keep_nan(gs[u][lane], -p.grad_clip, p.grad_clip);
          v = __fsub_rn(v, __fmul_rn(p.step_size, gc));
        }
        v = __fadd_rn(v, p.use_noise ? __fmul_rn(p.noise_std, noise[lane]) : 0.0f);
        xs[u][lane] = clamp_keep_nan(v, p.lo, p.hi);
      }
      store_group<T, kVector>(x, group, n, xs[u]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

template <typename T, bool kVector>
void launch_philox_normal(void* out, int64_t n, NoiseStream stream, cudaStream_t cuda_stream) {
  constexpr const char* kWhat = "philox_normal_cuda";
  const int64_t n_groups = cuda::ceil_div(n, kGroupSize);
  const auto kernel = philox_normal_kernel<T, kVector>;
  const unsigned blocks =
      cuda::grid_size(cuda::ceil_div(n_groups, kThreads), cuda::resident_ctas(kernel, kThreads, kWhat));
  kernel<<<blocks, kThreads, 0, cuda_stream>>>(static_cast<T*>(out), n, n_groups, stream);
  check_launch(kWhat);
}

template <typename T>
void dispatch_philox_normal(void* out, int64_t n, NoiseStream stream, cudaStream_t cuda_stream) {
  if (group_vectorizable<T>(out))
    launch_philox_normal<T, true>(out, n, stream, cuda_stream);
  else
    launch_philox_normal<T, false>(out, n, stream, cuda_stream);
}

template <typename T, bool kVector>
void launch_langevin_step(void* x, const void* grad, int64_t n, const LangevinParams& params,
                          cudaStream_t cuda_stream) {
  constexpr const char* kWhat = "langevin_step_cuda";
  const int64_t n_groups = cuda::ceil_div(n, kGroupSize);
  const auto kernel = langevin_step_kernel<T, kVector>;
  const unsigned blocks =
      cuda::grid_size(cuda::ceil_div(n_groups, kThreads), cuda::resident_ctas(kernel, kThreads, kWhat));
  kernel<<<blocks, kThreads, 0, cuda_stream>>>(static_cast<T*>(x), static_cast<const T*>(grad), n, n_groups, params);
  check_launch(kWhat);
}

template <typename T>
void dispatch_langevin_step(void* x, const void* grad, int64_t n, const LangevinParams& params,
                            cudaStream_t cuda_stream) {
  const bool vectorizable = group_vectorizable<T>(x) && (!params.use_grad || group_vectorizable<T>(grad));
  if (vectorizable)
    launch_langevin_step<T, true>(x, grad, n, params, cuda_stream);
  else
    launch_langevin_step<T, false>(x, grad, n, params, cuda_stream);
}

}  // namespace

void philox_normal_cuda(DType dtype, void* out, int64_t n, uint64_t seed, uint64_t offset, void* stream) {
  const std::string who = "philox_normal";
  if (!known_dtype(dtype))
    fail(who + ": unsupported output dtype " + dtype_name(dtype) + "; supported: float32, float64, float16, bfloat16");
  if (n < 0) fail(who + ": n must be >= 0, got " + std::to_string(n));
  if (n == 0) return;
  if (out == nullptr) fail(who + ": null output pointer for " + std::to_string(n) + " elements");

  const NoiseStream noise = make_noise_stream(seed, offset);
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  cuda::dispatch_float_types(dtype, "philox_normal: output",
                             [&](auto tag) { dispatch_philox_normal<decltype(tag)>(out, n, noise, cuda_stream); });
}

void langevin_step_cuda(DType dtype, void* x, const void* grad, int64_t n, double step_size, double noise_std,
                        uint64_t seed, uint64_t offset, double grad_clip, double lo, double hi, void* stream) {
  const std::string who = "langevin_step_";
  if (dtype != DType::Float32 && dtype != DType::Float16 && dtype != DType::BFloat16)
    fail(who + ": unsupported dtype " + dtype_name(dtype) + " for x and grad; supported: float32, float16, bfloat16");
  if (n < 0) fail(who + ": n must be >= 0, got " + std::to_string(n));
  if (n == 0) return;
  const bool use_grad = step_size != 0.0;
  if (x == nullptr || (use_grad && grad == nullptr))
    fail(who + ": null data pointer for " + std::to_string(n) + " elements");

  LangevinParams params{};
  params.step_size = static_cast<float>(step_size);
  params.noise_std = static_cast<float>(noise_std);
  params.grad_clip = static_cast<float>(grad_clip);
  params.lo = static_cast<float>(lo);
  params.hi = static_cast<float>(hi);
  params.use_grad = use_grad;
  params.use_noise = noise_std != 0.0;
  params.stream = make_noise_stream(seed, offset);
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  cuda::dispatch_float_types(dtype, "langevin_step_: x", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>)  // float64 was rejected above
      dispatch_langevin_step<T>(x, grad, n, params, cuda_stream);
  });
}

}  // namespace kexue
