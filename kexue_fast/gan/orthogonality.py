r"""Orthogonality penalties (docs/gan.md): the Self-Orthogonality Module — a penalty on the outputs
of chosen layers, collected by forward hooks — and BigGAN's orthogonal regulariser of many
weights in one call. Both penalties are defined in :mod:`kexue_fast.reference.orthogonality`.

How :func:`orthogonal_regularizer` computes: the weights are grouped by matrix shape, dtype and
device; each group is stacked into one ``(count, out, n)`` tensor and costs one batched GEMM of
the smaller Gram — ``W Wᵀ`` (``out × out``) when ``out ≤ n``, else ``WᵀW`` (``n × n``) by the
identities (``r_i = ‖w_i‖²`` the rows' squared norms)::

    biggan:  ‖(W Wᵀ) ⊙ (1 − I)‖² = ‖WᵀW‖² − Σ_i r_i²         ∂/∂W = 4·((W Wᵀ) ⊙ (1 − I))·W = 4·(W(WᵀW) − diag(r)·W)
    full:    ‖W Wᵀ − I‖²       = ‖WᵀW‖² − 2·Σ_i r_i + out   ∂/∂W = 4·(W Wᵀ − I)·W          = 4·(W(WᵀW) − W)

and its backward one batched GEMM more (autograd through the Gram would cost two): two GEMMs per
group in all, against three per layer for the loop.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from kexue_fast import _checks
from kexue_fast.ops.self_orthogonality import self_orthogonality, validate_arguments

KINDS = ("biggan", "full")
#: The layers :class:`SelfOrthogonality` hooks: their output's dim 1 (Linear: the last) is the k columns.
LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class SelfOrthogonality:
    """Collects the Self-Orthogonality penalty of chosen layers' pre-bias outputs during a forward.

    ``SelfOrthogonality(*modules, gamma=10.0, lam1=100.0, lam2=1.0, reduction="sum", eps=1e-12)``
    registers a forward hook on every ``nn.Linear`` and ``nn.Conv1d``/``Conv2d``/``Conv3d`` among
    ``modules`` (a module of another type: on every such layer inside it). On each call of a
    hooked layer the hook adds :func:`self_orthogonality` of the layer's output without its bias
    (``output − bias``: ``xᵀW`` to rounding — the bias is not part of the estimate) to
    :attr:`penalty`, with ``gamma``, ``lam1``, ``lam2``, ``reduction`` and ``eps`` as that function
    takes them. The ``y`` ``(b, k)`` it sees:

    * ``nn.Linear``: the output ``(*, k)`` with its leading dims flattened into ``b`` rows;
    * convolutions: every spatial position of every sample is a row — ``(N, C_out, H, W)``
      becomes ``(N·H·W, C_out)`` (the patches are the inputs ``x`` of the LSH argument).

    Hooks fire on every forward, in grad mode or not; a layer called twice adds twice. Read the
    sum with :attr:`penalty` (a 0-d tensor, 0 when nothing was added), reset it with
    :meth:`clear`, or both at once with :meth:`pop`; :meth:`remove` takes the hooks off, and a
    ``with`` block removes them at its end::

        ortho = SelfOrthogonality(D.conv1, D.conv2, gamma=10.0)
        loss = d_loss(D(x)) + ortho.pop()
    """

    def __init__(self, *modules, gamma=10.0, lam1=100.0, lam2=1.0, reduction="sum", eps=1e-12):
        op = "SelfOrthogonality"
        layers = []
        for i, module in enumerate(modules):
            if not isinstance(module, torch.nn.Module):
                raise TypeError(f"{op}: modules[{i}] must be an nn.Module, got {type(module).__name__}")
            found = [m for m in module.modules() if isinstance(m, LAYERS)]
            if not found:
                raise ValueError(f"{op}: modules[{i}] ({type(module).__name__}) holds no Linear or Conv1d/2d/3d layer")
            layers += found
        if not layers:
            raise ValueError(f"{op}: give at least one module")
        validate_arguments(op, gamma, lam1, lam2, reduction, eps)
        self.arguments = (gamma, lam1, lam2, reduction, eps)
        self.layers = list(dict.fromkeys(layers))
        self._total = None
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def _hook(self, layer, inputs, output):
        y = output.movedim(1, -1) if isinstance(layer, torch.nn.modules.conv._ConvNd) else output
        if layer.bias is not None:
            y = y - layer.bias
        value = self_orthogonality(y.reshape(-1, y.shape[-1]), *self.arguments)
        self._total = value if self._total is None else self._total + value

    @property
    def penalty(self) -> torch.Tensor:
        """The sum of the penalties added since the last :meth:`clear` (0-d; ``tensor(0.)`` if none)."""
        return torch.zeros(()) if self._total is None else self._total

    def clear(self) -> None:
        """Drops the collected sum (and the graph it holds)."""
        self._total = None

    def pop(self) -> torch.Tensor:
        """:attr:`penalty`, then :meth:`clear`."""
        total = self.penalty
        self.clear()
        return total

    def remove(self) -> None:
        """Takes the hooks off every layer (the collected sum stays readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> SelfOrthogonality:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _GroupPenalty(torch.autograd.Function):
    """The penalty of one stacked group ``(count, out, n)`` and its gradient (module docstring)."""

    @staticmethod
    def forward(ctx, stacked: torch.Tensor, kind: str) -> torch.Tensor:
        out, n = stacked.shape[1:]
        ctx.wide = out <= n
        if ctx.wide:  # M = W Wᵀ ⊙ (1 − I) or W Wᵀ − I; value ‖M‖², gradient 4·M·W
            gram = torch.bmm(stacked, stacked.mT)
            diagonal = gram.diagonal(dim1=1, dim2=2)
            if kind == "biggan":
                diagonal.zero_()
            else:
                diagonal.sub_(1)
            flat = gram.reshape(-1)
            ctx.save_for_backward(stacked, gram)
            return torch.dot(flat, flat)
        gram = torch.bmm(stacked.mT, stacked)
        rows = stacked.square().sum(-1)  # r_i
        flat = gram.reshape(-1)
        if kind == "biggan":
            value, rows_factor = torch.dot(flat, flat) - rows.square().sum(), rows.unsqueeze(-1)
        else:
            value, rows_factor = torch.dot(flat, flat) - 2 * rows.sum() + rows.numel(), None
        ctx.save_for_backward(stacked, gram, rows_factor)
        return value

    @staticmethod
    def backward(ctx, grad):
        if ctx.wide:
            stacked, residual = ctx.saved_tensors
            return torch.bmm(residual, stacked).mul_(4 * grad), None
        stacked, gram, rows_factor = ctx.saved_tensors
        product = torch.bmm(stacked, gram)
        product -= stacked if rows_factor is None else stacked * rows_factor
        return product.mul_(4 * grad), None


def _validate_weights(weights, kind, strength) -> list[torch.Tensor]:
    op = "orthogonal_regularizer"
    if isinstance(weights, torch.Tensor):
        raise TypeError(f"{op}: weights must be a list of Tensors, got one Tensor (wrap it: [w])")
    weights = list(weights)
    for i, w in enumerate(weights):
        _checks.tensor(op, f"weights[{i}]", w)
        if not w.is_floating_point():
            raise TypeError(f"{op}: weights[{i}] must have a floating-point dtype, got {w.dtype}")
        if w.dim() < 2:
            raise ValueError(f"{op}: weights[{i}] must have at least 2 dims (out, ...), got shape {tuple(w.shape)}; "
                             "biases and gains are not penalised")  # fmt: skip
        if w.device != weights[0].device:
            raise ValueError(f"{op}: weights[{i}] is on {w.device} but weights[0] is on {weights[0].device}")
    if kind not in KINDS:
        raise ValueError(f'{op}: kind must be "biggan" or "full", got {kind!r}')
    _checks.number(op, "strength", strength, float32=False)
    return weights


def orthogonal_regularizer(weights, kind: str = "biggan", strength: float = 1.0) -> torch.Tensor:
    """BigGAN's orthogonal regulariser summed over many weights in one call.

    Args:
        weights: a list (any iterable) of floating-point Tensors with at least 2 dims, each seen as
            the matrix ``W = w.reshape(w.shape[0], -1)`` (``(out, n)``: a conv weight's rows are its
            output channels), all on one device.
        kind: ``"biggan"`` — ``‖(W Wᵀ) ⊙ (1 − I)‖_F²`` (the rows' off-diagonal Gram; norms are free)
            — or ``"full"`` — ``‖W Wᵀ − I‖_F²``.
        strength: the factor of the sum (finite; BigGAN uses 1e-4).

    Returns:
        ``strength · Σ`` of the penalty over ``weights``: a 0-d float32 tensor (float64 if a weight
        is float64; 16-bit weights are computed in float32), differentiable in the weights. An
        empty list gives 0.

    Raises:
        TypeError: a weight that is not a floating-point Tensor. ValueError: a weight below 2 dims,
        weights on different devices, an unknown ``kind`` or a non-finite ``strength``.

    How it computes (one batched GEMM per group of equal shapes, the smaller Gram): this module.
    """
    weights = _validate_weights(weights, kind, strength)
    groups = defaultdict(list)
    for w in weights:
        compute = torch.float64 if w.dtype == torch.float64 else torch.float32
        matrix = w.reshape(w.shape[0], math.prod(w.shape[1:])).to(compute)
        groups[(matrix.shape, compute)].append(matrix)
    total = torch.zeros((), device=weights[0].device if weights else None)
    for matrices in groups.values():
        stacked = matrices[0].unsqueeze(0) if len(matrices) == 1 else torch.stack(matrices)
        total = total + _GroupPenalty.apply(stacked, kind)
    return total * strength


__all__ = ["SelfOrthogonality", "orthogonal_regularizer", "self_orthogonality"]
