// Batched spectral-norm power iteration (docs/spectral_norm.md). Torch-free: host arrays of raw pointers.
//
// For every matrix i < n: W_i is rows[i] × cols[i], row-major and contiguous, of dtype
// weight_dtypes[i] (Float32, Float64, Float16 or BFloat16). u_i (rows[i] elements) and v_i
// (cols[i] elements) are contiguous vectors of `vec_dtype` — Float32, or Float64 (then every
// weight is Float64) — and so is `sigmas`, an array of n values. Arithmetic in vec_dtype.
//
// spectral_norm_power_iter: n_iters rounds of
//     u ← normalize(W v),   v ← normalize(Wᵀ u),     normalize(a) = a / max(‖a‖₂, eps)
// (torch.nn.utils.parametrizations.spectral_norm's order), u and v updated in place, then
//     sigmas[i] = uᵀ W v
// with the updated vectors. When n_iters ≥ 1 the last round's t = Wᵀu gives it without another
// pass over W: uᵀWv = t·v = ‖t‖² / max(‖t‖, eps). With n_iters = 0 it is computed directly.
// spectral_sigma: sigmas[i] = uᵀ W v only (nothing is written but sigmas).
// Rows or cols of 0 give sigma 0 and leave the vectors as they are. Unsupported dtype codes
// throw std::invalid_argument before anything is written.
#pragma once
#include "kexue/common.h"
#include "kexue/cpu_dispatch.h"

namespace kexue {

struct MatrixList {
  const int32_t* weight_dtypes;
  const void* const* weights;
  void* const* us;
  void* const* vs;
  const int64_t* rows;
  const int64_t* cols;
  int64_t n;
};

// CPU entry points, one per ISA level (call KEXUE_CPU_KERNEL(name), kexue/cpu_dispatch.h).
KEXUE_PER_CPU_ISA(void spectral_norm_power_iter_cpu(DType vec_dtype, const MatrixList& mats, int64_t n_iters,
                                                    double eps, void* sigmas);
                  void spectral_sigma_cpu(DType vec_dtype, const MatrixList& mats, void* sigmas);)  // KEXUE_PER_CPU_ISA

#ifdef KEXUE_WITH_CUDA
// Same on the device (pointers are device pointers, the arrays live on the host), enqueued on
// `stream` (a cudaStream_t); the whole list takes a fixed number of launches per round.
void spectral_norm_power_iter_cuda(DType vec_dtype, const MatrixList& mats, int64_t n_iters, double eps, void* sigmas,
                                   void* stream);
void spectral_sigma_cuda(DType vec_dtype, const MatrixList& mats, void* sigmas, void* stream);
#endif

}  // namespace kexue
