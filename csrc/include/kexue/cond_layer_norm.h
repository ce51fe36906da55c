// Conditional LayerNorm / RMSNorm launchers (docs/cond_layer_norm.md). Torch-free: raw pointers, sizes, strides.
//
// x, y, grad_out, grad_x are contiguous (rows, D) in the given dtype. Row r belongs to sample
// r / rows_per_sample. weight/bias views: see AffineView. grad_weight/grad_bias (nullable) are
// contiguous (rows / plan.group_rows, D) in the dtype; grad_x is nullable too.
#pragma once
#include "kexue/common.h"
#include "kexue/cpu_dispatch.h"

namespace kexue {

// CPU entry points, one per ISA level (call KEXUE_CPU_KERNEL(name), kexue/cpu_dispatch.h).
KEXUE_PER_CPU_ISA(void cond_layer_norm_forward_cpu(DType dtype, const void* x, AffineView weight, AffineView bias,
                                                   void* y, int64_t rows, int64_t rows_per_sample, int64_t D,
                                                   double eps, bool rms);

                  void cond_layer_norm_backward_cpu(DType dtype, const void* grad_out, const void* x, AffineView weight,
                                                    void* grad_x, void* grad_weight, void* grad_bias, int64_t rows,
                                                    int64_t rows_per_sample, int64_t D, double eps, bool rms,
                                                    ReductionPlan plan);)  // KEXUE_PER_CPU_ISA

#ifdef KEXUE_WITH_CUDA
// Same semantics on the device, enqueued on `stream` (a cudaStream_t). `scratch` is device
// memory for 2 * n_blocks * D accumulators (float; double for Float64), where
// n_blocks = (rows / plan.group_rows) * ceil(plan.group_rows / plan.rows_per_block); it may be
// null when neither grad_weight nor grad_bias is wanted.
void cond_layer_norm_forward_cuda(DType dtype, const void* x, AffineView weight, AffineView bias, void* y, int64_t rows,
                                  int64_t rows_per_sample, int64_t D, double eps, bool rms, void* stream);

void cond_layer_norm_backward_cuda(DType dtype, const void* grad_out, const void* x, AffineView weight, void* grad_x,
                                   void* grad_weight, void* grad_bias, void* scratch, int64_t rows,
                                   int64_t rows_per_sample, int64_t D, double eps, bool rms, ReductionPlan plan,
                                   void* stream);
#endif

}  // namespace kexue
