// Modulated BatchNorm on the CPU (the math: kexue_fast/reference/batch_norm.py).
//
// One thread owns one channel at a time (OpenMP over channels), so every per-channel sum is added
// in one fixed order, whatever the number of threads. A channel is N chunks of S consecutive
// values (x[n, c, :]).
//   Forward, training: each chunk's mean and squared deviations by two passes over the chunk (in
//   L1), combined over n = 0..N-1 by Chan's formula (no cancellation of E[x²] − E[x]²); then
//   y = (x − μ)·a + β[n, c] with a = rstd·γ[n, c], re-reading the channel (from L2 when its N·S
//   values fit, which the statistics pass just brought in).
//   Backward: per chunk Σg and Σg·(x − μ) (∂β and ∂γ·σ), then in training the channel means of
//   g' = γ·g and g'·x̂ from them, and grad_x = a·g − rstd·mean(g') − (x − μ)·rstd²·mean(g'·x̂).
#include <omp.h>

#include <cmath>
#include <vector>

#include "kexue/batch_norm.h"
#include "kexue/cpu_reduce.h"
#include "kexue/cpu_types.h"

namespace kexue {
namespace KEXUE_CPU_NS {  // this ISA level's copy (kexue/cpu_dispatch.h)
namespace {

// Tensors below this many elements run on one thread (OpenMP start-up costs more).
constexpr int64_t kParallelThreshold = 1 << 15;

// Per-thread accumulator copies of a 16-bit chunk of x and of grad_out (unused for float/double).
template <class T>
struct ChunkScratch {
  std::vector<acc_t<T>> x, g;
  explicit ChunkScratch(int64_t S) {
    if constexpr (!std::is_same_v<T, acc_t<T>>) x.resize(S), g.resize(S);
  }
};

// γ[n, c] or β[n, c] as an accumulator value; `absent` when the parameter is not given.
template <class T>
acc_t<T> param_at(const AffineView& view, int64_t n, int64_t c, acc_t<T> absent) {
  if (!view.ptr) return absent;
  return to_float(static_cast<const T*>(view.ptr)[n * view.stride_b + c * view.stride_m]);
}

// Count, mean and sum of squared deviations of the values seen so far (Chan et al.'s update).
template <class A>
struct Moments {
  double count = 0;
  A mean = 0, m2 = 0;
  void add(int64_t chunk_count, A chunk_mean, A chunk_m2) {
    const double total = count + static_cast<double>(chunk_count);
    const A delta = chunk_mean - mean;
    mean += delta * static_cast<A>(chunk_count / total);
    m2 += chunk_m2 + delta * delta * static_cast<A>(count * chunk_count / total);
    count = total;
  }
};

template <class T>
Moments<acc_t<T>> channel_moments(const T* x, int64_t c, BatchNormShape shape, ChunkScratch<T>& buf) {
  using A = acc_t<T>;
  const int64_t S = shape.S;
  Moments<A> moments;
  for (int64_t n = 0; n < shape.N; ++n) {
    const A* chunk = as_acc(x + (n * shape.C + c) * S, S, buf.x.data());
    const A mean = row_sum<A>(S, [chunk](auto at) { return at(chunk); }) / static_cast<A>(S);
    const A m2 = row_sum<A>(S, [chunk, mean](auto at) {
      const auto d = at(chunk) - mean;
      return d * d;
    });
    moments.add(S, mean, m2);
  }
  return moments;
}

// The one elementwise pass of both directions, rounded to T (non-temporal stores when `streaming`):
//   out[s] = p·g[s] + (x[s] − μ)·q + r      (kWithG; the backward)
//   out[s] = (x[s] − μ)·q + r               (the forward, with q = a and r = β[n, c])
template <bool kWithG, class T, class A>
void write_chunk(const A* g, const A* x, A mu, A p, A q, A r, int64_t S, T* out, bool streaming) {
  constexpr int64_t L = kLanes<A>;
  const bool stream = streaming && reinterpret_cast<uintptr_t>(out) % (L * sizeof(T)) == 0;
  int64_t s = 0;
  for (; s + L <= S; s += L) {
    Vec<A> v = (load<Vec<A>>(x + s) - mu) * q + r;
    if constexpr (kWithG) v += p * load<Vec<A>>(g + s);
    store_vector(out + s, v, stream);
  }
  for (; s < S; ++s) out[s] = from_acc<T>((x[s] - mu) * q + r + (kWithG ? p * g[s] : A(0)));
}

template <class T>
void forward(const T* x, AffineView weight, AffineView bias, acc_t<T>* mean, acc_t<T>* var, bool training,
             BatchNormShape shape, double eps, T* y) {
  using A = acc_t<T>;
  const auto [N, C, S] = shape;
  const bool streaming = N * C * S * int64_t(sizeof(T)) >= kStreamingBytes;
#pragma omp parallel if (N * C * S > kParallelThreshold)
  {
    ChunkScratch<T> buf(S);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      if (training) {
        const auto moments = channel_moments(x, c, shape, buf);
        mean[c] = moments.mean;
        var[c] = moments.m2 / static_cast<A>(moments.count);
      }
      const A mu = mean[c], rstd = A(1) / std::sqrt(var[c] + static_cast<A>(eps));
      for (int64_t n = 0; n < N; ++n) {
        const int64_t at = (n * C + c) * S;
        const A* chunk = as_acc(x + at, S, buf.x.data());
        const A a = rstd * param_at<T>(weight, n, c, A(1));
        write_chunk<false>(chunk, chunk, mu, A(0), a, param_at<T>(bias, n, c, A(0)), S, y + at, streaming);
      }
    }
    if (streaming) finish_streaming();
  }
}

template <class T>
void backward(const T* grad_out, const T* x, AffineView weight, const acc_t<T>* mean, const acc_t<T>* var,
              bool training, BatchNormShape shape, double eps, T* grad_x, T* grad_weight, bool weight_per_sample,
              T* grad_bias, bool bias_per_sample) {
  using A = acc_t<T>;
  const auto [N, C, S] = shape;
  const bool sums_needed = training || grad_weight || grad_bias;
  const bool streaming = grad_x && N * C * S * int64_t(sizeof(T)) >= kStreamingBytes;
  const A inv_count = A(1) / static_cast<A>(N * S);
#pragma omp parallel if (N * C * S > kParallelThreshold)
  {
    ChunkScratch<T> buf(S);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      const A mu = mean[c], rstd = A(1) / std::sqrt(var[c] + static_cast<A>(eps));
      A total_g = 0, total_gx = 0;  // Σ_n Σ_s g and Σ_n Σ_s g·x̂ (shared ∂β, ∂γ)
      A mean_gw = 0, mean_gwx = 0;  // mean(g') and mean(g'·x̂)
      if (sums_needed) {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t at = (n * C + c) * S;
          const A* xc = as_acc(x + at, S, buf.x.data());
          const A* g = as_acc(grad_out + at, S, buf.g.data());
          const A sum_g = row_sum<A>(S, [g](auto in) { return in(g); });
          const A sum_gx = row_sum<A>(S, [g, xc, mu](auto in) { return in(g) * (in(xc) - mu); }) * rstd;
          if (grad_bias && bias_per_sample) grad_bias[n * C + c] = from_acc<T>(sum_g);
          if (grad_weight && weight_per_sample) grad_weight[n * C + c] = from_acc<T>(sum_gx);
          total_g += sum_g, total_gx += sum_gx;
          const A w = param_at<T>(weight, n, c, A(1));
          mean_gw += w * sum_g, mean_gwx += w * sum_gx;
        }
        if (grad_bias && !bias_per_sample) grad_bias[c] = from_acc<T>(total_g);
        if (grad_weight && !weight_per_sample) grad_weight[c] = from_acc<T>(total_gx);
      }
      if (!grad_x) continue;
      // grad_x = a·g − rstd·mean(g') − (x − μ)·rstd²·mean(g'·x̂); eval: a·g
      const A shift = training ? -rstd * mean_gw * inv_count : A(0);
      const A slope = training ? -rstd * rstd * mean_gwx * inv_count : A(0);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t at = (n * C + c) * S;
        const A* xc = as_acc(x + at, S, buf.x.data());
        const A* g = as_acc(grad_out + at, S, buf.g.data());
        const A a = rstd * param_at<T>(weight, n, c, A(1));
        write_chunk<true>(g, xc, mu, a, slope, shift, S, grad_x + at, streaming);
      }
    }
    if (streaming) finish_streaming();
  }
}

}  // namespace

void modulated_batch_norm_forward_cpu(DType dtype, const void* x, AffineView weight, AffineView bias, void* mean,
                                      void* var, bool training, BatchNormShape shape, double eps, void* y) {
  if (shape.N * shape.C * shape.S == 0) return;
  dispatch_float_types(dtype, "modulated_batch_norm", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    forward<T>(static_cast<const T*>(x), weight, bias, static_cast<A*>(mean), static_cast<A*>(var), training, shape,
               eps, static_cast<T*>(y));
  });
}

void modulated_batch_norm_backward_cpu(DType dtype, const void* grad_out, const void* x, AffineView weight,
                                       const void* mean, const void* var, bool training, BatchNormShape shape,
                                       double eps, void* grad_x, void* grad_weight, bool weight_per_sample,
                                       void* grad_bias, bool bias_per_sample) {
  if (shape.N * shape.C * shape.S == 0) return;
  dispatch_float_types(dtype, "modulated_batch_norm_backward", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    backward<T>(static_cast<const T*>(grad_out), static_cast<const T*>(x), weight, static_cast<const A*>(mean),
                static_cast<const A*>(var), training, shape, eps, static_cast<T*>(grad_x), static_cast<T*>(grad_weight),
                weight_per_sample, static_cast<T*>(grad_bias), bias_per_sample);
  });
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
