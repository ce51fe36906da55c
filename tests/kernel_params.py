"""Which implementations of an op this pytest process tests, and where: the native op always,
on every target (targets.py); its Triton variant (marked ``triton``) once per device — it has no
CPU ISA levels — where it can run: on CUDA, or on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

from kexue_fast._library import REGISTERED, TRITON_INTERPRET
from targets import DEVICES, TARGETS


def triton_name(name: str) -> str:
    """``op`` -> ``op_triton``; an in-place ``op_`` -> ``op_triton_`` (the naming of docs/conventions.md)."""
    return f"{name[:-1]}_triton_" if name.endswith("_") else f"{name}_triton"


def triton_marks(device: str = "cpu") -> list:
    """Marks of a Triton test case: ``triton``, and a skip where Triton cannot run on ``device``."""
    runnable = device == "cuda" or TRITON_INTERPRET
    return [
        pytest.mark.triton,
        pytest.mark.skipif(not runnable, reason="Triton on CPU needs TRITON_INTERPRET=1 (separate process)"),
    ]


def triton_targets(targets) -> list:
    """The devices of ``targets``, one target each (a Triton kernel is the same at every CPU ISA level)."""
    devices = {t.device for t in targets}
    return [t for t in DEVICES if t.device in devices]


def kernels(name: str, targets=TARGETS) -> list:
    """``(op, target)`` cases of op ``name``: the native op on each of ``targets``, its Triton
    variant (if registered) on each of their devices. Parametrize as ``"op,target"``: conftest.py
    sets the target's CPU ISA level for the test and marks CUDA targets ``gpu``."""
    params = [pytest.param(getattr(torch.ops.kexue, name), t, id=f"native-{t.id}") for t in targets]
    if triton_name(name) in REGISTERED:
        triton = getattr(torch.ops.kexue, triton_name(name))
        params += [
            pytest.param(triton, t, id=f"triton-{t.id}", marks=triton_marks(t.device)) for t in triton_targets(targets)
        ]
    return params


def providers(name: str) -> list:
    """The implementations of op ``name`` on the CPU at the ISA level in use (``"op"``), for the
    tests of what does not depend on the device or the level (bad input, version counters)."""
    params = [pytest.param(getattr(torch.ops.kexue, name), id="native")]
    if triton_name(name) in REGISTERED:
        params.append(pytest.param(getattr(torch.ops.kexue, triton_name(name)), id="triton", marks=triton_marks()))
    return params
