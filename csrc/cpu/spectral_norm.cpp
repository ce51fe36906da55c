// Batched spectral-norm power iteration on the CPU (docs/spectral_norm.md). For each matrix W (m × n) with
// vectors u (m) and v (n), each round is
//     u ← normalize(W v)      (m dot products of W's rows with v)
//     v ← normalize(Wᵀ u)     (t = Σ_r u_r·W[r, :], accumulated row by row: W is read in order)
// with normalize(a) = a / max(‖a‖, eps), then σ = uᵀWv — after a round, t·v = ‖t‖²/max(‖t‖, eps)
// without a third pass over W. Both products of a round come from one pass (power_iterate).
// The matrices of a list are shared among the OpenMP threads (one matrix per task, largest first); each matrix is handled by one thread in a fixed order, so
// the results do not depend on the thread count. 16-bit weights are widened row by row.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kexue/cpu_reduce.h"
#include "kexue/cpu_types.h"
#include "kexue/spectral_norm.h"

namespace kexue {
namespace KEXUE_CPU_NS {  // this ISA level's copy (kexue/cpu_dispatch.h)
namespace {

// Row r of W as accumulator values (converted into `buf` for 16-bit weights).
template <class T, class A>
const A* weight_row(const T* W, int64_t r, int64_t n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return W + r * n;
  } else {
    widen_row(W + r * n, n, buf);
    return buf;
  }
}

template <class A>
A norm(const A* a, int64_t n) {
  return std::sqrt(row_sum<A>(n, [a](auto at) { return at(a) * at(a); }));
}

// a ← a / denom. A division, not a product with 1/denom: that reciprocal overflows for an eps
// below float32's smallest normal number (0 · inf is NaN for a zero weight).
template <class A>
void divide(A* a, int64_t n, A denom) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) a[k] /= denom;
}

// u ← W v (unnormalised).
template <class T, class A>
void mat_vec(const T* W, int64_t m, int64_t n, const A* v, A* u, A* buf) {
  for (int64_t r = 0; r < m; ++r) {
    const A* row = weight_row<T, A>(W, r, n, buf);
    u[r] = row_sum<A>(n, [row, v](auto at) { return at(row) * at(v); });
  }
}

// t ← Wᵀ u (unnormalised).
template <class T, class A>
void mat_t_vec(const T* W, int64_t m, int64_t n, const A* u, A* t, A* buf) {
  std::fill(t, t + n, A(0));
  for (int64_t r = 0; r < m; ++r) {
    const A* row = weight_row<T, A>(W, r, n, buf);
    const A ur = u[r];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) t[c] += ur * row[c];
  }
}

// One pass over W: u ← W v and t ← Wᵀ u (both unnormalised), row by row while the row is in cache.
template <class T, class A>
void mat_vec_and_back(const T* W, int64_t m, int64_t n, const A* v, A* u, A* t, A* buf) {
  std::fill(t, t + n, A(0));
  for (int64_t r = 0; r < m; ++r) {
    const A* row = weight_row<T, A>(W, r, n, buf);
    const A ur = u[r] = row_sum<A>(n, [row, v](auto at) { return at(row) * at(v); });
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) t[c] += ur * row[c];
  }
}

// Each round reads W once: Wᵀ normalize(W v) = Wᵀ(W v) / max(‖W v‖, eps), so t is accumulated from
// the unnormalised u in the same pass that computes it, then divided. Wᵀ W v is of the order of
// ‖W v‖², so for tiny weights (or norms that eps clamps) it underflows where the two-pass order's
// Wᵀu does not: then, and only then, the round takes the second pass, t ← Wᵀ u
// (tests/test_spectral_norm.py's eps and tiny-weight cases need it).
template <class T, class A>
A power_iterate(const T* W, int64_t m, int64_t n, A* u, A* v, int64_t n_iters, A eps) {
  if (m == 0 || n == 0) return A(0);
  thread_local std::vector<A> scratch;  // buf (16-bit weights' rows), t, W v (n_iters == 0)
  scratch.resize(2 * n + m);
  A *buf = scratch.data(), *t = buf + n;
  if (n_iters == 0) {  // σ = uᵀ(W v) directly
    A* Wv = t + n;
    mat_vec<T, A>(W, m, n, v, Wv, buf);
    return row_sum<A>(m, [u, Wv](auto at) { return at(u) * at(Wv); });
  }
  const A smallest_safe = std::sqrt(std::numeric_limits<A>::min());
  A t_norm = 0;
  for (int64_t it = 0; it < n_iters; ++it) {
    mat_vec_and_back<T, A>(W, m, n, v, u, t, buf);
    const A u_denom = std::max(norm(u, m), eps);
    divide(u, m, u_denom);
    const A raw_norm = norm(t, n);
    if (std::isfinite(raw_norm) && raw_norm >= smallest_safe)
      divide(t, n, u_denom);
    else  // out of range (or ‖t‖ itself underflowed): the two-pass order
      mat_t_vec<T, A>(W, m, n, u, t, buf);
    t_norm = norm(t, n);
    const A t_denom = std::max(t_norm, eps);
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) v[c] = t[c] / t_denom;  // divided, as in divide()
  }
  return t_norm * t_norm / std::max(t_norm, eps);  // t·v with v = t / max(‖t‖, eps)
}

// The table's slots and sizes (docs in kexue/spectral_norm.h).
constexpr int kWeight = 0, kU = 1, kV = 2, kRows = 0, kCols = 1;

int64_t elements(const TensorTable& mats, int64_t i) { return mats.size(i, kRows) * mats.size(i, kCols); }

using MatrixFn = void (*)(const TensorTable&, int64_t i, int64_t n_iters, double eps, void* sigmas);

template <class T, class A>
void run_matrix(const TensorTable& mats, int64_t i, int64_t n_iters, double eps, void* sigmas) {
  static_cast<A*>(sigmas)[i] = power_iterate<T, A>(static_cast<const T*>(mats.pointer(i, kWeight)), mats.size(i, kRows),
                                                   mats.size(i, kCols), static_cast<A*>(mats.pointer(i, kU)),
                                                   static_cast<A*>(mats.pointer(i, kV)), n_iters, static_cast<A>(eps));
}

MatrixFn kernel_for(DType vec_dtype, DType w, int64_t index) {
  if (vec_dtype == DType::Float64 && w == DType::Float64) return run_matrix<double, double>;
  if (vec_dtype == DType::Float32) {
    if (w == DType::Float32) return run_matrix<float, float>;
    if (w == DType::Float16) return run_matrix<Float16, float>;
    if (w == DType::BFloat16) return run_matrix<BFloat16, float>;
  }
  fail("spectral_norm: weight dtype code " + std::to_string(static_cast<int>(w)) + " at index " +
       std::to_string(index) + " does not go with vector dtype code " + std::to_string(static_cast<int>(vec_dtype)));
}

void run_all(DType vec_dtype, const TensorTable& mats, int64_t n_iters, double eps, void* sigmas) {
  mats.expect_layout(3, 2, "spectral_norm");
  std::vector<MatrixFn> kernels(mats.n);
  for (int64_t i = 0; i < mats.n; ++i) {
    kernels[i] = kernel_for(vec_dtype, mats.dtype(i, kWeight), i);
    if (mats.dtype(i, kU) != vec_dtype || mats.dtype(i, kV) != vec_dtype)
      fail("spectral_norm: u / v at index " + std::to_string(i) + " are not of the vector dtype code " +
           std::to_string(static_cast<int>(vec_dtype)));
  }
  // Largest matrices first, handed out one at a time, so that the threads stay balanced.
  std::vector<int64_t> order(mats.n);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return elements(mats, a) > elements(mats, b); });
  int64_t total = 0;
  for (int64_t i = 0; i < mats.n; ++i) total += elements(mats, i);
#pragma omp parallel for schedule(dynamic, 1) if (mats.n > 1 && total > (1 << 15))
  for (int64_t k = 0; k < mats.n; ++k) kernels[order[k]](mats, order[k], n_iters, eps, sigmas);
}

}  // namespace

void spectral_norm_power_iter_cpu(DType vec_dtype, const TensorTable& mats, int64_t n_iters, double eps, void* sigmas) {
  if (n_iters < 0) fail("spectral_norm_power_iter: n_iters must be >= 0");
  run_all(vec_dtype, mats, n_iters, eps, sigmas);
}

void spectral_sigma_cpu(DType vec_dtype, const TensorTable& mats, void* sigmas) {
  run_all(vec_dtype, mats, 0, 0.0, sigmas);
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
