"""pytest-benchmark suites: the same cases and providers as ``kexue-fast bench``.

Run with heap reuse, as ``kexue-fast bench`` does (DESIGN.md, "Benchmark trap"):
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296 pytest bench
CI runs ``pytest bench --benchmark-disable``: every case once, as a smoke test.
"""

import pytest
import torch

import kexue_fast  # noqa: F401
from kexue_fast.benchmarks import load, make_thunk, providers_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_params(op: str) -> list:
    """One pytest param per (case, mode, provider) of ``op`` that runs on this device."""
    bench = load([op])[0]
    return [
        pytest.param(bench, case, mode, provider, id=f"{case.label}-{mode}-{provider}".replace(" ", "_"))
        for case in bench.cases
        for mode in case.modes
        for provider in providers_for(bench, DEVICE, mode, inputs=None)  # names only
    ]


def run_benchmark(benchmark, bench, case, mode, provider):
    torch._dynamo.reset()
    inputs = case.make_inputs(DEVICE)
    thunk = make_thunk(providers_for(bench, DEVICE, mode, inputs)[provider], inputs, mode)
    benchmark.group = f"{bench.name} {case.label} {mode}"
    if DEVICE.type == "cuda":
        benchmark(lambda: (thunk(), torch.cuda.synchronize()))
    else:
        benchmark(thunk)
