// Modulated BatchNorm on the CPU (the math: kexue_fast/reference/batch_norm.py).
//
// x is N·C rows of S values (row r = n·C + c). Both directions are two passes over the rows
// around a small per-channel step:
//   forward, training: each row's mean and squared deviations (two passes over the row, in L1),
//     combined per channel over n = 0..N-1 by Chan's formula (no E[x²] − E[x]² cancellation) —
//     or, for short rows (8×8 feature maps and smaller), per position over the samples
//     (block_statistics); then y = (x − μ)·a + β[n, c] with a = rstd·γ[n, c], for a block of
//     channels at a time right after its statistics, while its values are in the cache;
//   backward: each row's Σg and Σg·x̂ (the per-sample ∂β, ∂γ), summed per channel for the shared
//     ∂γ, ∂β and, in training, the means of g' = γ·g and g'·x̂; then
//     grad_x = a·g − rstd·mean(g') − (x − μ)·rstd²·mean(g'·x̂).
// Row results do not depend on which thread computes them, and the per-channel steps add in the
// fixed order n = 0..N-1: the results are the same for every number of threads.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kexue/batch_norm.h"
#include "kexue/cpu_reduce.h"
#include "kexue/cpu_types.h"

namespace kexue {
namespace KEXUE_CPU_NS {  // this ISA level's copy (kexue/cpu_dispatch.h)
namespace {

// Per-thread accumulator copies of a 16-bit row of x and of grad_out, for the types this level
// cannot widen in registers (float16 without F16C); empty otherwise.
template <class T>
struct RowScratch {
  std::vector<acc_t<T>> x, g;
  explicit RowScratch(int64_t S) {
    if constexpr (!kVectorWidening<T>) x.resize(S), g.resize(S);
  }
};

// Row `src` of S values as row_sum reads it: as it is where this level widens T in registers,
// else converted into `buf`.
template <class T>
const auto* summable(const T* src, int64_t S, std::vector<acc_t<T>>& buf) {
  if constexpr (kVectorWidening<T>) {
    return src;
  } else {
    return as_acc(src, S, buf.data());
  }
}

// γ[n, c] or β[n, c] as an accumulator value; `absent` when the parameter is not given.
template <class T>
acc_t<T> param_at(const AffineView& view, int64_t n, int64_t c, acc_t<T> absent) {
  if (!view.ptr) return absent;
  return to_float(static_cast<const T*>(view.ptr)[n * view.stride_b + c * view.stride_m]);
}

// Calls row_fn(r, n, c, buf) for every row r = n·C + c, each thread taking one contiguous range
// of rows (n, c follow r without divisions), its own copy of row_fn and its own RowScratch `buf`.
// (A row_fn that captures pointers by value keeps them in registers in its thread's copy; through
// a shared closure they would be loaded again after every store of a row, which may alias them.)
template <class T, class RowFn>
void for_each_row(BatchNormShape shape, const RowFn& shared_row_fn) {
  const int64_t rows = shape.N * shape.C;
#pragma omp parallel if (rows * shape.S > kParallelThreshold)
  {
    RowFn row_fn = shared_row_fn;
    RowScratch<T> buf(shape.S);
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t first = rows * thread / threads, last = rows * (thread + 1) / threads;
    int64_t n = first / shape.C, c = first % shape.C;
    for (int64_t r = first; r < last; ++r) {
      row_fn(r, n, c, buf);
      if (++c == shape.C) c = 0, ++n;
    }
  }
}

// The one elementwise pass of both directions over a row of S values, read as T and widened in
// registers, rounded to T on the way out (non-temporal stores when `streaming`):
//   out[s] = p·g[s] + (x[s] − μ)·q + o      (kWithG: the backward)
//   out[s] = (x[s] − μ)·q + o               (the forward, with q = a and o = β[n, c])
template <bool kWithG, class T, class A = acc_t<T>>
void write_row(const T* g, const T* x, A mu, A p, A q, A o, int64_t S, T* out, bool streaming) {
  constexpr int64_t L = kLanes<A>;
  const bool stream = streaming && reinterpret_cast<uintptr_t>(out) % (L * sizeof(T)) == 0;
  int64_t s = 0;
  if constexpr (kVectorWidening<T>) {
    for (; s + L <= S; s += L) {
      Vec<A> v = (load_widened(x + s) - mu) * q + o;
      if constexpr (kWithG) v += p * load_widened(g + s);
      store_vector(out + s, v, stream);
    }
  }
  for (; s < S; ++s) out[s] = from_acc<T>((to_float(x[s]) - mu) * q + o + (kWithG ? p * to_float(g[s]) : A(0)));
}

// Chan's formula over K groups of `size` values each, in the order k = 0..K-1: the mean and the
// (biased) variance of all K·size values from each group's mean means[k·stride] and sum of
// squared deviations m2s[k·stride].
template <class A>
void combine_groups(const A* means, const A* m2s, int64_t stride, int64_t K, int64_t size, A* mean, A* var) {
  A m = 0, m2 = 0;
  for (int64_t k = 0; k < K; ++k) {
    const A delta = means[k * stride] - m;
    m += delta / static_cast<A>(k + 1);
    m2 += m2s[k * stride] + delta * delta * (static_cast<A>(size) * static_cast<A>(k) / static_cast<A>(k + 1));
  }
  *mean = m, *var = m2 / static_cast<A>(K * size);
}

// Rows of at most this many values get their training statistics per position
// (block_statistics) rather than per row: at 4×4 or 8×8 feature maps the per-row reductions
// and the per-row combine cost more than the arithmetic.
constexpr int64_t kShortRow = 128;

// Welford's update per position over the samples n = 0..N-1, with x = x_n[j] and w = weights[n]
// = 1/(n + 1):
//   δ = x − mean[j],  mean[j] += δ·w,  m2[j] += δ·(x − mean[j]).
// welford_in_registers runs it for the R vectors of positions at x[0..R·L) (sample n's at
// x + n·stride), their means and m2 in registers through all the samples: no load or store of
// them per value, and the next samples' lines prefetched (their stride defeats the hardware's
// prefetchers). welford_one_by_one runs it for positions [0, J) one value at a time (the tail,
// and the types this level cannot widen in registers). The two give the same bits.
constexpr int kWelfordVectors = kVectorBytes >= 64 ? 8 : 4;  // R: 2·R accumulators, registers to spare
constexpr int64_t kWelfordAhead = 8;                         // samples prefetched ahead

template <int R, class T, class A = acc_t<T>>
void welford_in_registers(const T* x, int64_t stride, int64_t N, const A* weights, A* mean, A* m2) {
  using V = Vec<A>;
  constexpr int64_t L = kLanes<A>, kBytes = R * L * int64_t(sizeof(T));
  V m[R], q[R];
  for (int k = 0; k < R; ++k) m[k] = splat(A(0)), q[k] = splat(A(0));
  for (int64_t n = 0; n < N; ++n) {
    const T* xn = x + n * stride;
    if (n + kWelfordAhead < N) {
      const char* ahead = reinterpret_cast<const char*>(xn + kWelfordAhead * stride);
      for (int64_t byte = 0; byte < kBytes; byte += 64) __builtin_prefetch(ahead + byte);
    }
    const A w = weights[n];
    for (int k = 0; k < R; ++k) {
      const V v = load_widened(xn + k * L), delta = v - m[k];
      m[k] = m[k] + delta * w;
      q[k] = q[k] + delta * (v - m[k]);
    }
  }
  for (int k = 0; k < R; ++k) store(mean + k * L, m[k]), store(m2 + k * L, q[k]);
}

template <class T, class A = acc_t<T>>
void welford_one_by_one(const T* x, int64_t stride, int64_t N, const A* weights, int64_t J, A* mean, A* m2) {
  std::fill_n(mean, J, A(0));
  std::fill_n(m2, J, A(0));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < J; ++j) {
      const A v = to_float(x[n * stride + j]), delta = v - mean[j];
      mean[j] += delta * weights[n];
      m2[j] += delta * (v - mean[j]);
    }
  }
}

// combine_groups for each of `channels` channels, group k of channel c at c·channel_stride +
// k·group_stride, a vector of channels at a time, one per lane: per lane the very operations of
// combine_groups, so the same bits, but vector divisions where it made a chain of two scalar
// divisions per group of each channel (15 % of a 128×512×8×8 forward on one thread).
template <class A>
void combine_channels(const A* means, const A* m2s, int64_t channel_stride, int64_t group_stride, int64_t channels,
                      int64_t K, int64_t size, A* mean, A* var) {
  using V = Vec<A>;
  constexpr int64_t L = kLanes<A>;
  int64_t c = 0;
  for (; c + L <= channels; c += L) {
    V m = splat(A(0)), m2 = splat(A(0));
    for (int64_t k = 0; k < K; ++k) {
      const A* group_means = means + c * channel_stride + k * group_stride;
      const A* group_m2s = m2s + c * channel_stride + k * group_stride;
      V group_mean, group_m2;
      if (channel_stride == 1) {
        group_mean = load<V>(group_means), group_m2 = load<V>(group_m2s);
      } else {
        for (int64_t lane = 0; lane < L; ++lane) {
          group_mean[lane] = group_means[lane * channel_stride], group_m2[lane] = group_m2s[lane * channel_stride];
        }
      }
      const V delta = group_mean - m;
      m += delta / static_cast<A>(k + 1);
      m2 += group_m2 + delta * delta * (static_cast<A>(size) * static_cast<A>(k) / static_cast<A>(k + 1));
    }
    store(mean + c, m);
    store(var + c, m2 / static_cast<A>(K * size));
  }
  for (; c < channels; ++c) {
    combine_groups(means + c * channel_stride, m2s + c * channel_stride, group_stride, K, size, mean + c, var + c);
  }
}

// Each row's mean and sum of squared deviations, two passes over the row (in L1). The mean is
// summed shifted by the row's first value: with a large mean and a small spread, x − x₀ is exact
// and small, so the sum keeps the digits that a plain Σx rounds away.
template <class T, class A = acc_t<T>>
void row_moments(const T* row, int64_t S, RowScratch<T>& buf, A* mean, A* m2) {
  const auto* xr = summable(row, S, buf.x);
  const A x0 = to_float(xr[0]);
  const A m = x0 + row_sum<A>(S, [xr, x0](auto at) { return at(xr) - x0; }) / static_cast<A>(S);
  *mean = m;
  *m2 = row_sum<A>(S, [xr, m](auto at) {
    const auto d = at(xr) - m;
    return d * d;
  });
}

// The training statistics (mean, biased variance) of the channels [c0, c0 + channels) of x, in
// one pass over their values; `first` and `second` hold max(channels·S, N·channels) values.
//   Short rows (S ≤ kShortRow): Welford's update over the samples n = 0..N-1 gives every
// position's mean and sum of squared deviations (N values each, no E[x²] − E[x]² cancellation;
// the positions j = c·S + s of the block lie side by side in every sample); each channel then
// combines its S positions by Chan's formula in the order s = 0..S-1.
//   Longer rows: row_moments of each row, combined per channel over n = 0..N-1 by Chan's formula.
// A channel's results depend on its values only, not on the blocking or the thread.
template <class T, class A = acc_t<T>>
void block_statistics(const T* x, BatchNormShape shape, int64_t c0, int64_t channels, const A* weights,
                      RowScratch<T>& buf, A* first, A* second, A* mean, A* var) {
  const auto [N, C, S] = shape;
  if (S <= kShortRow) {
    const int64_t J = channels * S;
    const T* xc = x + c0 * S;
    int64_t j = 0;
    if constexpr (kVectorWidening<T>) {
      constexpr int64_t L = kLanes<A>, R = kWelfordVectors;
      for (; j + R * L <= J; j += R * L) welford_in_registers<R>(xc + j, C * S, N, weights, first + j, second + j);
      for (; j + L <= J; j += L) welford_in_registers<1>(xc + j, C * S, N, weights, first + j, second + j);
    }
    welford_one_by_one(xc + j, C * S, N, weights, J - j, first + j, second + j);
    combine_channels(first, second, S, 1, channels, S, N, mean + c0, var + c0);
  } else {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < channels; ++c) {
        row_moments(x + (n * C + c0 + c) * S, S, buf, first + n * channels + c, second + n * channels + c);
      }
    }
    combine_channels(first, second, 1, channels, channels, N, S, mean + c0, var + c0);
  }
}

// y = (x − μ)·a + β[n, c] with a = rstd·γ[n, c] for the rows (n, c) of channels [c0, c1).
template <class T, class A = acc_t<T>>
void write_rows(const T* x, AffineView weight, AffineView bias, const A* mean, const A* rstd, BatchNormShape shape,
                int64_t n, int64_t c0, int64_t c1, bool streaming, T* y) {
  const auto [N, C, S] = shape;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t r = n * C + c;
    const A a = rstd[c] * param_at<T>(weight, n, c, A(1));
    write_row<false>(x + r * S, x + r * S, mean[c], A(0), a, param_at<T>(bias, n, c, A(0)), S, y + r * S, streaming);
  }
}

// Bytes of x a thread keeps in its cache for the second pass in training: within the L2 of
// every AVX2 and AVX-512 core (Zen 3: 512 KiB); 1 MiB was 20 % slower in float32 on this Xeon.
constexpr int64_t kReuseBytes = int64_t(1) << 18;

template <class T>
void forward(const T* x, AffineView weight, AffineView bias, acc_t<T>* mean, acc_t<T>* var, bool training,
             BatchNormShape shape, double eps, T* y) {
  using A = acc_t<T>;
  const auto [N, C, S] = shape;
  const bool streaming = N * C * S * int64_t(sizeof(T)) >= kStreamingBytes;
  const bool parallel = N * C * S > kParallelThreshold;
  const A epsilon = static_cast<A>(eps);
  std::vector<A> rstd(C);
  std::vector<A> weights(training ? N : 0);
  for (int64_t n = 0; n < int64_t(weights.size()); ++n) weights[n] = A(1) / static_cast<A>(n + 1);
  // Training with channels enough for every thread: each thread takes a contiguous range of
  // channels, in blocks of at most kReuseBytes of x; a block's output is written right after its
  // statistics, while its values are still in the cache (one read of x from memory, not two).
  if (training && C >= 2 * int64_t(parallel ? omp_get_max_threads() : 1)) {
    const int64_t block = std::clamp<int64_t>(kReuseBytes / (N * S * int64_t(sizeof(T))), 1, C);
#pragma omp parallel if (parallel)
    {
      const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
      const int64_t first = C * thread / threads, last = C * (thread + 1) / threads;
      RowScratch<T> buf(S);
      std::vector<A> moments_a(block * std::max(S, N)), moments_b(moments_a.size());
      for (int64_t c0 = first; c0 < last; c0 += block) {
        const int64_t c1 = std::min(last, c0 + block);
        block_statistics(x, shape, c0, c1 - c0, weights.data(), buf, moments_a.data(), moments_b.data(), mean, var);
        for (int64_t c = c0; c < c1; ++c) rstd[c] = A(1) / std::sqrt(var[c] + epsilon);
        for (int64_t n = 0; n < N; ++n) write_rows(x, weight, bias, mean, rstd.data(), shape, n, c0, c1, streaming, y);
      }
      if (streaming) finish_streaming();
    }
    return;
  }
  // Otherwise the statistics first (short rows a channel per thread, longer ones a row per
  // thread, combined after), then the rows: the same operations, so the same bits.
  if (training && S <= kShortRow) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t c = 0; c < C; ++c) {
      RowScratch<T> buf(S);
      std::vector<A> moments_a(S), moments_b(S);
      block_statistics(x, shape, c, 1, weights.data(), buf, moments_a.data(), moments_b.data(), mean, var);
    }
  } else if (training) {
    std::vector<A> row_mean(N * C), row_m2(N * C);
    for_each_row<T>(shape, [&](int64_t r, int64_t, int64_t, RowScratch<T>& buf) {
      row_moments(x + r * S, S, buf, &row_mean[r], &row_m2[r]);
    });
    combine_channels(row_mean.data(), row_m2.data(), 1, C, C, N, S, mean, var);
  }
  for (int64_t c = 0; c < C; ++c) rstd[c] = A(1) / std::sqrt(var[c] + epsilon);
  for_each_row<T>(shape, [=, rstd = rstd.data()](int64_t, int64_t n, int64_t c, RowScratch<T>&) {
    write_rows(x, weight, bias, mean, rstd, shape, n, c, c + 1, streaming, y);
  });
  if (streaming) finish_streaming();
}

// What the backward needs besides its inputs: the per-sample or shared ∂γ, ∂β (null where not
// wanted) and, per channel, rstd and grad_x's coefficients (shift, slope: zero out of training).
template <class T>
struct BackwardOutputs {
  T *grad_weight, *grad_bias;
  bool weight_per_sample, bias_per_sample;
  acc_t<T>*rstd, *shift, *slope;
};

// Σg and Σg·x̂ of row r of channel c (the per-sample ∂β and ∂γ).
template <class T, class A = acc_t<T>>
void row_gradient_sums(const T* grad_out, const T* x, const A* mean, const A* rstd, int64_t r, int64_t c, int64_t S,
                       RowScratch<T>& buf, A* sum_g, A* sum_gx) {
  const auto* xr = summable(x + r * S, S, buf.x);
  const auto* g = summable(grad_out + r * S, S, buf.g);
  const A mu = mean[c];
  *sum_g = row_sum<A>(S, [g](auto at) { return at(g); });
  *sum_gx = row_sum<A>(S, [g, xr, mu](auto at) { return at(g) * (at(xr) - mu); }) * rstd[c];
}

// Channel c's row sums (sample n's at sum_g[n·stride], sum_gx[n·stride]) summed over n =
// 0..N-1: the shared ∂γ, ∂β and the means of g' = γ·g and g'·x̂ for grad_x (or, per sample, the
// sums themselves as ∂γ, ∂β).
template <class T, class A = acc_t<T>>
void channel_gradients(const A* sum_g, const A* sum_gx, int64_t stride, int64_t c, AffineView weight, bool training,
                       BatchNormShape shape, const BackwardOutputs<T>& out) {
  const auto [N, C, S] = shape;
  A total_g = 0, total_gx = 0, total_gw = 0, total_gwx = 0;
  for (int64_t n = 0; n < N; ++n) {
    const A g = sum_g[n * stride], gx = sum_gx[n * stride];
    if (out.grad_bias && out.bias_per_sample) out.grad_bias[n * C + c] = from_acc<T>(g);
    if (out.grad_weight && out.weight_per_sample) out.grad_weight[n * C + c] = from_acc<T>(gx);
    const A w = param_at<T>(weight, n, c, A(1));
    total_g += g, total_gx += gx, total_gw += w * g, total_gwx += w * gx;
  }
  if (out.grad_bias && !out.bias_per_sample) out.grad_bias[c] = from_acc<T>(total_g);
  if (out.grad_weight && !out.weight_per_sample) out.grad_weight[c] = from_acc<T>(total_gx);
  if (training) {  // grad_x = a·g − rstd·mean(g') − (x − μ)·rstd²·mean(g'·x̂)
    const A inv_count = A(1) / static_cast<A>(N * S), rstd = out.rstd[c];
    out.shift[c] = -rstd * total_gw * inv_count;
    out.slope[c] = -rstd * rstd * total_gwx * inv_count;
  }
}

// grad_x of row r of channel c, sample n.
template <class T, class A = acc_t<T>>
void write_gradient_row(const T* grad_out, const T* x, AffineView weight, const A* mean, const BackwardOutputs<T>& out,
                        int64_t r, int64_t n, int64_t c, int64_t S, bool streaming, T* grad_x) {
  const A a = out.rstd[c] * param_at<T>(weight, n, c, A(1));
  write_row<true>(grad_out + r * S, x + r * S, mean[c], a, out.slope[c], out.shift[c], S, grad_x + r * S, streaming);
}

template <class T>
void backward(const T* grad_out, const T* x, AffineView weight, const acc_t<T>* mean, const acc_t<T>* var,
              bool training, BatchNormShape shape, double eps, T* grad_x, T* grad_weight, bool weight_per_sample,
              T* grad_bias, bool bias_per_sample) {
  using A = acc_t<T>;
  const auto [N, C, S] = shape;
  std::vector<A> rstd(C), shift(C, A(0)), slope(C, A(0));
  for (int64_t c = 0; c < C; ++c) rstd[c] = A(1) / std::sqrt(var[c] + static_cast<A>(eps));
  const BackwardOutputs<T> out{grad_weight, grad_bias,    weight_per_sample, bias_per_sample,
                               rstd.data(), shift.data(), slope.data()};
  const bool sums = training || grad_weight || grad_bias;
  const bool streaming = N * C * S * int64_t(sizeof(T)) >= kStreamingBytes;
  const bool parallel = N * C * S > kParallelThreshold;
  // With channels enough for every thread: blocks of channels as in the forward (at most
  // kReuseBytes of x and of grad_out each), grad_x written right after the block's sums.
  if (C >= 2 * int64_t(parallel ? omp_get_max_threads() : 1)) {
    const int64_t block = std::clamp<int64_t>(kReuseBytes / (N * S * int64_t(sizeof(T))), 1, C);
#pragma omp parallel if (parallel)
    {
      const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
      const int64_t first = C * thread / threads, last = C * (thread + 1) / threads;
      RowScratch<T> buf(S);
      std::vector<A> sum_g(sums ? N * block : 0), sum_gx(sum_g.size());
      for (int64_t c0 = first; c0 < last; c0 += block) {
        const int64_t c1 = std::min(last, c0 + block), channels = c1 - c0;
        if (sums) {
          for (int64_t n = 0; n < N; ++n) {
            for (int64_t c = c0; c < c1; ++c) {
              const int64_t k = n * channels + c - c0;
              row_gradient_sums(grad_out, x, mean, out.rstd, n * C + c, c, S, buf, &sum_g[k], &sum_gx[k]);
            }
          }
          for (int64_t c = c0; c < c1; ++c) {
            channel_gradients(&sum_g[c - c0], &sum_gx[c - c0], channels, c, weight, training, shape, out);
          }
        }
        if (!grad_x) continue;
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t c = c0; c < c1; ++c) {
            write_gradient_row(grad_out, x, weight, mean, out, n * C + c, n, c, S, streaming, grad_x);
          }
        }
      }
      if (streaming) finish_streaming();
    }
    return;
  }
  // Otherwise a row per thread, the channels' sums after: the same operations, so the same bits.
  if (sums) {
    std::vector<A> sum_g(N * C), sum_gx(N * C);
    for_each_row<T>(shape, [&](int64_t r, int64_t, int64_t c, RowScratch<T>& buf) {
      row_gradient_sums(grad_out, x, mean, out.rstd, r, c, S, buf, &sum_g[r], &sum_gx[r]);
    });
    for (int64_t c = 0; c < C; ++c) channel_gradients(&sum_g[c], &sum_gx[c], C, c, weight, training, shape, out);
  }
  if (!grad_x) return;
  for_each_row<T>(shape, [=](int64_t r, int64_t n, int64_t c, RowScratch<T>&) {
    write_gradient_row(grad_out, x, weight, mean, out, r, n, c, S, streaming, grad_x);
  });
  if (streaming) finish_streaming();
}

// The running update of kexue/batch_norm.h, in the statistics' type A. The reference rounds
// every tensor op on its own, so no product here may be fused into the sum after it: this
// function is compiled without floating-point contraction.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <class R, class A>
void update_running_stats(const RunningStatsUpdate& u) {
  auto* running_mean = static_cast<R*>(u.running_mean);
  auto* running_var = static_cast<R*>(u.running_var);
  const auto* mean = static_cast<const A*>(u.mean);
  const auto* var = static_cast<const A*>(u.var);
  const A unbias = static_cast<A>(static_cast<double>(u.count) / static_cast<double>(u.count - 1));
  const A take = static_cast<A>(u.momentum), keep = static_cast<A>(1.0 - u.momentum);
  for (int64_t c = 0; c < u.C; ++c) {
    R& rm = running_mean[c * u.running_mean_stride];
    R& rv = running_var[c * u.running_var_stride];
    const A new_mean = take * mean[c * u.mean_stride] + keep * static_cast<A>(to_float(rm));
    const A unbiased = var[c * u.var_stride] * unbias;
    const A new_var = take * unbiased + keep * static_cast<A>(to_float(rv));
    rm = from_acc<R>(static_cast<acc_t<R>>(new_mean));
    rv = from_acc<R>(static_cast<acc_t<R>>(new_var));
  }
}
#pragma GCC pop_options

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

void batch_norm_update_stats_cpu(const RunningStatsUpdate& update) {
  dispatch_float_types(update.running_dtype, "batch_norm_update_stats_", [&](auto running_tag) {
    using R = decltype(running_tag);
    if (update.stats_dtype == DType::Float64) {
      update_running_stats<R, double>(update);
    } else if (update.stats_dtype == DType::Float32) {
      update_running_stats<R, float>(update);
    } else {
      throw std::invalid_argument("batch_norm_update_stats_: the statistics must be float32 or float64, got " +
                                  dtype_name(update.stats_dtype));
    }
  });
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
