// i-ResNet inversion of an MLP branch on the CPU (kexue/iresnet.h; the math:
// kexue_fast/reference/iresnet.py).
//
// How it computes. The rows are cut into blocks of up to kBlockRows rows; each OpenMP thread
// takes a block at a time and runs its whole solve: the block's iterates and activations stay in
// the thread's cache-resident workspace from the first iteration to the last, and a row that has
// stopped leaves the block at once (the rows still running are moved down, so the products only
// ever see active rows). The weights are packed once per call, before the threads start, into
// the layout the product reads (below) and shared read-only by all threads; they stay in L2.
//
// The products (a block's active rows times a layer) are the register-blocked FMA micro-kernels
// of kexue/cpu_mlp.h, with the bias, the activation (or, in the adjoint, the product with a'(h))
// applied to each tile before it leaves the registers; not a BLAS call. Why not a BLAS: the
// products are small (a block × a layer) and follow each other with elementwise work and a
// per-row test in between; handing each to a BLAS would write every
// activation to memory and back (the batch-wide eager loop's cost) and cost a call per layer per
// iteration per block. DESIGN.md (project root), "i-ResNet inversion on the CPU", has the measurements.
//
// Determinism: each row's arithmetic is the same whatever block or tile position it is in, so
// results do not depend on the thread count or on which rows converge together.
#include <omp.h>

#include <algorithm>
#include <cmath>
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

// The per-row stopping test on new = y − g(x) (or ḡ − Jᵀa): returns the row's state.
enum class RowState { Running, Converged, NonFinite };

template <class T>
RowState row_state(const T* fresh, const T* previous, int64_t D, T atol, T rtol) {
  using V = Vec<T>;
  constexpr int L = kLanes<T>;
  V change{}, size{}, bad{};
  const auto accumulate = [&](V f, V p) {
    const V diff = f - p;
    change = diff > change ? diff : change;
    change = -diff > change ? -diff : change;
    size = f > size ? f : size;
    size = -f > size ? -f : size;
    bad += f - f;  // 0 for finite values, NaN for NaN and ±inf
  };
  int64_t d = 0;
  for (; d + L <= D; d += L) accumulate(load<V>(fresh + d), load<V>(previous + d));
  if (d < D) {  // the padding lanes of the last vector take no part
    const auto valid = lane_constants<V, L>([](size_t k) { return T(k); }) < T(D - d);
    accumulate(valid ? load<V>(fresh + d) : V{}, valid ? load<V>(previous + d) : V{});
  }
  const T poison = lane_sum<T>(bad);
  if (poison != poison) return RowState::NonFinite;
  return lane_max<T>(change) <= atol + rtol * lane_max<T>(size) ? RowState::Converged : RowState::Running;
}

// The rows of one block: their global indices and their state, compacted as rows leave.
template <class T>
struct Block {
  int64_t D, Dp, n_active;
  std::vector<int64_t> index;
  std::vector<T> target, iterate;  // y (or ḡ) and the current x (or a), n_active × Dp each

  Block(int64_t first, int64_t rows, int64_t D, const T* source)
      : D(D), Dp(padded<T>(D)), n_active(rows), index(rows), target(rows * Dp, T(0)), iterate(rows * Dp) {
    for (int64_t r = 0; r < rows; ++r) {
      index[r] = first + r;
      std::memcpy(&target[r * Dp], source + (first + r) * D, D * sizeof(T));
    }
    iterate = target;
  }

  void finish(int64_t r, const T* value, T* result, int32_t* n_iter, int64_t iterations) const {
    std::memcpy(result + index[r] * D, value, D * sizeof(T));
    if (n_iter != nullptr) n_iter[index[r]] = static_cast<int32_t>(iterations);
  }
};

// One iteration's bookkeeping for a block: `fresh` holds the new iterates of the active rows
// (stride Dp); rows that stop are written out, the others move down. `also` are more per-row
// buffers (with their strides) that move with the rows.
template <class T>
void settle(Block<T>& block, const T* fresh, int64_t iteration, const FixedPointStop& stop, T* result, int32_t* n_iter,
            std::vector<std::pair<T*, int64_t>>& also) {
  const int64_t Dp = block.Dp;
  int64_t kept = 0;
  for (int64_t r = 0; r < block.n_active; ++r) {
    const T* f = fresh + r * Dp;
    const RowState state =
        row_state(f, &block.iterate[r * Dp], block.D, static_cast<T>(stop.atol), static_cast<T>(stop.rtol));
    if (state != RowState::Running) {
      block.finish(r, f, result, n_iter, state == RowState::Converged ? iteration + 1 : stop.max_iter);
      continue;
    }
    std::memcpy(&block.iterate[kept * Dp], f, Dp * sizeof(T));
    if (kept != r) {
      std::memcpy(&block.target[kept * Dp], &block.target[r * Dp], Dp * sizeof(T));
      block.index[kept] = block.index[r];
      for (auto& [buffer, stride] : also) std::memcpy(buffer + kept * stride, buffer + r * stride, stride * sizeof(T));
    }
    ++kept;
  }
  block.n_active = kept;
}

template <class T>
void finish_running(const Block<T>& block, const FixedPointStop& stop, T* result, int32_t* n_iter) {
  for (int64_t r = 0; r < block.n_active; ++r)
    block.finish(r, &block.iterate[r * block.Dp], result, n_iter, stop.max_iter);
}

// Runs one block's fixed point to the end: `apply(block, hidden, fresh)` writes fresh = target −
// (the branch, or Jᵀ, applied to the block's active iterates), row stride Dp, using the two
// `hidden` buffers (rows × max_width) for the layers between; `moving` are the per-row buffers
// that move with the rows (settle).
template <class T, class Pass>
void iterate_block(Block<T>& block, const FixedPointStop& stop, T* result, int32_t* n_iter, int64_t max_width,
                   std::vector<std::pair<T*, int64_t>>& moving, const Pass& apply) {
  const int64_t rows = block.n_active;
  std::vector<T> hidden[2] = {std::vector<T>(rows * max_width), std::vector<T>(rows * max_width)};
  std::vector<T> fresh(rows * block.Dp);
  for (int64_t it = 0; it < stop.max_iter && block.n_active > 0; ++it) {
    apply(block, hidden, fresh.data());
    settle(block, fresh.data(), it, stop, result, n_iter, moving);
  }
  finish_running(block, stop, result, n_iter);
}

// fresh = epilogue(in · layer) for the last product of a pass: target − it, row by row.
template <class T>
auto minus_from(const Block<T>& block) {
  return [target = block.target.data(), Dp = block.Dp](Vec<T> v, int64_t r, int64_t c) {
    return load<Vec<T>>(target + r * Dp + c) - v;
  };
}

template <class T, Activation A>
void solve_inverse(const TensorTable& table, const T* y, int64_t B, FixedPointStop stop, T* x, int32_t* n_iter) {
  const PackedBranch<T> branch(table, /*forward=*/true);
  const int64_t L = table.n, D = table.size(0, kCols), width = branch.max_width;
  const auto activation = [](Vec<T> h, int64_t, int64_t) { return activate<A, T>(h); };
  const auto pass = [&](const Block<T>& block, std::vector<T>(&hidden)[2], T* fresh) {  // x_new = y − g(x)
    const T* in = block.iterate.data();
    int64_t ld_in = block.Dp;
    for (int64_t k = 0; k + 1 < L; ++k) {
      product(in, ld_in, block.n_active, branch.layers[k], hidden[k % 2].data(), width, activation);
      in = hidden[k % 2].data();
      ld_in = width;
    }
    product(in, ld_in, block.n_active, branch.layers[L - 1], fresh, block.Dp, minus_from(block));
  };
  for_each_block(B, [&](int64_t first, int64_t rows) {
    Block<T> block(first, rows, D, y);
    std::vector<std::pair<T*, int64_t>> moving;
    iterate_block(block, stop, x, n_iter, width, moving, pass);
  });
}

// The chain of Jᵀ for `rows` rows of v_L = `in` (row stride ld_in): v_{k−1} = (v_k · W_k) ⊙ a'(h_{k−1})
// for the 0-based layers k = L − 1 … 1, into hidden[k % 2] (row stride `width`), with
// derivs[k − 1] = a'(h_{k−1}) of the same rows (row stride padded(out_{k−1})); `visit(k − 1, v)`
// sees each. Returns v_0 (`in` itself when L = 1) and sets ld_in to its row stride.
template <class T, class Visit>
const T* transposed_chain(const PackedBranch<T>& adjoint, const std::vector<std::vector<T>>& derivs, const T* in,
                          int64_t& ld_in, int64_t rows, std::vector<T> (&hidden)[2], const Visit& visit) {
  const int64_t width = adjoint.max_width;
  for (int64_t k = static_cast<int64_t>(adjoint.layers.size()) - 1; k > 0; --k) {
    const T* deriv = derivs[k - 1].data();
    const int64_t stride = padded<T>(adjoint.layers[k].N);
    product(in, ld_in, rows, adjoint.layers[k], hidden[k % 2].data(), width,
            [deriv, stride](Vec<T> v, int64_t r, int64_t c) { return v * load<Vec<T>>(deriv + r * stride + c); });
    in = hidden[k % 2].data();
    ld_in = width;
    visit(k - 1, in);
  }
  return in;
}

// The whole backward (kexue/iresnet.h), block by block: the branch at x (a'(h_k) kept in the block,
// the layers' inputs to A_k), the adjoint fixed point a = ḡ − Jᵀa, then the chain of −a to E_k.
template <class T, Activation A>
void solve_backward(const TensorTable& table, const T* x, const T* grad_x, int64_t B, FixedPointStop stop, T* a,
                    T* workspace) {
  using V = Vec<T>;
  const PackedBranch<T> forward(table, /*forward=*/true), adjoint(table, /*forward=*/false);
  const int64_t L = table.n, D = table.size(0, kCols), Dp = padded<T>(D);
  const int64_t width = std::max({forward.max_width, adjoint.max_width, Dp});
  std::vector<T*> E(L), inputs(L, nullptr);  // E_k (B × out_k); inputs[k] = A_k (B × in_k), k ≥ 1
  for (int64_t k = 0; k < L; ++k) {
    E[k] = workspace;
    workspace += B * table.size(k, kRows);
  }
  for (int64_t k = 1; k < L; ++k) {
    inputs[k] = workspace;
    workspace += B * table.size(k, kCols);
  }
  for_each_block(B, [&](int64_t first, int64_t rows) {
    std::vector<T> hidden[2] = {std::vector<T>(rows * width), std::vector<T>(rows * width)};
    std::vector<T> start(rows * Dp, T(0));
    std::vector<std::vector<T>> derivs(L - 1);  // a'(h_k) of the block's rows, in their order
    copy_rows(x + first * D, D, rows, D, start.data(), Dp);
    const T* in = start.data();
    int64_t ld_in = Dp;
    for (int64_t k = 0; k + 1 < L; ++k) {  // the branch at x
      const int64_t out = table.size(k, kRows), stride = padded<T>(out);
      derivs[k].resize(rows * stride);
      T* deriv = derivs[k].data();
      product(in, ld_in, rows, forward.layers[k], hidden[k % 2].data(), width, [=](V h, int64_t r, int64_t c) {
        V slope;
        const V value = activate_with_derivatives<A, T>(h, slope);
        store(deriv + r * stride + c, slope);
        return value;
      });
      in = hidden[k % 2].data();
      ld_in = width;
      copy_rows(in, width, rows, out, inputs[k + 1] + first * out, out);
    }

    Block<T> block(first, rows, D, grad_x);  // the adjoint solve, on copies of derivs that move with the rows
    std::vector<std::vector<T>> moving_derivs(derivs);
    std::vector<std::pair<T*, int64_t>> moving;
    for (int64_t k = 0; k + 1 < L; ++k) moving.emplace_back(moving_derivs[k].data(), padded<T>(table.size(k, kRows)));
    iterate_block(block, stop, a, nullptr, width, moving, [&](const Block<T>& b, std::vector<T>(&h)[2], T* fresh) {
      int64_t ld = b.Dp;
      const T* v0 = transposed_chain(adjoint, moving_derivs, b.iterate.data(), ld, b.n_active, h, [](int64_t, auto) {});
      product(v0, ld, b.n_active, adjoint.layers[0], fresh, b.Dp, minus_from(b));
    });

    for (int64_t r = 0; r < rows; ++r)  // δ_L = −a, then δ_k = (δ_{k+1} W_{k+1}) ⊙ a'(h_k)
      for (int64_t d = 0; d < D; ++d) start[r * Dp + d] = -a[(first + r) * D + d];
    copy_rows(start.data(), Dp, rows, D, E[L - 1] + first * D, D);
    int64_t ld = Dp;
    transposed_chain(adjoint, derivs, start.data(), ld, rows, hidden, [&](int64_t k, const T* delta) {
      const int64_t out = table.size(k, kRows);
      copy_rows(delta, width, rows, out, E[k] + first * out, out);
    });
  });
}

// Copies `source` (B × D) to `result` and sets n_iter to 0 (max_iter = 0).
template <class T>
void no_iterations(const T* source, int64_t B, int64_t D, T* result, int32_t* n_iter) {
  std::memcpy(result, source, B * D * sizeof(T));
  if (n_iter != nullptr) std::fill(n_iter, n_iter + B, 0);
}

void check_stop(const FixedPointStop& stop, const char* what) {
  if (stop.max_iter < 0 || stop.max_iter > INT32_MAX) fail(std::string(what) + ": max_iter must be in [0, 2^31)");
  if (!(stop.atol >= 0) || !(stop.rtol >= 0)) fail(std::string(what) + ": atol and rtol must be >= 0");
}

}  // namespace

void iresnet_inverse_cpu(DType dtype, const TensorTable& layers, Activation activation, const void* y, int64_t B,
                         FixedPointStop stop, void* x, int32_t* n_iter) {
  check_branch_table(dtype, layers, "iresnet_inverse");
  check_stop(stop, "iresnet_inverse");
  check_activation(activation, "iresnet_inverse");
  if (B < 0) fail("iresnet_inverse: B must be >= 0");
  const int64_t D = layers.size(0, kCols);
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    if (stop.max_iter == 0) return no_iterations(static_cast<const T*>(y), B, D, static_cast<T*>(x), n_iter);
    with_activation(activation, [&](auto code) {
      solve_inverse<T, code()>(layers, static_cast<const T*>(y), B, stop, static_cast<T*>(x), n_iter);
    });
  };
  dtype == DType::Float64 ? run(double{}) : run(float{});
}

void iresnet_inverse_backward_cpu(DType dtype, const TensorTable& layers, Activation activation, const void* x,
                                  const void* grad_x, int64_t B, FixedPointStop stop, void* a, void* workspace) {
  check_branch_table(dtype, layers, "iresnet_inverse_backward");
  check_stop(stop, "iresnet_inverse_backward");
  check_activation(activation, "iresnet_inverse_backward");
  if (B < 0) fail("iresnet_inverse_backward: B must be >= 0");
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    with_activation(activation, [&](auto code) {
      solve_backward<T, code()>(layers, static_cast<const T*>(x), static_cast<const T*>(grad_x), B, stop,
                                static_cast<T*>(a), static_cast<T*>(workspace));
    });
  };
  dtype == DType::Float64 ? run(double{}) : run(float{});
}

}  // namespace KEXUE_CPU_NS
}  // namespace kexue
