r"""Benchmark cases of one GAN training step — generator and discriminator — built from the kexue_fast
modules against the same model built from plain PyTorch pieces.

The model and the step are those of ``kexue-fast demo gan``'s full variant (:mod:`kexue_fast.demos.gan`:
its :class:`~kexue_fast.demos.gan.Generator`, :func:`~kexue_fast.demos.gan.discriminator` and
:func:`~kexue_fast.demos.gan.train_step`): G with SELF-MOD BatchNorms, D with spectral norm on every
layer and a Cascading Rejection head, the hinge loss, R1 on the real batch (weight ``r1``), one Adam
step of D then one of G, then the EMA of G. The two builds, with the same weights (the plain one
loads the kexue one's state dict):

G's norms
    ours: :class:`~kexue_fast.gan.SelfModulatedBatchNorm2d`; plain: :class:`HandSelfModulatedBatchNorm2d`,
    ``nn.BatchNorm2d`` without affine, then ``γ(z)``, ``β(z)`` broadcast.
D's head
    ours: :class:`~kexue_fast.gan.CascadingRejectionHead`; plain: :class:`HandCascadingHead`, the naive
    ``N``-pass cascade.
spectral norm
    ours: :func:`kexue_fast.nn.spectral_norm`, one :class:`~kexue_fast.nn.SpectralNormGroup` refresh per
    step; plain: ``torch.nn.utils.parametrizations.spectral_norm``, a power iteration in every forward of
    a layer (three per step: D(real), D(fake), D(fake) for G).
R1, losses
    ours: :func:`~kexue_fast.gan.zero_centered_gradient_penalty`,
    :func:`~kexue_fast.gan.cascading_rejection_loss`; plain: :func:`hand_d_losses`, :func:`hand_g_loss`.
EMA of G
    ours: :class:`kexue_fast.EMA` (``update()``); plain: ``torch._foreach_lerp_`` over G's parameters and
    floating-point buffers.

Providers (mode :data:`~kexue_fast.benchmarks.STEP`; in place of ``eager``/``compiled``):
``plain``, ``ours`` (the family's kernel), ``floor`` and, but in ``--quick``, ``plain-compiled`` and
``ours-compiled``: G, the D-losses function and the G-loss function each under ``torch.compile``
(the optimizers, the refresh and the EMA eager, as users compile a model), with
``torch._dynamo.config.trace_autograd_ops = True`` (:data:`COMPILE_CONFIG`) so that dynamo traces
R1's ``torch.autograd.grad(…, create_graph=True)``: with torch's default it breaks the graph and R1's
backward is then a double backward through a compiled graph, which ``aot_autograd`` refuses. Each
provider trains its own copy of the case's model (built on its first call, per case), from the same
weights; every call is one step on the case's fixed ``real`` batch and noise ``z``.

``floor`` is the step's lower bound, the same model with every piece that the two builds implement
differently taken out (:func:`build` ``"floor"``): G without its norms, D without spectral norm and
with a bias-free linear ``d → N`` head (the cascade's one GEMM), no EMA — the convolutions, the linear
layers, R1's double backward through them and Adam are left, which any build of this model pays.
``plain/floor`` bounds the speedup that any implementation of the replaced pieces can reach.

Verification (:func:`verify`): one step of ``ours`` against one step of the plain build in float64 from
the same weights, with torch's spectral norm given ours' rule (one power iteration per layer before the
step, then σ = uᵀWv of those vectors in each forward) — the losses, R1, every gradient of G and D and
the EMA's shadows. The verifying steps use SGD (lr ``lr``) in place of Adam: Adam's first step,
``lr·g/(|g| + ε)``, turns a rounding-level difference of a near-zero gradient into a difference of
``lr`` in the weight, which the G step then sees.

Cases (float32): **demo**, the demo's recipe (width 32, batch 64, z 32, 4 stages, 8×8 images); **wide**,
width 128, batch 256, 8 stages. Reported once per case and mode, outside the timing (:func:`stats`):
for a compiled provider the graphs dynamo compiled and the graph breaks it met so far.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from kexue_fast import reference
from kexue_fast.benchmarks import STEP, Case, Check, OpBench, compare, worst
from kexue_fast.demos import gan
from kexue_fast.ema import EMA
from kexue_fast.nn import SpectralNormGroup

#: The dynamo setting both compiled steps run under (module docstring).
COMPILE_CONFIG = {"trace_autograd_ops": True}


@dataclass(frozen=True)
class Recipe:
    """A case's model and step (the last input of every case)."""

    width: int = 32
    batch: int = 64
    z_dim: int = 32
    hidden: int = 32
    n_stages: int = 4
    r1: float = 1.0
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    ema_decay: float = 0.999
    seed: int = 0  # of the initial weights
    optimizer: str = "adam"  # "sgd" in the verifying steps (module docstring)


class HandSelfModulatedBatchNorm2d(nn.BatchNorm2d):
    """SELF-MOD as PyTorch users write it: ``nn.BatchNorm2d`` without affine, then ``γ(z)``, ``β(z)``
    broadcast over H, W — :class:`~kexue_fast.gan.SelfModulatedBatchNorm2d`'s math, parameters and
    buffers (its state dict loads here)."""

    def __init__(self, num_features: int, z_dim: int, hidden: int):
        super().__init__(num_features, affine=False)
        self.hidden = nn.Linear(z_dim, hidden)
        self.gamma = nn.Linear(hidden, num_features)
        self.beta = nn.Linear(hidden, num_features)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(z))
        return super().forward(x) * self.gamma(h)[:, :, None, None] + self.beta(h)[:, :, None, None]


class HandCascadingHead(nn.Module):
    """Cascading Rejection by the naive ``N``-pass cascade (:func:`kexue_fast.reference.cascading_rejection`),
    with :class:`~kexue_fast.gan.CascadingRejectionHead`'s ``weight`` ``(n_stages, d)``."""

    def __init__(self, d: int, n_stages: int, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(n_stages, d))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return reference.cascading_rejection(features, self.weight, self.eps)


class NoNorm(nn.Module):
    """The floor's stand-in for a SELF-MOD BatchNorm: ``x`` unchanged."""

    def __init__(self, num_features: int, z_dim: int, hidden: int):
        super().__init__()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return x


def hand_d_losses(D, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kexue_fast.demos.gan.d_losses` written by hand: the hinge loss and R1 by double backprop."""
    real = real.detach().requires_grad_()
    real_scores = D(real)
    (grad,) = torch.autograd.grad(real_scores.sum(), real, create_graph=True)
    r1 = grad.square().flatten(1).sum(1).mean()
    return F.relu(1 - real_scores).mean() + F.relu(1 + D(fake)).mean(), r1


def hand_g_loss(D, fake: torch.Tensor) -> torch.Tensor:
    """:func:`kexue_fast.demos.gan.g_loss_of` written by hand."""
    return -D(fake).mean()


def build(recipe: Recipe, flavour: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """G and D of ``flavour`` (``"ours"`` or ``"plain"``), both initialised as ``ours`` from ``recipe.seed``
    (the global generator is left alone), in ``dtype``; ``"floor"``: the step's lower bound (module
    docstring), from the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        if flavour == "floor":
            G = gan.Generator(recipe.z_dim, recipe.width, True, recipe.hidden, modulated=NoNorm)
            D = gan.discriminator(
                recipe.width, True, recipe.n_stages, lambda m: m, cascade=lambda d, n: nn.Linear(d, n, bias=False)
            )
            return G.to(dtype), D.to(dtype)
        G = gan.Generator(recipe.z_dim, recipe.width, True, recipe.hidden)
        D = gan.discriminator(recipe.width, True, recipe.n_stages)
    if flavour == "plain":
        state_g, state_d = G.state_dict(), D.state_dict()
        G = gan.Generator(recipe.z_dim, recipe.width, True, recipe.hidden, modulated=HandSelfModulatedBatchNorm2d)
        D = gan.discriminator(
            recipe.width, True, recipe.n_stages, parametrizations.spectral_norm, cascade=HandCascadingHead
        )
        G.load_state_dict(state_g)
        D.load_state_dict(state_d)
    return G.to(dtype), D.to(dtype)


class _Training:
    """One provider's model in training: G, D, their optimizers, the EMA of G and the step's pieces."""

    def __init__(self, recipe: Recipe, flavour: str, compiled: bool, dtype: torch.dtype):
        self.recipe, self.flavour = recipe, flavour
        self.G, self.D = build(recipe, flavour, dtype)
        if recipe.optimizer == "adam":
            optimizer = lambda m: torch.optim.Adam(m.parameters(), lr=recipe.lr, betas=recipe.betas)  # noqa: E731
        else:
            optimizer = lambda m: torch.optim.SGD(m.parameters(), lr=recipe.lr)  # noqa: E731
        self.opt_g, self.opt_d = optimizer(self.G), optimizer(self.D)
        self.d_losses, self.g_loss = (
            (gan.d_losses, gan.g_loss_of) if flavour == "ours" else (hand_d_losses, hand_g_loss)
        )
        self.generate = self.G
        if compiled:
            self.generate = torch.compile(self.G)
            self.d_losses, self.g_loss = torch.compile(self.d_losses), torch.compile(self.g_loss)
        if flavour == "ours":
            self.group, self.ema = SpectralNormGroup(self.D), EMA(self.G, decay=recipe.ema_decay)
        elif flavour == "plain":
            self.averaged = [*self.G.parameters(), *(b for b in self.G.buffers() if b.is_floating_point())]
            self.shadows = [t.detach().clone() for t in self.averaged]

    def step(self, real: torch.Tensor, z: torch.Tensor):
        """One training step: ``(d_loss, g_loss)``, detached."""
        if self.flavour == "ours":
            self.group.refresh()
        losses = gan.train_step(
            self.generate, self.D, self.opt_g, self.opt_d, real, z, self.recipe.r1, self.d_losses, self.g_loss
        )
        if self.flavour == "ours":
            self.ema.update()
        elif self.flavour == "plain":
            with torch.no_grad():
                torch._foreach_lerp_(self.shadows, self.averaged, 1 - self.recipe.ema_decay)
        return losses

    def shadow_tensors(self) -> list[torch.Tensor]:
        """The EMA's shadows, in the order of :attr:`averaged` (G's parameters, then its float buffers)."""
        if self.flavour == "plain":
            return self.shadows
        with self.ema.applied():
            return [t.detach().clone() for t in (*self.G.parameters(), *self.G.buffers()) if t.is_floating_point()]


class TrainingStep:
    """A provider: each call ``(real, z, recipe)`` is one training step of its own model for ``recipe``
    (built on the first call with that recipe); ``graphs`` and ``graph_breaks`` count what dynamo
    compiled and broke in a compiled provider's steps."""

    def __init__(self, flavour: str, compiled: bool = False):
        self.flavour, self.compiled = flavour, compiled
        self.trainings: dict[Recipe, _Training] = {}
        self.graphs = self.graph_breaks = 0

    def training(self, recipe: Recipe, dtype: torch.dtype = torch.float32) -> _Training:
        """A fresh model in training for ``recipe`` (not the one the calls train)."""
        return _Training(recipe, self.flavour, self.compiled, dtype)

    def __call__(self, real: torch.Tensor, z: torch.Tensor, recipe: Recipe):
        if recipe not in self.trainings:
            self.trainings[recipe] = self.training(recipe, real.dtype)
        if not self.compiled:
            return self.trainings[recipe].step(real, z)
        counters = torch._dynamo.utils.counters
        graphs, breaks = counters["stats"]["unique_graphs"], counters["graph_break"].total()
        with torch._dynamo.config.patch(**COMPILE_CONFIG):
            losses = self.trainings[recipe].step(real, z)
        self.graphs += counters["stats"]["unique_graphs"] - graphs
        self.graph_breaks += counters["graph_break"].total() - breaks
        return losses


def baselines(mode: str, quick: bool, compiled: bool) -> dict:
    """``plain`` first (the plot's speedups are over it), the ``floor``, then the compiled steps but in
    ``--quick``."""
    fns = {"plain": TrainingStep("plain"), "floor": TrainingStep("floor")}
    if compiled:
        fns |= {"plain-compiled": TrainingStep("plain", compiled=True), "ours-compiled": TrainingStep("ours", True)}
    return fns


@contextlib.contextmanager
def _ours_spectral_rule(D: nn.Module):
    """torch's spectral norm on ``D`` with ours' rule for one step: one power iteration per layer now,
    then every forward takes σ = uᵀWv of those vectors (the parametrizations in eval mode)."""
    layers = [m for m in D.modules() if parametrize.is_parametrized(m, "weight")]
    norms = [layer.parametrizations.weight[0] for layer in layers]
    with torch.no_grad():
        for layer in layers:
            layer.weight  # noqa: B018 (in train mode: one power iteration)
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()


def reference_step(real: torch.Tensor, z: torch.Tensor, recipe: Recipe) -> _Training:
    """One step of the plain build in float64 with ours' spectral-norm rule (module docstring), from the
    initial weights; returns the model after it, its losses in ``.losses``."""
    training = _Training(recipe, "plain", False, torch.float64)
    with _ours_spectral_rule(training.D):
        training.losses = training.step(real.double(), z.double())
    return training


def _gradients(training: _Training) -> dict[str, list[torch.Tensor]]:
    return {
        "grad_G": [p.grad for p in training.G.parameters()],
        "grad_D": [p.grad for p in training.D.parameters()],
    }


def verify(kernel: TrainingStep, reference, inputs) -> list[Check]:
    """One SGD step of ``kernel``'s flavour against ``reference`` (:func:`reference_step`) from the same
    weights: the losses, every gradient of G and D and the EMA's shadows."""
    real, z, recipe = inputs
    recipe = replace(recipe, optimizer="sgd")
    ours = kernel.training(recipe, real.dtype)
    ours.losses = ours.step(real, z)
    truth = reference(real, z, recipe)
    checks = [compare(name, a, b) for name, a, b in zip(("d_loss", "g_loss"), ours.losses, truth.losses)]
    got, want = _gradients(ours), _gradients(truth)
    for name in got:
        checks.append(
            worst(name, [compare(f"{name}[{i}]", a, b) for i, (a, b) in enumerate(zip(got[name], want[name]))])
        )
    pairs = zip(ours.shadow_tensors(), truth.shadow_tensors(), strict=True)
    checks.append(worst("EMA shadows", [compare(f"shadow[{i}]", a, b) for i, (a, b) in enumerate(pairs)]))
    return checks


def stats(case: Case, mode: str, fns: dict, inputs: list, seconds: dict) -> dict:
    """For each compiled provider, the graphs dynamo compiled and the graph breaks it met in its steps."""
    return {
        name: {"graphs compiled": fn.graphs, "graph breaks": fn.graph_breaks} for name, fn in fns.items() if fn.compiled
    }


def _inputs(recipe: Recipe, seed: int = 0):
    """``[real, z, recipe]``: a ``real`` batch uniform on [−1, 1] ``(batch, 1, 8, 8)`` and ``z ~ N(0, I)``."""

    def make(device):
        gen = torch.Generator().manual_seed(seed)
        real = (torch.rand(recipe.batch, 1, 8, 8, generator=gen) * 2 - 1).to(device)
        return [real, torch.randn(recipe.batch, recipe.z_dim, generator=gen).to(device), recipe]

    return make


DEMO, WIDE = Recipe(), Recipe(width=128, batch=256, n_stages=8)


def _case(name: str, recipe: Recipe, quick: bool = False) -> Case:
    label = f"{name} width={recipe.width} B={recipe.batch} N={recipe.n_stages} float32"
    return Case(label, _inputs(recipe), (STEP,), quick=quick)


BENCH = OpBench(
    name="gan_step",
    reference=reference_step,
    native=TrainingStep("ours"),
    native_name="ours",
    triton=None,
    ops=("gan_step",),
    cases=[_case("demo", DEMO, quick=True), _case("wide", WIDE)],
    floor=None,
    verify=verify,
    baselines=baselines,
    stats=stats,
    pairs=(
        ("plain", "ours"),
        ("plain-compiled", "ours-compiled"),
        ("plain-compiled", "ours"),
        ("plain", "floor"),
        ("ours", "floor"),
    ),
)


def smoke_bench() -> OpBench:
    """:data:`BENCH` with one tiny case (width 8, batch 8) and no compiled steps: CI's smoke run
    (``pytest bench --benchmark-disable``), seconds, not a measurement."""
    tiny = Recipe(width=8, batch=8, n_stages=3)
    return replace(BENCH, cases=[replace(_case("tiny", tiny, quick=True), compiled=False)])
