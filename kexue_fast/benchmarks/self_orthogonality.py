"""Benchmark cases of ``kexue::self_orthogonality``: the penalty of one layer's output ``y``
``(b, k)``, the issue's b = 256, k = 512 (``k > b``: the op's b × b Gram) and the transposed
shape (``k ≤ b``: the k × k Gram), float32, forward and forward+backward. ``eager`` is the direct
formula of :mod:`kexue_fast.reference.orthogonality` (the k × k ϑ and its masked sums, autograd's
backward), ``compiled`` the same under ``torch.compile``."""

import torch

from kexue_fast.benchmarks import Case, OpBench
from kexue_fast.reference import self_orthogonality as reference


def _inputs(b, k, dtype=torch.float32):
    def make(device):
        return [torch.randn(b, k, dtype=dtype, device=device) * 0.3]

    return make


MODES = ("forward", "forward+backward")

BENCH = OpBench(
    name="self_orthogonality",
    reference=reference,
    native=lambda y: torch.ops.kexue.self_orthogonality(y),
    triton=None,
    ops=("self_orthogonality", "self_orthogonality_forward", "self_orthogonality_backward"),
    input_names=("y",),
    cases=[
        Case("b=256 k=512 fp32", _inputs(256, 512), MODES, quick=True),
        Case("b=512 k=256 fp32", _inputs(512, 256), MODES),
    ],
    floor=None,
)
