"""Benchmark cases of ``kexue::langevin_step_``: IGEBM's CIFAR batch (128×3×32×32, step 10,
noise 0.005, clip 0.01, bounds [0, 1]) in float32 and bfloat16, and a larger batch.

``eager`` is the update a user writes by hand (``add_`` of ``randn_like·σ``, ``sub_`` of the
clipped gradient times the step, ``clamp_``); ``compiled`` is that under ``torch.compile``. Both
draw their noise from torch's generator, so they are checked for speed only; the kernels are
verified against ``kexue_fast.reference.langevin_step_`` (the Philox definition) in float64.
The floor reads ``x`` and ``grad`` and writes ``x`` once (``x.add_(grad, alpha=0)``)."""

import torch

from kexue_fast import reference
from kexue_fast._library import REGISTERED
from kexue_fast.benchmarks import CALL, Case, Check, OpBench, compare

STEP, NOISE, CLIP, LOW, HIGH, SEED, OFFSET = 10.0, 0.005, 0.01, 0.0, 1.0, 1, 0


def eager_update(x, grad):
    """The hand-written IGEBM update (textbook order, torch's generator)."""
    x.add_(torch.randn_like(x) * NOISE)
    x.sub_(grad.clamp(-CLIP, CLIP) * STEP)
    return x.clamp_(LOW, HIGH)


def _with(op):
    return lambda x, grad: op(x, grad, STEP, NOISE, SEED, OFFSET, CLIP, LOW, HIGH)


def verify(kernel, _eager, inputs) -> list[Check]:
    """The kernel's update against the Philox reference: float64 truth, 16-bit results against
    the reference in their own dtype (docs/conventions.md)."""
    x, grad = inputs
    actual = kernel(x.clone(), grad)
    truth = _with(reference.langevin_step_)(x.double(), grad.double())
    same_dtype = _with(reference.langevin_step_)(x.clone(), grad)
    return [compare("x", actual, truth, same_dtype)]


def _inputs(shape, dtype):
    def make(device):
        x = torch.rand(shape, device=device).to(dtype)
        grad = (0.02 * torch.randn(shape, device=device)).to(dtype)
        return [x, grad]

    return make


def _case(shape, dtype=torch.float32, quick=False):
    label = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
    return Case(label, _inputs(shape, dtype), (CALL,), quick)


BENCH = OpBench(
    name="langevin_step",
    reference=eager_update,
    native=_with(torch.ops.kexue.langevin_step_),
    triton=_with(torch.ops.kexue.langevin_step_triton_) if "langevin_step_triton_" in REGISTERED else None,
    ops=("langevin_step_", "langevin_step_triton_"),
    cases=[_case((128, 3, 32, 32), quick=True), _case((128, 3, 32, 32), torch.bfloat16), _case((64, 3, 128, 128))],
    floor=lambda x, grad: x.add_(grad, alpha=0.0),
    verify=verify,
)
