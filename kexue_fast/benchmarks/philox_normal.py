"""Benchmark cases of ``kexue::philox_normal`` against ``torch.randn`` (``eager``; ``compiled``
is ``torch.randn`` under ``torch.compile``): one IGEBM noise tensor (128×3×32×32) and 16M
elements, float32. The floor writes the output once (``torch.zeros``). The kernels are verified
against ``kexue_fast.reference.philox_normal`` (the Philox definition in PyTorch ops) at the
tolerance of docs/langevin.md, ``1e-5·(1 + |ξ|)``."""

import torch

from kexue_fast import reference
from kexue_fast._library import REGISTERED
from kexue_fast.benchmarks import CALL, Case, Check, OpBench

SEED, OFFSET = 1234, 5
RTOL = 1e-5  # |kernel − reference| <= RTOL·(1 + |reference|)


def _with(op):
    return lambda size, device: op(size, SEED, OFFSET, None, device)


def verify(kernel, _randn, inputs) -> list[Check]:
    size, device = inputs
    actual = kernel(size, device).double()
    truth = reference.philox_normal(size, SEED, OFFSET, device=device).double()
    error = ((actual - truth).abs() / (1 + truth.abs())).max().item()
    passed = error <= RTOL
    message = "" if passed else f"error {error:.3g} > {RTOL:.0e}·(1 + |ξ|)"
    return [Check("noise, |error| / (1 + |ξ|)", error, f"{RTOL:.0e}", passed, message)]


def _case(shape, quick=False):
    return Case(f"{'x'.join(map(str, shape))} float32", lambda device: [list(shape), device], (CALL,), quick)


BENCH = OpBench(
    name="philox_normal",
    reference=lambda size, device: torch.randn(size, device=device),
    native=_with(torch.ops.kexue.philox_normal),
    triton=_with(torch.ops.kexue.philox_normal_triton) if "philox_normal_triton" in REGISTERED else None,
    ops=("philox_normal", "philox_normal_triton"),
    cases=[_case((128, 3, 32, 32), quick=True), _case((16, 1024, 1024))],
    floor=lambda size, device: torch.zeros(size, device=device),
    verify=verify,
)
