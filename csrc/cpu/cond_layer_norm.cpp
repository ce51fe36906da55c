// Conditional LayerNorm / RMSNorm on the CPU (docs/cond_layer_norm.md).
//
// For each row x (length D) with its gain row w and bias row b:
//   LayerNorm: mu = mean(x), var = mean((x - mu)^2) (two passes), rstd = 1/sqrt(var + eps),
//              xhat = (x - mu) * rstd
//   RMSNorm:   rstd = 1/sqrt(mean(x^2) + eps), xhat = x * rstd
//   y = xhat * w + b
// Backward, with g = dL/dy and g' = g * w (nothing is saved by the forward: mu and rstd are
// recomputed from the row, which is in L1 anyway):
//   dx = rstd * (g' - mean(g') - xhat * mean(g' * xhat))     (RMS: without the mean(g') term)
//   dw[group] = sum over the group's rows of g * xhat,  db[group] = sum of g
// The weight/bias reduction is deterministic and independent of the thread count: each
// reduction block (see ReductionPlan) writes its own partial row, partials are summed in order.
//
// Parallelism: OpenMP over rows (forward) or reduction blocks (backward); inner loops are plain
// `omp simd` loops over D that the compiler vectorises for the target's widest float vectors.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kexue/cond_layer_norm.h"
#include "kexue/cpu_reduce.h"
#include "kexue/cpu_types.h"

namespace kexue {
namespace KEXUE_CPU_NS {  // this ISA level's copy (kexue/cpu_dispatch.h)
namespace {

// Per-thread row buffers: accumulator copies of 16-bit inputs and a constant row standing in for
// an absent weight (1) or bias (0).
template <class T>
struct RowScratch {
  using A = acc_t<T>;
  std::vector<A> x, g, w, b, ones, zeros, gw;
  const T* w_converted = nullptr;  // source of the row now in `w` (see affine_row)
  const T* b_converted = nullptr;
  explicit RowScratch(int64_t D) : ones(D, A(1)), zeros(D, A(0)), gw(D) {
    if constexpr (!std::is_same_v<T, A>) x.resize(D), g.resize(D), w.resize(D), b.resize(D);
  }
};

// The parameter row (gain or bias) that row `r` uses, as accumulator values; `absent` if none.
// 16-bit rows are converted into `buf` only when they change (a (B, D) row serves many rows).
template <class T>
const acc_t<T>* affine_row(const AffineView& view, int64_t r, int64_t rows_per_sample, int64_t D,
                           std::vector<acc_t<T>>& buf, const T*& converted, const acc_t<T>* absent) {
  if (!view.ptr) return absent;
  const int64_t b = r / rows_per_sample, m = r % rows_per_sample;
  const T* src = static_cast<const T*>(view.ptr) + b * view.stride_b + m * view.stride_m;
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return src;
  } else {
    if (src != converted) widen_row(src, D, buf.data()), converted = src;
    return buf.data();
  }
}

// A row of x as the row functions read it: as it is where this level widens T in registers
// (kVectorWidening<T>), else converted to accumulator values in `buf` (one more pass).
template <class T>
const auto* row_as_read(const T* row, int64_t D, std::vector<acc_t<T>>& buf) {
  if constexpr (kVectorWidening<T>) {
    return row;
  } else {
    return as_acc(row, D, buf.data());
  }
}

// Returns (mu, rstd) of one row; mu is 0 in RMS mode. x holds accumulator values, or values of a
// T that this level widens in registers (row_sum reads them as they are).
template <class A, class X>
std::pair<A, A> row_stats(const X* x, int64_t D, A eps, bool rms) {
  const A mu = rms ? A(0) : row_sum<A>(D, [x](auto at) { return at(x); }) / static_cast<A>(D);
  const A sq = row_sum<A>(D, [x, mu](auto at) {
    const auto c = at(x) - mu;
    return c * c;
  });
  return {mu, A(1) / std::sqrt(sq / static_cast<A>(D) + eps)};
}

// y[d] = (x[d] − μ)·rstd·w[d] + b[d] for d < D, rounded to T and stored a vector at a time, with
// non-temporal stores when `streaming` and the row is aligned to the stored vector's size.
// x as in row_stats.
template <class T, class A, class X>
void write_affine_row(const X* x, A mu, A rstd, const A* w, const A* b, int64_t D, T* y, bool streaming) {
  constexpr int64_t L = kLanes<A>;
  const bool stream = streaming && reinterpret_cast<uintptr_t>(y) % (L * sizeof(T)) == 0;
  int64_t d = 0;
  for (; d + L <= D; d += L)
    store_vector(y + d, (load_widened(x + d) - mu) * rstd * load<Vec<A>>(w + d) + load<Vec<A>>(b + d), stream);
  for (; d < D; ++d) y[d] = from_acc<T>((static_cast<A>(to_float(x[d])) - mu) * rstd * w[d] + b[d]);
}

template <class T>
void forward(const T* x, AffineView weight, AffineView bias, T* y, int64_t rows, int64_t rows_per_sample, int64_t D,
             double eps, bool rms) {
  using A = acc_t<T>;
  const bool streaming = rows * D * int64_t(sizeof(T)) >= kStreamingBytes;
#pragma omp parallel if (rows * D > kParallelThreshold)
  {
    RowScratch<T> buf(D);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const A* w = affine_row<T>(weight, r, rows_per_sample, D, buf.w, buf.w_converted, buf.ones.data());
      const A* b = affine_row<T>(bias, r, rows_per_sample, D, buf.b, buf.b_converted, buf.zeros.data());
      const auto* xr = row_as_read(x + r * D, D, buf.x);
      const auto [mu, rstd] = row_stats<A>(xr, D, static_cast<A>(eps), rms);
      write_affine_row(xr, mu, rstd, w, b, D, y + r * D, streaming);
    }
    if (streaming) finish_streaming();
  }
}

// grad_x[d] = rstd·(g'[d] − c_g − x̂[d]·c_x) with x̂[d] = (x[d] − μ)·rstd, rounded to T and stored
// like write_affine_row; with kParams also acc_w[d] += g[d]·x̂[d] and acc_b[d] += g[d]. x as in row_stats.
template <bool kParams, class T, class A, class X>
void write_grad_row(const X* x, const A* g, const A* gw, A mu, A rstd, A c_g, A c_x, int64_t D, T* grad_x, A* acc_w,
                    A* acc_b, bool streaming) {
  using V = Vec<A>;
  constexpr int64_t L = kLanes<A>;
  const bool stream = streaming && reinterpret_cast<uintptr_t>(grad_x) % (L * sizeof(T)) == 0;
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    const V xhat = (load_widened(x + d) - mu) * rstd;
    store_vector(grad_x + d, rstd * (load<V>(gw + d) - c_g - xhat * c_x), stream);
    if constexpr (kParams) {
      const V gd = load<V>(g + d);
      store(acc_w + d, load<V>(acc_w + d) + gd * xhat);
      store(acc_b + d, load<V>(acc_b + d) + gd);
    }
  }
  for (; d < D; ++d) {
    const A xhat = (static_cast<A>(to_float(x[d])) - mu) * rstd;
    grad_x[d] = from_acc<T>(rstd * (gw[d] - c_g - xhat * c_x));
    if constexpr (kParams) acc_w[d] += g[d] * xhat, acc_b[d] += g[d];
  }
}

template <class T>
void backward(const T* grad_out, const T* x, AffineView weight, T* grad_x, T* grad_weight, T* grad_bias, int64_t rows,
              int64_t rows_per_sample, int64_t D, double eps, bool rms, ReductionPlan plan) {
  using A = acc_t<T>;
  const bool want_params = grad_weight || grad_bias;
  const bool streaming = grad_x && rows * D * int64_t(sizeof(T)) >= kStreamingBytes;
  const int64_t n_groups = rows / plan.group_rows;
  const int64_t blocks_per_group = (plan.group_rows + plan.rows_per_block - 1) / plan.rows_per_block;
  const int64_t n_blocks = n_groups * blocks_per_group;
  // Partial sums per block: [n_blocks, D] for the weight, then the same for the bias.
  std::vector<A> partial(want_params && blocks_per_group > 1 ? 2 * n_blocks * D : 0);
  const A inv_D = A(1) / static_cast<A>(D);
  // Rounds a group's finished sums into grad_weight / grad_bias.
  auto write_group = [&](const std::vector<A>& sum_w, const std::vector<A>& sum_b, int64_t group) {
    if (grad_weight) narrow_row(sum_w.data(), D, grad_weight + group * D);
    if (grad_bias) narrow_row(sum_b.data(), D, grad_bias + group * D);
  };

#pragma omp parallel if (rows * D > kParallelThreshold)
  {
    RowScratch<T> buf(D);
    std::vector<A> acc_w(D), acc_b(D);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < n_blocks; ++k) {
      const int64_t group = k / blocks_per_group;
      const int64_t r0 = group * plan.group_rows + (k % blocks_per_group) * plan.rows_per_block;
      const int64_t r1 = std::min(r0 + plan.rows_per_block, (group + 1) * plan.group_rows);
      std::fill(acc_w.begin(), acc_w.end(), A(0));
      std::fill(acc_b.begin(), acc_b.end(), A(0));
      for (int64_t r = r0; r < r1; ++r) {
        const A* g = as_acc(grad_out + r * D, D, buf.g.data());
        const auto* xr = row_as_read(x + r * D, D, buf.x);
        const auto [mu, rstd] = row_stats<A>(xr, D, static_cast<A>(eps), rms);
        if (grad_x) {
          const A* w = affine_row<T>(weight, r, rows_per_sample, D, buf.w, buf.w_converted, buf.ones.data());
          // g' = g·w, rounded once into a buffer: recomputing it below could be contracted
          // into an FMA and then differ from the g' inside mean(g') (D = 1 would not give 0).
          A* gw = buf.gw.data();
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) gw[d] = g[d] * w[d];
          const A sum_g = rms ? A(0) : row_sum<A>(D, [gw](auto at) { return at(gw); });
          const A sum_gxc = row_sum<A>(D, [gw, xr, mu](auto at) { return at(gw) * (at(xr) - mu); });
          const A c_g = sum_g * inv_D;           // mean(g'), 0 for RMS
          const A c_x = sum_gxc * rstd * inv_D;  // mean(g'·x̂)
          // with want_params, grad_x and the parameter sums in one pass
          using X = std::remove_cv_t<std::remove_pointer_t<decltype(xr)>>;
          const auto write_row = want_params ? write_grad_row<true, T, A, X> : write_grad_row<false, T, A, X>;
          write_row(xr, g, gw, mu, rstd, c_g, c_x, D, grad_x + r * D, acc_w.data(), acc_b.data(), streaming);
        } else if (want_params) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            acc_w[d] += g[d] * (static_cast<A>(to_float(xr[d])) - mu) * rstd;
            acc_b[d] += g[d];
          }
        }
      }
      if (!want_params) continue;
      if (blocks_per_group == 1) {  // the block is the whole group: write the result directly
        write_group(acc_w, acc_b, group);
      } else {
        std::copy(acc_w.begin(), acc_w.end(), partial.begin() + k * D);
        std::copy(acc_b.begin(), acc_b.end(), partial.begin() + (n_blocks + k) * D);
      }
    }
    if (streaming) finish_streaming();
    if (want_params && blocks_per_group > 1) {
      // Second stage: add each group's partials in block order (implicit barrier above).
#pragma omp for schedule(static)
      for (int64_t group = 0; group < n_groups; ++group) {
        const A* pw = partial.data() + group * blocks_per_group * D;
        const A* pb = pw + n_blocks * D;
        std::fill(acc_w.begin(), acc_w.end(), A(0));
        std::fill(acc_b.begin(), acc_b.end(), A(0));
        for (int64_t j = 0; j < blocks_per_group; ++j) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            acc_w[d] += pw[j * D + d];
            acc_b[d] += pb[j * D + d];
          }
        }
        write_group(acc_w, acc_b, group);
      }
    }
  }
}

void check_plan(int64_t rows, ReductionPlan plan) {
  if (plan.group_rows < 1 || plan.rows_per_block < 1 || rows % plan.group_rows != 0)
    fail("cond_layer_norm backward: invalid reduction plan (group_rows must divide rows)");
}

}  // namespace

void cond_layer_norm_forward_cpu(DType dtype, const void* x, AffineView weight, AffineView bias, void* y, int64_t rows,
                                 int64_t rows_per_sample, int64_t D, double eps, bool rms) {
  if (rows == 0 || D == 0) return;
  dispatch_float_types(dtype, "cond_layer_norm", [&](auto tag) {
    using T = decltype(tag);
    forward<T>(static_cast<const T*>(x), weight, bias, static_cast<T*>(y), rows, rows_per_sample, D, eps, rms);
  });
}

void cond_layer_norm_backward_cpu(DType dtype, const void* grad_out, const void* x, AffineView weight, void* grad_x,
                                  void* grad_weight, void* grad_bias, int64_t rows, int64_t rows_per_sample, int64_t D,
                                  double eps, bool rms, ReductionPlan plan) {
  if (rows == 0 || D == 0) return;
  check_plan(rows, plan);
  dispatch_float_types(dtype, "cond_layer_norm_backward", [&](auto tag) {
    using T = decltype(tag);
    backward<T>(static_cast<const T*>(grad_out), static_cast<const T*>(x), weight, static_cast<T*>(grad_x),
                static_cast<T*>(grad_weight), static_cast<T*>(grad_bias), rows, rows_per_sample, D, eps, rms, plan);
  });
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
