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
weight skipped — the weights are read from memory by the kernel, so a roulette length drawn
into a tensor costs no sync and no fixed-length graph); the backward too, but for the weight
gradients, one product per layer with torch (a batch reduction, which the BLAS does best). CUDA:
no kernel of its own yet — both ops run the same products with torch (:func:`_torch_forward`,
:func:`gradients`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kexue_fast import _checks, _native
from kexue_fast._library import define_op
from kexue_fast.ops import iresnet as iresnet_ops
from kexue_fast.reference.iresnet import ACTIVATIONS, activation_derivative, activation_second_derivative
from kexue_fast.reference.langevin import philox4x32_10

OP = "iresnet_mlp_logdet"
SCHEMA = (
    "(Tensor x, Tensor[] weights, Tensor[] biases, str activation, Tensor probes, Tensor coefficients, "
    "bool keep=True) -> (Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_gx, Tensor grad_logdet, Tensor x, Tensor[] weights, Tensor[] biases, str activation, "
    "Tensor probes, Tensor saved) -> (Tensor, Tensor[], Tensor[])"
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


def validate(x, weights, biases, activation, probes, coefficients=None) -> None:
    """Raises a clear error naming the argument; changes nothing (``coefficients=None``: the
    backward's arguments, which have none)."""
    iresnet_ops.validate(OP, x, weights, biases, activation, 0, 0.0, 0.0, y_name="x")
    _checks.tensor(OP, "probes", probes)
    if probes.dim() != 3 or probes.shape[1:] != x.shape or probes.shape[0] < 1:
        raise ValueError(f"{OP}: probes must be (S, B, D) with S >= 1 and (B, D) = x's shape {tuple(x.shape)}, got "
                         f"{tuple(probes.shape)}")  # fmt: skip
    if probes.dtype != x.dtype or probes.device != x.device:
        raise TypeError(f"{OP}: probes must have x's dtype and device ({x.dtype} on {x.device}), got "
                        f"{probes.dtype} on {probes.device}")  # fmt: skip
    if coefficients is None:
        return
    _checks.tensor(OP, "coefficients", coefficients)
    if coefficients.dim() != 1 or coefficients.dtype != torch.float64:
        raise TypeError(f"{OP}: coefficients must be a 1-D float64 tensor, got {coefficients.dtype} of shape "
                        f"{tuple(coefficients.shape)}")  # fmt: skip
    if coefficients.device.type != "cpu" and coefficients.device != x.device:
        raise ValueError(
            f"{OP}: coefficients must be on the CPU or on x's device {x.device}, got {coefficients.device}"
        )


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
            probes.data_ptr(), probes.shape[0], coefficients.contiguous().data_ptr(), coefficients.numel(),
            gx.data_ptr(), logdet.data_ptr(),
            saved.data_ptr() if keep else 0,
        )  # fmt: skip
    return gx, logdet, saved


def _torch_op_forward(x, weights, biases, activation, probes, coefficients, keep=True):
    """The op's forward by :func:`_torch_forward` (devices without a native kernel: CUDA). Weights
    on the host are read there (no device sync) and the terms after the last nonzero one skipped;
    weights on the device are used as they are, every term computed."""
    validate(x, weights, biases, activation, probes, coefficients)
    if coefficients.device.type == "cpu":
        coefficients = coefficients.tolist()
        while coefficients and coefficients[-1] == 0:
            coefficients.pop()
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


def _kept(x, weights, probes, saved):
    """``(hidden, neumann, mu_sums)``: views of the pieces of ``saved`` (kexue/iresnet.h)."""
    L, (B, D), S = len(weights), x.shape, probes.shape[0]
    pieces = saved.split(_saved_sizes(x, weights, S))
    outs = [w.shape[0] for w in weights[:-1]]
    hidden = [p.view(B, n) for p, n in zip(pieces[: L - 1], outs)]
    return hidden, pieces[L - 1].view(S, B, D), [p.view(S, B, n) for p, n in zip(pieces[L:], outs)]


def _validate_backward(grad_gx, grad_logdet, x, weights, biases, activation, probes, saved) -> None:
    op = f"{OP}_backward"
    validate(x, weights, biases, activation, probes)
    for name, t, shape in (("grad_gx", grad_gx, x.shape), ("grad_logdet", grad_logdet, x.shape[:1])):
        _checks.tensor(op, name, t)
        if t.shape != shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{op}: {name} must be {x.dtype} of shape {tuple(shape)} on {x.device}, got "
                             f"{t.dtype} of shape {tuple(t.shape)} on {t.device}")  # fmt: skip
    _checks.tensor(op, "saved", saved)
    expected = sum(_saved_sizes(x, weights, probes.shape[0]))
    if saved.dim() != 1 or saved.numel() != expected or saved.dtype != x.dtype or saved.device != x.device:
        raise ValueError(f"{op}: saved must be what the forward kept with keep=True ({expected} elements of "
                         f"{x.dtype}), got {saved.dtype} of shape {tuple(saved.shape)}")  # fmt: skip


#: The fewest batch rows of one backward chunk (below, each chunk would cost a launch for little).
MIN_CHUNK_ROWS = 512


def chunk_rows(B: int, S: int, weights, saved_elems: int) -> int:
    """The batch rows of one chunk of the native backward: as many as keep its workspace (``E_l``
    and ``A_l`` of every layer, ``(1 + S)`` rows per batch row) no larger than what the forward
    kept for the backward (``saved``), at least :data:`MIN_CHUNK_ROWS` — so the backward adds at
    most about the kept memory to the peak, not twice it — and the chunks as even as that allows."""
    per_row = (1 + S) * sum(w.shape[0] + w.shape[1] for w in weights)
    most = max(1, min(B, max(MIN_CHUNK_ROWS, saved_elems // per_row)))
    n_chunks = max(1, -(-B // most))
    return max(1, -(-B // n_chunks))


def _native_backward(grad_gx, grad_logdet, x, weights, biases, activation, probes, saved):
    _validate_backward(grad_gx, grad_logdet, x, weights, biases, activation, probes, saved)
    B, S = x.shape[0], probes.shape[0]
    x, probes, saved = x.contiguous(), probes.contiguous(), saved.contiguous()
    grad_gx, grad_logdet = grad_gx.contiguous(), grad_logdet.contiguous()
    grad_x = torch.empty_like(x)
    grad_weights = [torch.zeros_like(w, memory_format=torch.contiguous_format) for w in weights]
    grad_biases = [torch.zeros_like(b, memory_format=torch.contiguous_format) for b in biases]
    if not B:
        return grad_x, grad_weights, grad_biases
    table, _alive = iresnet_ops.layer_table(weights, [b.contiguous() for b in biases], OP)
    launch = _native.launcher("iresnet_logdet_backward", x.device)
    chunk = chunk_rows(B, S, weights, saved.numel())
    workspace = x.new_empty((1 + S) * chunk * sum(w.shape[0] + w.shape[1] for w in weights))
    for first in range(0, B, chunk):
        rows = min(chunk, B - first)
        launch(
            _native.DTYPE_CODES[x.dtype], table, iresnet_ops.ACTIVATION_CODES[activation], x.data_ptr(), B, first,
            rows, probes.data_ptr(), S, grad_gx.data_ptr(), grad_logdet.data_ptr(), saved.data_ptr(),
            grad_x.data_ptr(), workspace.data_ptr(),
        )  # fmt: skip
        shapes = [((1 + S) * rows, n) for w in weights for n in w.shape]  # E_l, A_l for each layer l
        sizes = [r * n for r, n in shapes]
        pieces = [p.view(shape) for p, shape in zip(workspace[: sum(sizes)].split(sizes), shapes)]
        for grad_w, grad_b, e, a in zip(grad_weights, grad_biases, pieces[0::2], pieces[1::2]):
            grad_w.addmm_(e.t(), a)
            grad_b.add_(e[:rows].sum(0))
    return grad_x, grad_weights, grad_biases


def _torch_backward(grad_gx, grad_logdet, x, weights, biases, activation, probes, saved):
    """The backward op by :func:`gradients` (devices without a native kernel: CUDA)."""
    _validate_backward(grad_gx, grad_logdet, x, weights, biases, activation, probes, saved)
    hidden, neumann, mu_sums = _kept(x, weights, probes, saved)
    return gradients(activation, grad_gx, grad_logdet, x, probes, neumann, weights, hidden, mu_sums)


def _backward_fake(grad_gx, grad_logdet, x, weights, biases, activation, probes, saved):
    _validate_backward(grad_gx, grad_logdet, x, weights, biases, activation, probes, saved)
    empty = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return empty(x), [empty(w) for w in weights], [empty(b) for b in biases]


def _setup_context(ctx, inputs, output):
    x, weights, biases, activation, probes, *_ = inputs
    ctx.activation, ctx.n_layers = activation, len(weights)
    ctx.mark_non_differentiable(output[2])  # no zero gradient of it is made in the backward
    ctx.save_for_backward(x, probes, output[2], *weights, *biases)


def _backward(ctx, grad_gx, grad_logdet, _grad_saved):
    L = ctx.n_layers
    x, probes, saved, *params = ctx.saved_tensors
    if saved.numel() == 0 and x.shape[0]:
        raise RuntimeError(f"{OP}: the forward ran with keep=False, so it kept nothing to differentiate with")
    grad_gx = torch.zeros_like(x) if grad_gx is None else grad_gx
    grad_logdet = x.new_zeros(x.shape[0]) if grad_logdet is None else grad_logdet
    grad_x, grad_weights, grad_biases = iresnet_mlp_logdet_backward_op(
        grad_gx, grad_logdet, x, params[:L], params[L:], ctx.activation, probes, saved
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
                    randn(2, 7, 3, dtype=dtype), torch.tensor([1.0, 1.0, 2.0, 0.0], dtype=torch.float64)))  # fmt: skip
    w1 = randn(3, 3, scale=0.3).requires_grad_()
    out.append((randn(4, 3), [w1], [randn(3)], "tanh", randn(1, 4, 3), randn(2).abs()))
    out.append((randn(0, 3), [w1], [randn(3)], "softplus", randn(1, 0, 3), torch.ones(1, dtype=torch.float64)))
    return out


def backward_sample(x, weights, biases, activation, probes, coefficients) -> tuple:
    """The backward op's arguments for the forward op's (random upstream gradients)."""
    _, _, saved = torch.ops.kexue.iresnet_mlp_logdet(x, weights, biases, activation, probes, coefficients)
    grads = (torch.randn_like(x), torch.randn(x.shape[0], dtype=x.dtype, device=x.device))
    x, weights, biases = x.detach(), [w.detach() for w in weights], [b.detach() for b in biases]
    return (*grads, x, weights, biases, activation, probes, saved)


def _backward_samples(device) -> list[tuple]:
    return [backward_sample(*sample) for sample in _samples(device)]


iresnet_mlp_logdet_backward_op = define_op(
    f"{OP}_backward", BACKWARD_SCHEMA, cpu=_native_backward, cuda=_torch_backward, fake=_backward_fake,
    samples=_backward_samples,
)  # fmt: skip
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
    with ``probes`` ``(S, B, D)`` and the terms' weights ``coefficients`` (a sequence of numbers, or
    a 1-D float64 tensor on the CPU or on x's device): the values and gradients of
    :func:`kexue_fast.reference.iresnet.mlp_logdet` by the module docstring's products,
    ``torch.ops.kexue.iresnet_mlp_logdet``."""
    if not isinstance(coefficients, torch.Tensor):
        coefficients = torch.tensor(coefficients, dtype=torch.float64)
    tensors = (x, *weights, *biases)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    gx, logdet, _ = iresnet_mlp_logdet_op(x, list(weights), list(biases), activation, probes, coefficients, keep)
    return gx, logdet


# --- kexue::roulette_uniform ---------------------------------------------------------------------

ROULETTE_SCHEMA = "(SymInt seed, SymInt offset, Device? device=None) -> Tensor"
_LOW32 = 0xFFFFFFFF


def roulette_uniform(seed: int, offset: int) -> float:
    """The Russian roulette's uniform ``U = (r + 0.5)/2³²``, ``r`` the first word of Philox group
    ``2⁶⁴ − 1`` at ``(seed, offset)`` (:mod:`kexue_fast.iresnet.logdet`), computed on the host with
    Python ints (a negative seed or offset is read as two's complement)."""
    words = [_LOW32, _LOW32, offset & _LOW32, (offset >> 32) & _LOW32]
    return (philox4x32_10(words, (seed & _LOW32, (seed >> 32) & _LOW32))[0] + 0.5) * 2.0**-32


def _roulette_uniform(seed, offset, device=None):
    """:func:`roulette_uniform` as a float64 0-D tensor on ``device`` (default: torch's), filled by
    value (no copy from the host, no sync). As an op, ``torch.compile`` keeps it one opaque node:
    traced, its ten Philox rounds of integer tensor ops made inductor's lowering of the fused
    kernel take longer than ten minutes once the offset became symbolic (each word is read twice
    per round and the lowering re-expands every read)."""
    device = torch.get_default_device() if device is None else torch.device(device)
    return torch.full((), roulette_uniform(seed, offset), dtype=torch.float64, device=device)


def _roulette_uniform_fake(seed, offset, device=None):
    return torch.empty((), dtype=torch.float64, device=device)


def _roulette_uniform_samples(device) -> list[tuple]:
    return [(0, 0, device), (3, 2**40 + 5, device), (-1, -(2**63), device)]


roulette_uniform_op = define_op(
    "roulette_uniform", ROULETTE_SCHEMA, any_device=_roulette_uniform, fake=_roulette_uniform_fake,
    samples=_roulette_uniform_samples,
)  # fmt: skip
