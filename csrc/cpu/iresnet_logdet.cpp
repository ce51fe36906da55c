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
#include <cstring>
#include <string>
#include <vector>

#include "kexue/cpu_activations.h"
#include "kexue/cpu_mlp.h"
#include "kexue/iresnet.h"
#include "kexue/simd.h"

namespace kexue {
namespace KEXUE_CPU_NS {  // this ISA level's copy (kexue/cpu_dispatch.h)
namespace {

// Copies `rows` rows of `n` elements (row stride n) into a buffer of row stride `stride`, or back.
template <class T>
void copy_rows_in(const T* source, int64_t rows, int64_t n, T* block, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(block + r * stride, source + r * n, n * sizeof(T));
}
template <class T>
void copy_rows_out(const T* block, int64_t stride, int64_t rows, int64_t n, T* destination) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(destination + r * n, block + r * stride, n * sizeof(T));
}

// Where the results for the backward go (`saved`, kexue/iresnet.h), or all null.
template <class T>
struct SavedLayout {
  std::vector<T*> hidden, sums;  // per hidden layer: h (B × out), the Neumann sums μⁿ (S × B × out)
  T* neumann = nullptr;          // n (S × B × D)

  SavedLayout(T* saved, const std::vector<int64_t>& outs, int64_t B, int64_t S, int64_t D)
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
  const SavedLayout<T> layout(saved, outs, B, S, D);
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
    copy_rows_in(x + first * D, rows, D, probe.data(), Dp);
    const T* in = probe.data();
    int64_t ld_in = Dp;
    for (int64_t l = 0; l + 1 < L; ++l) {
      T *slope = slopes[l].data(), *h_out = hidden[l].data();
      const int64_t stride = strides[l];
      product(in, ld_in, rows, forward.layers[l], buffers[l % 2].data(), width, [=](V h, int64_t r, int64_t c) {
        store(h_out + r * stride + c, h);
        store(slope + r * stride + c, activation_slope<A, T>(h));
        return activate<A, T>(h);
      });
      in = buffers[l % 2].data();
      ld_in = width;
      if (layout.hidden[l] != nullptr) copy_rows_out(h_out, stride, rows, outs[l], layout.hidden[l] + first * outs[l]);
    }
    product(in, ld_in, rows, forward.layers[L - 1], next.data(), Dp, [](V v, int64_t, int64_t) { return v; });
    copy_rows_out(next.data(), Dp, rows, D, gx + first * D);

    std::fill(logdet + first, logdet + first + rows, T(0));
    for (int64_t s = 0; s < S; ++s) {
      copy_rows_in(probes + (s * B + first) * D, rows, D, probe.data(), Dp);
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
            T* at = sum + r * stride + c;
            store(at, load<V>(at) + weight * mu);
            return mu * load<V>(slope + r * stride + c);
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
        copy_rows_out(neumann.data(), Dp, rows, D, layout.neumann + (s * B + first) * D);
        for (int64_t l = 0; l + 1 < L; ++l)
          copy_rows_out(sums[l].data(), strides[l], rows, outs[l], layout.sums[l] + (s * B + first) * outs[l]);
      }
    }
  });
}

template <class T>
void series_typed(const TensorTable& table, Activation activation, const T* x, int64_t B, const T* probes, int64_t S,
                  const std::vector<T>& w, T* gx, T* logdet, T* saved) {
  switch (activation) {
    case Activation::Elu: return series<T, Activation::Elu>(table, x, B, probes, S, w, gx, logdet, saved);
    case Activation::Relu: return series<T, Activation::Relu>(table, x, B, probes, S, w, gx, logdet, saved);
    case Activation::Tanh: return series<T, Activation::Tanh>(table, x, B, probes, S, w, gx, logdet, saved);
    case Activation::Softplus: return series<T, Activation::Softplus>(table, x, B, probes, S, w, gx, logdet, saved);
    case Activation::LipSwish: return series<T, Activation::LipSwish>(table, x, B, probes, S, w, gx, logdet, saved);
  }
}

}  // namespace

void iresnet_logdet_cpu(DType dtype, const TensorTable& layers, Activation activation, const void* x, int64_t B,
                        const void* probes, int64_t S, const std::vector<double>& coefficients, void* gx, void* logdet,
                        void* saved) {
  check_branch_table(dtype, layers, "iresnet_mlp_logdet");
  if (static_cast<int>(activation) < 0 || static_cast<int>(activation) > static_cast<int>(Activation::LipSwish))
    fail("iresnet_mlp_logdet: unknown activation code " + std::to_string(static_cast<int>(activation)));
  if (B < 0 || S < 1) fail("iresnet_mlp_logdet: B must be >= 0 and S >= 1");
  // The terms after the last nonzero weight add nothing: they are not computed.
  size_t n_terms = coefficients.size();
  while (n_terms > 0 && coefficients[n_terms - 1] == 0) --n_terms;
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<T> signed_weights(n_terms);  // c_{k+1} (−1)^k
    for (size_t k = 0; k < n_terms; ++k) signed_weights[k] = static_cast<T>(k % 2 ? -coefficients[k] : coefficients[k]);
    series_typed(layers, activation, static_cast<const T*>(x), B, static_cast<const T*>(probes), S, signed_weights,
                 static_cast<T*>(gx), static_cast<T*>(logdet), static_cast<T*>(saved));
  };
  dtype == DType::Float64 ? run(double{}) : run(float{});
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
