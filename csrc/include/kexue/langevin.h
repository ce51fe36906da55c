// Counter-based Gaussian noise and the fused Langevin update (docs/langevin.md). Torch-free.
//
// Noise. Element i (flat, row-major) of the noise stream (seed, offset) belongs to group
// j = i / 4, lane i % 4. Group j is one Philox4x32-10 call (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC'11) with
//     counter (j mod 2^32, j >> 32, offset mod 2^32, offset >> 32),  key (seed mod 2^32, seed >> 32),
// giving words r0..r3; u_k = ((r_k >> 9) + 0.5) * 2^-23 in (0, 1); then Box-Muller in float32:
//     lanes 0, 1 = rho cos(theta), rho sin(theta),  rho = sqrt(-2 ln u0), theta = 2 pi u1,
//     lanes 2, 3 the same from (u2, u3).
// Every backend computes exactly this (to float32 rounding of ln/sin/cos), so the noise does not
// depend on the device, the block size or the shape: only on (seed, offset, i).
//
// Langevin update, elementwise over n contiguous elements, arithmetic in float32:
//     x <- clamp(x - step_size * clamp(grad, -grad_clip, grad_clip) + noise_std * xi_i, lo, hi)
// with xi the noise stream (seed, offset) at the element's flat index. "Unbounded" is passed as
// grad_clip = +inf, lo = -inf, hi = +inf. clamp keeps NaN (like torch.clamp). Two shortcuts with
// the same result: noise_std == 0 generates no noise (the term is +0.0f), and step_size == 0 does
// not read grad at all (so grad may alias x; non-finite grad values then do not propagate).
// x and grad share one dtype: Float32, Float16 or BFloat16 (Float64 throws).
#pragma once
#include <cstdint>

#include "kexue/common.h"
#include "kexue/cpu_dispatch.h"

namespace kexue {

// Philox4x32-10 constants (Random123).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// CPU entry points, one per ISA level (call KEXUE_CPU_KERNEL(name), kexue/cpu_dispatch.h).
KEXUE_PER_CPU_ISA(
    // out[i] = noise element i of the stream (seed, offset), i < n, computed in float32 and rounded to
    // `dtype` (Float32, Float64, Float16 or BFloat16).
    void philox_normal_cpu(DType dtype, void* out, int64_t n, uint64_t seed, uint64_t offset);

    // One Philox4x32-10 block, ctr[4], key[2] -> out[4], through the same rounds as the noise kernel
    // (for tests: the Random123 known-answer vectors).
    void philox4x32_10_cpu(const uint32_t* ctr, const uint32_t* key, uint32_t* out);

    void langevin_step_cpu(DType dtype, void* x, const void* grad, int64_t n, double step_size, double noise_std,
                           uint64_t seed, uint64_t offset, double grad_clip, double lo,
                           double hi);)  // KEXUE_PER_CPU_ISA

#ifdef KEXUE_WITH_CUDA
// The same on the device, enqueued on `stream` (a cudaStream_t); pointers are device pointers.
void philox_normal_cuda(DType dtype, void* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
void langevin_step_cuda(DType dtype, void* x, const void* grad, int64_t n, double step_size, double noise_std,
                        uint64_t seed, uint64_t offset, double grad_clip, double lo, double hi, void* stream);
#endif

}  // namespace kexue
