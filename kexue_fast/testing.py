"""Comparing kernels with their references (used by the tests and by ``kexue-fast bench``).

The rule of SPEC §0: float32/float64 kernels are compared with the reference run in float64;
float16/bfloat16 kernels may err at most twice as much as the reference run in the same dtype,
plus a small absolute slack.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing a float32/float64 result with the float64 truth."""
    return (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches(
    actual: torch.Tensor,
    truth: torch.Tensor,
    same_dtype_reference: torch.Tensor | None = None,
    *,
    atol: float = 1e-3,
    what: str = "output",
) -> None:
    """Checks ``actual`` against the float64 ``truth``: a scaled float32 tolerance, or for
    float16/bfloat16 the error budget ``2·err(same_dtype_reference) + atol``."""
    if actual.shape != truth.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}")
    if actual.dtype in LOW_PRECISION:
        if same_dtype_reference is None:
            raise ValueError("low-precision results need the same-dtype reference")
        err, budget = max_error(actual, truth), 2 * max_error(same_dtype_reference, truth) + atol
        if not err <= budget:
            raise AssertionError(f"{what}: {actual.dtype} error {err:.3g} > budget {budget:.3g}")
        return
    rtol, abs_tol = tolerance(actual.dtype)
    scale = truth.abs().max().item() if truth.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), truth.double(), rtol=rtol, atol=abs_tol * max(1.0, scale), msg=lambda m: f"{what}: {m}"
    )
