r"""The log-determinant ``ln det(I + J_g(x))`` of an invertible residual block, per row.

The estimators and the gradient are stated once, in :mod:`kexue_fast.reference.iresnet` ("The
log-determinant"): the power series ``Σ_k c_k (−1)^{k+1} vᵀ J^k v / k`` with Hutchinson probes
``v``, differentiated by the Neumann-series estimate ``nᵀ (∂J) v``. The weights ``c_k`` make the
estimator:

* ``series`` — the first ``n_terms`` terms (``c_k = 1``): biased by the tail, ``O(Lip^{n+1})``;
* ``roulette`` — Residual Flows' unbiased Russian roulette: a random length ``N = n_exact_terms + M``
  (``M`` geometric with success probability ``p`` or Poisson with rate ``λ``) and
  ``c_k = [k ≤ N] / P(N ≥ k)``, so ``E[c_k] = 1`` for every ``k``. ``N`` comes from the Philox stream
  of the probes: ``M ≥ m`` exactly when the uniform ``U = (r + 0.5)/2³²`` is below ``P(M ≥ m)``, ``r``
  the first word of Philox group ``2⁶⁴ − 1`` at ``(seed, offset)`` (a group no probe tensor reaches).
  ``U`` is a pure function of ``(seed, offset)``, so it is computed on the host in eager mode — no
  device read, no ``.item()``, no sync — and exactly ``N`` terms run. Under ``torch.compile`` the same
  ``U`` comes from the op ``kexue::roulette_uniform`` (the host computation, written into a device
  tensor by value: no sync, one opaque node) and the weights are a device tensor: the fused MLP
  kernel still stops after the ``N``-th term (on the CPU; on CUDA, and on the generic path, the
  graph holds every term that can be nonzero, the zero ones included: slower, no graph break);
* ``exact`` — ``slogdet`` of the full Jacobian (``D`` VJPs): the oracle, for small rows.

Probes: ``(n_probes, B, *row)`` standard normals of ``philox_normal`` at ``(seed, offset)``
(Rademacher: their signs); so ``(seed, offset)`` reproduces an estimate on any device. Pass the
training step as ``offset`` for fresh probes each step.

Branches: any callable ``g`` takes the generic path (autograd VJPs of ``g``,
:func:`~kexue_fast.reference.iresnet.power_series_logdet`); an
:class:`~kexue_fast.iresnet.MLPBranch` the fast path of :mod:`kexue_fast.ops.iresnet_logdet`.
"""

from __future__ import annotations

import math
import numbers

import torch

from kexue_fast import _checks
from kexue_fast.iresnet.branch import MLPBranch
from kexue_fast.ops.iresnet_logdet import mlp_logdet, roulette_uniform, roulette_uniform_op
from kexue_fast.ops.langevin import as_int64, philox_normal
from kexue_fast.reference.iresnet import exact_logdet, power_series_logdet

__all__ = ["ESTIMATORS", "PROBES", "ROULETTE_LENGTHS", "logdet", "probes", "residual_logdet", "roulette_coefficients",
           "roulette_uniform"]  # fmt: skip

OP = "logdet"
ESTIMATORS = ("series", "roulette", "exact")
PROBES = ("gaussian", "rademacher")
#: The law of the roulette's random extra length ``M``, and its parameter's default.
ROULETTE_LENGTHS = {"geometric": 0.5, "poisson": 2.0}
#: Below the smallest roulette uniform (``0.5/2³²`` ≈ 1.2e-10): a term whose survival probability
#: is smaller is never drawn, so it is left out of the fixed-length graph.
_SMALLEST_UNIFORM = 1e-10


def _is_int(value) -> bool:
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _validate(g, x, n_terms, n_probes, estimator, probe, seed, offset, n_exact_terms, roulette, roulette_param):
    _checks.branch_and_rows(OP, g, "x", x)
    if estimator not in ESTIMATORS:
        raise ValueError(f"{OP}: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if probe not in PROBES:
        raise ValueError(f"{OP}: probe must be one of {PROBES}, got {probe!r}")
    for name, value, low in (("n_terms", n_terms, 1), ("n_probes", n_probes, 1), ("n_exact_terms", n_exact_terms, 0)):
        if not _is_int(value) or value < low:
            raise ValueError(f"{OP}: {name} must be an int >= {low}, got {value!r}")
    for name, value in (("seed", seed), ("offset", offset)):
        if not isinstance(value, torch.SymInt):
            as_int64(value, f"{OP}: {name}")
    if roulette not in ROULETTE_LENGTHS:
        raise ValueError(f"{OP}: roulette must be one of {tuple(ROULETTE_LENGTHS)}, got {roulette!r}")
    if roulette_param is not None:
        ok = isinstance(roulette_param, numbers.Real) and math.isfinite(roulette_param) and roulette_param > 0
        if not ok or (roulette == "geometric" and roulette_param >= 1):
            bounds = "in (0, 1)" if roulette == "geometric" else "> 0"
            raise ValueError(f"{OP}: roulette_param of the {roulette} length must be a number {bounds}, got "
                             f"{roulette_param!r}")  # fmt: skip


def probes(x: torch.Tensor, n_probes: int, probe: str, seed: int, offset: int) -> torch.Tensor:
    """The Hutchinson probes ``(n_probes, *x.shape)`` in ``x``'s dtype (module docstring)."""
    noise = philox_normal([n_probes, *x.shape], seed, offset, torch.float32, x.device).to(x.dtype)
    return torch.sign(noise) if probe == "rademacher" else noise  # a Box–Muller normal is never exactly 0


def _survival(n_exact_terms: int, roulette: str, param: float) -> list[float]:
    """``P(N ≥ k)`` for ``k = 1, 2, …`` while it is at least the smallest uniform."""
    out = [1.0] * n_exact_terms
    if roulette == "geometric":
        m_max = int(math.log(_SMALLEST_UNIFORM) / math.log1p(-param))
        return out + [(1 - param) ** m for m in range(1, m_max + 1)]
    pmf, tail, m = math.exp(-param), 1.0, 0  # Poisson: P(M ≥ m + 1) = P(M ≥ m) − P(M = m)
    while True:
        tail -= pmf
        m += 1
        pmf *= param / m
        survival = tail if tail > 1e-3 else sum_tail(param, m)
        if survival < _SMALLEST_UNIFORM:
            return out
        out.append(survival)


def sum_tail(rate: float, m: int) -> float:
    """``P(M ≥ m)`` of a Poisson ``M`` with ``rate``, summed from the tail (no cancellation)."""
    term = math.exp(m * math.log(rate) - rate - math.lgamma(m + 1))
    total, j = 0.0, m
    while term > total * 1e-17:
        total += term
        j += 1
        term *= rate / j
    return total


def roulette_coefficients(uniform, n_exact_terms: int = 2, roulette: str = "geometric",
                          roulette_param: float | None = None):  # fmt: skip
    """The roulette's weights ``c_k = [U < P(N ≥ k)] / P(N ≥ k)``, nonzero exactly for ``k ≤ N``: a
    list of the ``N`` nonzero ones for a float ``uniform``; for a tensor ``uniform``, a float64 tensor
    on its device of all ``T`` that can be nonzero (``P(N ≥ T)`` at least the smallest uniform)."""
    param = ROULETTE_LENGTHS[roulette] if roulette_param is None else roulette_param
    survival = _survival(n_exact_terms, roulette, param)
    if not isinstance(uniform, torch.Tensor):
        return [1.0 / s for s in survival if uniform < s]  # a prefix: survival decreases
    survival = torch.tensor(survival, dtype=torch.float64, device=uniform.device)
    return torch.where(uniform < survival, survival.reciprocal(), 0.0)


def residual_logdet(
    g,
    x: torch.Tensor,
    n_terms: int = 5,
    n_probes: int = 1,
    estimator: str = "series",
    probe: str = "gaussian",
    seed: int = 0,
    offset: int = 0,
    *,
    n_exact_terms: int = 2,
    roulette: str = "geometric",
    roulette_param: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g(x), ln det(I + J_g(x)))`` for a residual block ``x ↦ x + g(x)``, per row: the branch's
    output (what the block adds to ``x``) and the log-determinant, from one evaluation of ``g``.

    Args:
        g: the residual branch, a callable treating rows independently with ``Lip(g) < 1`` (the
            series converges only then); an :class:`~kexue_fast.iresnet.MLPBranch` takes the fused path.
        x: ``(B, *row)`` floating point (float32 or float64 for the fused path).
        n_terms: the terms of the ``series`` estimator (``>= 1``; ignored by the others).
        n_probes: Hutchinson probes per row (``>= 1``); the estimate is their mean.
        estimator: ``"series"``, ``"roulette"`` or ``"exact"`` (module docstring).
        probe: ``"gaussian"`` or ``"rademacher"``.
        seed, offset: the Philox stream of the probes and of the roulette's length.
        n_exact_terms: the roulette's terms that are always computed (``>= 0``; Residual Flows: 2).
        roulette: the law of the roulette's extra length, ``"geometric"`` or ``"poisson"``.
        roulette_param: its success probability ``p`` in (0, 1) (default 0.5) or rate ``λ > 0``
            (default 2).

    Returns:
        ``g(x)`` like ``x`` and ``logdet`` of shape ``(B,)`` in ``x``'s dtype. Under grad mode both
        are differentiable: ``g(x)`` exactly, ``logdet`` by the Neumann-series estimate (``exact``:
        exactly), in ``x`` and in everything ``g`` uses.

    Raises:
        TypeError / ValueError naming the argument. See docs/iresnet_flow.md.
    """
    _validate(g, x, n_terms, n_probes, estimator, probe, seed, offset, n_exact_terms, roulette, roulette_param)
    if estimator == "exact":
        return exact_logdet(g, x)
    vectors = probes(x, n_probes, probe, seed, offset)
    if estimator == "series":
        coefficients = [1.0] * n_terms
    elif torch.compiler.is_compiling():
        uniform = roulette_uniform_op(as_int64(seed, "seed"), as_int64(offset, "offset"), x.device)
        coefficients = roulette_coefficients(uniform, n_exact_terms, roulette, roulette_param)
    else:
        coefficients = roulette_coefficients(roulette_uniform(seed, offset), n_exact_terms, roulette, roulette_param)
    if isinstance(g, MLPBranch) and x.dim() == 2 and x.dtype in (torch.float32, torch.float64):
        return mlp_logdet(x, *g.mlp_parameters(), vectors, coefficients)
    return power_series_logdet(g, x, vectors, coefficients)


def logdet(g, x: torch.Tensor, n_terms: int = 5, n_probes: int = 1, estimator: str = "series",
           probe: str = "gaussian", seed: int = 0, offset: int = 0, **roulette) -> torch.Tensor:  # fmt: skip
    """``ln det(I + J_g(x))`` per row, ``(B,)``: :func:`residual_logdet` without ``g(x)``, with the
    same arguments (``g``, ``x``, ``n_terms``, ``n_probes``, ``estimator``, ``probe``, ``seed``,
    ``offset``; ``n_exact_terms``, ``roulette``, ``roulette_param`` by keyword)."""
    return residual_logdet(g, x, n_terms, n_probes, estimator, probe, seed, offset, **roulette)[1]
