// Modulated BatchNorm launchers (docs/gan.md, "Modulated BatchNorm"; the math:
// kexue_fast/reference/batch_norm.py). Torch-free: raw pointers, sizes, strides.
//
// x, y, grad_out, grad_x are contiguous (N, C, S) in the given dtype (S: the product of the
// trailing dims, 1 for a 2-D x). weight/bias are AffineViews of (C,) or (N, C) tensors: the
// parameter of sample n, channel c is at ptr + n * stride_b + c * stride_m (stride_b = 0 for a
// shared (C,) parameter); null means absent (gain 1, bias 0). mean/var are (C,) accumulator
// values (float; double for Float64): written by a training forward, read otherwise.
// grad_weight/grad_bias (nullable) are contiguous, (N, C) when the flag says per sample, else (C,).
#pragma once
#include "kexue/common.h"
#include "kexue/cpu_dispatch.h"

namespace kexue {

struct BatchNormShape {
  int64_t N = 0, C = 0, S = 0;
};

// The running-statistics update of a training BatchNorm (batch_norm_update_stats_), for c < C:
//   running_mean[c] <- (1 - momentum)·running_mean[c] + momentum·mean[c]
//   running_var[c]  <- (1 - momentum)·running_var[c]  + momentum·(var[c]·count/(count - 1))
// computed in the statistics' type (`stats_dtype`: Float32 or Float64) with every product and sum
// rounded on its own, as the tensor ops of the reference round them (bitwise the same), then
// rounded to `running_dtype`. Each tensor is C values `stride` elements apart; count >= 2.
struct RunningStatsUpdate {
  DType running_dtype = DType::Float32;
  void* running_mean = nullptr;
  int64_t running_mean_stride = 1;
  void* running_var = nullptr;
  int64_t running_var_stride = 1;
  DType stats_dtype = DType::Float32;
  const void* mean = nullptr;
  int64_t mean_stride = 1;
  const void* var = nullptr;
  int64_t var_stride = 1;
  int64_t C = 0, count = 2;
  double momentum = 0.1;
};

// CPU entry points, one per ISA level (call KEXUE_CPU_KERNEL(name), kexue/cpu_dispatch.h).
KEXUE_PER_CPU_ISA(void modulated_batch_norm_forward_cpu(DType dtype, const void* x, AffineView weight, AffineView bias,
                                                        void* mean, void* var, bool training, BatchNormShape shape,
                                                        double eps, void* y);

                  void modulated_batch_norm_backward_cpu(DType dtype, const void* grad_out, const void* x,
                                                         AffineView weight, const void* mean, const void* var,
                                                         bool training, BatchNormShape shape, double eps, void* grad_x,
                                                         void* grad_weight, bool weight_per_sample, void* grad_bias,
                                                         bool bias_per_sample);

                  void batch_norm_update_stats_cpu(const RunningStatsUpdate& update);)  // KEXUE_PER_CPU_ISA

#ifdef KEXUE_WITH_CUDA
// Same semantics on the device, enqueued on `stream` (a cudaStream_t). `scratch` is device memory
// for 2 * (N + 1) * C accumulators (float; double for Float64): per (sample, channel) partial
// sums, then two per-channel values.
void modulated_batch_norm_forward_cuda(DType dtype, const void* x, AffineView weight, AffineView bias, void* mean,
                                       void* var, bool training, BatchNormShape shape, double eps, void* y,
                                       void* scratch, void* stream);

void modulated_batch_norm_backward_cuda(DType dtype, const void* grad_out, const void* x, AffineView weight,
                                        const void* mean, const void* var, bool training, BatchNormShape shape,
                                        double eps, void* grad_x, void* grad_weight, bool weight_per_sample,
                                        void* grad_bias, bool bias_per_sample, void* scratch, void* stream);

void batch_norm_update_stats_cuda(const RunningStatsUpdate& update, void* stream);
#endif

}  // namespace kexue
