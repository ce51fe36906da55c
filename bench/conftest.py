"""pytest-benchmark suites: the same cases and providers as ``kexue-fast bench``.

Run with heap reuse, as ``kexue-fast bench`` does (docs/cli.md, ``--no-heap-reuse``):
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296 pytest bench
CI runs ``pytest bench --benchmark-disable``: every case once, as a smoke test. Before a kernel
(native, Triton) is timed, its result on the case is checked against the reference, once per
case and kernel, outside the timed region: a wrong kernel fails its bench test.
"""

import pytest
import torch

import kexue_fast  # noqa: F401
from kexue_fast.benchmarks import kernels, load, make_thunk, providers_for, verify

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_VERIFIED: set[tuple[str, str, str]] = set()  # (op, case, kernel) already checked in this session


def _params(bench) -> list:
    return [
        pytest.param(bench, case, mode, provider, id=f"{case.label}-{mode}-{provider}".replace(" ", "_"))
        for case in bench.cases
        for mode in case.modes
        for provider in providers_for(bench, DEVICE, mode, inputs=None, case=case)  # names only
    ]


def bench_params(op: str) -> list:
    """One pytest param per (case, mode, provider) of ``op`` that runs on this device."""
    return _params(load([op])[0])


def parametrize_with_smoke_bench(metafunc, op: str, smoke_bench) -> None:
    """``pytest_generate_tests`` of a suite whose cases take minutes: ``bench,case,mode,provider``
    over ``smoke_bench()``'s tiny cases under ``--benchmark-disable`` (CI's smoke run), else over
    ``op``'s cases of ``kexue-fast bench``."""
    if "provider" not in metafunc.fixturenames:
        return
    smoke = metafunc.config.getoption("benchmark_disable", default=False)
    metafunc.parametrize("bench,case,mode,provider", _params(smoke_bench() if smoke else load([op])[0]))


def assert_verified(bench, case, provider, inputs) -> None:
    """Fails unless kernel ``provider`` of ``bench`` passes every check on ``inputs`` (once per
    case and kernel; the other providers are the reference and its variants)."""
    kernel = kernels(bench, DEVICE).get(provider)
    if kernel is None or (bench.name, case.label, provider) in _VERIFIED:
        return
    failed = [
        f"{c.quantity}: error {c.error:.3g}, tolerance {c.tolerance}: {c.message}"
        for c in verify(bench, kernel, inputs)
        if not c.passed
    ]
    assert not failed, f"{bench.name} {case.label} {provider} is wrong: " + "; ".join(failed)
    _VERIFIED.add((bench.name, case.label, provider))


def run_benchmark(benchmark, bench, case, mode, provider):
    torch._dynamo.reset()
    inputs = case.make_inputs(DEVICE)
    assert_verified(bench, case, provider, inputs)
    thunk = make_thunk(providers_for(bench, DEVICE, mode, inputs, case=case)[provider], inputs, mode)
    benchmark.group = f"{bench.name} {case.label} {mode}"
    if DEVICE.type == "cuda":
        benchmark(lambda: (thunk(), torch.cuda.synchronize()))
    else:
        benchmark(thunk)
