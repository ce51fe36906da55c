// Multi-tensor weight EMA (docs/ema.md). Torch-free: a kexue::TensorTable of raw pointers.
//
// The table has slots (shadow, param) and one size (numel) per entry. For every entry i, over
// numel contiguous elements:
//     shadow[i] <- decay * shadow[i] + (1 - decay) * param[i]
// computed in float (double when the shadow is Float64) with d = decay and w = 1 - decay (w
// formed in double, then rounded to the arithmetic type), rounded back to the shadow's dtype.
// Supported (shadow, param) dtype pairs: (F32, F32), (F32, BF16), (F32, F16), (F64, F64),
// (BF16, BF16), (F16, F16); anything else, or a table of another layout, throws
// std::invalid_argument before writing.
#pragma once
#include "kexue/cpu_dispatch.h"
#include "kexue/tensor_table.h"

namespace kexue {

// CPU entry points, one per ISA level (call KEXUE_CPU_KERNEL(name), kexue/cpu_dispatch.h).
KEXUE_PER_CPU_ISA(void ema_update_cpu(const TensorTable& table, double decay);)  // KEXUE_PER_CPU_ISA

#ifdef KEXUE_WITH_CUDA
// Same on the device: pointers are device pointers, the table itself lives on the host;
// enqueued on `stream` (a cudaStream_t) as few launches as possible (one per batch of tensors).
void ema_update_cuda(const TensorTable& table, double decay, void* stream);
#endif

}  // namespace kexue
