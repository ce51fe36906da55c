r"""``kexue::cond_layer_norm`` — fused conditional LayerNorm / RMSNorm (docs/cond_layer_norm.md).

Math, per row ``x`` of length ``D`` (the last dim), with the gain ``w`` and bias ``b`` that
belong to the row::

    LayerNorm:  μ = mean(x),  var = mean((x − μ)²),  rstd = 1/sqrt(var + eps),  x̂ = (x − μ)·rstd
    RMSNorm:    rstd = 1/sqrt(mean(x²) + eps),  x̂ = x·rstd                      (rms=True)
    y = x̂·w + b

``weight``/``bias`` are each ``None``, ``(D,)`` (shared, as in ``nn.LayerNorm``), ``(B, D)``
(per sample, broadcast over every middle dim of ``x`` of shape ``(B, *, D)``: the conditional
case) or exactly ``x.shape``. They must have ``x``'s dtype and device. A ``(B, D)`` parameter
may be a strided view (e.g. one chunk of a ``Linear`` output): it is read in place.

Backward (``g = ∂L/∂y``, ``g' = g·w``; the kernels recompute μ, rstd from ``x`` instead of
saving them)::

    ∂L/∂x = rstd·(g' − mean(g') − x̂·mean(g'·x̂))        (RMSNorm: without the mean(g') term)
    ∂L/∂w = Σ g·x̂,   ∂L/∂b = Σ g                          summed to the shape the caller passed

Numerics: float32/float64/float16/bfloat16; statistics and sums in float32 (float64 for float64);
two-pass variance. Gradient sums are deterministic: no float atomics, fixed block order.
Double backward is not supported.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kexue_fast import _checks, _native
from kexue_fast._library import TRITON_AVAILABLE, define_op, triton_kernels

SCHEMA = "(Tensor x, Tensor? weight, Tensor? bias, float eps=1e-05, bool rms=False) -> Tensor"
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, float eps, bool rms, "
    "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)

#: Reduction blocks to aim for in the backward (enough to keep every core / SM busy).
TARGET_BLOCKS = {"cpu": 64, "cuda": 512}


class Layout(NamedTuple):
    """``x`` seen as ``(B, M, D)``: ``rows = B·M`` rows of length ``D`` (a field, not a property:
    it is read several times per call)."""

    B: int
    M: int
    D: int
    rows: int


class Affine(NamedTuple):
    """A gain or bias as a kernel reads it: ``tensor[b·stride_b + m·stride_m + d]``.
    ``group_rows`` consecutive rows share one parameter row (the gradient's reduction groups)."""

    tensor: torch.Tensor | None
    stride_b: int
    stride_m: int
    group_rows: int


def validate(x, weight, bias, eps) -> Layout:
    """Raises a clear error naming the argument for anything docs/cond_layer_norm.md does not accept."""
    op = "cond_layer_norm"
    _checks.floating(op, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be at least 2-D (B, *, D), got shape {tuple(x.shape)}")
    _checks.number(op, "eps", eps, non_negative=True, float32=x.dtype != torch.float64)
    shape = x.shape
    B, D = shape[0], shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _checks.parameter_of(op, name, p, x)
        pshape = p.shape
        if not (pshape == (D,) or pshape == (B, D) or pshape == shape):
            raise ValueError(
                f"{op}: {name} must have shape (D,)={(D,)}, (B, D)={(B, D)} or "
                f"x.shape={tuple(shape)}, got {tuple(pshape)}"
            )
    M = math.prod(shape[1:-1])
    return Layout(B, M, D, B * M)


def validate_backward(grad_out, x, weight, bias, eps) -> Layout:
    """:func:`validate`, and ``grad_out`` must be a Tensor of ``x``'s shape, dtype and device
    (the kernels read it with ``x``'s element type: anything else would read past its end)."""
    lay = validate(x, weight, bias, eps)
    op = "cond_layer_norm_backward"
    _checks.tensor(op, "grad_out", grad_out)
    _checks.like_x(op, "grad_out", grad_out, x)
    return lay


def affine(p: torch.Tensor | None, lay: Layout) -> Affine:
    """How the kernels address ``p`` (made unit-stride along D, otherwise read in place)."""
    if p is None:
        return Affine(None, 0, 0, lay.rows)
    if p.dim() == 1:  # (D,): one row shared by all
        return Affine(p.contiguous(), 0, 0, lay.rows)
    if p.dim() == 2:  # (B, D): one row per sample (for a 2-D x that is also x.shape)
        p = p if p.stride(-1) == 1 else p.contiguous()
        return Affine(p, p.stride(0), 0, lay.M)
    p = p.contiguous()  # x.shape: one row per row
    return Affine(p, lay.M * lay.D, lay.D, 1)


def reduction_plan(group_rows: int, rows: int, target_blocks: int) -> tuple[int, int]:
    """``(group_rows, rows_per_block)``: split each group so that about ``target_blocks`` blocks
    exist in all. Depends on the shape only, so gradients are bitwise reproducible."""
    n_groups = rows // group_rows
    blocks_per_group = max(1, min(group_rows, -(-target_blocks // n_groups)))
    return group_rows, -(-group_rows // blocks_per_group)


# --- launchers: one forward and one backward per backend, with the same signatures ----------


def _native_forward(x: torch.Tensor, w: Affine, b: Affine, lay: Layout, eps: float, rms: bool):
    y = torch.empty_like(x)
    w_ptr = 0 if w.tensor is None else w.tensor.data_ptr()
    b_ptr = 0 if b.tensor is None else b.tensor.data_ptr()
    _native.launcher("cond_layer_norm_forward", x.device)(
        _native.DTYPE_CODES[x.dtype], x.data_ptr(),
        w_ptr, w.stride_b, w.stride_m,
        b_ptr, b.stride_b, b.stride_m,
        y.data_ptr(), lay.rows, lay.M, lay.D, eps, rms,
    )  # fmt: skip
    return y


def _native_backward(g, x, w: Affine, lay: Layout, eps, rms, need_gx, plan, gw_shape, gb_shape):
    group_rows, rows_per_block = plan
    gx = torch.empty_like(x) if need_gx else None
    gw = x.new_empty(gw_shape) if gw_shape is not None else None
    gb = x.new_empty(gb_shape) if gb_shape is not None else None
    args = [
        _native.DTYPE_CODES[x.dtype], g.data_ptr(), x.data_ptr(),
        _native.ptr(w.tensor), w.stride_b, w.stride_m,
        _native.ptr(gx), _native.ptr(gw), _native.ptr(gb),
    ]  # fmt: skip
    if x.is_cuda:  # device memory for the partial sums of the reduction blocks
        n_blocks = lay.rows // group_rows * -(-group_rows // rows_per_block)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        scratch = x.new_empty(2 * n_blocks * lay.D, dtype=acc) if gw is not None or gb is not None else None
        args.append(_native.ptr(scratch))
    args += [lay.rows, lay.M, lay.D, eps, rms, group_rows, rows_per_block]
    _native.launcher("cond_layer_norm_backward", x.device)(*args)
    return gx, gw, gb


def _triton_forward(x, w: Affine, b: Affine, lay: Layout, eps, rms):
    y = triton_kernels("cond_layer_norm").cond_layer_norm_forward(
        x.view(lay.rows, lay.D), w.tensor, (w.stride_b, w.stride_m),
        b.tensor, (b.stride_b, b.stride_m), lay.M, eps, rms,
    )  # fmt: skip
    return y.view(x.shape)


def _triton_backward(g, x, w: Affine, lay: Layout, eps, rms, need_gx, plan, gw_shape, gb_shape):
    gx, gw, gb = triton_kernels("cond_layer_norm").cond_layer_norm_backward(
        g.view(lay.rows, lay.D), x.view(lay.rows, lay.D), w.tensor, (w.stride_b, w.stride_m), lay.M,
        eps, rms, need_gx, plan[0], plan[1], gw_shape is not None, gb_shape is not None,
    )  # fmt: skip
    return (
        None if gx is None else gx.view(x.shape),
        None if gw is None else gw.view(gw_shape),
        None if gb is None else gb.view(gb_shape),
    )


# --- op implementations, generic over the launchers -----------------------------------------


def _forward_impl(launch):
    def forward(x, weight, bias, eps=1e-5, rms=False):
        lay = validate(x, weight, bias, eps)
        if x.numel() == 0:
            return torch.empty_like(x, memory_format=torch.contiguous_format)
        return launch(x.contiguous(), affine(weight, lay), affine(bias, lay), lay, eps, rms)

    return forward


def _backward_impl(launch):
    def backward(grad_out, x, weight, bias, eps, rms, output_mask):
        lay = validate_backward(grad_out, x, weight, bias, eps)
        need_gx, need_gw, need_gb = _needed(output_mask, weight, bias)
        gx = gw = gb = None
        if x.numel() > 0:
            g, x = grad_out.contiguous(), x.contiguous()
            w, b = affine(weight, lay), affine(bias, lay)
            target = TARGET_BLOCKS.get(x.device.type, TARGET_BLOCKS["cpu"])
            gw_shape = weight.shape if need_gw else None
            gb_shape = bias.shape if need_gb else None
            # One pass serves both parameter gradients when they reduce over the same groups.
            together = not (need_gw and need_gb) or w.group_rows == b.group_rows
            plan = reduction_plan(w.group_rows if need_gw else b.group_rows, lay.rows, target)
            gx, gw, gb = launch(g, x, w, lay, eps, rms, need_gx, plan, gw_shape, gb_shape if together else None)
            if not together:
                plan = reduction_plan(b.group_rows, lay.rows, target)
                gb = launch(g, x, w, lay, eps, rms, False, plan, None, gb_shape)[2]
        return (
            _grad_or_empty(gx, x, x, need_gx),
            _grad_or_empty(gw, weight, x, need_gw),
            _grad_or_empty(gb, bias, x, need_gb),
        )

    return backward


def _grad_or_empty(grad, like, x, needed):
    """The gradient; zeros shaped like ``like`` if needed but never computed (empty input), a
    fresh 0-element tensor if not needed (outputs must not alias each other)."""
    if grad is not None:
        return grad
    return x.new_zeros(like.shape) if needed else x.new_empty(0)


def _needed(output_mask, weight, bias) -> tuple[bool, bool, bool]:
    return bool(output_mask[0]), bool(output_mask[1]) and weight is not None, bool(output_mask[2]) and bias is not None


def _forward_fake(x, weight, bias, eps=1e-5, rms=False):
    validate(x, weight, bias, eps)
    return x.new_empty(x.shape)


def _backward_fake(grad_out, x, weight, bias, eps, rms, output_mask):
    validate_backward(grad_out, x, weight, bias, eps)
    need_gx, need_gw, need_gb = _needed(output_mask, weight, bias)
    return (
        x.new_empty(x.shape if need_gx else (0,)),
        x.new_empty(weight.shape if need_gw else (0,)),
        x.new_empty(bias.shape if need_gb else (0,)),
    )


def _autograd(backward_op):
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, rms = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.eps, ctx.rms = eps, rms

    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        mask = _needed(ctx.needs_input_grad[:3], weight, bias)
        grads = backward_op(grad, x, weight, bias, ctx.eps, ctx.rms, list(mask))
        return *(g if need else None for g, need in zip(grads, mask)), None, None

    return backward, setup_context


def _forward_samples(device) -> list[tuple]:
    """opcheck inputs: every parameter layout, LayerNorm and RMS, with and without grad."""
    make = lambda *shape, grad=False: torch.randn(*shape, device=device, requires_grad=grad)  # noqa: E731
    B, M, D = 3, 4, 37
    return [
        (make(B, M, D, grad=True), make(B, D, grad=True), make(B, D, grad=True), 1e-5, False),
        (make(B, M, D, grad=True), make(D, grad=True), make(D, grad=True), 1e-5, True),
        (make(B, M, D, grad=True), make(B, M, D, grad=True), None, 1e-6, False),
        (make(B, 2, M, D), None, make(B, D), 1e-5, False),
        (make(B, D, grad=True), make(B, 2 * D, grad=True)[:, :D], make(D), 0.0, True),
        (make(0, M, D, grad=True), make(0, D, grad=True), make(D, grad=True), 1e-5, False),
    ]


def _detach(t):
    return None if t is None else t.detach()


def _backward_samples(device) -> list[tuple]:
    """The backward op has no autograd of its own (no double backward): inputs without grad."""
    return [
        (torch.randn_like(x), x.detach(), _detach(w), _detach(b), eps, rms, mask)
        for (x, w, b, eps, rms) in _forward_samples(device)
        for mask in ([True, True, True], [True, False, False], [False, True, True])
    ]


def _register(suffix: str, forward_launch, backward_launch):
    """The forward and backward ops of one family of launchers, on CPU and CUDA (``_triton``: the
    Triton variant, where define_op decides which devices it runs on)."""
    triton = suffix == "_triton"
    backward_kernel, forward_kernel = _backward_impl(backward_launch), _forward_impl(forward_launch)
    backward_op = define_op(
        f"cond_layer_norm_backward{suffix}", BACKWARD_SCHEMA, cpu=backward_kernel, cuda=backward_kernel,
        fake=_backward_fake, samples=_backward_samples, triton=triton,
    )  # fmt: skip
    backward, setup_context = _autograd(backward_op)
    return define_op(
        f"cond_layer_norm{suffix}", SCHEMA, cpu=forward_kernel, cuda=forward_kernel,
        fake=_forward_fake, samples=_forward_samples, triton=triton,
        backward=backward, setup_context=setup_context,
    )  # fmt: skip


cond_layer_norm_op = _register("", _native_forward, _native_backward)
cond_layer_norm_triton_op = _register("_triton", _triton_forward, _triton_backward) if TRITON_AVAILABLE else None


def cond_layer_norm(x, weight=None, bias=None, eps: float = 1e-5, rms: bool = False):
    """Fused LayerNorm (``rms=True``: RMSNorm) over the last dim of ``x`` with a shared,
    per-sample or elementwise gain and bias; ``torch.ops.kexue.cond_layer_norm``.

    Args:
        x: ``(B, *, D)`` Tensor, at least 2-D; float32, float64, float16 or bfloat16.
        weight: ``None``, ``(D,)``, ``(B, D)`` (one gain per sample, broadcast over the middle
            dims) or ``x.shape``; ``x``'s dtype and device. A strided ``(B, D)`` view is read in place.
        bias: like ``weight``.
        eps: finite, ``>= 0`` (and within float32 range unless ``x`` is float64); added to the
            variance (mean square for RMSNorm) inside the square root.
        rms: RMSNorm (no centring) instead of LayerNorm.

    Returns:
        ``y`` of ``x``'s shape and dtype, ``(x − μ)·rstd·weight + bias``; differentiable in
        ``x``, ``weight`` and ``bias`` (gradients reduced to the shape passed; no double backward).

    Raises:
        TypeError: ``x`` not a Tensor, an unsupported dtype, or ``weight``/``bias`` of another dtype.
        ValueError: ``x`` below 2-D, a ``weight``/``bias`` shape not listed above or on another
            device, or a negative/NaN/infinite ``eps``.

    The math, numerics and examples: docs/cond_layer_norm.md.
    """
    return cond_layer_norm_op(x, weight, bias, eps, rms)
