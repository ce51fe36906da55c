r"""``kexue::iresnet_mlp_logdet`` — the log-determinant's fast path for an MLP branch: ``g(x)`` and
the whole power series from hand-derived Jacobian products, forward and backward, without
autograd's double backward (docs/iresnet_flow.md).

The estimator and its Neumann gradient are those of :func:`kexue_fast.reference.iresnet.power_series_logdet`
(``value = Σ_k c_k (−1)^{k+1} vᵀ J^k v / k``, gradient of ``nᵀ J v``). For the branch
``h_l = W_l a_{l−1} + b_l``, ``a_l = σ(h_l)`` (``a_0 = x``, ``l < L``), ``g = W_L a_{L−1} + b_L``, with
``D_l = σ'(h_l)`` cached once:

* **Forward.** A vector–Jacobian product ``Jᵀ w`` is ``μ_{L−1} = W_Lᵀ w``, then ``λ_l = D_l μ_l`` and
  ``μ_{l−1} = W_lᵀ λ_l``, down to ``Jᵀ w = W_1ᵀ λ_1``: ``L`` products per term. The series runs
  ``w_0 = v``, ``w_k = Jᵀ w_{k−1}``; since ``n = Σ_k c_k (−1)^{k+1} w_{k−1}`` and the product is linear,
  the intermediates of ``Jᵀ n`` are the same sums of the terms' intermediates: ``μ^n_l`` is
  accumulated on the way, at no product's cost.
* **Backward** of ``S = nᵀ J v`` (``n`` a constant) joined to the branch's own backward, for upstream
  ``ḡ`` (of ``g(x)``) and ``ℓ`` (of the log-det, per row): with the right chain of the probe
  ``p_1 = W_1 v``, ``q_l = D_l p_l``, ``p_{l+1} = W_{l+1} q_l`` (``q_0 = v``), and ``λ^n_l = D_l μ^n_l``,

      ∂S/∂W_L = n q_{L−1}ᵀ,   ∂S/∂W_l = λ^n_l q_{l−1}ᵀ,   ∂S/∂h_l = μ^n_l ⊙ p_l ⊙ σ''(h_l),

  so the backward is the branch's: ``e_L = ḡ``; ``e_l = (W_{l+1}ᵀ e_{l+1}) ⊙ D_l + ℓ·μ^n_l ⊙ p_l ⊙ σ''(h_l)``;
  ``∂W_l = e_lᵀ a_{l−1} + ℓ·λ^n_lᵀ q_{l−1}`` (``∂W_L`` with ``n`` for ``λ^n_L``), ``∂b_l = Σ_rows e_l``,
  ``∂x = W_1ᵀ e_1`` — ``2L − 1`` products more than the branch's own backward, whatever the number
  of terms. Several probes: each probe's terms, with ``ℓ / n_probes``.

Saved for the backward: ``x``, the ``h_l``, ``n`` and the ``μ^n_l`` — memory independent of the
number of terms.

How the backends compute. CPU: the forward is one native kernel (csrc/cpu/iresnet_logdet.cpp:
each block of rows runs the branch and the whole series in cache, terms after the last nonzero
weight skipped); the backward is the products above with torch (:func:`gradients`: the weight
gradients are batch reductions, which the BLAS does best). CUDA: no kernel of its own yet — the
op's forward is the same products with torch (:func:`_torch_forward`). Weights given as a tensor
(the roulette under ``torch.compile``) take :class:`_TorchMLPLogdet`, the torch products forward
and backward, every term computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kexue_fast import _checks, _native
from kexue_fast._library import define_op
from kexue_fast.ops import iresnet as iresnet_ops
from kexue_fast.reference.iresnet import ACTIVATIONS, activation_derivative, activation_second_derivative

OP = "iresnet_mlp_logdet"
SCHEMA = (
    "(Tensor x, Tensor[] weights, Tensor[] biases, str activation, Tensor probes, float[] coefficients, "
    "bool keep=True) -> (Tensor, Tensor, Tensor)"
)


def _activation(name: str, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ(h), σ'(h))``, equal to :mod:`kexue_fast.reference.iresnet`'s, by arithmetic alone for
    elu and tanh (no ``where`` or comparison: those are 10× slower than a multiply on the CPU)."""
    if name == "elu":
        slope = torch.exp(h.clamp(max=0))  # σ'(h) = exp(min(h, 0))
        return F.relu(h).add_(slope).sub_(1), slope
    if name == "tanh":
        a = torch.tanh(h)
        return a, 1 - a * a
    return ACTIVATIONS[name](h), activation_derivative(name, h)


def _second_derivative(name: str, h: torch.Tensor, a: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """``σ''(h)`` from ``h``, ``a = σ(h)`` and ``slope = σ'(h)`` (the same arithmetic-only forms)."""
    if name == "elu":
        return slope - h.sign().clamp_(min=0)  # exp(h) for h <= 0, else 0
    if name == "tanh":
        return -2 * a * slope
    return activation_second_derivative(name, h)


def _add_scaled_(total: torch.Tensor, t: torch.Tensor, weight) -> None:
    """``total += weight·t`` in one op for a number ``weight`` (a tensor one under torch.compile)."""
    if isinstance(weight, torch.Tensor):
        total.add_(t * weight)
    else:
        total.add_(t, alpha=weight)


def _torch_forward(activation, coefficients, x, probes, weights, biases):
    """``(g(x), logdet, hidden, neumann, mu_sums)`` by the forward products, with torch."""
    L = len(weights)
    hidden, derivs, a = [], [], x
    for w, b in zip(weights[:-1], biases[:-1]):
        h = torch.addmm(b, a, w.t())
        hidden.append(h)
        a, slope = _activation(activation, h)
        derivs.append(slope)
    gx = torch.addmm(biases[-1], a, weights[-1].t())
    w, neumann, terms = probes, torch.zeros_like(probes), torch.zeros_like(probes)  # terms: Σ c (−1)^{k+1} w_k / k
    mu_sums = [torch.zeros(probes.shape[:2] + (h.shape[1],), dtype=x.dtype, device=x.device) for h in hidden]
    for k, c in enumerate(coefficients):
        weight = c if k % 2 == 0 else -c  # c_{k+1} (−1)^k
        _add_scaled_(neumann, w, weight)
        for i in range(L - 1, 0, -1):  # μ_i = W_{i+1}ᵀ λ_{i+1} (λ_L = w), λ_i = D_i μ_i
            mu = w @ weights[i]
            _add_scaled_(mu_sums[i - 1], mu, weight)
            w = mu * derivs[i - 1]
        w = w @ weights[0]
        _add_scaled_(terms, w, weight / (k + 1))
    value = (terms * probes).sum(-1)
    return gx, value.mean(0), hidden, neumann, mu_sums


def gradients(activation, grad_gx, grad_logdet, x, probes, neumann, weights, hidden, mu_sums):
    """``(∂x, [∂W_l], [∂b_l])`` by the backward products of the module docstring, from what the
    forward kept: ``hidden`` (the ``h_l``), ``neumann`` (``n``) and ``mu_sums`` (the ``μ^n_l``)."""
    L = len(weights)
    inputs, derivs = [x], []  # a_0 … a_{L−1}; D_1 … D_{L−1}
    for h in hidden:
        a, slope = _activation(activation, h)
        inputs.append(a)
        derivs.append(slope)
    scale = (grad_logdet / probes.shape[0]).unsqueeze(-1)  # ℓ per probe, (B, 1)
    rights = [probes]  # q_0 = v, then q_l = D_l p_l
    products = []  # p_l
    for i in range(L - 1):
        products.append(rights[-1] @ weights[i].t())
        rights.append(products[-1] * derivs[i])
    left = neumann * scale  # ℓ·λ^n_L = ℓ·n
    e = grad_gx
    grad_weights, grad_biases = [None] * L, [None] * L
    for i in range(L - 1, -1, -1):  # layer i + 1 of the docstring
        grad_weights[i] = e.t() @ inputs[i] + torch.einsum("sbo,sbi->oi", left, rights[i])
        grad_biases[i] = e.sum(0)
        if i == 0:
            break
        mu = mu_sums[i - 1] * scale
        e = (e @ weights[i]) * derivs[i - 1] + (
            mu * products[i - 1] * _second_derivative(activation, hidden[i - 1], inputs[i], derivs[i - 1])
        ).sum(0)
        left = mu * derivs[i - 1]
    grad_x = e @ weights[0]
    return grad_x, grad_weights, grad_biases


class _TorchMLPLogdet(torch.autograd.Function):
    """``(g(x), logdet)`` by the module docstring's products in torch; inputs ``x, probes, *weights, *biases``."""

    @staticmethod
    def forward(ctx, activation, coefficients, x, probes, *params):
        L = len(params) // 2
        gx, logdet, hidden, neumann, mu_sums = _torch_forward(
            activation, coefficients, x, probes, params[:L], params[L:]
        )
        ctx.activation, ctx.n_layers = activation, L
        ctx.save_for_backward(x, probes, neumann, *params[:L], *hidden, *mu_sums)
        return gx, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gx, grad_logdet):
        L = ctx.n_layers
        x, probes, neumann, *rest = ctx.saved_tensors
        weights, hidden, mu_sums = rest[:L], rest[L : 2 * L - 1], rest[2 * L - 1 :]
        grad_x, grad_weights, grad_biases = gradients(
            ctx.activation, grad_gx, grad_logdet, x, probes, neumann, weights, hidden, mu_sums
        )
        return None, None, grad_x, None, *grad_weights, *grad_biases


def validate(x, weights, biases, activation, probes, coefficients) -> None:
    """Raises a clear error naming the argument; changes nothing."""
    iresnet_ops.validate(OP, x, weights, biases, activation, 0, 0.0, 0.0, y_name="x")
    _checks.tensor(OP, "probes", probes)
    if probes.dim() != 3 or probes.shape[1:] != x.shape or probes.shape[0] < 1:
        raise ValueError(f"{OP}: probes must be (S, B, D) with S >= 1 and (B, D) = x's shape {tuple(x.shape)}, got "
                         f"{tuple(probes.shape)}")  # fmt: skip
    if probes.dtype != x.dtype or probes.device != x.device:
        raise TypeError(f"{OP}: probes must have x's dtype and device ({x.dtype} on {x.device}), got "
                        f"{probes.dtype} on {probes.device}")  # fmt: skip
    for k, c in enumerate(coefficients):
        _checks.number(OP, f"coefficients[{k}]", c, float32=x.dtype == torch.float32)


def _saved_sizes(x, weights, n_probes):
    """The sizes of the pieces of ``saved`` in order: each ``h_l``, ``n``, each ``μ^n_l`` (kexue/iresnet.h)."""
    B, D = x.shape
    outs = [w.shape[0] for w in weights[:-1]]
    return [B * o for o in outs] + [n_probes * B * D] + [n_probes * B * o for o in outs]


def _native_forward(x, weights, biases, activation, probes, coefficients, keep=True):
    validate(x, weights, biases, activation, probes, coefficients)
    x, probes = x.contiguous(), probes.contiguous()
    gx = torch.empty_like(x)
    logdet = x.new_empty(x.shape[0])
    saved = x.new_empty(sum(_saved_sizes(x, weights, probes.shape[0])) if keep else 0)
    if x.shape[0]:
        table, _alive = iresnet_ops.layer_table(weights, [b.contiguous() for b in biases], OP)
        _native.launcher("iresnet_logdet", x.device)(
            _native.DTYPE_CODES[x.dtype], table, iresnet_ops.ACTIVATION_CODES[activation], x.data_ptr(), x.shape[0],
            probes.data_ptr(), probes.shape[0], list(coefficients), gx.data_ptr(), logdet.data_ptr(),
            saved.data_ptr() if keep else 0,
        )  # fmt: skip
    return gx, logdet, saved


def _torch_op_forward(x, weights, biases, activation, probes, coefficients, keep=True):
    """The op's forward by :func:`_torch_forward` (devices without a native kernel: CUDA)."""
    validate(x, weights, biases, activation, probes, coefficients)
    with torch.no_grad():
        gx, logdet, hidden, neumann, mu_sums = _torch_forward(activation, coefficients, x, probes, weights, biases)
    pieces = [*hidden, neumann, *mu_sums] if keep else []
    saved = torch.cat([p.reshape(-1) for p in pieces]) if pieces else x.new_empty(0)
    return gx, logdet, saved


def _fake(x, weights, biases, activation, probes, coefficients, keep=True):
    validate(x, weights, biases, activation, probes, coefficients)
    saved = x.new_empty(sum(_saved_sizes(x, weights, probes.shape[0])) if keep else 0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0]), saved


def _setup_context(ctx, inputs, output):
    x, weights, _, activation, probes, *_ = inputs
    ctx.activation, ctx.n_layers = activation, len(weights)
    ctx.save_for_backward(x, probes, output[2], *weights)


def _backward(ctx, grad_gx, grad_logdet, _grad_saved):
    L = ctx.n_layers
    x, probes, saved, *weights = ctx.saved_tensors
    if saved.numel() == 0 and x.shape[0]:
        raise RuntimeError(f"{OP}: the forward ran with keep=False, so it kept nothing to differentiate with")
    x = x.contiguous()
    grad_gx = torch.zeros_like(x) if grad_gx is None else grad_gx
    grad_logdet = x.new_zeros(x.shape[0]) if grad_logdet is None else grad_logdet
    pieces = list(saved.split(_saved_sizes(x, weights, probes.shape[0])))
    B, D = x.shape
    S = probes.shape[0]
    hidden = [p.view(B, -1) for p in pieces[: L - 1]]
    neumann = pieces[L - 1].view(S, B, D)
    mu_sums = [p.view(S, B, -1) for p in pieces[L:]]
    grad_x, grad_weights, grad_biases = gradients(
        ctx.activation, grad_gx, grad_logdet, x, probes, neumann, weights, hidden, mu_sums
    )
    return grad_x, grad_weights, grad_biases, None, None, None, *[None] * (len(ctx.needs_input_grad) - 6)


def _samples(device) -> list[tuple]:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float64, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).to(device)

    out = []
    for dtype in (torch.float64, torch.float32):
        weights = [randn(o, i, dtype=dtype, scale=0.3) for o, i in ((5, 3), (4, 5), (3, 4))]
        biases = [randn(5, dtype=dtype), randn(4, dtype=dtype), randn(3, dtype=dtype)]
        x = randn(7, 3, dtype=dtype).requires_grad_()
        out.append((x, [w.requires_grad_() for w in weights], [b.requires_grad_() for b in biases], "elu",
                    randn(2, 7, 3, dtype=dtype), [1.0, 1.0, 2.0, 0.0]))  # fmt: skip
    w1 = randn(3, 3, scale=0.3).requires_grad_()
    out.append((randn(4, 3), [w1], [randn(3)], "tanh", randn(1, 4, 3), [1.0, 1.0]))
    out.append((randn(0, 3), [w1], [randn(3)], "softplus", randn(1, 0, 3), [1.0]))
    return out


iresnet_mlp_logdet_op = define_op(
    OP,
    SCHEMA,
    cpu=_native_forward,
    cuda=_torch_op_forward,
    fake=_fake,
    samples=_samples,
    backward=_backward,
    setup_context=_setup_context,
)


def mlp_logdet(x, weights, biases, activation, probes, coefficients):
    """``(g(x), logdet)`` for the MLP branch ``weights``, ``biases``, ``activation`` at ``x`` ``(B, D)``
    with ``probes`` ``(S, B, D)`` and the terms' weights ``coefficients`` (numbers, or a 1-D tensor):
    the values and gradients of :func:`kexue_fast.reference.iresnet.mlp_logdet` by the module
    docstring's products — ``torch.ops.kexue.iresnet_mlp_logdet``, or for tensor weights torch."""
    if isinstance(coefficients, torch.Tensor):
        return _TorchMLPLogdet.apply(activation, coefficients, x, probes, *weights, *biases)
    tensors = (x, *weights, *biases)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    gx, logdet, _ = iresnet_mlp_logdet_op(x, list(weights), list(biases), activation, probes, list(coefficients), keep)
    return gx, logdet
