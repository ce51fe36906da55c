r"""``kexue::ema_update_`` — weight EMA for a whole model in one call (docs/ema.md).

For every pair ``(shadow[i], params[i])``::

    shadow[i] ← decay·shadow[i] + (1 − decay)·params[i]

in place, computed in float32 (float64 for float64 shadows) and rounded to the shadow's dtype.
``shadow`` may be float32 while ``params`` are bfloat16/float16 (mixed precision: the params are
widened on the fly, no temporary copies); otherwise the dtypes match. Shapes match pairwise,
all tensors are on one device, shadows are contiguous. Every pair is validated before any
shadow is written; empty lists are a no-op. No autograd (call it under ``no_grad``).

Why fp32 shadows: at decay 0.9999 the increment ``(1 − decay)·(θ − Θ)`` is ~1e-4 of the
weight, below bfloat16's resolution (~4e-3), so a bfloat16 shadow never moves.
"""

from __future__ import annotations

from operator import attrgetter, is_

import torch

from kexue_fast import _checks, _native, _tables
from kexue_fast._library import TRITON_AVAILABLE, define_op, triton_kernels

SCHEMA = "(Tensor(a!)[] shadow, Tensor[] params, float decay) -> ()"

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
#: (shadow dtype, param dtype) pairs the kernels support.
DTYPE_PAIRS = {(F32, F32), (F32, BF16), (F32, F16), (F64, F64), (BF16, BF16), (F16, F16)}


def validate(shadow, params, decay) -> None:
    """Raises a clear error naming the argument for anything docs/ema.md does not accept."""
    op = "ema_update_"
    if len(shadow) != len(params):
        raise ValueError(f"{op}: shadow has {len(shadow)} tensors but params has {len(params)}")
    if not 0.0 <= decay <= 1.0:  # also false for NaN
        raise ValueError(f"{op}: decay must be in [0, 1], got {decay}")
    if _all_valid(shadow, params):
        return
    device = shadow[0].device if shadow else None
    for i, (s, p) in enumerate(zip(shadow, params)):  # names the first offending pair
        if (s.dtype, p.dtype) not in DTYPE_PAIRS:
            raise TypeError(
                f"{op}: shadow[{i}] is {s.dtype} and params[{i}] is {p.dtype}; supported "
                "(shadow, param) pairs: equal float dtypes, or a float32 shadow for bfloat16/float16 params"
            )
        if s.shape != p.shape:
            raise ValueError(f"{op}: shadow[{i}] has shape {tuple(s.shape)} but params[{i}] has {tuple(p.shape)}")
        if s.device != device or p.device != device:
            raise ValueError(f"{op}: shadow[{i}] / params[{i}] are on {s.device} / {p.device}, expected {device}")
        if not s.is_contiguous():
            raise ValueError(f"{op}: shadow[{i}] must be contiguous (it is updated in place)")
        _checks.not_requiring_grad(op, f"shadow[{i}]", s)


_device, _is_cpu, _requires_grad = attrgetter("device"), attrgetter("is_cpu"), attrgetter("requires_grad")


def _on_one_device(shadow, params) -> bool:
    """Whether all tensors are on one device (on the CPU: checked by a flag, not a device object
    per tensor)."""
    if shadow and shadow[0].is_cpu:
        return all(map(_is_cpu, shadow)) and all(map(_is_cpu, params))
    return len(set(map(_device, shadow)) | set(map(_device, params))) <= 1


def _all_valid(shadow, params) -> bool:
    """Whether every pair passes the checks of :func:`validate`, by C-level loops (a model's EMA
    has thousands of tensors); where not, ``validate``'s loop finds the pair to name."""
    return (
        set(zip(map(_tables.DTYPE, shadow), map(_tables.DTYPE, params))) <= DTYPE_PAIRS
        and list(map(_tables.SHAPE, shadow)) == list(map(_tables.SHAPE, params))
        and _on_one_device(shadow, params)
        and all(map(torch.Tensor.is_contiguous, shadow))
        and not any(map(_requires_grad, shadow))
    )


#: The table's slots (shadow, param) both span numel elements; the shadows are written.
_EXTENTS, _WRITTEN = [[0], [0]], [True, False]


def check_disjoint(shadow, params, table=None, table_params=None) -> None:
    """No shadow shares memory with another shadow or with any param (needs real data pointers,
    so it runs in the kernels, not in the fake kernel). With the launch's ``table`` (and the
    ``table_params`` it points to) a sweep in C++ over the table's ranges clears the usual case;
    where it finds a clash, or a param was copied (non-contiguous), the check of
    ``kexue_fast._checks`` runs and names the two tensors."""
    if table is not None and all(map(is_, table_params, params)) and not table.overlapping(_EXTENTS, _WRITTEN):
        return
    _checks.disjoint("ema_update_", [("shadow", shadow)], [("params", params)])


def make_table(shadow, params):
    """The launchers' table (slots shadow, param; size numel) and the contiguous params it points
    to (the caller keeps them alive during the call)."""
    params = list(map(torch.Tensor.contiguous, params))
    return _tables.build("ema_update", (shadow, params), list(map(torch.Tensor.numel, shadow)), 1), params


def _native_launch(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    table, contiguous_params = make_table(shadow, params)
    check_disjoint(shadow, params, table, contiguous_params)
    _native.launcher("ema_update", shadow[0].device)(table, decay)


def _triton_launch(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    check_disjoint(shadow, params)
    kernels = triton_kernels("ema_update")
    kernels.ema_update_(shadow, [p.contiguous() for p in params], decay)


def _impl(launch):
    def ema_update(shadow, params, decay):
        validate(shadow, params, decay)
        if shadow:
            launch(shadow, params, decay)

    return ema_update


def _fake(shadow, params, decay):
    validate(shadow, params, decay)


def _samples(device) -> list[tuple]:
    make = lambda n, dtype: torch.randn(n, dtype=dtype, device=device)  # noqa: E731
    return [
        ([make((3, 5), F32), make(7, F32)], [make((3, 5), F32), make(7, F32)], 0.9),
        ([make(17, F32), make((2, 9), F32)], [make(17, BF16), make((2, 9), F16)], 0.999),
        ([make(4, F64)], [make(4, F64)], 0.5),
        ([make(33, BF16)], [make(33, BF16)], 0.0),
        ([], [], 0.9),
    ]


ema_update_op = define_op("ema_update_", SCHEMA, any_device=_impl(_native_launch), fake=_fake, samples=_samples)
ema_update_triton_op = (
    define_op("ema_update_triton_", SCHEMA, any_device=_impl(_triton_launch), fake=_fake, samples=_samples, triton=True)
    if TRITON_AVAILABLE
    else None
)


def ema_update_(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """``shadow[i] ← decay·shadow[i] + (1 − decay)·params[i]`` for every pair, in place, in one
    call; ``torch.ops.kexue.ema_update_``. Most users want :class:`kexue_fast.EMA`.

    Args:
        shadow: list of contiguous Tensors, written in place; they must not require grad nor
            share memory with each other or with any param. Each call bumps their version counters.
        params: list of Tensors, ``shadow[i].shape == params[i].shape``, all on one device.
            Dtype pairs: equal float dtypes, or float32 shadows for bfloat16/float16 params.
        decay: in ``[0, 1]``.

    Raises:
        TypeError: an unsupported (shadow, param) dtype pair or a non-tensor entry.
        ValueError: lists of different lengths, a shape mismatch, mixed devices, a
            non-contiguous shadow, overlapping buffers, or ``decay`` outside ``[0, 1]``/NaN.
        RuntimeError: a shadow that requires grad.

    Nothing is written when it raises. See docs/ema.md.
    """
    ema_update_op(shadow, params, decay)
