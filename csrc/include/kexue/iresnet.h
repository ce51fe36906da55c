// i-ResNet inversion of an MLP residual block (docs/iresnet.md; the math is in
// kexue_fast/reference/iresnet.py). Torch-free.
//
// The branch g(x) = W_L a(… a(W_1 x + b_1) …) + b_L is a kexue::TensorTable `layers` of L ≥ 1
// entries with slots (weight, bias) and sizes (rows, cols) = (out_k, in_k): weight_k is rows × cols,
// row-major and contiguous, bias_k has rows elements; in_1 = out_L = D and in_{k+1} = out_k, every
// width ≥ 1 (the Python side checks the chain; the launchers check the layout and dtypes). Every
// tensor — y, x, the weights and biases, grad_x and a — has the dtype `dtype` (Float32 or Float64)
// and every row of y/x/grad_x/a is D contiguous elements (row stride D).
//
// iresnet_inverse: for each of the B rows, x₀ = y, x_{k+1} = y − g(x_k), until
//     ‖x_{k+1} − x_k‖_∞ ≤ atol + rtol·‖x_{k+1}‖_∞     (x = x_{k+1}, n_iter = k + 1)
// or x_{k+1} holds a NaN/inf (x = x_{k+1}, n_iter = max_iter: "not converged", stopped at once)
// or k + 1 = max_iter (x = x_{max_iter}, n_iter = max_iter). max_iter = 0: x = y, n_iter = 0.
// Each row stops on its own; rows never influence each other. n_iter is int32 [B].
//
// iresnet_adjoint: the linear fixed point of the implicit-function backward,
//     a₀ = grad_x,  a_{k+1} = grad_x − J_g(x)ᵀ a_k,   J_g(x)ᵀ v = W_1ᵀ(d_1 ⊙ W_2ᵀ(d_2 ⊙ … W_Lᵀ v)),
// with the same stopping rule, per row. `adjoint_layers` has slots (weight, deriv) and sizes
// (rows, cols): the same weights, and deriv_k = a'(h_k) at the solution (B × out_k, contiguous)
// for k < L — the derivative of the activation after layer k; the last entry's deriv pointer is
// null (no activation follows layer L). n_iter (int32 [B]) may be null. (CUDA; the CPU has the
// whole backward below.)
//
// iresnet_inverse_backward: the whole implicit-function backward at the solution x (B × D) for the
// upstream gradient grad_x, for `layers` (slots (weight, bias)): the branch at x (h_k, a'(h_k)), the
// adjoint fixed point above, written to a (B × D, the gradient in y), and for the weight gradients
// that the caller computes as one product per layer (∂W_k = E_kᵀ A_k, ∂b_k = Σ_rows E_k), to
// `workspace`: E_1 … E_L (B × out_k each), δ_L = −a and δ_k = (W_{k+1}ᵀ δ_{k+1}) ⊙ a'(h_k), then
// A_2 … A_L (B × in_k each), the layers' inputs a(h_{k−1}) (A_1 is x itself).
//
// iresnet_logdet: g(x) and the power series of ln det(I + J_g(x)) per row (the math:
// kexue_fast/iresnet/mlp_logdet.py): for `layers` (slots (weight, bias)), x (B × D), probes
// (S × B × D, S ≥ 1) and the terms' weights c_1 … c_T (T float64 values on the host, finite: checked,
// and within float32's range for Float32), writes gx (B × D) and
//     logdet[b] = (1/S) Σ_s Σ_{k=1}^{T} c_k (−1)^{k+1} v_sᵀ J^k v_s / k,
// computing no term after the last nonzero c_k. If `saved` is not null it receives, for the
// backward, one after the other: h_l (B × out_l) for each hidden layer l < L, the Neumann vectors
// n_s = Σ_k c_k (−1)^{k+1} (Jᵀ)^{k−1} v_s (S × B × D), and for each hidden layer the sums
// μⁿ_l (S × B × out_l) of the products' intermediates μ_l = W_{l+1}ᵀ λ_{l+1} with the same weights.
//
// iresnet_logdet_backward: for upstream gradients grad_gx (B × D) and grad_logdet (B) at what
// iresnet_logdet kept (`saved`), for the C = n_rows rows first_row … first_row + C − 1 (a chunk of
// the B: the caller bounds the workspace so), writes those rows of grad_x (B × D) and, for the
// weight gradients that the caller computes as one product per layer, `workspace`: for each layer
// l = 1 … L in turn, E_l ((1 + S)·C × out_l) then A_l ((1 + S)·C × in_l), so that the chunk's part
// of ∂W_l is E_lᵀ A_l and of ∂b_l the sum of the first C rows of E_l. E_l's first C rows are e_l
// (the gradient at the layer's output), the next S·C the probes' ℓ·λⁿ_l (ℓ = grad_logdet / S;
// λⁿ_L = n); A_l's first C rows are the layer's input a_{l−1} (a_0 = x), the next S·C the probes'
// q_{l−1} (q_0 = v). The math: kexue_fast/ops/iresnet_logdet.py.
//
// Activation codes (kexue_fast/ops/iresnet.py maps names onto them):
//   Elu = 0 (alpha 1), Relu = 1, Tanh = 2, Softplus = 3 (beta 1, threshold 20: h above 20 passes
//   through), LipSwish = 4 (h·sigmoid(h)/1.1).
// Bad codes, dtypes or table layouts throw std::invalid_argument before anything is written.
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>

#include "kexue/common.h"
#include "kexue/cpu_dispatch.h"
#include "kexue/tensor_table.h"

namespace kexue {

enum class Activation : int { Elu = 0, Relu = 1, Tanh = 2, Softplus = 3, LipSwish = 4 };

// Throws std::invalid_argument (naming `what`) unless `code` is one of the activations.
inline void check_activation(Activation code, const char* what) {
  if (static_cast<int>(code) < 0 || static_cast<int>(code) > static_cast<int>(Activation::LipSwish))
    fail(std::string(what) + ": unknown activation code " + std::to_string(static_cast<int>(code)));
}

// Calls f(std::integral_constant<Activation, A>{}) for the activation A = `code`, so that f can
// instantiate a kernel for it (nothing for a code check_activation refuses).
template <class F>
void with_activation(Activation code, const F& f) {
  switch (code) {
    case Activation::Elu: return f(std::integral_constant<Activation, Activation::Elu>{});
    case Activation::Relu: return f(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::Tanh: return f(std::integral_constant<Activation, Activation::Tanh>{});
    case Activation::Softplus: return f(std::integral_constant<Activation, Activation::Softplus>{});
    case Activation::LipSwish: return f(std::integral_constant<Activation, Activation::LipSwish>{});
  }
}

// When a row's iteration stops (the rule above).
struct FixedPointStop {
  int64_t max_iter = 100;
  double atol = 1e-6;
  double rtol = 1e-6;
};

// CPU entry points, one per ISA level (call KEXUE_CPU_KERNEL(name), kexue/cpu_dispatch.h).
KEXUE_PER_CPU_ISA(void iresnet_inverse_cpu(DType dtype, const TensorTable& layers, Activation activation, const void* y,
                                           int64_t B, FixedPointStop stop, void* x, int32_t* n_iter);
                  void iresnet_inverse_backward_cpu(DType dtype, const TensorTable& layers, Activation activation,
                                                    const void* x, const void* grad_x, int64_t B, FixedPointStop stop,
                                                    void* a, void* workspace);
                  void iresnet_logdet_cpu(DType dtype, const TensorTable& layers, Activation activation, const void* x,
                                          int64_t B, const void* probes, int64_t S, const double* coefficients,
                                          int64_t T, void* gx, void* logdet, void* saved);
                  void iresnet_logdet_backward_cpu(DType dtype, const TensorTable& layers, Activation activation,
                                                   const void* x, int64_t B, int64_t first_row, int64_t n_rows,
                                                   const void* probes, int64_t S, const void* grad_gx,
                                                   const void* grad_logdet, const void* saved, void* grad_x,
                                                   void* workspace);)  // KEXUE_PER_CPU_ISA

#ifdef KEXUE_WITH_CUDA
// Same on the device (pointers are device pointers, the tables live on the host), enqueued on
// `stream` (a cudaStream_t) with no host synchronisation (CUDA-graph capturable). `scratch` is
// device memory of at least iresnet_scratch_elems_cuda(layers, B) elements of `dtype`,
// `scratch_elems` its size (a smaller one throws before anything is launched); the caller
// allocates it (the policy: kexue/cuda_common.cuh).
int64_t iresnet_scratch_elems_cuda(const TensorTable& layers, int64_t B);
void iresnet_inverse_cuda(DType dtype, const TensorTable& layers, Activation activation, const void* y, int64_t B,
                          FixedPointStop stop, void* x, int32_t* n_iter, void* scratch, int64_t scratch_elems,
                          void* stream);
void iresnet_adjoint_cuda(DType dtype, const TensorTable& adjoint_layers, const void* grad_x, int64_t B,
                          FixedPointStop stop, void* a, int32_t* n_iter, void* scratch, int64_t scratch_elems,
                          void* stream);
#endif

}  // namespace kexue
