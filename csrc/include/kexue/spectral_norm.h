// Batched spectral-norm power iteration (docs/spectral_norm.md). Torch-free: a kexue::TensorTable
// of raw pointers with slots (weight, u, v) and sizes (rows, cols) per entry.
//
// For every entry i < n: W_i is rows × cols, row-major and contiguous, of the weight slot's dtype
// (Float32, Float64, Float16 or BFloat16). u_i (rows elements) and v_i (cols elements) are
// contiguous vectors of `vec_dtype` — Float32, or Float64 (then every weight is Float64) — and so
// is `sigmas`, an array of n values. Arithmetic in vec_dtype; u and v slots of another
// dtype code throw.
//
// spectral_norm_power_iter: n_iters rounds of
//     u ← normalize(W v),   v ← normalize(Wᵀ u),     normalize(a) = a / max(‖a‖₂, eps)
// (torch.nn.utils.parametrizations.spectral_norm's order), u and v updated in place, then
//     sigmas[i] = uᵀ W v
// with the updated vectors. When n_iters ≥ 1 the last round's t = Wᵀu gives it without another
// pass over W: uᵀWv = t·v = ‖t‖² / max(‖t‖, eps). With n_iters = 0 it is computed directly.
// spectral_sigma: sigmas[i] = uᵀ W v only (nothing is written but sigmas).
// Rows or cols of 0 give sigma 0 and leave the vectors as they are. Unsupported dtype codes or
// a table of another layout throw std::invalid_argument before anything is written.
#pragma once
#include "kexue/cpu_dispatch.h"
#include "kexue/tensor_table.h"

namespace kexue {

// CPU entry points, one per ISA level (call KEXUE_CPU_KERNEL(name), kexue/cpu_dispatch.h).
KEXUE_PER_CPU_ISA(void spectral_norm_power_iter_cpu(DType vec_dtype, const TensorTable& mats, int64_t n_iters,
                                                    double eps, void* sigmas);
                  void spectral_sigma_cpu(DType vec_dtype, const TensorTable& mats,
                                          void* sigmas);)  // KEXUE_PER_CPU_ISA

#ifdef KEXUE_WITH_CUDA
// Same on the device (pointers are device pointers, the table lives on the host), enqueued on
// `stream` (a cudaStream_t); the whole table takes a fixed number of launches per round.
// `scratch` is device memory of at least spectral_norm_scratch_elems_cuda(mats) elements of
// vec_dtype, `scratch_elems` its size (a smaller one throws before anything is launched); the
// caller allocates it (the policy: kexue/cuda_common.cuh).
int64_t spectral_norm_scratch_elems_cuda(const TensorTable& mats);
void spectral_norm_power_iter_cuda(DType vec_dtype, const TensorTable& mats, int64_t n_iters, double eps, void* sigmas,
                                   void* scratch, int64_t scratch_elems, void* stream);
void spectral_sigma_cuda(DType vec_dtype, const TensorTable& mats, void* sigmas, void* scratch, int64_t scratch_elems,
                         void* stream);
#endif

}  // namespace kexue
