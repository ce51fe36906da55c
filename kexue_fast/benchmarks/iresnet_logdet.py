r"""Benchmark cases of the i-ResNet log-determinant: one training step of an invertible residual
block ``z = x + g(x)`` with an MLP branch ``g``, against a residual-flows-style step.

The step (mode :data:`~kexue_fast.benchmarks.STEP`): ``g(x)`` and the estimate of
``ln det(I + J_g(x))`` per row, ``loss = mean_rows(½‖z‖² − logdet)`` (the negative log-likelihood
of a one-block flow up to a constant), then the gradients of ``loss`` in ``x`` (which requires
grad, as inside a flow) and in every weight and bias of ``g``. The estimators are those of
:mod:`kexue_fast.iresnet.logdet`: ``series`` (5 terms, 1 probe) and ``roulette`` (geometric length,
``p = 0.5``, 2 exact terms, 1 probe). Every provider runs on the same weights and inputs, and the
weights are plain leaf tensors (:func:`plain_branch`): no power iteration in the timed step, so
the comparison is of the log-det machinery alone.

Providers (in place of ``eager``/``compiled``, see :attr:`OpBench.baselines`):

* ``ours`` — :func:`kexue_fast.iresnet.residual_logdet` on the :class:`~kexue_fast.iresnet.MLPBranch`
  (whatever path it takes for one), eager;
* ``residual-flows`` — :func:`residual_flows_logdet`, the approach of residual-flows'
  ``iResBlock``: ``g(x)`` under autograd, one ``torch.autograd.grad`` VJP per term (no graph),
  the Neumann-series gradient from one VJP with ``create_graph=True``, probes from
  ``torch.randn_like`` and the roulette's length drawn on the host (numpy) every step;
* ``ours-compiled``, ``residual-flows-compiled`` — the same steps with the loss under
  ``torch.compile`` (its backward compiled with it by ``aot_autograd``; the gradients are taken
  outside, as in a training loop), graph breaks and recompilations (residual-flows: one per new
  length) included. Both run with ``torch._dynamo.config.trace_autograd_ops = True``
  (:data:`COMPILE_CONFIG`), so that dynamo traces the ``torch.autograd.grad`` calls: with torch's
  default they break the graph and the ``create_graph`` VJP is then a double backward through a
  compiled graph, which ``aot_autograd`` refuses ("does not currently support double backward").

Each provider's step number is the ``offset`` of its probes (fresh probes and a fresh roulette
length every step, as in training). The timed call returns the detached loss and the gradients.
A compiled provider's first call (the runner's warm-up) runs ``Settings.compile_warm_up`` = 10
steps, so that the timing sees what a long training run sees: the graphs of the lengths drawn so
far (a length first drawn later still compiles inside a timed turn, as it would in training), or
dynamo's eager fallback once its recompile limit is reached.

Reported once per case, outside the timing (:func:`stats`): the peak memory of one step (as in
:func:`~kexue_fast.benchmarks.iresnet_inverse.peak_bytes`: ``max_memory_allocated`` on CUDA, the
peak of torch's allocations seen by ``torch.profiler`` on CPU) and its ratio to ``ours``'; for
the compiled providers the steps run so far, the graphs dynamo compiled in them (recompilations
included) and the graph breaks it met.

Cases: **toy** ``MLPBranch(2, 64, 3)`` at B = 4096 and **mid** ``MLPBranch(64, 256, 3)`` at
B = 1024, float32, each with the series and the roulette estimator. :func:`smoke_bench` has the
same cases at B = 64 for CI's ``pytest bench --benchmark-disable``.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn.utils import parametrize

from kexue_fast.benchmarks import STEP, Case, Check, OpBench, compare, worst
from kexue_fast.benchmarks.iresnet_inverse import peak_bytes
from kexue_fast.iresnet import MLPBranch, residual_logdet

SEED = 0  # the Philox seed of ours' probes
VERIFY_OFFSET = 7  # the step at which the kernel is verified
#: The dynamo setting both compiled steps run under (module docstring).
COMPILE_CONFIG = {"trace_autograd_ops": True}


@dataclass(frozen=True)
class Settings:
    """The estimator of a case, the last input of every case."""

    estimator: str = "series"  # "series" or "roulette"
    n_terms: int = 5  # the series' terms
    n_probes: int = 1
    n_exact_terms: int = 2  # the roulette's terms always computed
    p: float = 0.5  # the roulette's geometric success probability
    compile_warm_up: int = 10  # the steps a compiled provider runs on its first call (module docstring)


def roulette_weights(extra: int, s: Settings) -> list[float]:
    """The roulette's ``c_k = 1/P(N ≥ k)``, ``k = 1 … N``, for the length ``N = n_exact_terms + extra``
    (:mod:`kexue_fast.iresnet.logdet`: ``P(M ≥ m) = (1 − p)^m``)."""
    return [1.0] * s.n_exact_terms + [(1 - s.p) ** -m for m in range(1, extra + 1)]


def residual_flows_logdet(g, x: torch.Tensor, probes: torch.Tensor, coefficients: list[float]):
    """``(g(x), logdet)`` the residual-flows way (module docstring) for ``probes`` ``(S, B, ...)`` and
    the weights ``c_k`` of the terms; the estimate and its Neumann gradient are those stated in
    :mod:`kexue_fast.reference.iresnet` (residual-flows' Neumann vector has one term more, and in
    training it returns the surrogate ``nᵀJv`` in place of the value; here the value is kept)."""
    gx = g(x)
    value = surrogate = 0.0
    for v in probes:
        w, neumann = v, torch.zeros_like(v)
        with torch.no_grad():
            for k, c in enumerate(coefficients):
                neumann = neumann + (-1) ** k * c * w
                (w,) = torch.autograd.grad(gx, x, w, retain_graph=True)
                value = value + (-1) ** k * c / (k + 1) * (w * v).flatten(1).sum(1)
        (jacobian_t_neumann,) = torch.autograd.grad(gx, x, neumann, retain_graph=True, create_graph=True)
        surrogate = surrogate + (jacobian_t_neumann * v).flatten(1).sum(1)
    return gx, (value + surrogate - surrogate.detach()) / probes.shape[0]


def _loss(x: torch.Tensor, gx: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """``mean_rows(½‖x + g(x)‖² − logdet)``."""
    return (0.5 * (x + gx).pow(2).flatten(1).sum(1) - logdet).mean()


def ours_loss(x, branch, s: Settings, offset: int):
    """The loss of ``ours`` at step number ``offset``."""
    gx, logdet = residual_logdet(
        branch, x, s.n_terms, s.n_probes, s.estimator, seed=SEED, offset=offset, n_exact_terms=s.n_exact_terms,
        roulette="geometric", roulette_param=s.p,
    )  # fmt: skip
    return _loss(x, gx, logdet)


def residual_flows_loss(rng: np.random.Generator):
    """The loss of ``residual-flows``, its roulette length drawn by ``rng`` (numpy, on the host)."""

    def loss(x, branch, s: Settings, offset: int):  # offset: unused, the global torch RNG moves on
        if s.estimator == "series":
            coefficients = [1.0] * s.n_terms
        else:
            coefficients = roulette_weights(int(rng.geometric(s.p)) - 1, s)  # numpy's geometric is ≥ 1
        probes = torch.randn(s.n_probes, *x.shape, dtype=x.dtype, device=x.device)
        return _loss(x, *residual_flows_logdet(branch, x, probes, coefficients))

    return loss


def gradients(loss: torch.Tensor, x: torch.Tensor, branch: MLPBranch) -> list[torch.Tensor]:
    """``[∂x, ∂W_1 … ∂W_L, ∂b_1 … ∂b_L]`` of ``loss``."""
    weights, biases, _ = branch.mlp_parameters()
    return list(torch.autograd.grad(loss, [x, *weights, *biases]))


class TrainingStep:
    """A provider: each call is one training step, ``loss = loss_fn(x, branch, settings, offset)`` with
    the next step number as ``offset`` and its :func:`gradients`, returning ``(loss.detach(), gradients)``.
    Compiled: ``loss_fn`` under ``torch.compile`` (with :data:`COMPILE_CONFIG`; its backward is compiled
    with it by ``aot_autograd``), whose first call runs ``settings.compile_warm_up`` steps (module
    docstring); ``graphs`` and ``graph_breaks`` count what dynamo compiled and broke in its steps."""

    def __init__(self, loss_fn, compiled: bool = False):
        self.loss_fn, self.compiled = loss_fn, compiled
        self.count = self.graphs = self.graph_breaks = 0
        self._loss = torch.compile(loss_fn) if compiled else loss_fn

    def run(self, x, branch, s: Settings, offset: int):
        """The step at step number ``offset``: ``(loss.detach(), gradients)``."""
        if not self.compiled:
            loss = self._loss(x, branch, s, offset)
            return loss.detach(), gradients(loss, x, branch)
        counters = torch._dynamo.utils.counters
        graphs, breaks = counters["stats"]["unique_graphs"], counters["graph_break"].total()
        with torch._dynamo.config.patch(**COMPILE_CONFIG):
            loss = self._loss(x, branch, s, offset)
        self.graphs += counters["stats"]["unique_graphs"] - graphs
        self.graph_breaks += counters["graph_break"].total() - breaks
        return loss.detach(), gradients(loss, x, branch)

    def __call__(self, x, branch, s: Settings):
        for _ in range(s.compile_warm_up if self.compiled and self.count == 0 else 1):
            self.count += 1
            result = self.run(x, branch, s, self.count)
        return result


def baselines(mode: str, quick: bool, compiled: bool) -> dict:
    """The residual-flows steps first (the plot's speedups are over the eager one), ``ours-compiled``
    (``ours`` itself is the family's kernel); no compiled step in ``--quick``."""
    fns = {"residual-flows": TrainingStep(residual_flows_loss(np.random.default_rng(SEED)))}
    if compiled:
        fns["residual-flows-compiled"] = TrainingStep(residual_flows_loss(np.random.default_rng(SEED)), True)
        fns["ours-compiled"] = TrainingStep(ours_loss, True)
    return fns


def reference_step(x, branch, s: Settings, offset: int):
    """``ours``' step in float64 through the generic path (:func:`residual_logdet` on a plain function
    of the branch's parameters, so no fast path), with ``ours``' probes and roulette length."""
    x64 = x.detach().double().requires_grad_()
    branch64 = plain_branch_from(branch, torch.float64)
    gx, logdet = residual_logdet(
        lambda z: branch64(z), x64,  # a function, not the MLPBranch: the generic path
        s.n_terms, s.n_probes, s.estimator, seed=SEED, offset=offset, n_exact_terms=s.n_exact_terms,
        roulette="geometric", roulette_param=s.p,
    )  # fmt: skip
    loss = _loss(x64, gx, logdet)
    return loss.detach(), gradients(loss, x64, branch64)


def verify(kernel, reference, inputs) -> list[Check]:
    """``ours``' loss and gradients at step :data:`VERIFY_OFFSET` against the float64 generic path
    (``reference``) on the same probes and length."""
    x, branch, s = inputs
    loss, grads = kernel.run(x, branch, s, VERIFY_OFFSET)
    loss64, grads64 = reference(x, branch, s, VERIFY_OFFSET)
    L = len(branch.layers)
    checks = [compare("loss", loss, loss64), compare("grad_x", grads[0], grads64[0])]
    for name, part in (("grad_weights", slice(1, 1 + L)), ("grad_biases", slice(1 + L, None))):
        checks.append(worst(name, [compare(f"{name}[{i}]", *c) for i, c in enumerate(zip(grads[part], grads64[part]))]))
    return checks


def stats(case: Case, mode: str, fns: dict, inputs: list, seconds: dict) -> dict:
    """provider -> its peak memory in one step and the ratio to ``ours``'; for a compiled step also
    the graphs dynamo compiled and the graph breaks it met in all its steps so far."""
    device = inputs[0].device
    reported = {}
    for name, fn in fns.items():
        fn(*inputs)  # a step of a new roulette length may compile: not inside the measurement
        reported[name] = {"peak MB": peak_bytes(lambda fn=fn: fn(*inputs), device) / 2**20}
        if fn.compiled:
            reported[name] |= {"steps": fn.count, "graphs compiled": fn.graphs, "graph breaks": fn.graph_breaks}
    ours = reported.get("ours", {}).get("peak MB")
    for name, values in reported.items():
        if ours and name != "ours":
            values["peak / ours'"] = values["peak MB"] / ours
    return reported


def plain_branch_from(branch: MLPBranch, dtype: torch.dtype | None = None, device=None) -> MLPBranch:
    """A copy of ``branch`` whose weights are plain leaf parameters holding its normalised weights
    (spectral norm removed: no power iteration), in ``dtype`` on ``device``."""
    copy = deepcopy(branch)
    for layer in copy.layers:
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return copy.to(dtype=dtype, device=device)


#: Training-mode calls of a fresh branch's ``mlp_parameters`` (5 power iterations each) before its
#: weights are taken: the norms converge, as in a trained flow.
POWER_ITERATION_CALLS = 40


def plain_branch(dim: int, hidden: int, seed: int = 0, device=None) -> MLPBranch:
    """``MLPBranch(dim, hidden, 3)`` initialised from ``seed``, its power iteration converged (each
    weight ``W / max(1, σ(W)/0.9)``), with plain weights (:func:`plain_branch_from`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        branch = MLPBranch(dim, hidden, 3)
    with torch.no_grad():
        for _ in range(POWER_ITERATION_CALLS):
            branch.mlp_parameters()
    return plain_branch_from(branch.eval(), device=device)


def _inputs(B: int, dim: int, hidden: int, s: Settings, seed: int = 0):
    """``[x, branch, settings]``: ``x ~ N(0, I)`` ``(B, dim)`` float32 requiring grad, the branch of
    :func:`plain_branch`."""

    def make(device):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(B, dim, generator=gen).to(device).requires_grad_()
        return [x, plain_branch(dim, hidden, seed, device), s]

    return make


TOY, MID = (2, 64), (64, 256)


def _cases(B_toy: int = 4096, B_mid: int = 1024, warm_up: int = 10) -> list[Case]:
    series, roulette = Settings(compile_warm_up=warm_up), Settings(estimator="roulette", compile_warm_up=warm_up)
    return [
        Case(f"toy B={B_toy} 2-64-64-2 series", _inputs(B_toy, *TOY, series), (STEP,), quick=True),
        Case(f"mid B={B_mid} 64-256-256-64 series", _inputs(B_mid, *MID, series), (STEP,)),
        Case(f"toy B={B_toy} 2-64-64-2 roulette", _inputs(B_toy, *TOY, roulette), (STEP,)),
        Case(f"mid B={B_mid} 64-256-256-64 roulette", _inputs(B_mid, *MID, roulette), (STEP,)),
    ]


BENCH = OpBench(
    name="iresnet_logdet",
    reference=reference_step,
    native=TrainingStep(ours_loss),
    native_name="ours",
    triton=None,
    ops=("iresnet_logdet", "iresnet_mlp_logdet", "iresnet_mlp_logdet_backward", "roulette_uniform"),
    cases=_cases(),
    floor=None,
    verify=verify,
    baselines=baselines,
    stats=stats,
    pairs=(("residual-flows", "ours"), ("residual-flows-compiled", "ours-compiled")),
)


def smoke_bench() -> OpBench:
    """:data:`BENCH` with every case at B = 64 and the compiled steps in the toy cases only: CI's
    smoke run (``pytest bench --benchmark-disable``), seconds, not a measurement."""
    cases = [replace(c, compiled=c.label.startswith("toy")) for c in _cases(B_toy=64, B_mid=64, warm_up=1)]
    return replace(BENCH, cases=cases)
