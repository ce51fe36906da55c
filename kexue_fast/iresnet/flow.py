r"""The i-ResNet flow's modules (docs/iresnet_flow.md, "Modules"): the invertible residual block,
ActNorm, and the flow that stacks them on a standard-normal base.

The density, once. The flow maps a row ``x`` to ``z = f(x)`` through ``n_blocks`` steps, each an
:class:`ActNorm` followed by an :class:`InvertibleResBlock` ``x ↦ x + g(x)``, and models

    ln p(x) = ln N(z; 0, I) + Σ_steps ln |det ∂step/∂input|,
    ln N(z; 0, I) = −‖z‖² / 2 − (D / 2) ln 2π,

with ActNorm's log-determinant ``Σ_j log_scale_j`` and the block's ``ln det(I + J_g(x))`` estimated
by :func:`~kexue_fast.iresnet.residual_logdet`. Sampling runs the inverse on base noise
``z ~ N(0, I)``: each block by the fixed-point iteration of :func:`~kexue_fast.iresnet.iresnet_inverse`,
each ActNorm in closed form.

The offset convention: the probes of the log-determinant are Philox streams at ``(seed, offset)``;
block ``i`` of a flow uses ``seed + i`` (its own stream) and every block the ``offset`` passed to
``forward``/``log_prob`` — pass the training step there, so each step draws fresh probes and any
step can be replayed.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.distributed as dist
from torch import nn

from kexue_fast.iresnet.branch import MLPBranch
from kexue_fast.iresnet.inverse import iresnet_inverse
from kexue_fast.iresnet.logdet import _validate as _validate_logdet_settings
from kexue_fast.iresnet.logdet import residual_logdet
from kexue_fast.ops.langevin import philox_normal

__all__ = ["ActNorm", "IResNetFlow", "InvertibleResBlock"]

#: Why torch.compile stops at ActNorm's initialisation (the message of fullgraph=True's error).
_EAGER_INIT = (
    "ActNorm's data-dependent initialisation runs eagerly: run one training-mode forward before torch.compile "
    "(fullgraph=True) of the flow"
)


def _positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")


def _check_rows(owner: str, name: str, x, dim: int, like: torch.Tensor) -> None:
    """``x`` is a ``(B, dim)`` Tensor of ``like``'s dtype and device (the module's parameters)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{owner}: {name} must have shape (B, {dim}), got {tuple(x.shape)}")
    if x.dtype != like.dtype or x.device != like.device:
        raise TypeError(f"{owner}: {name} must have the module's dtype and device ({like.dtype} on {like.device}), "
                        f"got {x.dtype} on {x.device}")  # fmt: skip


class InvertibleResBlock(nn.Module):
    """The invertible residual block ``z = x + g(x)`` with an :class:`~kexue_fast.iresnet.MLPBranch`
    ``g`` (``.branch``; ``Lip(g) ≤ coeff^n_layers < 1``), its log-determinant estimated by
    :func:`~kexue_fast.iresnet.residual_logdet` and its inverse solved by
    :func:`~kexue_fast.iresnet.iresnet_inverse`.

    Args:
        dim, hidden, n_layers, activation, coeff, n_power_iterations: the branch's
            (:class:`~kexue_fast.iresnet.MLPBranch`).
        n_terms, n_probes, estimator, probe: the log-determinant's estimator
            (:func:`~kexue_fast.iresnet.residual_logdet`).
        seed: the Philox seed of its probes (the offset comes with each forward).
        n_exact_terms, roulette, roulette_param: the ``roulette`` estimator's settings.

    Raises:
        ValueError / TypeError naming the argument, before any module is built.
    """

    def __init__(self, dim: int, hidden: int, n_layers: int = 3, activation: str = "elu", coeff: float = 0.9,
                 n_power_iterations: int = 5, *, n_terms: int = 5, n_probes: int = 1, estimator: str = "series",
                 probe: str = "gaussian", seed: int = 0, n_exact_terms: int = 2, roulette: str = "geometric",
                 roulette_param: float | None = None):  # fmt: skip
        super().__init__()
        _positive_int("InvertibleResBlock", "dim", dim)
        settings = (n_terms, n_probes, estimator, probe, seed, 0, n_exact_terms, roulette, roulette_param)
        _validate_logdet_settings(nn.Identity(), torch.empty(0, dim), *settings)  # as the forward will call it
        self.branch, self.dim = MLPBranch(dim, hidden, n_layers, activation, coeff, n_power_iterations), dim
        self.n_terms, self.n_probes, self.estimator, self.probe, self.seed = n_terms, n_probes, estimator, probe, seed
        self.roulette = {"n_exact_terms": n_exact_terms, "roulette": roulette, "roulette_param": roulette_param}

    def forward(self, x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, logdet)``: ``z = x + g(x)`` for ``x`` of shape ``(B, dim)`` and the estimate of
        ``ln det(I + J_g(x))``, ``(B,)``, with the probes of ``(self.seed, offset)``; differentiable
        (the log-det by the Neumann-series gradient, ``exact`` exactly)."""
        _check_rows("InvertibleResBlock", "x", x, self.dim, self.branch.layers[0].bias)
        gx, logdet = residual_logdet(self.branch, x, self.n_terms, self.n_probes, self.estimator, self.probe,
                                     self.seed, offset, **self.roulette)  # fmt: skip
        return x + gx, logdet

    def inverse(self, z: torch.Tensor, max_iter: int = 100, atol: float = 1e-6, rtol: float = 1e-6,
                return_n_iter: bool = False, *, warn: bool = True):  # fmt: skip
        """The ``x`` with ``x + g(x) = z`` (``z``: ``(B, dim)``), each row by the fixed-point iteration
        of :func:`~kexue_fast.iresnet.iresnet_inverse` with ``max_iter``, ``atol``, ``rtol`` and ``warn``;
        ``(x, n_iter)`` with ``return_n_iter``. Differentiable by the implicit function theorem.
        The weights are the forward's: in training mode, unless a ``SpectralNormGroup`` runs them,
        reading them runs a power iteration — use eval mode or a group for an exact round trip."""
        _check_rows("InvertibleResBlock.inverse", "z", z, self.dim, self.branch.layers[0].bias)
        x, n_iter = iresnet_inverse(z, *self.branch.mlp_parameters(), max_iter, atol, rtol, warn=warn)
        return (x, n_iter) if return_n_iter else x

    def extra_repr(self) -> str:
        return f"estimator={self.estimator!r}, n_terms={self.n_terms}, n_probes={self.n_probes}, seed={self.seed}"


class ActNorm(nn.Module):
    """The per-feature affine map ``z = (x + bias) ⊙ exp(log_scale)`` on rows ``x`` of shape
    ``(B, dim)``, log-determinant ``Σ_j log_scale_j`` for every row.

    Data-dependent initialisation: the first forward in training mode sets ``bias = −mean`` and
    ``log_scale = −½ ln(var + eps)`` from its batch (per feature, population variance), so that
    batch leaves with zero mean and unit variance (up to ``eps``). Under ``torch.distributed``
    (initialised, world size > 1) the statistics are those of the batches of all ranks together,
    all-reduced over the default group: every rank gets the same parameters, and every rank must
    run that first forward (a collective, as under DDP). The buffer ``initialized`` records that
    it happened, so the state survives ``state_dict``/``load_state_dict``, DDP's buffer broadcast
    and an EMA. Under ``torch.compile`` the initialisation runs eagerly (a graph break): do it in
    eager mode first (one training-mode forward) to compile with ``fullgraph=True``.

    Args:
        dim: the size of a row.
        eps: added to the variance at the initialisation (a positive number).

    Raises:
        ValueError naming the argument.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        _positive_int("ActNorm", "dim", dim)
        if isinstance(eps, bool) or not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"ActNorm: eps must be a finite number > 0, got {eps!r}")
        self.dim, self.eps = dim, eps
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))
        # The host's copy of ``initialized``, so that the forward reads no device value once it is
        # set (and torch.compile guards on a bool); refreshed from the buffer on load_state_dict.
        self._initialized = False
        self.register_load_state_dict_post_hook(ActNorm._after_load)

    @staticmethod
    def _after_load(module: ActNorm, incompatible_keys) -> None:
        module._initialized = bool(module.initialized)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, logdet)`` for ``x`` of shape ``(B, dim)``: ``z`` like ``x``, ``logdet`` ``(B,)``
        (initialising first if this is the first training-mode forward)."""
        _check_rows("ActNorm", "x", x, self.dim, self.bias)
        if self.training and not self._initialized:
            self._initialize(x)
        z = (x + self.bias) * torch.exp(self.log_scale)
        return z, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``x = z ⊙ exp(−log_scale) − bias`` for ``z`` of shape ``(B, dim)``."""
        _check_rows("ActNorm.inverse", "z", z, self.dim, self.bias)
        return z * torch.exp(-self.log_scale) - self.bias

    @functools.partial(torch.compiler.disable, reason=_EAGER_INIT)
    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        """The data-dependent initialisation of the class docstring, unless the buffer says it
        already happened (a loaded or broadcast state)."""
        if not bool(self.initialized):
            rows = x.detach().double()
            totals = _sum_over_ranks(torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])]))
            count = int(totals[-1])
            if count < 2:
                raise ValueError(f"ActNorm: the data-dependent initialisation needs a batch of at least 2 rows "
                                 f"(over all ranks), got {count}")  # fmt: skip
            mean = totals[:-1] / count
            var = _sum_over_ranks((rows - mean).square().sum(0)) / count
            self.bias.copy_(-mean)
            self.log_scale.copy_(-0.5 * torch.log(var + self.eps))
            self.initialized.fill_(True)
        self._initialized = True

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks of the default process group (in place), if there are several."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class IResNetFlow(nn.Module):
    """A normalising flow of ``n_blocks`` steps ``ActNorm → InvertibleResBlock`` on a standard-normal
    base (the density and the offset convention: the module docstring). Block ``i`` uses the probe
    seed ``seed + i``.

    Args:
        dim: the size of a row.
        n_blocks: the number of steps.
        hidden, n_layers, activation, coeff, n_power_iterations: every block's branch
            (:class:`~kexue_fast.iresnet.MLPBranch`).
        n_terms, n_probes, estimator, probe, n_exact_terms, roulette, roulette_param: every
            block's log-determinant estimator (:func:`~kexue_fast.iresnet.residual_logdet`).
        actnorm: put an :class:`ActNorm` before each block (``False``: blocks only).
        seed: the probe seed of block 0.

    Attributes:
        blocks: the ``n_blocks`` :class:`InvertibleResBlock` (``nn.ModuleList``).
        actnorms: the ``n_blocks`` :class:`ActNorm` before them, or ``None`` without ``actnorm``.

    Raises:
        ValueError / TypeError naming the argument, before any module is built.
    """

    def __init__(self, dim: int, n_blocks: int, hidden: int, n_layers: int = 3, activation: str = "elu",
                 coeff: float = 0.9, n_power_iterations: int = 5, *, n_terms: int = 5, n_probes: int = 1,
                 estimator: str = "series", probe: str = "gaussian", actnorm: bool = True, seed: int = 0,
                 n_exact_terms: int = 2, roulette: str = "geometric",
                 roulette_param: float | None = None):  # fmt: skip
        super().__init__()
        for name, value in (("dim", dim), ("n_blocks", n_blocks), ("hidden", hidden)):
            _positive_int("IResNetFlow", name, value)
        if not isinstance(actnorm, bool):
            raise TypeError(f"IResNetFlow: actnorm must be a bool, got {actnorm!r}")
        self.dim = dim
        self.blocks = nn.ModuleList(
            InvertibleResBlock(dim, hidden, n_layers, activation, coeff, n_power_iterations, n_terms=n_terms,
                               n_probes=n_probes, estimator=estimator, probe=probe, seed=seed + i,
                               n_exact_terms=n_exact_terms, roulette=roulette, roulette_param=roulette_param)
            for i in range(n_blocks)
        )  # fmt: skip
        self.actnorms = nn.ModuleList(ActNorm(dim) for _ in range(n_blocks)) if actnorm else None

    def forward(self, x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, logdet)``: ``z = f(x)`` for ``x`` of shape ``(B, dim)`` and the sum of the steps'
        log-determinants, ``(B,)`` (the blocks' probes at ``offset``)."""
        _check_rows("IResNetFlow", "x", x, self.dim, self.blocks[0].branch.layers[0].bias)
        logdet = x.new_zeros(x.shape[0])
        for i, block in enumerate(self.blocks):
            if self.actnorms is not None:
                x, step_logdet = self.actnorms[i](x)
                logdet = logdet + step_logdet
            x, step_logdet = block(x, offset)
            logdet = logdet + step_logdet
        return x, logdet

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``ln N(z; 0, I)`` per row of ``z`` ``(B, dim)``: with :meth:`forward`'s ``(z, logdet)``,
        ``log_prob = base_log_prob(z) + logdet`` (what a DDP-wrapped flow, whose forward is
        :meth:`forward`, computes)."""
        return -0.5 * z.square().sum(1) - 0.5 * self.dim * math.log(2 * math.pi)

    def log_prob(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``ln p(x)`` per row of ``x`` ``(B, dim)``, ``(B,)`` (the module docstring; the blocks'
        probes at ``offset``); differentiable, the training loss is ``−log_prob(x, step).mean()``."""
        z, logdet = self(x, offset)
        return self.base_log_prob(z) + logdet

    def inverse(self, z: torch.Tensor, max_iter: int = 100, atol: float = 1e-6, rtol: float = 1e-6,
                return_n_iter: bool = False, *, warn: bool = True):  # fmt: skip
        """``x = f⁻¹(z)`` for ``z`` of shape ``(B, dim)``: each block inverted by
        :meth:`InvertibleResBlock.inverse` with ``max_iter``, ``atol``, ``rtol``, ``warn``, each
        ActNorm exactly. With ``return_n_iter``: ``(x, n_iter)``, ``n_iter`` int32 ``(B, n_blocks)``,
        column ``i`` the iterations of block ``i``."""
        _check_rows("IResNetFlow.inverse", "z", z, self.dim, self.blocks[0].branch.layers[0].bias)
        n_iters = []
        for i in reversed(range(len(self.blocks))):
            z, n_iter = self.blocks[i].inverse(z, max_iter, atol, rtol, return_n_iter=True, warn=warn)
            n_iters.append(n_iter)
            if self.actnorms is not None:
                z = self.actnorms[i].inverse(z)
        return (z, torch.stack(n_iters[::-1], 1)) if return_n_iter else z

    def sample(self, n: int, seed: int = 0, offset: int = 0, max_iter: int = 100, atol: float = 1e-6,
               rtol: float = 1e-6) -> torch.Tensor:  # fmt: skip
        """``n`` samples ``x = f⁻¹(z)``, ``(n, dim)`` in the flow's dtype and device, from the base
        noise ``z = philox_normal((n, dim), seed, offset)`` (reproducible from ``(seed, offset)``),
        inverted by :meth:`inverse` with ``max_iter``, ``atol``, ``rtol``. Wrap it in
        ``torch.no_grad()`` unless the samples should carry gradients."""
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise ValueError(f"IResNetFlow.sample: n must be an int >= 0, got {n!r}")
        like = self.blocks[0].branch.layers[0].bias
        z = philox_normal((n, self.dim), seed, offset, like.dtype, like.device)
        return self.inverse(z, max_iter, atol, rtol)
