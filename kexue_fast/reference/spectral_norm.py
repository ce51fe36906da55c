"""Reference batched spectral-norm power iteration (docs/spectral_norm.md), written exactly as
``torch.nn.utils.parametrizations.spectral_norm`` computes it, one matrix at a time."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _matrix(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], math.prod(w.shape[1:])).to(like.dtype)  # (-1 fails for 0 rows)


def spectral_sigma(weights: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """``σ_i = u_iᵀ W_i v_i`` for the lists ``weights``, ``us``, ``vs``, with
    ``W_i = weights[i].reshape(shape[0], -1)`` (``m_i × n_i``), ``us[i]`` of ``m_i`` and ``vs[i]`` of
    ``n_i`` elements; a 1-D tensor in the vectors' dtype, differentiable in the weights (u, v are
    constants). A ``ValueError`` if the lists differ in length. See docs/spectral_norm.md."""
    if not weights:
        return torch.empty(0)
    pairs = zip(weights, us, vs, strict=True)
    return torch.stack([torch.vdot(u.detach(), torch.mv(_matrix(w, u), v.detach())) for w, u, v in pairs])


def spectral_norm_power_iter_(weights, us, vs, n_iters: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """``n_iters`` rounds of ``u ← normalize(W v)``, ``v ← normalize(Wᵀ u)`` (``normalize(a) =
    a / max(‖a‖, eps)``) on every matrix of ``weights``, ``us`` and ``vs`` updated in place, then
    the σ of each matrix with the updated vectors (see :func:`spectral_sigma`). Complex weights
    work too (``Wᵀ`` is then the conjugate transpose). See docs/spectral_norm.md."""
    with torch.no_grad():
        for w, u, v in zip(weights, us, vs, strict=True):
            W = _matrix(w, u)
            if W.numel() == 0:
                continue
            for _ in range(n_iters):
                u.copy_(F.normalize(torch.mv(W, v), dim=0, eps=eps))
                v.copy_(F.normalize(torch.mv(W.mH, u), dim=0, eps=eps))  # conjugate transpose
        return spectral_sigma(weights, us, vs)
