"""Triton helpers shared by the kernels (installed as ``kexue_fast.triton_kernels._common``).

Pointer tables (the ``Tensor[]`` kernels: ema_update, spectral_norm)
--------------------------------------------------------------------
A kernel over many separately allocated tensors does not take them as arguments: it takes one
int64 table of their addresses (``data_ptr()``), sizes and per-program work items, built on the
host by :func:`pointer_table` and copied to the device once. A program loads an address and
turns it into a typed pointer with :func:`typed_pointer`, which is ``int64.to(pointer_type)``
(``tt.int_to_ptr`` on the GPU). The element type comes from a "type witness" pointer argument
(:func:`type_witness`: 16 bytes of the table viewed as that dtype, never dereferenced). Under
``TRITON_INTERPRET=1`` with CPU tensors this runs unchanged (the interpreter's ``int_to_ptr`` is
a bit-cast of a host address, and the tensors are not arguments, so its copy-in/copy-back of
arguments never touches them); non-CPU tensors under the interpreter go through
:func:`run_on_host_copies`.
"""

from __future__ import annotations

import array
import struct
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl


def f64_bits(x: float) -> int:
    """The bit pattern of the float64 ``x`` as an int64, to carry a scalar in a pointer table
    (the kernel reads it back with ``.to(tl.float64, bitcast=True)``)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def pointer_table(segments: Sequence[Sequence[int] | torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One int64 table holding ``segments`` one after another, each padded to an even length so
    that every segment starts 16-byte aligned (as the table does) and the kernels' pointer
    arguments always specialise alike; built on the host, copied to ``device`` once (pageable
    host → device with ``non_blocking``: staged at once, no stream sync). A segment is a sequence
    of Python ints or a 1-D int64 CPU tensor. Returns the segments' views on ``device``, without
    their padding; the first segment should be two entries long to serve :func:`type_witness`."""
    host = array.array("q")
    spans = []
    for segment in segments:
        start = len(host)
        if isinstance(segment, torch.Tensor):
            host.extend([0] * segment.numel())  # the tensor is copied in below
        else:
            host.extend(segment)
        spans.append((start, len(host) - start))
        if len(host) & 1:
            host.append(0)
    table = torch.frombuffer(host, dtype=torch.int64).clone()  # its own memory, not the array's
    for (start, length), segment in zip(spans, segments):
        if isinstance(segment, torch.Tensor):
            table[start : start + length] = segment
    if device.type != "cpu":
        table = table.to(device, non_blocking=True)
    return [table[start : start + length] for start, length in spans]


def type_witness(head: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A pointer argument whose element type is ``dtype``: the 16 bytes of a table's two-entry
    first segment ``head`` viewed as ``dtype`` (never dereferenced)."""
    return head.view(dtype)


@triton.jit
def typed_pointer(address, ELEM_TY: tl.constexpr):
    """The int64 ``address`` (loaded from a pointer table) as a pointer to ``ELEM_TY``."""
    return address.to(tl.pointer_type(ELEM_TY))


def interpreted(kernel) -> bool:
    """True when ``kernel`` is an interpreter function (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def run_on_host_copies(run: Callable, tensor_lists: Sequence[Sequence[torch.Tensor]], written: Sequence[int]):
    """``run(*host_lists)`` on host copies of ``tensor_lists`` (the interpreter dereferences
    table addresses on the host, so device tensors cannot be used directly), then the host copies
    of the lists at the positions ``written`` copied back into the originals; returns ``run``'s
    result (host tensors stay on the host: the caller moves them)."""
    host_lists = [[t.cpu() for t in tensors] for tensors in tensor_lists]
    result = run(*host_lists)
    for k in written:
        for original, copy in zip(tensor_lists[k], host_lists[k]):
            original.copy_(copy)
    return result


@triton.jit
def to_output(v, out_ptr, ROUND_BF16: tl.constexpr):
    """Casts float32/float64 values to ``out_ptr``'s element type, rounding to nearest even.
    bfloat16 is rounded by hand: the GPU cast does that anyway, but the CPU interpreter's cast
    truncates."""
    if ROUND_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), rounded)
    else:
        return v.to(out_ptr.dtype.element_ty)


@triton.jit
def to_compute(v, IS_FP64: tl.constexpr):
    """Widens loaded values to the arithmetic type: float64 for float64 data, else float32.
    bfloat16 is widened by its bits (the upper half of a float32), which is exact and what the GPU
    cast does; the CPU interpreter's cast gets subnormal bfloat16 values wrong (sign and size)."""
    if IS_FP64:
        return v.to(tl.float64)
    elif v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)
