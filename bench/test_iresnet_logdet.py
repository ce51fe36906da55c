"""The i-ResNet log-det training step's benchmark suite (kexue_fast/benchmarks/iresnet_logdet.py), and
checks of what the benchmark itself claims: its residual-flows-style step computes the same loss and
gradients as ours on the same probes and length, its host-drawn length has ours' law, its weights
are plain leaves, its verification fails wrong kernels. Under ``--benchmark-disable`` (CI's smoke
run) the cases are the B = 64 ones of ``smoke_bench()``; timed, they are those of ``kexue-fast bench``."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import parametrize_with_smoke_bench, run_benchmark
from kexue_fast.benchmarks import iresnet_logdet as bench_module
from kexue_fast.iresnet import MLPBranch, residual_logdet
from kexue_fast.iresnet.logdet import probes, roulette_coefficients, roulette_uniform


def pytest_generate_tests(metafunc):
    parametrize_with_smoke_bench(metafunc, "iresnet_logdet", bench_module.smoke_bench)


def test_iresnet_logdet(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)


def _float64_inputs(B=48, dim=3, hidden=16, **settings):
    x, branch, s = bench_module._inputs(B, dim, hidden, bench_module.Settings(**settings))(torch.device("cpu"))
    return x.detach().double().requires_grad_(), bench_module.plain_branch_from(branch, torch.float64), s


def _roulette_offset(min_length: int) -> int:
    """The first step at which ours' roulette draws a length of at least ``min_length``."""
    lengths = {o: len(roulette_coefficients(roulette_uniform(bench_module.SEED, o))) for o in range(200)}
    return next(o for o, n in lengths.items() if n >= min_length)


@pytest.mark.parametrize("estimator", ["series", "roulette"])
def test_residual_flows_step_is_ours_on_ours_probes_and_length(estimator):
    # Two probes, float64, at a step where ours' roulette runs at least 4 terms: the
    # residual-flows-style step given ours' probes and weights has ours' loss and gradients.
    x, branch, s = _float64_inputs(estimator=estimator, n_probes=2)
    offset = _roulette_offset(4)
    loss, grads = bench_module.TrainingStep(bench_module.ours_loss).run(x, branch, s, offset)
    vectors = probes(x, s.n_probes, "gaussian", bench_module.SEED, offset)
    weights = (
        [1.0] * s.n_terms
        if estimator == "series"
        else roulette_coefficients(roulette_uniform(bench_module.SEED, offset))
    )
    rf_loss = bench_module._loss(x, *bench_module.residual_flows_logdet(branch, x, vectors, weights))
    rf_grads = bench_module.gradients(rf_loss, x, branch)
    torch.testing.assert_close(rf_loss, loss, rtol=1e-10, atol=1e-12)
    for got, want in zip(rf_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_host_drawn_length_has_ours_law_and_weights():
    # The weights of a length N are ours' first N; over 20,000 host draws P(N >= k) is 1/c_k
    # (within 4 standard errors), so E[c_k·[k <= N]] = 1: the same unbiased estimator.
    s = bench_module.Settings(estimator="roulette")
    longest = roulette_coefficients(1e-9, s.n_exact_terms, "geometric", s.p)  # U this small: N = 2 + 29
    for extra in range(6):
        assert bench_module.roulette_weights(extra, s) == longest[: s.n_exact_terms + extra]
    rng = np.random.default_rng(1)
    lengths = np.array([len(bench_module.roulette_weights(int(rng.geometric(s.p)) - 1, s)) for _ in range(20000)])
    for k in range(1, 8):
        frequency, survival = (lengths >= k).mean(), 1 / longest[k - 1]
        assert abs(frequency - survival) <= 4 * np.sqrt(survival * (1 - survival) / lengths.size) + 1e-12, k


def test_plain_branch_is_the_normalised_branch_with_leaf_weights():
    # Its weights are the seeded branch's W / max(1, σ(W)/0.9), σ computed exactly here, its
    # biases the same; leaves, and no power iteration when used in training mode.
    branch = bench_module.plain_branch(3, 16, seed=4).train()
    weights, biases, activation = branch.mlp_parameters()
    again, _, _ = branch.mlp_parameters()
    assert all(a is b for a, b in zip(weights, again))
    assert all(t.is_leaf and t.requires_grad for t in weights + biases) and activation == "elu"
    torch.manual_seed(4)
    original = MLPBranch(3, 16, 3)
    for layer, w, b in zip(original.layers, weights, biases, strict=True):
        raw = layer.parametrizations.weight.original.detach()
        sigma = torch.linalg.matrix_norm(raw.double(), 2).item()
        torch.testing.assert_close(w.detach(), raw / max(1.0, sigma / 0.9), rtol=1e-4, atol=1e-6)
        assert torch.equal(b.detach(), layer.bias.detach())


def test_verification_fails_wrong_kernels():
    inputs = bench_module._inputs(64, 2, 16, bench_module.Settings())(torch.device("cpu"))
    checks = bench_module.verify(bench_module.BENCH.native, bench_module.reference_step, inputs)
    assert all(c.passed for c in checks), checks

    def short(x, branch, s, offset):  # the first term only
        return bench_module.ours_loss(x, branch, replace(s, n_terms=1), offset)

    def no_logdet_gradient(x, branch, s, offset):  # the right value, the gradient of g alone
        gx, logdet = residual_logdet(branch, x, s.n_terms, seed=bench_module.SEED, offset=offset)
        return bench_module._loss(x, gx, logdet.detach())

    for wrong, failing in ((short, {"loss", "grad_x"}), (no_logdet_gradient, {"grad_x"})):
        checks = bench_module.verify(bench_module.TrainingStep(wrong), bench_module.reference_step, inputs)
        failed = {c.quantity for c in checks if not c.passed}
        assert failing <= failed and "grad_weights (worst of 3)" in failed, (wrong.__name__, failed)
        assert ("loss" in failed) == (wrong is short)


def test_steps_count_and_a_compiled_step_warms_up():
    # Each call is the next step (offset); a compiled provider's first call runs compile_warm_up
    # steps and counts the graphs dynamo compiled for them.
    x, branch, offsets = torch.ones(3, 2, requires_grad=True), bench_module.plain_branch(2, 4), []

    def loss(x, branch, s, offset):
        offsets.append(offset)
        return offset * branch(x).sum()

    total = branch(x).sum().item()
    eager = bench_module.TrainingStep(loss)
    values = [eager(x, branch, bench_module.Settings())[0].item() for _ in range(3)]
    assert offsets == [1, 2, 3] and values == pytest.approx([total, 2 * total, 3 * total])
    compiled = bench_module.TrainingStep(lambda x, branch, s, offset: offset * branch(x).sum(), compiled=True)
    value, grads = compiled(x, branch, bench_module.Settings(compile_warm_up=3))
    assert compiled.count == 3 and value.item() == pytest.approx(3 * total) and compiled.graphs >= 1
    assert len(grads) == 7 and torch.allclose(grads[0], 3 * eager.run(x, branch, None, 1)[1][0])
    compiled(x, branch, bench_module.Settings(compile_warm_up=3))
    assert compiled.count == 4


def test_stats_report_each_providers_peak_memory():
    inputs = bench_module._inputs(256, 2, 64, bench_module.Settings())(torch.device("cpu"))
    fns = {**bench_module.baselines("step", quick=True, compiled=False), "ours": bench_module.BENCH.native}
    reported = bench_module.stats(None, "step", fns, inputs, dict.fromkeys(fns, 1.0))
    assert set(reported) == {"residual-flows", "ours"}
    activations = 256 * 64 * 4  # one hidden layer's activations in float32: each step holds several
    assert all(r["peak MB"] * 2**20 > activations for r in reported.values()), reported
    assert (
        reported["residual-flows"]["peak / ours'"]
        == reported["residual-flows"]["peak MB"] / reported["ours"]["peak MB"]
    )
