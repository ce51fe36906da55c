r"""``kexue::modulated_batch_norm`` — BatchNorm with a shared or per-sample affine, fused (docs/gan.md).

The math (statistics, running update, backward) is stated once, in
:mod:`kexue_fast.reference.batch_norm`. ``torch.library`` cannot register autograd for an op that
writes its inputs, so the op of docs/gan.md is a ``CompositeImplicitAutograd`` op made of three:

* ``kexue::modulated_batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps)
  -> (y, mean, var)``: functional and differentiable in ``x``, ``weight``, ``bias``; ``mean``/``var``
  are the ``(C,)`` statistics used (the batch's, biased, in training; copies of the running ones in
  eval), float32 (float64 for float64 ``x``), not differentiable;
* ``kexue::modulated_batch_norm_backward(grad_out, x, weight, bias, mean, var, training, eps,
  output_mask) -> (grad_x, grad_weight, grad_bias)``: no double backward;
* ``kexue::batch_norm_update_stats_(running_mean, running_var, mean, var, count, momentum)``: the
  running update of ``F.batch_norm`` (unbiased variance), in place.

Kernels: one native CPU kernel per direction (OpenMP over channels; every per-channel sum in one
fixed order, so results do not depend on the thread count) and CUDA kernels
(csrc/cuda/modulated_batch_norm.cu: per (sample, channel) partial sums, combined per channel in
a fixed order — deterministic too). The running update is one launch of a small kernel on
either device that rounds every product and sum as the reference's tensor ops do: bitwise the same.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kexue_fast import _checks, _native
from kexue_fast._library import define_composite, define_op
from kexue_fast.reference.batch_norm import accumulation_dtype

SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, "
    "float momentum=0.1, float eps=1e-05) -> Tensor"
)
FORWARD_SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, bool training, "
    "float eps=1e-05) -> (Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, bool training, float eps, "
    "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)
UPDATE_SCHEMA = (
    "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, SymInt count, float momentum) -> ()"
)
OP = "modulated_batch_norm"


class Shape(NamedTuple):
    """``x`` seen as ``(N, C, S)``, ``S`` the product of its trailing dims."""

    N: int
    C: int
    S: int


def validate(x, weight, bias, running_mean, running_var, training, eps, op: str = OP) -> Shape:
    """Raises a clear error naming the argument for anything docs/gan.md does not accept."""
    _checks.floating(op, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be at least 2-D (N, C, *), got shape {tuple(x.shape)}")
    _checks.number(op, "eps", eps, non_negative=True, float32=x.dtype != torch.float64)
    N, C = x.shape[0], x.shape[1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _checks.parameter_of(op, name, p, x)
        if p.shape not in ((C,), (N, C)):
            raise ValueError(f"{op}: {name} must have shape (C,)={(C,)} or (N, C)={(N, C)}, got {tuple(p.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together (one is None)")
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        if r is None:
            continue
        _checks.tensor(op, name, r)
        if r.dtype not in _native.DTYPE_CODES:
            raise TypeError(f"{op}: {name} must be a float tensor, got {r.dtype}")
        if r.device != x.device:
            raise ValueError(f"{op}: {name} is on {r.device} but x is on {x.device}")
        if r.shape != (C,):
            raise ValueError(f"{op}: {name} must have shape (C,)={(C,)}, got {tuple(r.shape)}")
    if not isinstance(training, bool):
        raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var are required when training=False")
    S = math.prod(x.shape[2:])
    if training and N * S == 1:
        raise ValueError(f"{op}: x must have more than 1 value per channel when training, got shape {tuple(x.shape)}")
    return Shape(N, C, S)


def validate_statistics(mean, var, x, op: str) -> None:
    """``mean``/``var`` are the forward's ``(C,)`` statistics: the kernels read them as the
    accumulation dtype, so anything else would be read wrongly."""
    acc = accumulation_dtype(x.dtype)
    for name, t in (("mean", mean), ("var", var)):
        _checks.tensor(op, name, t)
        if t.dtype != acc or t.shape != (x.shape[1],) or t.device != x.device:
            raise ValueError(
                f"{op}: {name} must be a ({x.shape[1]},) {acc} tensor on {x.device} (the forward's statistics), "
                f"got {tuple(t.shape)} {t.dtype} on {t.device}"
            )


def validate_update(running_mean, running_var, mean, var, count, momentum) -> None:
    op = "batch_norm_update_stats_"
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        _checks.tensor(op, name, r)
        if r.dtype not in _native.DTYPE_CODES or r.dim() != 1:
            raise ValueError(f"{op}: {name} must be a 1-D float tensor, got {r.dim()}-D {r.dtype}")
        _checks.not_requiring_grad(op, name, r)
    if running_var.shape != running_mean.shape or running_var.device != running_mean.device:
        raise ValueError(f"{op}: running_var must have running_mean's shape and device")
    for name, t in (("mean", mean), ("var", var)):
        _checks.tensor(op, name, t)
        if t.dtype not in (torch.float32, torch.float64) or t.shape != running_mean.shape:
            raise ValueError(f"{op}: {name} must be a float32/float64 tensor of shape {tuple(running_mean.shape)}")
        if t.device != running_mean.device:
            raise ValueError(f"{op}: {name} is on {t.device} but running_mean is on {running_mean.device}")
    if var.dtype != mean.dtype:
        raise ValueError(f"{op}: var must have mean's dtype {mean.dtype} (the forward's statistics), got {var.dtype}")
    if isinstance(count, bool) or not isinstance(count, (int, torch.SymInt)) or count < 0 or count == 1:
        raise ValueError(f"{op}: count must be an int 0 or >= 2 (values per channel), got {count}")
    validate_momentum(momentum, op)


def validate_momentum(momentum, op: str) -> None:
    _checks.number(op, "momentum", momentum, non_negative=True)
    if momentum > 1:
        raise ValueError(f"{op}: momentum must be in [0, 1], got {momentum}")


def _view(p: torch.Tensor | None) -> tuple[int, int, int]:
    """``(pointer, per-sample stride, per-channel stride)`` of a ``(C,)`` or ``(N, C)`` parameter,
    read in place whatever its strides."""
    if p is None:
        return 0, 0, 0
    if p.dim() == 1:
        return p.data_ptr(), 0, p.stride(0)
    return p.data_ptr(), p.stride(0), p.stride(1)


def _statistics(x, running_mean, running_var, training, C):
    """Fresh ``(C,)`` buffers for the statistics: empty in training (the kernel writes them), copies
    of the running ones in eval."""
    acc = accumulation_dtype(x.dtype)
    if training:
        return x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc)
    return x.new_empty(C, dtype=acc).copy_(running_mean), x.new_empty(C, dtype=acc).copy_(running_var)


def _launch(kernel: str, x, shape: Shape, stats_dtype, args: list) -> None:
    """Runs ``kernel`` on ``x``'s device; on CUDA with device memory for its 2·N·C partial sums
    and 2·C per-channel values as the last argument (held here until the launch is enqueued)."""
    scratch = x.new_empty(2 * (shape.N + 1) * shape.C, dtype=stats_dtype) if x.is_cuda else None
    if scratch is not None:
        args = [*args, scratch.data_ptr()]
    _native.launcher(kernel, x.device)(*args)


# --- op implementations ----------------------------------------------------------------------------


def _forward(x, weight, bias, running_mean, running_var, training, eps=1e-5):
    shape = validate(x, weight, bias, running_mean, running_var, training, eps)
    mean, var = _statistics(x, running_mean, running_var, training, shape.C)
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        if training:  # no values: the statistics are undefined, as torch's batch norm leaves them
            mean.fill_(math.nan), var.fill_(math.nan)
        return y, mean, var
    args = [
        _native.DTYPE_CODES[x.dtype], x.data_ptr(), *_view(weight), *_view(bias),
        mean.data_ptr(), var.data_ptr(), training, *shape, eps, y.data_ptr(),
    ]  # fmt: skip
    _launch("modulated_batch_norm_forward", x, shape, mean.dtype, args)
    return y, mean, var


def _needed(output_mask, weight, bias) -> tuple[bool, bool, bool]:
    return bool(output_mask[0]), bool(output_mask[1]) and weight is not None, bool(output_mask[2]) and bias is not None


def _backward(grad_out, x, weight, bias, mean, var, training, eps, output_mask):
    op = "modulated_batch_norm_backward"
    shape = validate(x, weight, bias, None if training else mean, None if training else var, training, eps, op)
    validate_statistics(mean, var, x, op)
    _checks.tensor(op, "grad_out", grad_out)
    _checks.like_x(op, "grad_out", grad_out, x)
    need_gx, need_gw, need_gb = _needed(output_mask, weight, bias)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_gx else x.new_empty(0)
    gw = x.new_empty(weight.shape) if need_gw else x.new_empty(0)
    gb = x.new_empty(bias.shape) if need_gb else x.new_empty(0)
    if x.numel() == 0:  # the kernel writes every entry of gw, gb; with no values they are 0
        return gx, gw.zero_(), gb.zero_()
    grad_out, x = grad_out.contiguous(), x.contiguous()
    args = [
        _native.DTYPE_CODES[x.dtype], grad_out.data_ptr(), x.data_ptr(), *_view(weight),
        mean.data_ptr(), var.data_ptr(), training, *shape, eps,
        _native.ptr(gx) if need_gx else 0,
        _native.ptr(gw) if need_gw else 0, need_gw and weight.dim() == 2,
        _native.ptr(gb) if need_gb else 0, need_gb and bias.dim() == 2,
    ]  # fmt: skip
    _launch("modulated_batch_norm_backward", x, shape, mean.dtype, args)
    return gx, gw, gb


def _update(running_mean, running_var, mean, var, count, momentum):
    validate_update(running_mean, running_var, mean, var, count, momentum)
    _checks.disjoint("batch_norm_update_stats_", [("running_mean", running_mean), ("running_var", running_var)],
                     [("mean", mean), ("var", var)])  # fmt: skip
    if count == 0:  # an empty batch: nothing to average in
        return
    args = [
        _native.DTYPE_CODES[running_mean.dtype], running_mean.data_ptr(), running_mean.stride(0),
        running_var.data_ptr(), running_var.stride(0), _native.DTYPE_CODES[mean.dtype], mean.data_ptr(),
        mean.stride(0), var.data_ptr(), var.stride(0), running_mean.shape[0], count, momentum,
    ]  # fmt: skip
    _native.launcher("batch_norm_update_stats", running_mean.device)(*args)


# --- fake kernels, autograd, samples ---------------------------------------------------------------


def _forward_fake(x, weight, bias, running_mean, running_var, training, eps=1e-5):
    shape = validate(x, weight, bias, running_mean, running_var, training, eps)
    acc = accumulation_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty(shape.C, dtype=acc), x.new_empty(shape.C, dtype=acc)


def _backward_fake(grad_out, x, weight, bias, mean, var, training, eps, output_mask):
    op = "modulated_batch_norm_backward"
    validate(x, weight, bias, None if training else mean, None if training else var, training, eps, op)
    validate_statistics(mean, var, x, op)
    _checks.tensor(op, "grad_out", grad_out)
    _checks.like_x(op, "grad_out", grad_out, x)
    need_gx, need_gw, need_gb = _needed(output_mask, weight, bias)
    return (
        x.new_empty(x.shape if need_gx else (0,)),
        x.new_empty(weight.shape if need_gw else (0,)),
        x.new_empty(bias.shape if need_gb else (0,)),
    )


def _update_fake(running_mean, running_var, mean, var, count, momentum):
    validate_update(running_mean, running_var, mean, var, count, momentum)


def _autograd(backward_op):
    def setup_context(ctx, inputs, output):
        x, weight, bias, _, _, training, eps = inputs
        _, mean, var = output
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.mark_non_differentiable(mean, var)
        ctx.training, ctx.eps = training, eps

    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, mean, var = ctx.saved_tensors
        mask = _needed(ctx.needs_input_grad[:3], weight, bias)
        grads = backward_op(grad_y, x, weight, bias, mean, var, ctx.training, ctx.eps, list(mask))
        return *(g if need else None for g, need in zip(grads, mask)), None, None, None, None

    return backward, setup_context


def _make(*shape, device, grad=False, dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)


def _forward_samples(device) -> list[tuple]:
    """opcheck inputs: per-sample and shared affine, training and eval, 2-D to 5-D, empty."""
    make = lambda *shape, grad=False, dtype=torch.float32: _make(*shape, device=device, grad=grad, dtype=dtype)  # noqa: E731
    running = lambda C: (make(C), make(C).abs() + 0.5)  # noqa: E731
    N, C = 3, 5
    return [
        (make(N, C, 4, 3, grad=True), make(N, C, grad=True), make(N, C, grad=True), *running(C), True, 1e-5),
        (make(N, C, 7, grad=True), make(C, grad=True), make(C, grad=True), None, None, True, 1e-3),
        (make(N, C, 2, 3, grad=True), make(N, C, grad=True), make(C), *running(C), False, 1e-5),
        (make(N, C, grad=True), None, make(N, 2 * C, grad=True)[:, ::2], None, None, True, 0.0),
        (make(N, C, 2, 2, 2, dtype=torch.float64), None, None, *running(C), True, 1e-5),
        (make(0, C, 4, grad=True), make(0, C, grad=True), make(C, grad=True), *running(C), False, 1e-5),
    ]


def _detach(t):
    return None if t is None else t.detach()


def _backward_samples(device) -> list[tuple]:
    """The backward op has no autograd of its own (no double backward): inputs without grad."""
    samples = []
    for x, w, b, rm, rv, training, eps in _forward_samples(device):
        x, w, b = x.detach(), _detach(w), _detach(b)
        _, mean, var = _forward(x, w, b, rm, rv, training, eps)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            samples.append((torch.randn_like(x), x, w, b, mean, var, training, eps, mask))
    return samples


def _update_samples(device) -> list[tuple]:
    make = lambda *shape, dtype=torch.float32: _make(*shape, device=device, dtype=dtype)  # noqa: E731
    return [
        (make(5), make(5).abs(), make(5), make(5).abs(), 12, 0.1),
        (make(3, dtype=torch.bfloat16), make(3, dtype=torch.bfloat16).abs(), make(3), make(3).abs(), 2, 1.0),
        (make(4, dtype=torch.float64), make(4, dtype=torch.float64).abs(), make(4, dtype=torch.float64),
         make(4, dtype=torch.float64).abs(), 0, 0.5),
    ]  # fmt: skip


modulated_batch_norm_backward_op = define_op(
    "modulated_batch_norm_backward", BACKWARD_SCHEMA, cpu=_backward, cuda=_backward,
    fake=_backward_fake, samples=_backward_samples,
)  # fmt: skip
_backward_formula, _setup_context = _autograd(modulated_batch_norm_backward_op)
modulated_batch_norm_forward_op = define_op(
    "modulated_batch_norm_forward", FORWARD_SCHEMA, cpu=_forward, cuda=_forward,
    fake=_forward_fake, samples=_forward_samples, backward=_backward_formula, setup_context=_setup_context,
)  # fmt: skip
batch_norm_update_stats_op = define_op(
    "batch_norm_update_stats_", UPDATE_SCHEMA, cpu=_update, cuda=_update, fake=_update_fake,
    samples=_update_samples,
)  # fmt: skip


def _composite(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """The SPEC op: the forward (which validates the rest), then (training, with running
    statistics) their update."""
    validate_momentum(momentum, OP)
    y, mean, var = modulated_batch_norm_forward_op(x, weight, bias, running_mean, running_var, training, eps)
    if training and running_mean is not None:
        count = x.shape[0] * math.prod(x.shape[2:])
        batch_norm_update_stats_op(running_mean, running_var, mean, var, count, momentum)
    return y


modulated_batch_norm_op = define_composite(OP, SCHEMA, _composite)


def modulated_batch_norm(
    x, weight=None, bias=None, running_mean=None, running_var=None, training: bool = True,
    momentum: float = 0.1, eps: float = 1e-5,
):  # fmt: skip
    """BatchNorm over ``x`` ``(N, C, *)`` with a shared ``(C,)`` or per-sample ``(N, C)`` affine, in
    one fused pass each way; ``torch.ops.kexue.modulated_batch_norm``. Drop-in for
    ``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)`` where
    ``weight``/``bias`` may also be ``(N, C)`` (conditional BN, SELF-MOD).

    Args:
        x: ``(N, C, *)``, at least 2-D; float32, float64, float16 or bfloat16.
        weight: ``None`` (1), ``(C,)`` or ``(N, C)`` (one γ per sample); ``x``'s dtype and device.
            Any strides (e.g. a chunk of a ``Linear`` output) are read in place.
        bias: like ``weight`` (``None``: 0).
        running_mean, running_var: ``(C,)`` float tensors (any float dtype), both or neither.
            Required when ``training=False`` (then they normalise); in training they are updated in
            place as ``F.batch_norm`` does, with the unbiased batch variance.
        training: batch statistics (and the running update) or the running statistics.
        momentum: in ``[0, 1]``, the weight of the batch in the running update (for a cumulative
            average pass ``1 / num_batches_tracked``, as ``nn.BatchNorm2d`` does with ``momentum=None``).
        eps: finite, ``>= 0``, added to the variance.

    Returns:
        ``y`` of ``x``'s shape and dtype (contiguous); differentiable in ``x``, ``weight`` and
        ``bias``, gradients of the shape passed (no double backward).

    Raises:
        TypeError: a non-tensor ``x``/``weight``/``bias``, an unsupported dtype, or ``weight``/``bias``
            of another dtype than ``x``.
        ValueError: a shape not listed above, another device, only one running statistic, eval
            without running statistics, training with one value per channel, ``eps``/``momentum``
            out of range, or running statistics that overlap.

    Nothing is written when it raises. The math: :mod:`kexue_fast.reference.batch_norm`; docs/gan.md.
    """
    return modulated_batch_norm_op(x, weight, bias, running_mean, running_var, training, momentum, eps)
