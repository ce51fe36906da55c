"""Tensor tables: the one multi-tensor argument of the ``Tensor[]`` launchers
(``_C.TensorTable``, csrc/include/kexue/tensor_table.h), built here and nowhere else.

A table has ``n`` entries of ``len(slots)`` tensors each (a data pointer and a dtype code per
tensor, entry-major) and ``sizes_per_entry`` int64 sizes per entry; e.g. the EMA's entries are
``(shadow, param)`` with size ``numel``, spectral norm's ``(weight, u, v)`` with ``(rows, cols)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain, repeat
from operator import attrgetter

import torch

from kexue_fast import _C
from kexue_fast._native import DTYPE_CODES

#: Tensor attributes a fingerprint can hold besides the data pointer (functions of a tensor).
DTYPE, SHAPE = attrgetter("dtype"), attrgetter("shape")


def build(
    what: str,
    slots: Sequence[Sequence[torch.Tensor | None]],
    sizes: Sequence[int],
    sizes_per_entry: int,
    *,
    null_dtype: torch.dtype | None = None,
    slot_dtypes: Sequence[torch.dtype | None] | None = None,
):
    """A ``_C.TensorTable`` whose entry ``i`` holds ``slots[0][i], slots[1][i], …`` and the sizes
    ``sizes[i * sizes_per_entry : (i + 1) * sizes_per_entry]``. ``what`` names the op in the
    table's errors. The tensors are taken as they are (the op has validated them: contiguous,
    supported dtypes); the table holds raw pointers, so the caller keeps the tensors alive while
    it is used. Costs C-level loops only (no Python step per tensor). ``slot_dtypes``: per slot,
    the dtype the caller has checked all its tensors to have, or None where each tensor's is
    read (spares a call per tensor). With ``null_dtype`` given, entries may be None: a null
    pointer with that dtype's code (e.g. the i-ResNet adjoint's missing derivative after the last
    layer); that case takes a Python step per tensor."""
    entries = list(chain.from_iterable(zip(*slots)))
    if null_dtype is None:
        pointers = list(map(torch.Tensor.data_ptr, entries))
        slot_codes = [
            list(map(DTYPE_CODES.__getitem__, map(DTYPE, tensors))) if dtype is None else repeat(DTYPE_CODES[dtype])
            for tensors, dtype in zip(slots, slot_dtypes or [None] * len(slots))
        ]
        dtypes = list(chain.from_iterable(zip(*slot_codes)))
    else:
        pointers = [0 if t is None else t.data_ptr() for t in entries]
        dtypes = [DTYPE_CODES[null_dtype if t is None else t.dtype] for t in entries]
    return _C.TensorTable(len(slots), sizes_per_entry, pointers, dtypes, list(sizes), what)


# --- cached tables: built and validated once, re-checked cheaply on every call ---------------

_data_ptr = torch.Tensor.data_ptr


def fingerprint(tensors: Sequence[torch.Tensor], *attributes) -> list[list]:
    """``[data pointers of tensors, attributes[0] of them, …]`` as lists, by C-level loops (no
    Python step per tensor). Two fingerprints compare equal (one C-level ``==``) exactly when
    every tensor still has the same pointer and attributes."""
    return [list(map(_data_ptr, tensors)), *(list(map(a, tensors)) for a in attributes)]


class Cache:
    """A value built from tensors (a table and what its launch needs) that is rebuilt, and so
    re-validated, only when the tensors' fingerprint changes.

    Which fingerprint is enough: every change made through torch's API gives a tensor a new data
    pointer — ``.to()`` / ``.half()`` / ``.double()`` / ``.cuda()`` (new data is made while the old
    is still alive), ``load_state_dict(assign=True)``, a parameter, buffer or shadow assigned
    anew, ``module.weight = value`` on a parametrized module (``original.set_(value)``) — and the
    caller fetches the tensors afresh on each call (from the dicts that own them, by C-level
    ``map``), so a replaced tensor is seen. ``load_state_dict`` copies into the existing tensors:
    pointers, dtypes and shapes stay, and so does the table's validity. For the tensors the
    user's model owns (weights, parameters) the caller adds their shape, which catches what keeps
    the pointer: a view of the same memory with another shape (``p.data = p.data.view(…)``, also
    a view as a dtype of another element size), ``resize_`` to a smaller size. Not caught: a
    view as a dtype of the same element size (``.view(torch.int32)`` of float32 data), which
    keeps pointer and shape (the kernel would read the bits as the old dtype; no byte outside
    the tensor is touched). The buffers the op writes (shadows, power-iteration vectors) belong
    to the module and are checked by pointer only. Each attribute costs a C-level call per
    tensor (~0.1 µs, more when the kernel has pushed the tensors out of the caches): measured,
    the dtype of the weights cost 7% of a refresh() of 200 small layers.

    ``build(*tensor_lists)`` validates (raising for bad input, which leaves the cache empty so
    the next call validates again) and returns the value; ``get`` returns the cached value while
    ``key`` equals the one it was built for."""

    def __init__(self, build):
        self._build = build
        self._key = None
        self._value = None

    def __getstate__(self):
        # A copy (copy.deepcopy, pickle) starts empty and builds its own value at its first call:
        # a table holds raw pointers to the original's tensors, and cannot be pickled anyway.
        return {"_build": self._build, "_key": None, "_value": None}

    @property
    def value(self):
        """The value last built (None before the first ``get``)."""
        return self._value

    def get(self, key, *tensor_lists):
        if key != self._key:
            self._key = None
            self._value = self._build(*tensor_lists)
            self._key = key
        return self._value
