"""The i-ResNet inversion's benchmark suite (kexue_fast/benchmarks/iresnet_inverse.py), and checks
of what the benchmark itself claims: its float64 per-row solve is the reference's rule, the stiff
case has the rows it says, its verification fails wrong kernels, its memory meter sees torch's
allocations. Under ``--benchmark-disable`` (CI's smoke run) the cases are the B = 64 ones of
``smoke_bench()``; timed, they are those of ``kexue-fast bench``."""

import torch

from conftest import parametrize_with_smoke_bench, run_benchmark
from kexue_fast import reference
from kexue_fast.benchmarks import iresnet_inverse as bench_module


def pytest_generate_tests(metafunc):
    parametrize_with_smoke_bench(metafunc, "iresnet_inverse", bench_module.smoke_bench)


def test_iresnet_inverse(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)


def _stiff(B):
    return bench_module._inputs(B, bench_module.STIFF_DIMS, bench_module.STIFF_C, stiff=True, max_iter=500)


def test_per_row_solve_is_the_references_rule():
    # Stiff rows (a few iterations to a few hundred), one NaN row, float64: row by row the reference.
    inputs = bench_module._float64(_stiff(24)(torch.device("cpu")))
    inputs[0][5, 3] = float("nan")
    y, weights, biases, s = bench_module._split(inputs)
    x, n_iter = bench_module.per_row_solve(*inputs)
    x_ref, n_ref = reference.iresnet_inverse(y, weights, biases, "elu", s.max_iter, s.atol, s.rtol)
    assert n_iter.tolist() == n_ref.tolist()
    assert n_iter[5] == s.max_iter and n_iter.min() < 20 and n_iter.max() >= 100
    torch.testing.assert_close(x, x_ref, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_stiff_case_has_slow_and_fast_rows():
    # The docstring's claim, on 1024 rows in float64: a third of the rows need 100 or more
    # iterations, more than half fewer than 20, and all converge within max_iter.
    inputs = _stiff(1024)(torch.device("cpu"))
    _, n_iter = bench_module.per_row_solve(*bench_module._float64(inputs))
    slow, fast = (n_iter >= 100).double().mean().item(), (n_iter < 20).double().mean().item()
    assert 0.25 <= slow <= 0.4 and fast >= 0.5, (slow, fast)
    assert n_iter.max() < inputs[-1].max_iter
    assert 0.95 <= inputs[-1].lip < 1


def _kernel(solve):
    return bench_module.Solver(solve)


def test_verification_fails_wrong_kernels():
    inputs = bench_module._inputs(256, bench_module.MID, 0.97)(torch.device("cpu"))
    right = bench_module.BENCH.native
    checks = bench_module.verify(right, bench_module.per_row_solve, inputs)
    assert all(c.passed for c in checks), checks

    def off(*args):  # right iterations, x off by 1e-4 in one entry
        x, n = right.solve(*args)
        x = x.clone()
        x[7, 2] += 1e-4
        return x, n

    def stuck(*args):  # right x, but every row claims max_iter
        x, n = right.solve(*args)
        return x, torch.full_like(n, args[-1].max_iter)

    def early(*args):  # stops every row after 2 iterations
        return bench_module._native(*args[:-1], bench_module.Settings(max_iter=2, lip=args[-1].lip))

    for wrong, failing in ((off, "residual"), (stuck, "rows at max_iter"), (early, "residual")):
        checks = bench_module.verify(_kernel(wrong), bench_module.per_row_solve, inputs)
        failed = [c.quantity for c in checks if not c.passed]
        assert any(q.startswith(failing) for q in failed), (wrong.__name__, failed)


def test_loops_report_their_counts_and_errors():
    # fixed-100 runs 100 iterations whatever the rows do; batch-wide stops at the first iteration
    # where every row meets the rule, which is no earlier than the slowest row's own stop.
    inputs = _stiff(64)(torch.device("cpu"))
    fns = bench_module.baselines("forward", quick=False, compiled=False)
    fns["native"] = bench_module.BENCH.native
    reported = bench_module.stats(bench_module.BENCH.cases[-1], "forward", fns, inputs, dict.fromkeys(fns, 1.0))
    _, n64 = bench_module.per_row_solve(*bench_module._float64(inputs))
    assert reported["fixed-100"]["loop count"] == 100
    assert reported["batch-wide"]["loop count"] >= n64.max() - 3
    assert reported["fixed-100"]["max error"] > 100 * reported["batch-wide"]["max error"]  # 100 is too few here
    assert abs(reported["native"]["n_iter mean"] - n64.double().mean().item()) < 2
    assert reported["native"]["max error"] < 1e-4


def test_peak_memory_sees_torchs_allocations():
    # 4 MB held, then 8 MB more at once, all freed: the peak is 12 MB above the start, whatever
    # was allocated before.
    held = torch.ones(1 << 20)

    def thunk():
        a = torch.ones(1 << 20)
        b = torch.ones(2 << 20)
        return float((a.sum() + b.sum()).item())

    assert bench_module.peak_bytes(thunk, torch.device("cpu")) >= 12 << 20
    assert bench_module.peak_bytes(thunk, torch.device("cpu")) < 13 << 20
    assert bench_module.peak_bytes(lambda: held.add_(1), torch.device("cpu")) < 1 << 16
