"""Benchmark cases of ``kexue::modulated_batch_norm``: a generator's BatchNorm in training with
per-sample γ, β (SELF-MOD / conditional BN), on the issue's two shapes, float32 and bfloat16.

The baseline is what PyTorch users write: ``F.batch_norm`` without affine, then the broadcast
per-sample affine (three passes over the largest tensor forward, more backward). Each provider
keeps its own running statistics (updated every call, as in training)."""

import torch
import torch.nn.functional as F

from kexue_fast.benchmarks import Case, OpBench


def _with_running_stats(fn):
    """``fn(x, w, b, running_mean, running_var)`` as ``f(x, w, b)`` with running statistics of its
    own, made on the first call of each channel count, dtype and device."""
    buffers = {}

    def call(x, w, b):
        key = (x.shape[1], x.dtype, x.device)
        if key not in buffers:
            stats = torch.float64 if x.dtype == torch.float64 else torch.float32
            buffers[key] = (x.new_zeros(x.shape[1], dtype=stats), x.new_ones(x.shape[1], dtype=stats))
        return fn(x, w, b, *buffers[key])

    return call


def hand_written(x, w, b, running_mean, running_var):
    """BatchNorm without affine, then the per-sample affine broadcast over H, W."""
    y = F.batch_norm(x, running_mean.to(x.dtype), running_var.to(x.dtype), None, None, True, 0.1, 1e-5)
    return y * w[:, :, None, None] + b[:, :, None, None]


def fused(x, w, b, running_mean, running_var):
    return torch.ops.kexue.modulated_batch_norm(x, w, b, running_mean, running_var, True, 0.1, 1e-5)


def _inputs(shape, dtype):
    def make(device):
        t = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
        return [t(*shape), 1 + 0.1 * t(shape[0], shape[1]), t(shape[0], shape[1])]

    return make


def _case(shape, dtype, quick=False):
    label = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} (N,C) γ,β train"
    return Case(label, _inputs(shape, dtype), ("forward", "forward+backward"), quick)


BENCH = OpBench(
    name="modulated_batch_norm",
    reference=_with_running_stats(hand_written),
    native=_with_running_stats(fused),
    triton=None,
    ops=(
        "modulated_batch_norm",
        "modulated_batch_norm_forward",
        "modulated_batch_norm_backward",
        "batch_norm_update_stats_",
    ),
    input_names=("x", "weight", "bias"),
    cases=[
        _case((64, 256, 16, 16), torch.float32, quick=True),
        _case((64, 256, 16, 16), torch.bfloat16),
        _case((128, 512, 8, 8), torch.float32),
        _case((128, 512, 8, 8), torch.bfloat16),
    ],
)
