r"""Invertible residual blocks ``y = x + g(x)`` (docs/iresnet.md): the inverse for any residual branch.

* :func:`fixed_point_inverse` — ``x`` with ``x + g(x) = y`` for any callable branch ``g``
  (an MLP, a convolutional ``nn.Sequential``, ...), each row stopping on its own, differentiable
  by the implicit function theorem. The generic path, in plain PyTorch.
* :func:`iresnet_inverse` — the same for an MLP branch in one native kernel
  (``torch.ops.kexue.iresnet_inverse``, :mod:`kexue_fast.ops.iresnet`).
* :func:`mlp_residual` — the MLP branch ``g`` that :func:`iresnet_inverse` inverts.

The iteration, the per-row stopping rule and what NaN/inf rows give are those of
:mod:`kexue_fast.reference.iresnet`, with a row of ``y`` being ``y[i]`` of any shape and the norms
taken over all of its elements.

The backward of :func:`fixed_point_inverse`, once. At the solution ``x* = y − g_θ(x*)`` the
implicit function theorem gives, for ``ḡ = ∂L/∂x*`` and ``J = ∂g/∂x`` at ``x*``,

    a = ḡ − Jᵀ a   (solved by the fixed-point iteration a₀ = ḡ, a_{k+1} = ḡ − Jᵀ a_k),
    ∂L/∂y = a,     ∂L/∂θ = −(∂g/∂θ)ᵀ a.

Both are the vector–Jacobian products of ``f(z, y, θ) = y − g_θ(z)`` at ``z = x*`` with ``a``: so
the solve runs without a graph, then ``f`` is evaluated once, differentiably, at ``z = x*``
(detached, requiring grad), and ``x`` is returned as ``x*`` joined to ``f`` by
:class:`_ImplicitGradient`, whose backward turns ``ḡ`` into ``a`` (VJPs ``Jᵀ v`` from the kept graph
of ``g(z)`` with respect to ``z``) and hands ``a`` to ``f``'s graph, which autograd then carries to
``y`` and to every tensor ``g`` closes over. Nothing of the iterations is kept: the memory is one
evaluation of ``g`` (its graph) plus a few batch-sized buffers, whatever the iteration count.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from kexue_fast import _checks
from kexue_fast.ops.iresnet import NOT_CONVERGED, iresnet_inverse, warn_if_not_converged
from kexue_fast.reference.iresnet import depends_on_more_than, mlp_residual

__all__ = ["NOT_CONVERGED", "fixed_point_inverse", "iresnet_inverse", "mlp_residual"]

OP = "fixed_point_inverse"


def _validate(g, y, max_iter, atol, rtol) -> None:
    if not callable(g):
        raise TypeError(f"{OP}: g must be callable (a function or nn.Module mapping a batch to a batch), got "
                        f"{type(g).__name__}")  # fmt: skip
    _checks.tensor(OP, "y", y)
    if not y.is_floating_point():
        raise TypeError(f"{OP}: y must have a floating-point dtype, got {y.dtype}")
    if y.dim() < 1:
        raise ValueError(f"{OP}: y must have a batch dimension (rank >= 1, rows along dim 0), got a 0-D tensor")
    if math.prod(y.shape[1:]) < 1:
        raise ValueError(f"{OP}: every row of y must have at least one element, got shape {tuple(y.shape)}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"{OP}: max_iter must be an int >= 0, got {max_iter!r}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        _checks.number(OP, name, value, non_negative=True, float32=y.dtype != torch.float64)


def _checked(out, like: torch.Tensor, what: str) -> torch.Tensor:
    """``out`` (what ``g`` returned for ``like``) if it is a batch of ``like``'s shape, dtype and device."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{OP}: g must return a Tensor, got {type(out).__name__} {what}")
    if out.shape != like.shape:
        raise ValueError(f"{OP}: g must return its input's shape, got {tuple(out.shape)} for an input of shape "
                         f"{tuple(like.shape)} {what}")  # fmt: skip
    if out.dtype != like.dtype or out.device != like.device:
        raise TypeError(f"{OP}: g must return its input's dtype and device ({like.dtype} on {like.device}), got "
                        f"{out.dtype} on {out.device} {what}")  # fmt: skip
    return out


def _solve(h, target: torch.Tensor, max_iter: int, atol: float, rtol: float):
    """The rows of ``v₀ = target``, ``v_{k+1} = target − h(rows, v_k)`` (``rows``: an index tensor
    of the rows still running, ``v_k`` and the result theirs only), each row leaving as soon as
    it stops (the rule of :mod:`kexue_fast.reference.iresnet`). Returns ``(v, n_iter)``. One host
    sync per iteration: the number of rows still running, which sizes the next batch."""
    B = target.shape[0]
    out = target.clone()
    n_iter = torch.zeros(B, dtype=torch.int32, device=target.device)
    rows = torch.arange(B, device=target.device)
    v = target
    for k in range(max_iter):
        new = target - h(rows, v)
        flat_new, flat_old = new.reshape(new.shape[0], -1), v.reshape(v.shape[0], -1)
        size = flat_new.abs().amax(1)  # NaN or inf exactly when the row holds a NaN or an inf
        bad = ~torch.isfinite(size)
        converged = (flat_new - flat_old).abs().amax(1) <= atol + rtol * size
        if k + 1 == max_iter:  # every row still running ends here
            out[rows] = new
            n_iter[rows] = torch.where(converged & ~bad, k + 1, max_iter).to(torch.int32)
            break
        done = converged | bad
        n_running = rows.numel() - int(done.sum())  # the sync
        if n_running == rows.numel():
            v = new
            continue
        order = torch.argsort(done.to(torch.uint8), stable=True)  # running rows first, in order
        leaving = order[n_running:]
        out[rows[leaving]] = new[leaving]
        n_iter[rows[leaving]] = torch.where(bad[leaving], max_iter, k + 1).to(torch.int32)
        if n_running == 0:
            break
        running = order[:n_running]
        rows, v, target = rows[running], new[running], target[running]
    return out, n_iter


class _Vjp:
    """``v ↦ J_g(x*)ᵀ v`` for chosen rows of ``x*``, from the kept graph of one evaluation of ``g``.
    The graph covers a set of rows (at first all of them); once no more than half of those are
    still asked for, ``g`` is evaluated again on just those rows, so a product costs about what
    its rows cost (rows are independent: a row's product does not depend on its batch)."""

    def __init__(self, g, x_star: torch.Tensor, z: torch.Tensor, gz: torch.Tensor):
        self.g, self.x_star, self.z, self.gz = g, x_star, z, gz
        self.rows = torch.arange(x_star.shape[0], device=x_star.device)

    def __call__(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # ``rows`` is always a subset of ``self.rows`` in the same (ascending) order: the solve
        # only ever drops rows.
        if rows.numel() * 2 <= self.rows.numel():
            with torch.enable_grad():
                self.z = self.x_star[rows].detach().requires_grad_()
                self.gz = _checked(self.g(self.z), self.z, "(at the solution, in the backward)")
            self.rows = rows
        if rows.numel() == self.rows.numel():
            return self._product(v)
        position = torch.empty(self.x_star.shape[0], dtype=torch.long, device=rows.device)
        position[self.rows] = torch.arange(self.rows.numel(), device=rows.device)
        full = torch.zeros_like(self.z)
        full[position[rows]] = v
        return self._product(full)[position[rows]]

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        if not self.gz.requires_grad:  # g does not depend on its input
            return torch.zeros_like(v)
        (product,) = torch.autograd.grad(self.gz, self.z, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if product is None else product


class _ImplicitGradient(torch.autograd.Function):
    """Returns the solution ``x*`` (the very tensor: its value exactly) joined to ``f = y − g(z)``
    (``z = x*``): the backward solves ``a = ḡ − J_g(x*)ᵀ a`` and passes ``a`` on as the gradient
    of ``f`` (module docstring)."""

    @staticmethod
    def forward(ctx, f, state):
        x_star = state.pop("x_star")
        ctx.save_for_backward(x_star)  # saved as an output: no reference cycle through ctx
        ctx.state = state
        return x_star

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        (x_star,) = ctx.saved_tensors
        state = ctx.state
        vjp = _Vjp(state["g"], x_star.detach(), state["z"], state["gz"])
        a, _ = _solve(vjp, grad_x, *state["settings"])
        return a, None


def fixed_point_inverse(
    g, y: torch.Tensor, max_iter: int = 100, atol: float = 1e-6, rtol: float = 1e-6, *, warn: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``x`` with ``x + g(x) = y`` for any residual branch ``g``, each row solved on its own by
    ``x₀ = y``, ``x_{k+1} = y − g(x_k)`` (the rule of :mod:`kexue_fast.reference.iresnet`).

    The generic path, plain PyTorch: each iteration calls ``g`` once, on the rows still running
    only (``g(x[active])``), and syncs with the device once (on CUDA: to size the next batch).
    For an MLP branch :func:`iresnet_inverse` does the whole solve in one native kernel.

    Args:
        g: a callable (function, ``nn.Module``) mapping a batch ``(b, *row_shape)`` to a batch of
            the same shape, dtype and device, for any ``b``; ``Lip(g) < 1`` for the iteration to
            converge. It must treat rows independently and deterministically — no batch norm in
            training mode, no dropout — since it sees varying subsets of the batch.
        y: ``(B, ...)`` floating point, rows along dim 0 (``(B, D)`` for an MLP, ``(B, C, H, W)``
            for a convolutional branch); the norms of the stopping rule run over each row's elements.
        max_iter: the most iterations per row (``>= 0``; ``0`` returns ``y``).
        atol, rtol: a row stops once ``‖x_{k+1} − x_k‖_∞ <= atol + rtol·‖x_{k+1}‖_∞`` (finite,
            ``>= 0``). In float32 a tolerance below about ``2⁻²³·‖x‖∞`` can never be met.
        warn: warn once (:data:`NOT_CONVERGED`) when some rows ended at ``max_iter``.

    Returns:
        ``(x, n_iter)``: ``x`` like ``y``; ``n_iter`` int32 ``(B,)``, ``max_iter`` for the rows that
        did not converge (those whose iterate became NaN/inf among them, which stop at once).
        Under grad mode, if ``y`` or anything ``g`` uses requires grad, ``x`` is differentiable by
        the implicit function theorem (module docstring): never unrolled, memory independent of
        the iterations, at the cost of one more evaluation of ``g``, at the solution.

    Raises:
        TypeError / ValueError naming the argument (``g`` not callable or returning another shape,
        dtype or device; ``y`` not a floating-point Tensor of rank >= 1; ``max_iter`` < 0; negative
        or non-finite ``atol``/``rtol``). See docs/iresnet.md.
    """
    _validate(g, y, max_iter, atol, rtol)
    settings = (max_iter, atol, rtol)
    if y.shape[0] == 0:
        return y.clone(), torch.zeros(0, dtype=torch.int32, device=y.device)
    with torch.no_grad():
        x_star, n_iter = _solve(lambda _, x: _checked(g(x), x, "(in the solve)"), y.detach(), *settings)
    if warn:
        warn_if_not_converged(n_iter, max_iter)
    if not torch.is_grad_enabled():
        return x_star, n_iter
    with torch.enable_grad():
        z = x_star.detach().requires_grad_()
        gz = _checked(g(z), z, "(at the solution)")
        if not (y.requires_grad or depends_on_more_than(gz, z)):
            return x_star, n_iter
        f = y - gz
    state = {"g": g, "x_star": x_star, "z": z, "gz": gz, "settings": settings}
    return _ImplicitGradient.apply(f, state), n_iter
