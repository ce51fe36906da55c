// The log-determinant's power series of an MLP branch on the CPU, with g(x) (kexue/iresnet.h; the
// math: kexue_fast/iresnet/mlp_logdet.py).
//
// How it computes. The rows are cut into blocks (kexue/cpu_mlp.h); each OpenMP thread takes a
// block at a time and runs everything for it: the branch's forward (keeping a'(h) of every hidden
// layer in the block's workspace), then for each probe the whole series — n_terms vector–Jacobian
// products w ← Jᵀ w, each layer a product with the packed W and an epilogue that multiplies by
// a'(h) and adds the layer's output into the Neumann sums — and the dot with the probe. Nothing
// but the results (and, for the backward, h, n and the sums) leaves the block's cache-resident
// workspace. The products are the micro-kernels of kexue/cpu_mlp.h; the weights are packed once
// per call, both ways (Wᵀ for the forward, W for the products with Jᵀ), shared by the threads.
//
// Determinism: each row's arithmetic is the same whatever block it is in: results do not depend
// on the thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kexue/cpu_activations.h"
#include "kexue/cpu_mlp.h"
#include "kexue/iresnet.h"
#include "kexue/simd.h"

namespace kexue {
namespace KEXUE_CPU_NS {  // this ISA level's copy (kexue/cpu_dispatch.h)
namespace {

// Where the results for the backward go (`saved`, kexue/iresnet.h), or all null.
template <class P>  // T* or const T*
struct SavedLayout {
  std::vector<P> hidden, sums;  // per hidden layer: h (B × out), the Neumann sums μⁿ (S × B × out)
  P neumann = nullptr;          // n (S × B × D)

  SavedLayout(P saved, const std::vector<int64_t>& outs, int64_t B, int64_t S, int64_t D)
      : hidden(outs.size(), nullptr), sums(outs.size(), nullptr) {
    if (saved == nullptr) return;
    for (size_t l = 0; l < outs.size(); ++l) {
      hidden[l] = saved;
      saved += B * outs[l];
    }
    neumann = saved;
    saved += S * B * D;
    for (size_t l = 0; l < outs.size(); ++l) {
      sums[l] = saved;
      saved += S * B * outs[l];
    }
  }
};

template <class T, Activation A>
void series(const TensorTable& table, const T* x, int64_t B, const T* probes, int64_t S,
            const std::vector<T>& signed_weights, T* gx, T* logdet, T* saved) {
  using V = Vec<T>;
  const PackedBranch<T> forward(table, /*forward=*/true), adjoint(table, /*forward=*/false);
  const int64_t L = table.n, D = table.size(0, kCols), Dp = padded<T>(D);
  const int64_t width = std::max({forward.max_width, adjoint.max_width, Dp});
  std::vector<int64_t> outs(L - 1), strides(L - 1);
  for (int64_t l = 0; l + 1 < L; ++l) {
    outs[l] = table.size(l, kRows);
    strides[l] = padded<T>(outs[l]);
  }
  const SavedLayout<T*> layout(saved, outs, B, S, D);
  for_each_block(B, [&](int64_t first, int64_t rows) {
    std::vector<T> probe(rows * Dp, T(0)), w(rows * Dp), next(rows * Dp), neumann(rows * Dp), terms(rows * Dp);
    std::vector<T> buffers[2] = {std::vector<T>(rows * width), std::vector<T>(rows * width)};
    std::vector<std::vector<T>> slopes(L - 1), hidden(L - 1), sums(L - 1);
    for (int64_t l = 0; l + 1 < L; ++l) {
      slopes[l].resize(rows * strides[l]);
      hidden[l].resize(rows * strides[l]);
      sums[l].resize(rows * strides[l]);
    }
    // The branch: h_l = W_l a_{l−1} + b_l (kept), a'(h_l) (kept), a_l; then g(x).
    copy_rows(x + first * D, D, rows, D, probe.data(), Dp);
    const T* in = probe.data();
    int64_t ld_in = Dp;
    for (int64_t l = 0; l + 1 < L; ++l) {
      T *slope = slopes[l].data(), *h_out = hidden[l].data();
      const int64_t stride = strides[l];
      product(in, ld_in, rows, forward.layers[l], buffers[l % 2].data(), width, [=](V h, int64_t r, int64_t c) {
        V d;
        const V a = activate_with_derivatives<A, T>(h, d);
        store(h_out + r * stride + c, h);
        store(slope + r * stride + c, d);
        return a;
      });
      in = buffers[l % 2].data();
      ld_in = width;
      if (layout.hidden[l] != nullptr)
        copy_rows(h_out, stride, rows, outs[l], layout.hidden[l] + first * outs[l], outs[l]);
    }
    product(in, ld_in, rows, forward.layers[L - 1], next.data(), Dp, [](V v, int64_t, int64_t) { return v; });
    copy_rows(next.data(), Dp, rows, D, gx + first * D, D);

    std::fill(logdet + first, logdet + first + rows, T(0));
    for (int64_t s = 0; s < S; ++s) {
      copy_rows(probes + (s * B + first) * D, D, rows, D, probe.data(), Dp);
      w = probe;
      std::fill(neumann.begin(), neumann.end(), T(0));
      std::fill(terms.begin(), terms.end(), T(0));
      for (auto& sum : sums) std::fill(sum.begin(), sum.end(), T(0));
      for (size_t k = 0; k < signed_weights.size(); ++k) {  // w ← Jᵀ w, with the sums
        const T weight = signed_weights[k], term_weight = weight / static_cast<T>(k + 1);
        for (int64_t i = 0; i < rows * Dp; ++i) neumann[i] += weight * w[i];
        in = w.data();
        ld_in = Dp;
        for (int64_t l = L - 1; l > 0; --l) {  // μ = λ·W_{l+1} (0-based layer l); Σ += weight·μ; λ = μ ⊙ a'(h_l)
          T* sum = sums[l - 1].data();
          const T* slope = slopes[l - 1].data();
          const int64_t stride = strides[l - 1];
          product(in, ld_in, rows, adjoint.layers[l], buffers[l % 2].data(), width, [=](V mu, int64_t r, int64_t c) {
            const int64_t i = r * stride + c;  // every load before the store: no reload of the captures after it
            const V lambda = mu * load<V>(slope + i);
            store(sum + i, load<V>(sum + i) + weight * mu);
            return lambda;
          });
          in = buffers[l % 2].data();
          ld_in = width;
        }
        T* term_sums = terms.data();
        product(in, ld_in, rows, adjoint.layers[0], next.data(), Dp, [=](V v, int64_t r, int64_t c) {
          T* at = term_sums + r * Dp + c;
          store(at, load<V>(at) + term_weight * v);
          return v;
        });
        std::swap(w, next);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T value = 0;
        for (int64_t d = 0; d < D; ++d) value += terms[r * Dp + d] * probe[r * Dp + d];
        logdet[first + r] += value / static_cast<T>(S);
      }
      if (layout.neumann != nullptr) {
        copy_rows(neumann.data(), Dp, rows, D, layout.neumann + (s * B + first) * D, D);
        for (int64_t l = 0; l + 1 < L; ++l)
          copy_rows(sums[l].data(), strides[l], rows, outs[l], layout.sums[l] + (s * B + first) * outs[l], outs[l]);
      }
    }
  });
}

// The backward (kexue_fast/ops/iresnet_logdet.py): block by block, the activations, a'(h) and
// a''(h) from the kept h; for each probe the right chain p_l = W_l q_{l−1}, q_l = a'(h_l) ⊙ p_l
// (q_0 = v) and the sum Σ_s μⁿ ⊙ p; then e_L = ḡ, e_l = (W_{l+1}ᵀ e_{l+1}) ⊙ a'(h_l) + ℓ a''(h_l) ⊙ Σ_s μⁿ ⊙ p,
// ∂x = W_1ᵀ e_1, for the rows first_row … first_row + n_rows − 1 of the B. What the weight gradients
// of those rows need goes to `workspace`, layer by layer (kexue/iresnet.h).
template <class T, Activation A>
void series_backward(const TensorTable& table, const T* x, int64_t B, int64_t first_row, int64_t n_rows,
                     const T* probes, int64_t S, const T* grad_gx, const T* grad_logdet, const T* saved, T* grad_x,
                     T* workspace) {
  using V = Vec<T>;
  const PackedBranch<T> forward(table, /*forward=*/true), adjoint(table, /*forward=*/false);
  const int64_t L = table.n, D = table.size(0, kCols), Dp = padded<T>(D);
  const int64_t width = std::max({forward.max_width, adjoint.max_width, Dp});
  std::vector<PackedLayer<T>> linear(forward.layers);  // the right chain's products have no bias
  for (auto& layer : linear) layer.bias = nullptr;
  std::vector<int64_t> outs(L - 1), strides(L - 1);
  for (int64_t l = 0; l + 1 < L; ++l) {
    outs[l] = table.size(l, kRows);
    strides[l] = padded<T>(outs[l]);
  }
  const SavedLayout<const T*> layout(saved, outs, B, S, D);
  // Layer l's part of the workspace: E_l ((1 + S)·n_rows × out_l) then A_l ((1 + S)·n_rows × in_l),
  // the chunk's rows at `local` = row − first_row.
  std::vector<T*> E(L), Ain(L);
  for (int64_t l = 0; l < L; ++l) {
    E[l] = workspace;
    workspace += (1 + S) * n_rows * table.size(l, kRows);
    Ain[l] = workspace;
    workspace += (1 + S) * n_rows * table.size(l, kCols);
  }
  for_each_block(n_rows, [&](int64_t local, int64_t rows) {
    const int64_t first = first_row + local;
    std::vector<T> q(rows * width, T(0)), next(rows * width), e(rows * width), mu(rows * width);
    std::vector<T> scale(rows);
    for (int64_t r = 0; r < rows; ++r) scale[r] = grad_logdet[first + r] / static_cast<T>(S);
    std::vector<std::vector<T>> slopes(L - 1), curvatures(L - 1), injected(L - 1);
    for (int64_t l = 0; l + 1 < L; ++l) {  // a_l (to A_{l+1}), a'(h_l), a''(h_l)
      const int64_t stride = strides[l];
      std::vector<T> h(rows * stride, T(0)), act(rows * stride);
      slopes[l].resize(rows * stride);
      curvatures[l].resize(rows * stride);
      injected[l].assign(rows * stride, T(0));
      copy_rows(layout.hidden[l] + first * outs[l], outs[l], rows, outs[l], h.data(), stride);
      for (int64_t i = 0; i < rows * stride; i += kLanes<T>) {
        V d, d2;
        store(&act[i], activate_with_derivatives<A, T>(load<V>(&h[i]), d, &d2));
        store(&slopes[l][i], d);
        store(&curvatures[l][i], d2);
      }
      copy_rows(act.data(), stride, rows, outs[l], Ain[l + 1] + local * outs[l], outs[l]);
    }
    copy_rows(x + first * D, D, rows, D, Ain[0] + local * D, D);
    for (int64_t s = 0; s < S; ++s) {  // the right chain of probe s
      const int64_t at = (1 + s) * n_rows + local;
      copy_rows(probes + (s * B + first) * D, D, rows, D, q.data(), Dp);
      copy_rows(q.data(), Dp, rows, D, Ain[0] + at * D, D);
      int64_t ld = Dp;
      for (int64_t l = 0; l + 1 < L; ++l) {
        const int64_t stride = strides[l];
        copy_rows(layout.sums[l] + (s * B + first) * outs[l], outs[l], rows, outs[l], mu.data(), stride);
        T *sum = injected[l].data(), *left = mu.data();
        const T *mus = mu.data(), *slope = slopes[l].data(), *ell = scale.data();
        product(q.data(), ld, rows, linear[l], next.data(), stride, [=](V p, int64_t r, int64_t c) {
          const int64_t i = r * stride + c;
          const V q = p * load<V>(slope + i);
          store(sum + i, load<V>(sum + i) + load<V>(mus + i) * p);
          return q;
        });
        for (int64_t r = 0; r < rows; ++r)  // ℓ λⁿ_l = ℓ a'(h_l) ⊙ μⁿ_l, in place
          for (int64_t c = 0; c < stride; c += kLanes<T>)
            store(left + r * stride + c, ell[r] * load<V>(left + r * stride + c) * load<V>(slope + r * stride + c));
        copy_rows(left, stride, rows, outs[l], E[l] + at * outs[l], outs[l]);
        copy_rows(next.data(), stride, rows, outs[l], Ain[l + 1] + at * outs[l], outs[l]);
        std::swap(q, next);
        ld = stride;
      }
      copy_rows(layout.neumann + (s * B + first) * D, D, rows, D, mu.data(), Dp);  // ℓ n, the last layer's left
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < D; ++d) mu[r * Dp + d] *= scale[r];
      copy_rows(mu.data(), Dp, rows, D, E[L - 1] + at * D, D);
    }
    copy_rows(grad_gx + first * D, D, rows, D, e.data(), Dp);
    copy_rows(grad_gx + first * D, D, rows, D, E[L - 1] + local * D, D);
    int64_t ld = Dp;
    for (int64_t l = L - 2; l >= 0; --l) {  // e_l from e_{l+1}
      const int64_t stride = strides[l];
      const T *slope = slopes[l].data(), *curvature = curvatures[l].data(), *sum = injected[l].data();
      const T* ell = scale.data();
      product(e.data(), ld, rows, adjoint.layers[l + 1], next.data(), stride, [=](V eps, int64_t r, int64_t c) {
        const int64_t i = r * stride + c;
        return eps * load<V>(slope + i) + ell[r] * load<V>(curvature + i) * load<V>(sum + i);
      });
      copy_rows(next.data(), stride, rows, outs[l], E[l] + local * outs[l], outs[l]);
      std::swap(e, next);
      ld = stride;
    }
    product(e.data(), ld, rows, adjoint.layers[0], next.data(), Dp, [](V v, int64_t, int64_t) { return v; });
    copy_rows(next.data(), Dp, rows, D, grad_x + first * D, D);
  });
}

void check_arguments(DType dtype, const TensorTable& layers, Activation activation, int64_t B, int64_t S,
                     const char* what) {
  check_branch_table(dtype, layers, what);
  check_activation(activation, what);
  if (B < 0 || S < 1) fail(std::string(what) + ": B must be >= 0 and S >= 1");
}

}  // namespace

void iresnet_logdet_backward_cpu(DType dtype, const TensorTable& layers, Activation activation, const void* x,
                                 int64_t B, int64_t first_row, int64_t n_rows, const void* probes, int64_t S,
                                 const void* grad_gx, const void* grad_logdet, const void* saved, void* grad_x,
                                 void* workspace) {
  check_arguments(dtype, layers, activation, B, S, "iresnet_mlp_logdet_backward");
  if (first_row < 0 || n_rows < 0 || first_row + n_rows > B)
    fail("iresnet_mlp_logdet_backward: the rows [first_row, first_row + n_rows) must lie in [0, B)");
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    with_activation(activation, [&](auto code) {
      series_backward<T, code()>(layers, static_cast<const T*>(x), B, first_row, n_rows, static_cast<const T*>(probes),
                                 S, static_cast<const T*>(grad_gx), static_cast<const T*>(grad_logdet),
                                 static_cast<const T*>(saved), static_cast<T*>(grad_x), static_cast<T*>(workspace));
    });
  };
  dtype == DType::Float64 ? run(double{}) : run(float{});
}

void iresnet_logdet_cpu(DType dtype, const TensorTable& layers, Activation activation, const void* x, int64_t B,
                        const void* probes, int64_t S, const double* coefficients, int64_t T, void* gx, void* logdet,
                        void* saved) {
  check_arguments(dtype, layers, activation, B, S, "iresnet_mlp_logdet");
  // The terms after the last nonzero weight add nothing: they are not computed.
  if (T < 0) fail("iresnet_mlp_logdet: the number of coefficients must be >= 0");
  const double largest = dtype == DType::Float32 ? std::numeric_limits<float>::max() : INFINITY;
  for (int64_t k = 0; k < T; ++k)
    if (!(std::abs(coefficients[k]) <= largest))  // NaN fails too
      fail("iresnet_mlp_logdet: coefficients[" + std::to_string(k) + "] must be a finite number" +
           (dtype == DType::Float32 ? " that fits in float32" : "") + ", got " + std::to_string(coefficients[k]));
  int64_t n_terms = T;
  while (n_terms > 0 && coefficients[n_terms - 1] == 0) --n_terms;
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<T> signed_weights(n_terms);  // c_{k+1} (−1)^k
    for (int64_t k = 0; k < n_terms; ++k)
      signed_weights[k] = static_cast<T>(k % 2 ? -coefficients[k] : coefficients[k]);
    with_activation(activation, [&](auto code) {
      series<T, code()>(layers, static_cast<const T*>(x), B, static_cast<const T*>(probes), S, signed_weights,
                        static_cast<T*>(gx), static_cast<T*>(logdet), static_cast<T*>(saved));
    });
  };
  dtype == DType::Float64 ? run(double{}) : run(float{});
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
