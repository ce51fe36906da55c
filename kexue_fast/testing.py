"""Comparing kernels with their references (used by the tests and by ``kexue-fast bench``).

The rule (docs/conventions.md, "References and tests"): float32/float64 kernels are compared with
the reference run in float64; float16/bfloat16 kernels may err at most twice as much as the
reference run in the same dtype, plus a small absolute slack.
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
        assert_matches(a, t, s, atol=0.0, what=f"updated[{i}]")
        errors[f"updated[{i}]"] = max_error(a, t)
    return {"max over tensors": max(errors.values(), default=0.0)}
