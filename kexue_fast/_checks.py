"""Argument checks shared by every op (docs/conventions.md, "Bad input" and "In-place ops").

Each raises a ``TypeError``/``ValueError``/``RuntimeError`` whose message starts with the op's
name and names the argument; none of them writes anything, so an op that validates first and
launches second leaves every input as it was when it raises.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

#: The largest finite float32: scalars the kernels compute with in float32 must not exceed it.
FLOAT32_MAX = torch.finfo(torch.float32).max


def tensor(op: str, name: str, value) -> torch.Tensor:
    """``value`` if it is a Tensor; a TypeError naming ``name`` otherwise (``None`` included)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")
    return value


def number(op: str, name: str, value, *, non_negative: bool = False, float32: bool = True) -> None:
    """A finite real number (``≥ 0`` if ``non_negative``) that fits in float32 when the kernel
    computes in float32 (``1e39`` would silently become ``inf`` there)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (non_negative and value < 0):
        raise ValueError(f"{op}: {name} must be a finite number{' >= 0' if non_negative else ''}, got {value}")
    if float32 and abs(value) > FLOAT32_MAX:
        raise ValueError(f"{op}: {name}={value} overflows float32 (the kernel computes in float32; |{name}| <= 3.4e38)")


def not_requiring_grad(op: str, name: str, t: torch.Tensor) -> None:
    """Buffers an op overwrites must not be part of an autograd graph."""
    if t.requires_grad:
        raise RuntimeError(
            f"{op}: {name} requires grad, but the op overwrites it and has no autograd; pass a tensor that does "
            "not require grad (e.g. t.detach() or a buffer)"
        )


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share a memory location (``expand``, ``as_strided``). Torch's
    quick test answers yes, no or "too hard"; the last is settled by listing the offsets."""
    quick = torch._debug_has_internal_overlap(t)
    if quick != 2:
        return quick == 1
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(size) * stride).flatten()
    return offsets.unique().numel() < t.numel()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[first, last + 1)`` that ``t``'s elements occupy."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.nbytes
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


Named = tuple[str, "torch.Tensor | list[torch.Tensor]"]


def disjoint(op: str, written: Iterable[Named], read: Iterable[Named] = ()) -> None:
    """A ValueError if a written buffer shares memory with another written buffer or with an
    input it is computed from. ``written``/``read`` are ``(name, tensor)`` or ``(name, list of
    tensors)`` pairs (entry ``i`` of a list is called ``name[i]``). Compares the byte ranges the
    tensors span (so two interleaved strided views of one storage count as overlapping); empty
    tensors occupy nothing.

    One sweep over the ranges sorted by start: a range overlaps an earlier one exactly when it
    starts before the largest end seen so far, so keeping the largest end of the written ranges
    and of all ranges finds every written/any pair in ``O(n log n)``.
    """
    groups = [(name, tensors, True) for name, tensors in written] + [(name, tensors, False) for name, tensors in read]
    spans = []
    for g, (_, tensors, is_written) in enumerate(groups):
        for i, t in enumerate([tensors] if isinstance(tensors, torch.Tensor) else tensors):
            if t.numel():
                spans.append((*_span(t), is_written, g, i))
    if len(spans) < 2:
        return
    spans.sort()

    def label(g: int, i: int) -> str:
        name, tensors, _ = groups[g]
        return name if isinstance(tensors, torch.Tensor) else f"{name}[{i}]"

    end_any = end_written = -1
    holder_any = holder_written = (0, 0)
    for start, end, is_written, g, i in spans:
        other = holder_any if is_written and start < end_any else holder_written if start < end_written else None
        if other is not None:
            raise ValueError(
                f"{op}: {label(g, i)} and {label(*other)} share memory; buffers the op writes must not overlap each "
                "other or its inputs (pass separate tensors, e.g. .clone())"
            )
        if end > end_any:
            end_any, holder_any = end, (g, i)
        if is_written and end > end_written:
            end_written, holder_written = end, (g, i)
