r"""Reference Cascading Rejection (docs/gan.md, "Cascading Rejection"; TECHNIQUES.md §6).

A discriminator's feature ``v`` is scored along ``w_1``, then what ``w_1`` cannot see — the
vector rejection of ``v`` from ``w_1`` — is scored along ``w_2``, and so on, for ``N`` stages::

    v₁ = v,    s_i = ⟨v_i, w_i⟩,    v_{i+1} = v_i − (s_i / max(‖w_i‖², eps)) · w_i,    i = 1..N

``v_{i+1}`` is orthogonal to ``w_i`` (not to the earlier ``w_j`` unless the ``w``'s are
orthogonal). ``eps`` only matters for a ``w_i`` of (almost) zero norm, whose stage then scores 0
and removes nothing.
"""

from __future__ import annotations

import torch


def cascading_rejection(v: torch.Tensor, w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The ``N`` scores of every row of ``v`` ``(B, d)`` against the rows of ``w`` ``(N, d)``:
    ``(B, N)``, ``scores[:, i] = s_{i+1}`` of the module docstring, by the naive cascade — ``N``
    sequential passes over ``(B, d)``. Computed in float32 (float64 for float64 inputs) and cast
    back to ``v.dtype``; ``eps`` is the floor of ``‖w_i‖²``. Differentiable in ``v`` and ``w`` (no
    stop-gradient anywhere). It does not
    validate its arguments as the op does (torch's own errors come out). This is also the code a
    user would write, so the benchmark uses it as the eager baseline."""
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    rest, w = v.to(compute), w.to(compute)
    scores = []
    for w_i in w:
        s_i = rest @ w_i
        scores.append(s_i)
        rest = rest - (s_i / (w_i @ w_i).clamp(min=eps)).unsqueeze(1) * w_i
    if not scores:  # N = 0: the empty (B, 0) result, still a function of v and w for autograd
        return (rest @ w.mT).to(v.dtype)
    return torch.stack(scores, dim=1).to(v.dtype)
