"""Which implementations of an op this pytest process tests: the native op always; its Triton
variant (marked ``triton``) where it can run — on CUDA, or on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

from kexue_fast._library import REGISTERED, TRITON_INTERPRET


def providers(name: str, device: str = "cpu") -> list:
    params = [pytest.param(getattr(torch.ops.kexue, name), id="native")]
    if f"{name}_triton" in REGISTERED:
        runnable = device == "cuda" or TRITON_INTERPRET
        params.append(
            pytest.param(
                getattr(torch.ops.kexue, f"{name}_triton"),
                id="triton",
                marks=[
                    pytest.mark.triton,
                    pytest.mark.skipif(not runnable, reason="Triton on CPU needs TRITON_INTERPRET=1 (separate process)"),
                ],
            )
        )
    return params
