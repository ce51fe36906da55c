"""Reference conditional LayerNorm / RMSNorm (docs/cond_layer_norm.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def broadcast_affine(param: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Views a gain/bias of shape ``(D,)``, ``(B, D)`` or ``x.shape`` so it broadcasts over ``x``
    (a ``(B, D)`` parameter is shared by every middle position of its sample)."""
    if param is None or param.dim() == 1 or param.shape == x.shape:
        return param
    return param.reshape(param.shape[0], *([1] * (x.dim() - 2)), param.shape[-1])


def cond_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    rms: bool = False,
) -> torch.Tensor:
    """``y = (x − μ)·rstd·weight + bias`` over the last dim of ``x`` (shape ``(B, *, D)``), with
    ``rstd = 1/sqrt(var + eps)`` (``rms=True``: no centring, ``rstd = 1/sqrt(mean(x²) + eps)``).
    ``weight`` and ``bias`` are ``None``, ``(D,)``, ``(B, D)`` or ``x.shape``. Computed in float32
    (float64 for float64 inputs) and cast back to ``x.dtype``; differentiable. It does not validate
    its arguments as the op does (torch's own errors come out). This is also the eager code a user
    would write, so the benchmarks use it as the eager baseline. See docs/cond_layer_norm.md."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    norm = F.rms_norm if rms else F.layer_norm
    xhat = norm(x.to(compute), x.shape[-1:], eps=eps)
    w, b = broadcast_affine(weight, x), broadcast_affine(bias, x)
    if w is not None:
        xhat = xhat * w.to(compute)
    if b is not None:
        xhat = xhat + b.to(compute)
    return xhat.to(x.dtype)
