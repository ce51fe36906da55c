"""Argument checks shared by every op (docs/conventions.md, "Bad input" and "In-place ops").

Each raises a ``TypeError``/``ValueError``/``RuntimeError`` whose message starts with the op's
name and names the argument; none of them writes anything, so an op that validates first and
launches second leaves every input as it was when it raises.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import compress
from operator import attrgetter, not_

import numpy as np
import torch

#: The largest finite float32: scalars the kernels compute with in float32 must not exceed it.
FLOAT32_MAX = torch.finfo(torch.float32).max


def tensor(op: str, name: str, value) -> torch.Tensor:
    """``value`` if it is a Tensor; a TypeError naming ``name`` otherwise (``None`` included)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")
    return value


#: The dtypes every kernel takes.
FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def floating(op: str, name: str, value) -> torch.Tensor:
    """``value`` if it is a Tensor of a dtype in :data:`FLOATING`; a TypeError naming ``name`` otherwise."""
    tensor(op, name, value)
    if value.dtype not in FLOATING:
        raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got {value.dtype}")
    return value


def branch_and_rows(op: str, g, name: str, rows) -> None:
    """A residual branch ``g`` (callable) and a floating-point batch ``rows`` ``(B, ...)`` with at
    least one element per row (the generic i-ResNet functions take any row shape)."""
    if not callable(g):
        raise TypeError(f"{op}: g must be callable (a function or nn.Module mapping a batch to a batch), got "
                        f"{type(g).__name__}")  # fmt: skip
    tensor(op, name, rows)
    if not rows.is_floating_point():
        raise TypeError(f"{op}: {name} must have a floating-point dtype, got {rows.dtype}")
    if rows.dim() < 1:
        raise ValueError(f"{op}: {name} must have a batch dimension (rank >= 1, rows along dim 0), got a 0-D tensor")
    if math.prod(rows.shape[1:]) < 1:
        raise ValueError(f"{op}: {name} must have at least one element in every row, got shape {tuple(rows.shape)}")


def number(op: str, name: str, value, *, non_negative: bool = False, float32: bool = True) -> None:
    """A finite real number (``≥ 0`` if ``non_negative``) that fits in float32 when the kernel
    computes in float32 (``1e39`` would silently become ``inf`` there)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (non_negative and value < 0):
        raise ValueError(f"{op}: {name} must be a finite number{' >= 0' if non_negative else ''}, got {value}")
    if float32 and abs(value) > FLOAT32_MAX:
        raise ValueError(f"{op}: {name}={value} overflows float32 (the kernel computes in float32; |{name}| <= 3.4e38)")


def parameter_of(op: str, name: str, p, x: torch.Tensor) -> None:
    """``p`` is a Tensor of ``x``'s dtype (else TypeError) on ``x``'s device (else ValueError): a
    gain or bias the kernels read with ``x``'s element type."""
    tensor(op, name, p)
    if p.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")


def like_x(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """``t`` has ``x``'s dtype, device and shape: the kernels read it with ``x``'s element type
    and size, so anything else would read the wrong bytes or past its end."""
    parameter_of(op, name, t, x)
    if t.shape != x.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}")


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


_nbytes = attrgetter("nbytes")


def _nbytes_spanned(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to just past its last (0 for an empty tensor)."""
    if t.is_contiguous() or not t.numel():
        return t.nbytes
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


Named = tuple[str, "torch.Tensor | list[torch.Tensor]"]

#: Up to this many tensors the pairs are compared directly (cheaper than NumPy's set-up).
SMALL = 8


def disjoint(op: str, written: Iterable[Named], read: Iterable[Named] = ()) -> None:
    """A ValueError if a written buffer shares memory with another written buffer or with an
    input it is computed from. ``written``/``read`` are ``(name, tensor)`` or ``(name, list of
    tensors)`` pairs (entry ``i`` of a list is called ``name[i]``). Compares the byte ranges the
    tensors span (so two interleaved strided views of one storage count as overlapping); empty
    tensors occupy nothing.
    """
    tensors, writes, names = [], [], []  # names: (name, is one tensor, position of its first tensor)
    for arguments, is_written in ((written, True), (read, False)):
        for name, group in arguments:
            single = isinstance(group, torch.Tensor)
            names.append((name, single, len(tensors)))
            tensors += [group] if single else group
            writes += [is_written] * (len(tensors) - names[-1][2])
    find = _first_clash_pairwise if len(tensors) <= SMALL else _first_clash_sorted
    clash = find(tensors, writes)
    if clash is not None:
        first, second = (_label(names, k) for k in clash)
        raise ValueError(
            f"{op}: {first} and {second} share memory; buffers the op writes must not overlap each other or its "
            "inputs (pass separate tensors, e.g. .clone())"
        )


def _label(names, k: int) -> str:
    """How :func:`disjoint` names its ``k``-th tensor: ``x``, or ``us[3]`` for entry 3 of ``us``."""
    name, single, first = next(entry for entry in reversed(names) if entry[2] <= k)
    return name if single else f"{name}[{k - first}]"


def _first_clash_pairwise(tensors, writes) -> tuple[int, int] | None:
    spans = [(t.data_ptr(), t.data_ptr() + _nbytes_spanned(t)) for t in tensors]
    for k, (start_k, end_k) in enumerate(spans):
        for j, (start_j, end_j) in enumerate(spans[:k]):
            if (writes[k] or writes[j]) and start_k < end_j and start_j < end_k and start_k < end_k and start_j < end_j:
                return k, j
    return None


def _first_clash_sorted(tensors, writes) -> tuple[int, int] | None:
    """A sweep over the ranges sorted by start: a range overlaps an earlier one exactly when it
    starts before the largest end seen so far, so the running maxima of the ends of the written
    ranges and of all ranges find a written/any overlap in ``O(n log n)``, vectorised (one
    model's EMA has hundreds of tensors)."""
    n = len(tensors)
    starts = np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.int64, count=n)
    sizes = np.fromiter(map(_nbytes, tensors), dtype=np.int64, count=n)  # right for contiguous tensors
    for i in compress(range(n), map(not_, map(torch.Tensor.is_contiguous, tensors))):
        sizes[i] = _nbytes_spanned(tensors[i])
    keep = np.flatnonzero(sizes > 0)
    order = keep[np.argsort(starts[keep], kind="stable")]
    start, end, written = starts[order], starts[order] + sizes[order], np.array(writes)[order]
    max_end_before = np.maximum.accumulate(np.concatenate(([-1], end[:-1])))
    max_written_end_before = np.maximum.accumulate(np.concatenate(([-1], np.where(written, end, -1)[:-1])))
    clash = (written & (start < max_end_before)) | (start < max_written_end_before)
    if not clash.any():
        return None
    k = int(np.argmax(clash))
    j = next(j for j in range(k) if start[k] < end[j] and (written[k] or written[j]))
    return int(order[k]), int(order[j])
