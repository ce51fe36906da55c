"""Benchmark cases of ``kexue::cascading_rejection`` (the issue's shape: ``B = 256`` features of
``d = 1024`` scored in ``N = 8`` stages), against the naive ``N``-step cascade of the reference —
eager and under ``torch.compile``."""

import torch

from kexue_fast.benchmarks import Case, OpBench
from kexue_fast.reference import cascading_rejection as reference

EPS = 1e-12


def _inputs(B, N, d, dtype=torch.float32):
    def make(device):
        return [torch.randn(B, d, dtype=dtype, device=device), torch.randn(N, d, dtype=dtype, device=device)]

    return make


def _with(fn):
    return lambda v, w: fn(v, w, EPS)


def _case(B, N, d, dtype=torch.float32, quick=False):
    label = f"B={B} d={d} N={N} {str(dtype).removeprefix('torch.')}"
    return Case(label, _inputs(B, N, d, dtype), ("forward", "forward+backward"), quick)


BENCH = OpBench(
    name="cascading_rejection",
    reference=_with(reference),
    native=_with(torch.ops.kexue.cascading_rejection),
    triton=None,
    ops=("cascading_rejection", "cascading_rejection_backward"),
    input_names=("v", "w"),
    cases=[_case(256, 8, 1024, quick=True), _case(256, 16, 1024), _case(256, 8, 1024, torch.bfloat16)],
)
