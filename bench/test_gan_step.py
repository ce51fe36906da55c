"""The GAN training step's benchmark suite (kexue_fast/benchmarks/gan_step.py), and checks of what
the benchmark itself claims: the two builds start from the same weights and compute the same step
(under one spectral-norm rule), the plain build uses torch's spectral norm and iterates in every
forward, the verification fails wrong steps. Under ``--benchmark-disable`` (CI's smoke run) the case
is the tiny one of ``smoke_bench()``; timed, they are those of ``kexue-fast bench``."""

from dataclasses import replace

import pytest
import torch
from torch.nn.utils import parametrize

from conftest import parametrize_with_smoke_bench, run_benchmark
from kexue_fast.benchmarks import gan_step as bench_module
from kexue_fast.gan import CascadingRejectionHead, SelfModulatedBatchNorm2d
from kexue_fast.nn.spectral import SpectralNorm

TINY = bench_module.Recipe(width=8, batch=8, n_stages=3)


def pytest_generate_tests(metafunc):
    parametrize_with_smoke_bench(metafunc, "gan_step", bench_module.smoke_bench)


def test_gan_step(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)


def _inputs(recipe=TINY):
    return bench_module._inputs(recipe)(torch.device("cpu"))


def test_builds_hold_the_same_weights_in_their_own_pieces():
    G, D = bench_module.build(TINY, "ours")
    G_plain, D_plain = bench_module.build(TINY, "plain")
    for ours, plain in ((G, G_plain), (D, D_plain)):
        a, b = ours.state_dict(), plain.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(isinstance(n, SelfModulatedBatchNorm2d) for n in G.norms)
    assert all(type(n) is bench_module.HandSelfModulatedBatchNorm2d for n in G_plain.norms)
    assert isinstance(D[-1], CascadingRejectionHead) and isinstance(D_plain[-1], bench_module.HandCascadingHead)
    layers = [m for m in D_plain.modules() if parametrize.is_parametrized(m, "weight")]
    assert len(layers) == 4 and not any(isinstance(m.parametrizations.weight[0], SpectralNorm) for m in layers)
    # the same scores in eval mode (no power iteration, σ from the same vectors)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(D_plain.eval()(x), D.eval()(x), rtol=1e-5, atol=1e-6)
    z = torch.randn(5, TINY.z_dim)
    torch.testing.assert_close(G_plain.eval()(z), G.eval()(z), rtol=1e-5, atol=1e-6)


def test_floor_keeps_the_convolutions_and_linear_layers_and_drops_the_replaced_pieces():
    G, D = bench_module.build(TINY, "ours")
    G_floor, D_floor = bench_module.build(TINY, "floor")

    def shapes(model, kinds):
        return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, kinds)]

    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    assert shapes(G_floor, convs) == shapes(G, convs) and shapes(D_floor, convs) == shapes(D, convs)
    assert shapes(G_floor, torch.nn.Linear) == [tuple(G.fc.weight.shape)]  # no SELF-MOD linears
    assert all(type(n) is bench_module.NoNorm for n in G_floor.norms)
    assert not any(parametrize.is_parametrized(m) for m in D_floor.modules())
    assert type(D_floor[-1]) is torch.nn.Linear and D_floor[-1].bias is None
    assert D_floor[-1].weight.shape == D[-1].weight.shape  # (n_stages, d): the cascade's one GEMM
    training = bench_module.TrainingStep("floor").training(TINY)
    d_loss, g_loss = training.step(*_inputs()[:2])
    assert torch.isfinite(d_loss) and torch.isfinite(g_loss)
    assert all(p.grad is not None for p in (*training.G.parameters(), *training.D.parameters()))


def test_plain_step_iterates_in_every_forward_ours_once_per_step():
    # torch's parametrization moves u at each of the three D forwards of a step; ours' layers
    # leave u to the group's refresh: once per step.
    real, z, recipe = _inputs()
    counts = {}
    for flavour in ("plain", "ours"):
        training = bench_module.TrainingStep(flavour).training(recipe)
        norm = next(
            m for m in training.D.modules() if parametrize.is_parametrized(m, "weight")
        ).parametrizations.weight[0]
        versions = [norm._u._version]
        hook = training.D.register_forward_pre_hook(lambda *_, u=norm._u, seen=versions: seen.append(u._version))
        training.step(real, z)
        hook.remove()
        versions.append(norm._u._version)
        counts[flavour] = len(set(versions)) - 1  # the updates of u: before, at each D forward, after
    assert counts == {"plain": 3, "ours": 1}, counts


def test_each_provider_trains_its_own_model_per_recipe():
    real, z, recipe = _inputs()
    step = bench_module.TrainingStep("ours")
    first = [step(real, z, recipe)[0].item() for _ in range(3)]
    assert len(step.trainings) == 1 and len(set(first)) == 3  # the model moves: each step's loss differs
    other = replace(recipe, seed=1)
    step(*_inputs(other)[:2], other)
    assert len(step.trainings) == 2


def test_verification_passes_ours():
    checks = bench_module.verify(bench_module.BENCH.native, bench_module.reference_step, _inputs())
    assert len(checks) == 5 and all(c.passed for c in checks), checks


def test_plain_step_is_ours_under_ours_spectral_rule_only():
    # The plain build computes ours' step once torch's spectral norm follows ours' rule (one
    # iteration per step); with torch's own (one per forward) σ moves, and so does D's loss.
    real, z, recipe = _inputs()
    recipe = replace(recipe, optimizer="sgd")
    ours = bench_module.TrainingStep("ours").training(recipe).step(real, z)
    plain = bench_module.TrainingStep("plain")
    training = plain.training(recipe)
    with bench_module._ours_spectral_rule(training.D):
        same = training.step(real, z)
    torch_rule = plain.training(recipe).step(real, z)
    for a, b in zip(same, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert abs(torch_rule[0] - ours[0]) > 1e-5


class _Wrong(bench_module.TrainingStep):
    """A step with one piece changed by ``change(training)``."""

    def __init__(self, change):
        super().__init__("ours")
        self.change = change

    def training(self, recipe, dtype=torch.float32):
        training = super().training(recipe, dtype)
        self.change(training)
        return training


def _no_r1(training):
    d_losses = training.d_losses
    training.d_losses = lambda D, real, fake: (d_losses(D, real, fake)[0], torch.zeros(()))


def _ema_decay(training):
    training.ema.decay = 0.9


def _norm_in_eval_mode(training):
    training.G.norms[1].eval()  # normalises by the running statistics


@pytest.mark.parametrize(
    "change,failing",
    [
        (_no_r1, {"grad_D (worst of 7)"}),
        (_ema_decay, {"EMA shadows (worst of 32)"}),
        # D's gradient moves too, but by less than its tolerance: one norm of G changes fake only a little
        (_norm_in_eval_mode, {"d_loss", "g_loss", "grad_G (worst of 26)", "EMA shadows (worst of 32)"}),
    ],
)
def test_verification_fails_wrong_steps(change, failing):
    checks = bench_module.verify(_Wrong(change), bench_module.reference_step, _inputs())
    failed = {c.quantity for c in checks if not c.passed}
    assert failed == failing, checks
