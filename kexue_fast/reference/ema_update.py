"""Reference multi-tensor EMA (docs/ema.md)."""

from __future__ import annotations

import torch


def ema_update_(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """For each pair of the lists ``shadow`` and ``params``, ``shadow ← decay·shadow + (1 − decay)·param``
    in place, computed in float32 (float64 for float64 shadows) and rounded to the shadow's dtype.
    A ``ValueError`` if the lists differ in length; otherwise torch's own errors (no validation).
    See docs/ema.md."""
    with torch.no_grad():
        for s, p in zip(shadow, params, strict=True):
            compute = torch.float64 if s.dtype == torch.float64 else torch.float32
            s.copy_(decay * s.to(compute) + (1.0 - decay) * p.to(compute))
