"""Where the kernel tests run. A *target* is a device and, on CPU, the vector ISA level of the
native kernels (``_C.cpu_isas()``: every level this CPU supports, best first).

The numeric checks against the references run on every target (:data:`TARGETS`); the checks of
the registration (opcheck, ``torch.compile``, ``torch.export``, bad input) once per device
(:data:`DEVICES`), the CPU at the level in use. The CUDA target is always collected and marked
``gpu`` (conftest.py), so ``-m gpu`` selects it and a machine without a GPU skips it with the
reason. The level of a CPU target is set for the duration of its test by the autouse fixture in
conftest.py (:func:`cpu_isa`).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import pytest

from kexue_fast import _C


class Target(NamedTuple):
    device: str
    #: The CPU ISA level the native kernels use; None: the level in use (and on CUDA).
    isa: str | None = None

    @property
    def id(self) -> str:
        return self.device if self.isa is None else f"{self.device}-{self.isa}"


CPU = Target("cpu")
CUDA = Target("cuda")


#: Every CPU ISA level this machine supports, then CUDA.
TARGETS = [Target("cpu", level) for level in _C.cpu_isas()] + [CUDA]
#: One target per device.
DEVICES = [CPU, CUDA]
#: The CPU targets (the tests of thread counts and of the native CPU code paths).
CPU_TARGETS = [t for t in TARGETS if t.device == "cpu"]


def target_params(targets) -> list:
    """``targets`` as pytest parameters named by their ids (parametrize ``"target"`` with them)."""
    return [pytest.param(t, id=t.id) for t in targets]


@contextlib.contextmanager
def cpu_isa(level: str):
    """Runs the block with the native CPU kernels at ``level``, restoring the level in use after."""
    previous = _C.cpu_isa()
    _C.set_cpu_isa(level)
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)
