"""Conditional LayerNorm modules on top of ``kexue::cond_layer_norm``: bert4keras's
:class:`ConditionalLayerNorm` and DiT's :class:`AdaLayerNorm` / :func:`modulate`.

The math, the accepted shapes and dtypes and the errors are in docs/cond_layer_norm.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kexue_fast.ops.cond_layer_norm import cond_layer_norm

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda t: t,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "swish": nn.functional.silu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
}


class ConditionalLayerNorm(nn.Module):
    r"""LayerNorm whose gain and bias depend on a condition vector (bert4keras semantics, Su 2019).

    ``c' = act(c W_h)`` (only with ``hidden_dim``; else ``c' = c``), then per sample
    ``γ̃ = γ + c' W_γ``, ``β̃ = β + c' W_β`` and ``y = LN(x)·γ̃ + β̃`` with ``x`` of shape
    ``(B, *, D)`` and ``cond`` of shape ``(B, cond_dim)``. ``W_γ``, ``W_β`` are bias-free and
    zero-initialised, so a fresh module equals the pretrained LayerNorm exactly; ``W_h`` is
    bias-free with PyTorch's default init (zero-initialising it too would kill its gradient).

    Args:
        normalized_shape: ``D``, an ``int`` or a shape whose last entry is ``D``.
        cond_dim: size of the condition vector ``c``.
        hidden_dim: size of the optional hidden projection ``W_h`` (``None``: no projection).
        hidden_act: the activation after ``W_h``: ``"linear"`` (default), ``"relu"``, ``"gelu"``,
            ``"swish"``, ``"silu"``, ``"tanh"`` or a callable; another string is a ``ValueError``.
        eps: added to the variance (bert4keras's ``1e-12`` by default); must be finite and ``>= 0``.
        rms: RMSNorm instead of LayerNorm (bert4keras ``zero_mean=False``).
        device, dtype: where and in which dtype the parameters are created.

    ``weight``/``bias`` are named as in ``nn.LayerNorm``: ``load_state_dict`` accepts an
    ``nn.LayerNorm`` state dict (the conditional projections then keep their zero init).
    See docs/cond_layer_norm.md.
    """

    def __init__(
        self,
        normalized_shape: int,
        cond_dim: int,
        hidden_dim: int | None = None,
        hidden_act: str | Callable | None = None,
        eps: float = 1e-12,
        rms: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not callable(hidden_act) and (hidden_act or "linear") not in ACTIVATIONS:
            raise ValueError(
                f"ConditionalLayerNorm: hidden_act must be a callable or one of {sorted(ACTIVATIONS)}, "
                f"got {hidden_act!r}"
            )
        factory = {"device": device, "dtype": dtype}
        dim = normalized_shape if isinstance(normalized_shape, int) else normalized_shape[-1]
        self.normalized_shape, self.eps, self.rms = (dim,), eps, rms
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.bias = nn.Parameter(torch.zeros(dim, **factory))
        self.hidden = nn.Linear(cond_dim, hidden_dim, bias=False, **factory) if hidden_dim else None
        self.hidden_act = ACTIVATIONS[hidden_act or "linear"] if not callable(hidden_act) else hidden_act
        projected = hidden_dim or cond_dim
        self.gamma_dense = nn.Linear(projected, dim, bias=False, **factory)
        self.beta_dense = nn.Linear(projected, dim, bias=False, **factory)
        nn.init.zeros_(self.gamma_dense.weight)
        nn.init.zeros_(self.beta_dense.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Normalises ``x`` of shape ``(B, *, D)`` with the gain and bias of the condition ``cond`` of
        shape ``(B, cond_dim)``; returns a tensor of ``x``'s shape and dtype. The per-sample gain and
        bias are cast to ``x``'s dtype, so ``x`` may be 16-bit under float32 parameters. Errors are
        those of ``kexue_fast.cond_layer_norm`` (docs/cond_layer_norm.md) and of ``nn.Linear``."""
        c = self.hidden_act(self.hidden(cond)) if self.hidden is not None else cond
        gamma = (self.weight + self.gamma_dense(c)).to(x.dtype)
        beta = (self.bias + self.beta_dense(c)).to(x.dtype)
        return cond_layer_norm(x, gamma, beta, self.eps, self.rms)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # An nn.LayerNorm state dict has only weight and bias: the conditional projections (and
        # the hidden one) keep their current values. `state_dict` is load_state_dict's own
        # copy, and the children read it after this, so filling it in place is enough.
        if prefix + "weight" in state_dict and prefix + "gamma_dense.weight" not in state_dict:
            for key, value in self.state_dict(prefix=prefix).items():
                state_dict.setdefault(key, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, rms={self.rms}"


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DiT's ``LN(x)·(1 + scale) + shift`` in one fused pass: a LayerNorm without affine
    parameters over the last dim of ``x`` (shape ``(B, *, D)``), then a per-sample modulation
    with ``shift``/``scale`` of shape ``(B, D)`` (or ``(D,)`` / ``x.shape``), in ``x``'s dtype.
    ``eps`` is added to the variance. Differentiable in ``x``, ``shift`` and ``scale``. Raises
    what ``kexue_fast.cond_layer_norm`` raises (``TypeError`` for a dtype mismatch, ``ValueError``
    for a wrong shape or ``eps``); see docs/cond_layer_norm.md."""
    return cond_layer_norm(x, 1 + scale, shift, eps)


class AdaLayerNorm(nn.Module):
    """DiT adaptive LayerNorm (adaLN-Zero): ``shift, scale[, gate] = Linear(SiLU(c))`` and
    ``y = LN(x)·(1 + scale) + shift``. The projection is zero-initialised, so the block starts
    as a plain LayerNorm (and, with ``gate=True``, a closed residual gate).

    Args:
        dim: ``D``, the normalised (last) dim of ``x``.
        cond_dim: size of the condition ``c``.
        eps: added to the variance.
        gate: also produce a residual gate; ``forward`` then returns ``(y, gate)``.
        device, dtype: where and in which dtype the projection is created.

    See docs/cond_layer_norm.md.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6, gate: bool = False, device=None, dtype=None):
        super().__init__()
        self.dim, self.eps, self.gate = dim, eps, gate
        self.linear = nn.Linear(cond_dim, (3 if gate else 2) * dim, device=device, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        """``x`` of shape ``(B, *, D)``, condition ``c`` of shape ``(B, cond_dim)``: returns ``y`` of
        ``x``'s shape, or ``(y, gate)`` with ``gate`` of shape ``(B, D)`` when ``gate=True`` (apply it
        as ``x + gate[:, None] * f(y)``)."""
        chunks = self.linear(nn.functional.silu(c)).to(x.dtype).chunk(3 if self.gate else 2, dim=-1)
        y = modulate(x, chunks[0], chunks[1], self.eps)
        return (y, chunks[2]) if self.gate else y
