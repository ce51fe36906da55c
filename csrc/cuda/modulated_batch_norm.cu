// Modulated BatchNorm on CUDA (the math: kexue_fast/reference/batch_norm.py; the CPU kernel,
// csrc/cpu/modulated_batch_norm.cpp, has the same structure and formulas).
//
// x is N·C rows of S values (row r = n·C + c). Each direction is three launches on one stream:
//   1. one warp per row: the row's mean and squared deviations (forward, training) or Σg and
//      Σg·x̂ (backward) by xor-butterfly shuffles, written to scratch[r] and scratch[rows + r];
//   2. one thread per channel: the rows of its channel combined over n = 0..N-1 in that order
//      (forward: Chan's formula → mean, var; backward: the shared ∂γ, ∂β and, in training,
//      shift = −rstd·mean(g'), slope = −rstd²·mean(g'·x̂), kept in scratch[2·rows + c] and
//      scratch[2·rows + C + c]); the per-sample ∂γ, ∂β are written here too;
//   3. one warp per row: y = (x − μ)·a + β[n, c], or grad_x = a·g + (x − μ)·slope + shift, with
//      a = rstd·γ[n, c].
// No atomics and a fixed order everywhere: the results are bitwise reproducible. Launch 1 is
// skipped in eval (forward) and when neither a parameter gradient nor training asks for it.
#include <cuda_runtime.h>

#include <stdexcept>

#include "kexue/batch_norm.h"
#include "kexue/cuda_common.cuh"

namespace kexue {
namespace {

using cuda::acc_t;
using cuda::add_rn;
using cuda::ceil_div;
using cuda::FromAcc;
using cuda::grid_size;
using cuda::mul_rn;
using cuda::to_acc;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// γ[n, c] or β[n, c] as an accumulator value; `absent` when the parameter is not given.
template <typename T>
__device__ __forceinline__ acc_t<T> param_at(const T* p, int64_t stride_n, int64_t stride_c, int64_t n, int64_t c,
                                             acc_t<T> absent) {
  return p == nullptr ? absent : to_acc(p[n * stride_n + c * stride_c]);
}

// Launch 1 of the forward: row_mean[r], row_m2[r] for every row.
template <typename T>
__global__ void __launch_bounds__(kThreads) row_moments_kernel(const T* x, int64_t rows, int64_t S, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5); r < rows; r += warps) {
    const T* row = x + r * S;
    const A x0 = to_acc(row[0]);  // the shift of the CPU kernel (csrc/cpu/modulated_batch_norm.cpp)
    A sum = 0;
    for (int64_t s = lane; s < S; s += 32) sum += to_acc(row[s]) - x0;
    const A mean = x0 + warp_sum(sum) / static_cast<A>(S);
    A m2 = 0;
    for (int64_t s = lane; s < S; s += 32) {
      const A d = to_acc(row[s]) - mean;
      m2 += d * d;
    }
    m2 = warp_sum(m2);
    if (lane == 0) scratch[r] = mean, scratch[rows + r] = m2;
  }
}

// Launch 2 of the forward: Chan's combination of channel c's rows, in the order n = 0..N-1.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    channel_moments_kernel(const A* scratch, BatchNormShape shape, A* mean, A* var) {
  const int64_t rows = shape.N * shape.C;
  for (int64_t c = blockIdx.x * int64_t(kThreads) + threadIdx.x; c < shape.C; c += int64_t(gridDim.x) * kThreads) {
    A m = 0, m2 = 0;
    for (int64_t n = 0; n < shape.N; ++n) {
      const A delta = scratch[n * shape.C + c] - m;
      m += delta / static_cast<A>(n + 1);
      m2 += scratch[rows + n * shape.C + c] +
            delta * delta * (static_cast<A>(shape.S) * static_cast<A>(n) / static_cast<A>(n + 1));
    }
    mean[c] = m;
    var[c] = m2 / static_cast<A>(shape.N * shape.S);
  }
}

// Launch 3 of both directions: out = p·g + (x − μ)·q + o per row (kWithG), else (x − μ)·q + o,
// with q = a (forward) or slope (backward) and p = a.
template <typename T, bool kWithG>
__global__ void __launch_bounds__(kThreads)
    write_rows_kernel(const T* x, const T* g, const T* w, int64_t w_sn, int64_t w_sc, const T* b, int64_t b_sn,
                      int64_t b_sc, const acc_t<T>* mean, const acc_t<T>* var, const acc_t<T>* shift,
                      const acc_t<T>* slope, BatchNormShape shape, acc_t<T> eps, T* out) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t rows = shape.N * shape.C, S = shape.S;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5); r < rows; r += warps) {
    const int64_t n = r / shape.C, c = r - n * shape.C;
    const A mu = mean[c], rstd = A(1) / sqrt(var[c] + eps);
    const A a = rstd * param_at(w, w_sn, w_sc, n, c, A(1));
    const A q = kWithG ? (slope ? slope[c] : A(0)) : a;
    const A o = kWithG ? (shift ? shift[c] : A(0)) : param_at(b, b_sn, b_sc, n, c, A(0));
    for (int64_t s = lane; s < S; s += 32) {
      A v = (to_acc(x[r * S + s]) - mu) * q + o;
      if constexpr (kWithG) v += a * to_acc(g[r * S + s]);
      out[r * S + s] = cuda::FromAcc<T>::cast(v);
    }
  }
}

// Launch 1 of the backward: Σg and Σg·x̂ of every row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_grad_sums_kernel(const T* grad_out, const T* x, const acc_t<T>* mean, const acc_t<T>* var, BatchNormShape shape,
                         acc_t<T> eps, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t rows = shape.N * shape.C, S = shape.S;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5); r < rows; r += warps) {
    const int64_t c = r % shape.C;
    const A mu = mean[c];
    A sum_g = 0, sum_gx = 0;
    for (int64_t s = lane; s < S; s += 32) {
      const A gv = to_acc(grad_out[r * S + s]);
      sum_g += gv;
      sum_gx += gv * (to_acc(x[r * S + s]) - mu);
    }
    sum_g = warp_sum(sum_g);
    sum_gx = warp_sum(sum_gx) * (A(1) / sqrt(var[c] + eps));
    if (lane == 0) scratch[r] = sum_g, scratch[rows + r] = sum_gx;
  }
}

// Launch 2 of the backward: per channel, over n = 0..N-1 in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    channel_grads_kernel(acc_t<T>* scratch, const T* w, int64_t w_sn, int64_t w_sc, const acc_t<T>* var,
                         BatchNormShape shape, acc_t<T> eps, bool training, T* grad_w, bool w_per_sample, T* grad_b,
                         bool b_per_sample) {
  using A = acc_t<T>;
  const int64_t rows = shape.N * shape.C;
  const A inv_count = A(1) / static_cast<A>(shape.N * shape.S);
  for (int64_t c = blockIdx.x * int64_t(kThreads) + threadIdx.x; c < shape.C; c += int64_t(gridDim.x) * kThreads) {
    A total_g = 0, total_gx = 0, total_gw = 0, total_gwx = 0;
    for (int64_t n = 0; n < shape.N; ++n) {
      const int64_t r = n * shape.C + c;
      const A sg = scratch[r], sgx = scratch[rows + r];
      if (grad_b && b_per_sample) grad_b[r] = cuda::FromAcc<T>::cast(sg);
      if (grad_w && w_per_sample) grad_w[r] = cuda::FromAcc<T>::cast(sgx);
      const A wv = param_at(w, w_sn, w_sc, n, c, A(1));
      total_g += sg, total_gx += sgx, total_gw += wv * sg, total_gwx += wv * sgx;
    }
    if (grad_b && !b_per_sample) grad_b[c] = cuda::FromAcc<T>::cast(total_g);
    if (grad_w && !w_per_sample) grad_w[c] = cuda::FromAcc<T>::cast(total_gx);
    const A rstd = A(1) / sqrt(var[c] + eps);
    scratch[2 * rows + c] = training ? -rstd * total_gw * inv_count : A(0);                    // shift
    scratch[2 * rows + shape.C + c] = training ? -rstd * rstd * total_gwx * inv_count : A(0);  // slope
  }
}

unsigned row_grid(int64_t rows) { return grid_size(ceil_div(rows, kWarpsPerBlock), int64_t(1) << 16); }
unsigned channel_grid(int64_t C) { return grid_size(ceil_div(C, kThreads)); }

// The running update of kexue/batch_norm.h, one thread per channel, each product and sum
// rounded on its own (mul_rn, add_rn) as the reference's tensor ops round them.
template <typename R, typename A>
__global__ void __launch_bounds__(kThreads) update_running_stats_kernel(RunningStatsUpdate u) {
  auto* running_mean = static_cast<R*>(u.running_mean);
  auto* running_var = static_cast<R*>(u.running_var);
  const auto* mean = static_cast<const A*>(u.mean);
  const auto* var = static_cast<const A*>(u.var);
  const A unbias = static_cast<A>(static_cast<double>(u.count) / static_cast<double>(u.count - 1));
  const A take = static_cast<A>(u.momentum), keep = static_cast<A>(1.0 - u.momentum);
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < u.C; c += int64_t(gridDim.x) * blockDim.x) {
    R& rm = running_mean[c * u.running_mean_stride];
    R& rv = running_var[c * u.running_var_stride];
    const A new_mean = add_rn(mul_rn(take, mean[c * u.mean_stride]), mul_rn(keep, static_cast<A>(to_acc(rm))));
    const A unbiased = mul_rn(var[c * u.var_stride], unbias);
    const A new_var = add_rn(mul_rn(take, unbiased), mul_rn(keep, static_cast<A>(to_acc(rv))));
    rm = FromAcc<R>::cast(static_cast<acc_t<R>>(new_mean));
    rv = FromAcc<R>::cast(static_cast<acc_t<R>>(new_var));
  }
}

}  // namespace

void modulated_batch_norm_forward_cuda(DType dtype, const void* x, AffineView weight, AffineView bias, void* mean,
                                       void* var, bool training, BatchNormShape shape, double eps, void* y,
                                       void* scratch, void* stream) {
  const int64_t rows = shape.N * shape.C;
  if (rows * shape.S == 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_float_types(dtype, "modulated_batch_norm", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    A* mean_ = static_cast<A*>(mean);
    A* var_ = static_cast<A*>(var);
    if (training) {
      A* partial = static_cast<A*>(scratch);
      row_moments_kernel<T><<<row_grid(rows), kThreads, 0, st>>>(static_cast<const T*>(x), rows, shape.S, partial);
      check_launch("modulated_batch_norm_forward (row moments)");
      channel_moments_kernel<A><<<channel_grid(shape.C), kThreads, 0, st>>>(partial, shape, mean_, var_);
      check_launch("modulated_batch_norm_forward (channel moments)");
    }
    write_rows_kernel<T, false><<<row_grid(rows), kThreads, 0, st>>>(
        static_cast<const T*>(x), nullptr, static_cast<const T*>(weight.ptr), weight.stride_b, weight.stride_m,
        static_cast<const T*>(bias.ptr), bias.stride_b, bias.stride_m, mean_, var_, nullptr, nullptr, shape,
        static_cast<A>(eps), static_cast<T*>(y));
    check_launch("modulated_batch_norm_forward (normalise)");
  });
}

void modulated_batch_norm_backward_cuda(DType dtype, const void* grad_out, const void* x, AffineView weight,
                                        const void* mean, const void* var, bool training, BatchNormShape shape,
                                        double eps, void* grad_x, void* grad_weight, bool weight_per_sample,
                                        void* grad_bias, bool bias_per_sample, void* scratch, void* stream) {
  const int64_t rows = shape.N * shape.C;
  if (rows * shape.S == 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_float_types(dtype, "modulated_batch_norm_backward", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* g = static_cast<const T*>(grad_out);
    const T* xt = static_cast<const T*>(x);
    const T* w = static_cast<const T*>(weight.ptr);
    const A* mean_ = static_cast<const A*>(mean);
    const A* var_ = static_cast<const A*>(var);
    A* partial = static_cast<A*>(scratch);
    const bool sums = training || grad_weight || grad_bias;
    if (sums) {
      row_grad_sums_kernel<T>
          <<<row_grid(rows), kThreads, 0, st>>>(g, xt, mean_, var_, shape, static_cast<A>(eps), partial);
      check_launch("modulated_batch_norm_backward (row sums)");
      channel_grads_kernel<T><<<channel_grid(shape.C), kThreads, 0, st>>>(
          partial, w, weight.stride_b, weight.stride_m, var_, shape, static_cast<A>(eps), training,
          static_cast<T*>(grad_weight), weight_per_sample, static_cast<T*>(grad_bias), bias_per_sample);
      check_launch("modulated_batch_norm_backward (channel sums)");
    }
    if (grad_x == nullptr) return;
    const A* shift = sums ? partial + 2 * rows : nullptr;
    const A* slope = sums ? partial + 2 * rows + shape.C : nullptr;
    write_rows_kernel<T, true><<<row_grid(rows), kThreads, 0, st>>>(xt, g, w, weight.stride_b, weight.stride_m, nullptr,
                                                                    0, 0, mean_, var_, shift, slope, shape,
                                                                    static_cast<A>(eps), static_cast<T*>(grad_x));
    check_launch("modulated_batch_norm_backward (grad_x)");
  });
}

void batch_norm_update_stats_cuda(const RunningStatsUpdate& update, void* stream) {
  if (update.C == 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_float_types(update.running_dtype, "batch_norm_update_stats_", [&](auto running_tag) {
    using R = decltype(running_tag);
    if (update.stats_dtype == DType::Float64) {
      update_running_stats_kernel<R, double><<<channel_grid(update.C), kThreads, 0, st>>>(update);
    } else if (update.stats_dtype == DType::Float32) {
      update_running_stats_kernel<R, float><<<channel_grid(update.C), kThreads, 0, st>>>(update);
    } else {
      throw std::invalid_argument("batch_norm_update_stats_: the statistics must be float32 or float64, got " +
                                  dtype_name(update.stats_dtype));
    }
    check_launch("batch_norm_update_stats_");
  });
}

}  // namespace kexue
