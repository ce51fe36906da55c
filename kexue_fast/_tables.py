"""Tensor tables: the one multi-tensor argument of the ``Tensor[]`` launchers
(``_C.TensorTable``, csrc/include/kexue/tensor_table.h), built here and nowhere else.

A table has ``n`` entries of ``len(slots)`` tensors each (a data pointer and a dtype code per
tensor, entry-major) and ``sizes_per_entry`` int64 sizes per entry; e.g. the EMA's entries are
``(shadow, param)`` with size ``numel``, spectral norm's ``(weight, u, v)`` with ``(rows, cols)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from operator import attrgetter

import torch

from kexue_fast import _C
from kexue_fast._native import DTYPE_CODES

_dtype_of = attrgetter("dtype")


def build(what: str, slots: Sequence[Sequence[torch.Tensor]], sizes: Sequence[int], sizes_per_entry: int):
    """A ``_C.TensorTable`` whose entry ``i`` holds ``slots[0][i], slots[1][i], …`` and the sizes
    ``sizes[i * sizes_per_entry : (i + 1) * sizes_per_entry]``. ``what`` names the op in the
    table's errors. The tensors are taken as they are (the op has validated them: contiguous,
    supported dtypes); the table holds raw pointers, so the caller keeps the tensors alive while
    it is used. Costs C-level loops only (no Python step per tensor)."""
    entries = list(chain.from_iterable(zip(*slots)))
    pointers = list(map(torch.Tensor.data_ptr, entries))
    dtypes = list(map(DTYPE_CODES.__getitem__, map(_dtype_of, entries)))
    return _C.TensorTable(len(slots), sizes_per_entry, pointers, dtypes, list(sizes), what)
