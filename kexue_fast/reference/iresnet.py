r"""Reference i-ResNet inversion (docs/iresnet.md): the MLP residual branch, its inverse by
fixed-point iteration with each row stopping on its own, and the implicit-function backward —
plain PyTorch, one row at a time where that is clearer, written for clarity, not speed.

The branch is ``g(x) = W_L a(… a(W_1 x + b_1) …) + b_L``: ``weights[k]`` is ``(out_k, in_k)`` as
in ``nn.Linear``, the activation ``a`` sits between layers, not after the last one.

The solve, per row: ``x₀ = y``, ``x_{k+1} = y − g(x_k)``, stopping at the first ``k`` where
``‖x_{k+1} − x_k‖_∞ ≤ atol + rtol·‖x_{k+1}‖_∞`` (``x = x_{k+1}``, ``n_iter = k + 1``), or when
``x_{k+1}`` holds a NaN or an infinity (that row stops at once, ``x = x_{k+1}``, ``n_iter =
max_iter``: "not converged"), or at ``k + 1 = max_iter``. ``max_iter = 0`` gives ``x = y``,
``n_iter = 0``.

The backward (implicit function theorem): for ``ḡ = ∂L/∂x`` solve ``a = ḡ − J_g(x)ᵀ a`` by the
same iteration and stopping rule (``a₀ = ḡ``); then ``∂L/∂y = a`` and ``∂L/∂θ = −(∂g/∂θ)ᵀ a``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: The activations, by name (LipSwish is ``x·sigmoid(x)/1.1``, 1-Lipschitz).
ACTIVATIONS = {
    "elu": F.elu,
    "relu": F.relu,
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "lipswish": lambda h: h * torch.sigmoid(h) / 1.1,
}


def activation_second_derivative(name: str, h: torch.Tensor) -> torch.Tensor:
    """``a''(h)`` elementwise, as autograd's double backward of :data:`ACTIVATIONS` gives it
    (elu: ``exp(h)`` for ``h <= 0``, else 0; relu: 0; softplus: 0 above torch's threshold 20)."""
    if name == "elu":
        return torch.where(h > 0, torch.zeros_like(h), torch.exp(h))
    if name == "relu":
        return torch.zeros_like(h)
    if name == "tanh":
        t = torch.tanh(h)
        return -2 * t * (1 - t * t)
    if name == "softplus":
        s = torch.sigmoid(h)
        return torch.where(h > 20, torch.zeros_like(h), s * (1 - s))
    if name == "lipswish":
        s = torch.sigmoid(h)
        return s * (1 - s) * (2 + h * (1 - 2 * s)) / 1.1
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")


def activation_derivative(name: str, h: torch.Tensor) -> torch.Tensor:
    """``a'(h)`` elementwise, as autograd differentiates :data:`ACTIVATIONS` (relu'(0) = 0,
    elu'(0) = 1, softplus with torch's threshold 20: ``a'(h) = 1`` above it)."""
    if name == "elu":
        return torch.where(h > 0, torch.ones_like(h), torch.exp(h))
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "tanh":
        return 1 - torch.tanh(h) ** 2
    if name == "softplus":
        return torch.where(h > 20, torch.ones_like(h), torch.sigmoid(h))
    if name == "lipswish":
        s = torch.sigmoid(h)
        return (s + h * s * (1 - s)) / 1.1
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")


def mlp_residual(x: torch.Tensor, weights, biases, activation: str = "elu") -> torch.Tensor:
    """The residual branch ``g(x) = W_L a(… a(W_1 x + b_1) …) + b_L`` for ``x`` of shape
    ``(B, in_1)``: ``weights[k]`` is ``(out_k, in_k)`` as in ``nn.Linear``, ``biases[k]`` is
    ``(out_k,)``, ``activation`` a name of :data:`ACTIVATIONS`; differentiable in everything."""
    act = ACTIVATIONS[activation]
    h = x
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = F.linear(h, w, b)
        if k < len(weights) - 1:
            h = act(h)
    return h


def _stops(new: torch.Tensor, old: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """Per row: the stopping test ``‖new − old‖_∞ ≤ atol + rtol·‖new‖_∞``."""
    return (new - old).abs().amax(1) <= atol + rtol * new.abs().amax(1)


def _fixed_point(step, start: torch.Tensor, max_iter: int, atol: float, rtol: float):
    """Rows of ``start`` iterated by ``step(rows, v) -> new v of those rows`` until each stops
    (module docstring); returns ``(v, n_iter)``. One row at a time: the plainest statement."""
    v = start.clone()
    n_iter = torch.zeros(start.shape[0], dtype=torch.int32, device=start.device)
    for i in range(start.shape[0]):
        row = v[i : i + 1]
        for k in range(max_iter):
            new = step(i, row)
            if not bool(torch.isfinite(new).all()):  # first: inf <= atol + rtol·inf would count as converged
                row, n_iter[i] = new, max_iter
                break
            row, converged = new, bool(_stops(new, row, atol, rtol))
            if converged:
                n_iter[i] = k + 1
                break
        else:
            n_iter[i] = max_iter
        v[i : i + 1] = row
    return v, n_iter


def iresnet_inverse(y, weights, biases, activation="elu", max_iter=100, atol=1e-6, rtol=1e-6):
    """``(x, n_iter)`` with ``x + mlp_residual(x, weights, biases, activation) = y`` row by row
    (``y``: ``(B, D)``), each row iterated at most ``max_iter`` times and stopped by ``atol`` and
    ``rtol`` as the module docstring states; ``n_iter`` int32 ``(B,)``."""
    with torch.no_grad():
        return _fixed_point(
            lambda i, x: y[i : i + 1] - mlp_residual(x, weights, biases, activation), y, max_iter, atol, rtol
        )


def adjoint_solve(grad_x, x, weights, biases, activation="elu", max_iter=100, atol=1e-6, rtol=1e-6):
    """``(a, n_iter)`` with ``a = grad_x − J_g(x)ᵀ a`` row by row for the branch ``weights``,
    ``biases``, ``activation`` at ``x``, by the same iteration and rule (``max_iter``, ``atol``, ``rtol``)."""

    def step(i, a):
        with torch.enable_grad():
            xi = x[i : i + 1].detach().requires_grad_()
            (vjp,) = torch.autograd.grad(mlp_residual(xi, weights, biases, activation), xi, a)
        return grad_x[i : i + 1] - vjp

    with torch.no_grad():
        return _fixed_point(step, grad_x, max_iter, atol, rtol)


def iresnet_inverse_backward(grad_x, x, weights, biases, activation="elu", max_iter=100, atol=1e-6, rtol=1e-6):
    """``(∂L/∂y, [∂L/∂W_k], [∂L/∂b_k])`` for ``ḡ = grad_x`` at the solution ``x`` of the branch
    ``weights``, ``biases``, ``activation``: ``a`` from :func:`adjoint_solve` (``max_iter``, ``atol``,
    ``rtol`` as in the solve), then ``∂L/∂y = a`` and ``∂L/∂θ = −(∂g/∂θ)ᵀ a`` (one VJP of ``g``)."""
    a, _ = adjoint_solve(grad_x, x, weights, biases, activation, max_iter, atol, rtol)
    with torch.enable_grad():
        params = [t.detach().requires_grad_() for t in (*weights, *biases)]
        L = len(weights)
        g = mlp_residual(x.detach(), params[:L], params[L:], activation)
        grads = torch.autograd.grad(g, params, -a)
    return a, list(grads[:L]), list(grads[L:])


# --- The log-determinant ln det(I + J_g(x)) of a residual block, per row (docs/iresnet_flow.md) ---
#
# The power series, for ‖J_g‖₂ < 1:  ln det(I + J) = Σ_{k≥1} (−1)^{k+1} tr(J^k) / k, with each
# trace estimated by Hutchinson's vᵀ J^k v (E[v vᵀ] = I). With weights c_k on the terms (the
# truncated series: c_k = 1 for k ≤ n; Russian roulette: c_k = [k ≤ N] / P(N ≥ k)), one probe v:
#
#     value     = Σ_{k=1}^{T} c_k (−1)^{k+1} (vᵀ J^k v) / k,     vᵀ J^k = w_kᵀ, w_0 = v, w_k = Jᵀ w_{k−1}.
#
# Its gradient is not that of the truncated sum but the Neumann-series estimate of Residual Flows,
#
#     ∂ ln det(I + J)/∂θ = tr((I + J)⁻¹ ∂J/∂θ) ≈ nᵀ (∂J/∂θ) v,    n = Σ_{k=1}^{T} c_k (−1)^{k+1} w_{k−1},
#
# (the same for ∂/∂x): ``n`` is accumulated without a graph, then one differentiable product
# ``nᵀ J v`` carries the gradient, so memory does not grow with T. (For c_k = 1 its expectation is
# the gradient of the truncated series.) Several probes: the mean over them.


def depends_on_more_than(out: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether ``out``'s graph reaches a tensor requiring grad other than the leaf ``z`` (a
    parameter or any tensor ``g`` closes over): every such tensor leads back to a leaf."""
    if out.grad_fn is None:
        return False
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None and leaf is not z:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _at(g, x: torch.Tensor):
    """``(z, g(z), differentiable)``: ``z`` is ``x`` or, if ``x`` does not require grad, a detached
    leaf that does (the Jacobian products need one); ``differentiable``: grad mode is on and the
    result depends on ``x`` or on anything ``g`` uses that requires grad."""
    with torch.enable_grad():
        z = x if x.requires_grad else x.detach().requires_grad_()
        gz = g(z)
    differentiable = torch.is_grad_enabled() and (x.requires_grad or depends_on_more_than(gz, z))
    return z, gz, differentiable


def power_series_logdet(g, x: torch.Tensor, probes: torch.Tensor, coefficients):
    """``(g(x), logdet)`` for a residual branch ``g`` (any callable treating rows independently),
    ``x`` ``(B, ...)``, ``probes`` ``(S, B, ...)``, ``coefficients`` the ``c_k`` (numbers or a 1-D
    tensor, ``T`` of them): the value
    and the Neumann gradient stated above, through autograd VJPs of ``g``; ``logdet`` is ``(B,)``."""
    z, gz, differentiable = _at(g, x)

    def vjp(w, create_graph=False):
        if not gz.requires_grad:  # g does not depend on anything differentiable: J = 0
            return torch.zeros_like(w)
        (product,) = torch.autograd.grad(gz, z, w, retain_graph=True, create_graph=create_graph, allow_unused=True)
        return torch.zeros_like(w) if product is None else product

    def rows_dot(a, b):
        return (a * b).flatten(1).sum(1)

    weights = [(-1) ** k * c for k, c in enumerate(coefficients)]  # c_{k+1} (−1)^k
    value = x.new_zeros(x.shape[0])
    surrogate = x.new_zeros(x.shape[0])
    for v in probes:
        w, neumann = v, torch.zeros_like(v)
        with torch.no_grad():
            for k, weight in enumerate(weights):
                neumann = neumann + weight * w
                w = vjp(w)
                value = value + weight / (k + 1) * rows_dot(w, v)
        if differentiable:
            with torch.enable_grad():
                surrogate = surrogate + rows_dot(vjp(neumann, create_graph=True), v)
    logdet = value / probes.shape[0]
    if differentiable:
        logdet = logdet + (surrogate - surrogate.detach()) / probes.shape[0]
    return (gz if differentiable else gz.detach()), logdet


def exact_logdet(g, x: torch.Tensor):
    """``(g(x), ln |det(I + J_g(x))|)`` per row, from the full Jacobian (``D`` VJPs, ``D`` the
    elements of a row) and ``slogdet``; differentiable (exactly) under grad mode. For small ``D``."""
    z, gz, differentiable = _at(g, x)
    B, D = x.shape[0], math.prod(x.shape[1:])
    eye = torch.eye(D, dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        if gz.requires_grad:
            rows = [
                torch.autograd.grad(gz, z, eye[i].expand(B, D).reshape(x.shape), retain_graph=True,
                                    create_graph=differentiable, allow_unused=True)[0]
                for i in range(D)
            ]  # fmt: skip
            jacobian = torch.stack([torch.zeros_like(x) if r is None else r for r in rows], 1).reshape(B, D, D)
        else:
            jacobian = x.new_zeros(B, D, D)
        result = torch.linalg.slogdet(eye + jacobian).logabsdet
    if not differentiable:
        return gz.detach(), result.detach()
    return gz, result


def mlp_logdet(x, weights, biases, activation, probes, coefficients):
    """``(g(x), logdet)`` of :func:`power_series_logdet` for the MLP branch :func:`mlp_residual`
    (``x`` ``(B, D)``, ``probes`` ``(S, B, D)``): the reference of the MLP fast path
    (:mod:`kexue_fast.ops.iresnet_logdet`)."""
    return power_series_logdet(lambda z: mlp_residual(z, weights, biases, activation), x, probes, coefficients)
