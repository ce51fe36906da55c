r"""Reference of ``kexue::modulated_batch_norm``: BatchNorm whose affine may differ per sample.

Math, for ``x`` of shape ``(N, C, *)`` and each channel ``c`` (``M = N·prod(*)`` values)::

    training:  μ_c = mean over (n, *) of x[n, c, *],   σ²_c = mean (x − μ_c)²      (biased)
    eval:      μ_c = running_mean[c],                  σ²_c = running_var[c]
    x̂ = (x − μ_c) / sqrt(σ²_c + eps)
    y[n, c, *] = γ[n, c]·x̂[n, c, *] + β[n, c]

``γ``/``β`` (``weight``/``bias``) are ``None`` (1 and 0), ``(C,)`` (shared, as ``nn.BatchNorm2d``)
or ``(N, C)`` (per sample: conditional BN, SELF-MOD). In training the running statistics (when
given) are updated as ``F.batch_norm`` updates them, with the *unbiased* batch variance::

    running_mean ← (1 − momentum)·running_mean + momentum·μ
    running_var  ← (1 − momentum)·running_var  + momentum·σ²·M/(M − 1)

Backward (``g = ∂L/∂y``, ``g' = γ[n, c]·g``; means over the channel's ``M`` values)::

    training:  ∂L/∂x = rstd·(g' − mean(g') − x̂·mean(g'·x̂))
    eval:      ∂L/∂x = rstd·g'
    ∂L/∂γ[n, c] = Σ_* g·x̂,   ∂L/∂β[n, c] = Σ_* g        (summed over n as well for a (C,) γ, β)

Statistics are computed in float32 (float64 for float64 ``x``), then ``y`` is rounded to ``x``'s dtype.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics: float64 for float64, float32 for every other float type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """The running update of the module docstring, in place, in the statistics' dtype (``mean``'s),
    rounded to the running statistics' dtype; ``count`` (``M``) is the number of values per channel."""
    unbiased = var * (count / (count - 1))
    running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(mean.dtype))
    running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(mean.dtype))


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` or ``(N, C)`` tensor shaped to broadcast against ``x`` ``(N, C, *)``."""
    trailing = (1,) * (x.dim() - 2)
    return t.reshape(1, -1, *trailing) if t.dim() == 1 else t.reshape(*t.shape, *trailing)


def modulated_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The math of the module docstring, written out. ``x`` ``(N, C, *)``; ``weight``/``bias``
    ``None``, ``(C,)`` or ``(N, C)``; ``running_mean``/``running_var`` ``(C,)`` or ``None``, read
    when not ``training``, updated in place with ``momentum`` when ``training``; ``eps`` is added
    to the variance."""
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    dims = [0, *range(2, x.dim())]
    if training:
        mean = xa.mean(dims)
        var = xa.var(dims, correction=0)
        if running_mean is not None:
            with torch.no_grad():
                update_running_stats(running_mean, running_var, mean, var, xa.numel() // x.shape[1], momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    y = (xa - _per_channel(mean, x)) * torch.rsqrt(_per_channel(var, x) + eps)
    if weight is not None:
        y = y * _per_channel(weight.to(acc), x)
    if bias is not None:
        y = y + _per_channel(bias.to(acc), x)
    return y.to(x.dtype)
