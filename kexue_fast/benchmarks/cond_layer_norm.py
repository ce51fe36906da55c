"""Benchmark cases of ``kexue::cond_layer_norm`` (the issue's goal shape is 32×512×1024 float32
with per-sample ``(B, D)`` weight and bias)."""

import torch

from kexue_fast._library import REGISTERED
from kexue_fast.benchmarks import Case, OpBench
from kexue_fast.reference import cond_layer_norm as reference


def _inputs(shape, layout, dtype=torch.float32):
    def make(device):
        B, D = shape[0], shape[-1]
        pshape = {"per_sample": (B, D), "shared": (D,)}[layout]
        t = lambda s: torch.randn(s, dtype=dtype, device=device)  # noqa: E731
        return [t(shape), t(pshape), t(pshape)]

    return make


def _with(op):
    return lambda x, w, b: op(x, w, b, 1e-5, False)


def _case(shape, layout, dtype=torch.float32, quick=False, modes=("forward", "backward", "forward+backward")):
    name = "x".join(map(str, shape))
    label = f"{name} {str(dtype).removeprefix('torch.')} {'(B,D)' if layout == 'per_sample' else '(D,)'}"
    return Case(label, _inputs(shape, layout, dtype), modes, quick)


BENCH = OpBench(
    name="cond_layer_norm",
    reference=_with(reference),
    native=_with(torch.ops.kexue.cond_layer_norm),
    triton=_with(torch.ops.kexue.cond_layer_norm_triton) if "cond_layer_norm_triton" in REGISTERED else None,
    ops=("cond_layer_norm", "cond_layer_norm_backward", "cond_layer_norm_triton", "cond_layer_norm_backward_triton"),
    input_names=("x", "weight", "bias"),
    cases=[
        _case((32, 512, 1024), "per_sample", quick=True),
        _case((4096, 768), "shared", modes=("forward", "forward+backward")),
        _case((32, 512, 1024), "per_sample", torch.bfloat16, modes=("forward", "forward+backward")),
    ],
)
