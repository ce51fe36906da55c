"""Which implementations of an op this pytest process tests: the native op always; its Triton
variant (marked ``triton``) where it can run — on CUDA, or on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

from kexue_fast._library import REGISTERED, TRITON_INTERPRET


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


def providers(name: str, device: str = "cpu") -> list:
    params = [pytest.param(getattr(torch.ops.kexue, name), id="native")]
    if triton_name(name) in REGISTERED:
        params.append(
            pytest.param(getattr(torch.ops.kexue, triton_name(name)), id="triton", marks=triton_marks(device))
        )
    return params
