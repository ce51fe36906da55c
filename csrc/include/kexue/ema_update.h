// Multi-tensor weight EMA (docs/ema.md). Torch-free: host arrays of raw pointers, sizes, dtype codes.
//
// For every i < n_tensors, over numels[i] contiguous elements:
//     shadow[i] <- decay * shadow[i] + (1 - decay) * param[i]
// computed in float (double when the shadow is Float64) with d = decay and w = 1 - decay (w
// formed in double, then rounded to the arithmetic type), rounded back to the shadow's dtype.
// Supported (shadow, param) dtype pairs: (F32, F32), (F32, BF16), (F32, F16), (F64, F64),
// (BF16, BF16), (F16, F16); anything else throws std::invalid_argument before writing.
#pragma once
#include "kexue/common.h"
#include "kexue/cpu_dispatch.h"

namespace kexue {

// CPU entry points, one per ISA level (call KEXUE_CPU_KERNEL(name), kexue/cpu_dispatch.h).
KEXUE_PER_CPU_ISA(void ema_update_cpu(const int32_t* shadow_dtypes, const int32_t* param_dtypes, void* const* shadows,
                                      const void* const* params, const int64_t* numels, int64_t n_tensors,
                                      double decay);)  // KEXUE_PER_CPU_ISA

#ifdef KEXUE_WITH_CUDA
// Same on the device: pointers are device pointers, the arrays themselves live on the host;
// enqueued on `stream` (a cudaStream_t) as few launches as possible (one per batch of tensors).
void ema_update_cuda(const int32_t* shadow_dtypes, const int32_t* param_dtypes, void* const* shadows,
                     const void* const* params, const int64_t* numels, int64_t n_tensors, double decay, void* stream);
#endif

}  // namespace kexue
