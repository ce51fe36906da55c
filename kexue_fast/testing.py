"""Comparing kernels with their references (used by the tests and by ``kexue-fast bench``).

The rule (docs/conventions.md, "References and tests"): float32/float64 kernels are compared with
the reference run in float64; float16/bfloat16 kernels may err at most twice as much as the
reference run in the same dtype, plus a small slack. The 16-bit rule is applied element by
element and never asks for better than rounding to nearest, so a kernel that rounds its float32
result to nearest passes and one that truncates (errors up to a whole ulp) fails.
"""

from __future__ import annotations

import math

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing a float32/float64 result with the float64 truth."""
    return (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


#: The part of the 16-bit budget that covers float32 arithmetic, relative to the largest |truth|:
#: 1/32 of a float16 and 1/256 of a bfloat16 ulp at that magnitude.
LOW_PRECISION_SLACK = 2.0**-16


def half_ulp(truth: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of the ``dtype`` numbers around each value of ``truth`` (the subnormal
    spacing below the smallest normal number): the largest error of rounding to nearest."""
    info = torch.finfo(dtype)
    mantissa_bits, min_exponent = round(-math.log2(info.eps)), round(math.log2(info.tiny))
    _, exponent = torch.frexp(truth.double().abs())  # |t| = m·2^e with m in [0.5, 1); e = 0 for 0
    exponent = torch.where(truth == 0, min_exponent, exponent - 1).clamp_min(min_exponent)
    return torch.pow(2.0, exponent - mantissa_bits - 1).double()


def assert_matches(
    actual: torch.Tensor,
    truth: torch.Tensor,
    same_dtype_reference: torch.Tensor | None = None,
    *,
    atol: float = 0.0,
    what: str = "output",
) -> None:
    """Checks ``actual`` against the float64 ``truth``: a scaled float32 tolerance, or for
    float16/bfloat16, element by element, the budget ``max(2·err(same_dtype_reference), ½ ulp)
    + 2⁻¹⁶·max|truth| + atol`` (ulp: the dtype's spacing at the true value)."""
    if actual.shape != truth.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}")
    if actual.dtype in LOW_PRECISION:
        if same_dtype_reference is None:
            raise ValueError("low-precision results need the same-dtype reference")
        if not actual.numel():
            return
        truth = truth.double()
        err = (actual.double() - truth).abs()
        reference_err = (same_dtype_reference.double() - truth).abs()
        slack = LOW_PRECISION_SLACK * truth.abs().max().item() + atol
        budget = torch.maximum(2 * reference_err, half_ulp(truth, actual.dtype)) + slack
        over = (err / budget).flatten().nan_to_num(float("inf"))  # a NaN fails
        if not over.max() <= 1:
            i = int(over.argmax())
            raise AssertionError(
                f"{what}: {actual.dtype} error {err.flatten()[i]:.3g} > budget {budget.flatten()[i]:.3g} at flat index "
                f"{i} (actual {actual.flatten()[i].item():.6g}, truth {truth.flatten()[i].item():.6g}, same-dtype "
                f"reference {same_dtype_reference.flatten()[i].item():.6g})"
            )
        return
    rtol, abs_tol = tolerance(actual.dtype)
    scale = truth.abs().max().item() if truth.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), truth.double(), rtol=rtol, atol=abs_tol * max(1.0, scale), msg=lambda m: f"{what}: {m}"
    )


def forward_backward(fn, inputs, grad_out: torch.Tensor | None):
    """Runs ``fn(*inputs)`` and, when ``grad_out`` is given, the gradients of every tensor input
    that is floating point (None elsewhere). Views among the inputs are kept as views of fresh
    leaves, so strided layouts reach ``fn`` unchanged."""
    leaves = [t.detach().requires_grad_() if _differentiable(t) and grad_out is not None else t for t in inputs]
    y = fn(*leaves)
    if grad_out is None:
        return y, [None] * len(inputs)
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, grad_out))
    return y, [next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]


def _differentiable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def check_against_reference(fn, reference, inputs, *, backward: bool = True, names=None) -> dict[str, float]:
    """Compares ``fn`` with ``reference`` on ``inputs`` — the output and (``backward``) every
    input gradient — by that rule; returns the max errors, raises AssertionError."""
    first = fn(*inputs)
    grad_out = torch.randn_like(first) if backward else None
    y, grads = forward_backward(fn, inputs, grad_out)
    as64 = [t.double() if _differentiable(t) else t for t in inputs]
    y64, grads64 = forward_backward(reference, as64, None if grad_out is None else grad_out.double())
    low = y.dtype in LOW_PRECISION
    y_same, grads_same = forward_backward(reference, inputs, grad_out) if low else (None, [None] * len(inputs))
    names = names or [f"grad[{i}]" for i in range(len(inputs))]
    assert y.dtype == first.dtype and y.shape == y64.shape
    assert_matches(y, y64, y_same, what="output")
    errors = {"output": max_error(y, y64)}
    for name, g, g64, g_same in zip(names, grads, grads64, grads_same):
        if g64 is not None:
            assert g.dtype == y.dtype
            assert_matches(g, g64, g_same, what=name)
            errors[name] = max_error(g, g64)
    return errors


def _as_float64(arg):
    if isinstance(arg, torch.Tensor) and arg.is_floating_point():
        return arg.double()
    if isinstance(arg, (list, tuple)):
        return [_as_float64(a) for a in arg]
    return arg


def check_update_against_reference(fn, reference, inputs) -> dict[str, float]:
    """For ops that update the list of tensors ``inputs[0]`` in place: runs ``fn`` and
    ``reference`` on copies and compares every updated tensor by that rule (float64
    truth; 16-bit results against the reference run in their own dtype). Returns max errors."""
    targets, rest = inputs[0], inputs[1:]
    actual = [t.clone() for t in targets]
    fn(actual, *rest)
    truth = [t.double().clone() for t in targets]  # .double() of a float64 tensor is itself
    reference(truth, *_as_float64(list(rest)))
    same_dtype = [t.clone() for t in targets]
    reference(same_dtype, *rest)
    errors = {}
    for i, (a, t, s) in enumerate(zip(actual, truth, same_dtype)):
        assert_matches(a, t, s, what=f"updated[{i}]")
        errors[f"updated[{i}]"] = max_error(a, t)
    return {"max over tensors": max(errors.values(), default=0.0)}
