r"""Cascading Rejection for a discriminator (docs/gan.md, "Cascading Rejection"): the ``N`` scores
(:func:`cascading_rejection`, on ``kexue::cascading_rejection``; the math in
:mod:`kexue_fast.reference.cascading`), their GAN loss, and a head module.

The loss of stage ``i`` is the usual GAN loss of the score ``s_i`` averaged over the batch; the
stages are combined by the weighted average ``Σ λ_i ℓ_i / Σ λ_i``. ``target`` says whose loss::

    target        hinge                 bce (sigmoid + cross-entropy)
    "real"        mean relu(1 − s_i)    mean softplus(−s_i) = −log σ(s_i)         D on real samples
    "fake"        mean relu(1 + s_i)    mean softplus(s_i)  = −log(1 − σ(s_i))    D on generated samples
    "generator"   −mean s_i             mean softplus(−s_i)  (non-saturating)     G on generated samples

so D's loss is ``loss(D(x), "real") + loss(D(G(z)), "fake")`` and G's is ``loss(D(G(z)), "generator")``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kexue_fast import _checks
from kexue_fast.ops.cascading_rejection import cascading_rejection

__all__ = ["CascadingRejectionHead", "cascading_rejection", "cascading_rejection_loss"]

LOSSES = ("hinge", "bce")
TARGETS = ("real", "fake", "generator")


def _per_sample(scores: torch.Tensor, target: str, loss: str) -> torch.Tensor:
    """The table of the module docstring, before the batch mean."""
    if loss == "hinge":
        return {"real": lambda s: F.relu(1 - s), "fake": lambda s: F.relu(1 + s), "generator": torch.neg}[target](
            scores
        )
    return F.softplus(scores if target == "fake" else -scores)


def _stage_weights(weights, n_stages: int) -> list[float]:
    """``weights`` as ``n_stages`` floats: finite, ``>= 0``, with a positive sum (ValueError/TypeError otherwise)."""
    op = "cascading_rejection_loss"
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"{op}: weights must be None or a sequence of {n_stages} numbers, got {type(weights).__name__}")
    values = weights.tolist() if isinstance(weights, torch.Tensor) else list(weights)
    if len(values) != n_stages or any(isinstance(x, list) for x in values):
        raise ValueError(f"{op}: weights must hold one number per stage ({n_stages}), got {len(values)}")
    for i, x in enumerate(values):
        _checks.number(op, f"weights[{i}]", x, non_negative=True, float32=False)
    if not sum(values) > 0:
        raise ValueError(f"{op}: weights must have a positive sum, got {values}")
    return [float(x) for x in values]


def cascading_rejection_loss(scores: torch.Tensor, target: str, loss: str = "hinge", weights=None) -> torch.Tensor:
    """The GAN loss of Cascading Rejection scores: ``Σ_i λ_i ℓ_i / Σ_i λ_i``, ``ℓ_i`` the batch mean
    of stage ``i``'s loss (the table of the module docstring).

    Args:
        scores: ``(B, N)`` floating-point scores (:func:`cascading_rejection` or
            :class:`CascadingRejectionHead`).
        target: ``"real"`` or ``"fake"`` (the discriminator's two terms) or ``"generator"``.
        loss: ``"hinge"`` or ``"bce"`` (sigmoid + binary cross-entropy on the logits ``s_i``).
        weights: ``None`` (every stage alike) or ``N`` finite numbers ``λ_i >= 0`` with a positive
            sum: a list, a tuple or a 1-D tensor (read on the host).

    Returns:
        A 0-D tensor, differentiable in ``scores``: float32 for float16/bfloat16 scores (computed
        in float32), else ``scores``' dtype. An empty batch gives NaN (a mean over nothing, as
        torch's losses).

    Raises:
        TypeError: ``scores`` not a floating-point Tensor; ``weights`` of the wrong type.
        ValueError: ``scores`` not 2-D or with no stage, an unknown ``target`` or ``loss``,
            ``weights`` of the wrong length, negative, non-finite or summing to 0.
    """
    op = "cascading_rejection_loss"
    _checks.tensor(op, "scores", scores)
    if not scores.is_floating_point():
        raise TypeError(f"{op}: scores must have a floating-point dtype, got {scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"{op}: scores must be 2-D (B, N), got shape {tuple(scores.shape)}")
    if target not in TARGETS:
        raise ValueError(f"{op}: target must be one of {TARGETS}, got {target!r}")
    if loss not in LOSSES:
        raise ValueError(f"{op}: loss must be one of {LOSSES}, got {loss!r}")
    n_stages = scores.shape[1]
    if n_stages == 0:
        raise ValueError(f"{op}: scores must have at least one stage (N >= 1), got shape {tuple(scores.shape)}")
    lambdas = None if weights is None else _stage_weights(weights, n_stages)
    compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
    per_stage = _per_sample(scores.to(compute), target, loss).mean(dim=0)
    if lambdas is None:
        return per_stage.mean()
    return (per_stage * per_stage.new_tensor(lambdas)).sum() / math.fsum(lambdas)


class CascadingRejectionHead(nn.Module):
    """A discriminator's last layer: features ``(B, d)`` → Cascading Rejection scores ``(B, n_stages)``.

    Holds ``weight`` ``(n_stages, d)`` (row ``i`` is ``w_{i+1}``, initialised as ``nn.Linear(d,
    n_stages)``'s weight; no bias) and calls :func:`cascading_rejection`. It works with
    ``kexue_fast.nn.spectral_norm(head)`` (or torch's): the whole ``(n_stages, d)`` matrix is then
    divided by its largest singular value, one factor for every stage — the scores are scaled
    alike and ``eps`` applies to the normalised rows.

    Args:
        d: the feature size.
        n_stages: the number of scores ``N`` (``>= 1``).
        eps: the floor of ``‖w_i‖²`` (finite, ``>= 0``).
    """

    def __init__(self, d: int, n_stages: int, eps: float = 1e-12, device=None, dtype=None):
        super().__init__()
        for name, value, low in (("d", d, 0), ("n_stages", n_stages, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CascadingRejectionHead: {name} must be an int >= {low}, got {value!r}")
        _checks.number("CascadingRejectionHead", "eps", eps, non_negative=True, float32=False)
        self.d, self.n_stages, self.eps = d, n_stages, eps
        self.weight = nn.Parameter(torch.empty(n_stages, d, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``U(−1/√d, 1/√d)``, as ``nn.Linear`` initialises its weight."""
        bound = 1 / math.sqrt(self.d) if self.d else 0.0
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The ``(B, n_stages)`` scores of ``features`` ``(B, d)``, on the weight's device. Floating-point
        features of another dtype are cast to the weight's (bfloat16 features under autocast with a
        float32 weight give float32 scores, with no precision lost on the weight)."""
        weight = self.weight
        if features.is_floating_point() and features.dtype != weight.dtype:
            features = features.to(weight.dtype)
        return cascading_rejection(features, weight, self.eps)

    def extra_repr(self) -> str:
        return f"d={self.d}, n_stages={self.n_stages}, eps={self.eps}"
