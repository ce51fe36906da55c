r"""Reference orthogonality penalties (docs/gan.md): the Self-Orthogonality penalty of a layer's
output (kexue.fm/archives/7169) by the direct formula, and the orthogonal regulariser of weights by a
loop over the layers — the code a user writes by hand.

**Self-Orthogonality.** For a layer's pre-bias output ``y`` of shape ``(b, k)`` (``b`` rows — the
batch, or every spatial position of a conv — and ``k`` output columns)::

    T  = tanh(γ·y)
    t̂_i = T[:, i] / max(‖T[:, i]‖₂, eps)          (each column normalised over the b rows)
    ϑ  = T̂ᵀ T̂                                      (k × k; ϑ_ij ≈ 1 − 2θ_ij/π, θ_ij the angle of w_i, w_j)
    S₁ = Σ_{i≠j} ϑ_ij,   S₂ = Σ_{i≠j} ϑ_ij²
    reduction "sum":   R = λ₁·S₁² + λ₂·S₂
    reduction "mean":  R = λ₁·(S₁/c)² + λ₂·(S₂/c),   c = k(k − 1)   (the mean over the off-diagonal
                       entries, taken before squaring and weighting; R = 0 when k < 2)

A dead column (``T[:, i] = 0``, e.g. ``y[:, i] = 0``) has ``t̂_i = 0``: its ϑ entries, the diagonal
one included, are 0 and it adds nothing to ``R``. The value is finite, and so is the gradient —
but through the clamp ``∂t̂_i/∂T[:, i] = 1/eps``, so a dead column's gradient is of the order of
``γ·λ₁·|S₁|·‖s‖/eps`` (``s`` the row sums of T̂): with the default ``eps = 1e-12``, huge; raise
``eps`` (e.g. ``1e-4``) where columns can die. An empty ``y`` (``b = 0`` or ``k = 0``) gives ``R = 0``.

**Orthogonal regulariser.** For weights ``W`` viewed as ``(out, n) = W.reshape(W.shape[0], -1)``::

    kind "biggan":  ‖(W Wᵀ) ⊙ (1 − I)‖_F²     (BigGAN: the off-diagonal of the rows' Gram)
    kind "full":    ‖W Wᵀ − I‖_F²             (I of size out)

summed over the weights and multiplied by ``strength``.

Both compute in float32 (float64 for float64 inputs), are differentiable by autograd and do not
validate their arguments as the library does.
"""

from __future__ import annotations

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def self_orthogonality(
    y: torch.Tensor,
    gamma: float = 10.0,
    lam1: float = 100.0,
    lam2: float = 1.0,
    reduction: str = "sum",
    eps: float = 1e-12,
) -> torch.Tensor:
    """The penalty ``R`` of the module docstring for ``y`` ``(b, k)`` with the tanh sharpness
    ``gamma``, the weights ``lam1``, ``lam2``, the ``reduction`` "sum" or "mean" and the column-norm
    floor ``eps``, by forming the k × k ϑ; a 0-d tensor of ``y``'s dtype."""
    compute = _compute_dtype(y)
    t = torch.tanh(gamma * y.to(compute))
    t_hat = t / torch.linalg.vector_norm(t, dim=0, keepdim=True).clamp_min(eps)
    theta = t_hat.T @ t_hat
    k = theta.shape[0]
    off_diagonal = theta * (1 - torch.eye(k, dtype=compute, device=y.device))
    s1, s2 = off_diagonal.sum(), off_diagonal.square().sum()
    if reduction == "mean":
        pairs = max(k * (k - 1), 1)
        s1, s2 = s1 / pairs, s2 / pairs
    return (lam1 * s1.square() + lam2 * s2).to(y.dtype)


def orthogonal_regularizer(weights, kind: str = "biggan", strength: float = 1.0) -> torch.Tensor:
    """``strength`` times the sum over ``weights`` of the ``kind`` ("biggan" or "full") penalty of
    the module docstring, one layer at a time; a 0-d float32 tensor (float64 if the first weight is)."""
    total = torch.zeros((), dtype=_compute_dtype(weights[0]) if weights else torch.float32)
    for w in weights:
        w = w.reshape(w.shape[0], -1).to(total.dtype)
        eye = torch.eye(w.shape[0], dtype=total.dtype, device=w.device)
        gram = w @ w.T
        total = total.to(w.device) + (gram * (1 - eye) if kind == "biggan" else gram - eye).square().sum()
    return strength * total
