r"""``kexue::iresnet_inverse`` and ``kexue::iresnet_inverse_backward`` — the inverse of an
invertible residual block ``y = x + g(x)`` with an MLP branch, solved row by row inside one
kernel, differentiated by the implicit function theorem (docs/iresnet.md).

The math — the branch, the per-row stopping rule, what NaN/inf rows give, the adjoint fixed point
of the backward — is stated once, in :mod:`kexue_fast.reference.iresnet`.

How the backends compute: the solve and the adjoint solve are native kernels (C++ on CPU, CUDA
on GPU). The parameter gradients ``∂L/∂θ = −(∂g/∂θ)ᵀ a`` end in one matrix product per layer done
here with torch (``∂W_k = δ_kᵀ·input_k``: a batch reduction, which the BLAS does best). On the CPU
one kernel computes everything before those products: the branch at the solution (``a'(h_k)``
and the layers' inputs), the adjoint solve and the chain ``δ_k`` of ``−a``, block by block in
cache. On CUDA the branch at the solution and the chain are torch operations around the adjoint
kernel.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import torch
import torch.nn.functional as F

from kexue_fast import _checks, _native, _tables
from kexue_fast._library import TRITON_AVAILABLE, define_op, triton_kernels
from kexue_fast.reference.iresnet import ACTIVATIONS, activation_derivative

INVERSE_SCHEMA = (
    '(Tensor y, Tensor[] weights, Tensor[] biases, str activation="elu", int max_iter=100, float atol=1e-6, '
    "float rtol=1e-6) -> (Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_x, Tensor x, Tensor[] weights, Tensor[] biases, str activation, int max_iter, float atol, "
    "float rtol) -> (Tensor, Tensor[], Tensor[])"
)

#: Activation name -> kexue::Activation code (csrc/include/kexue/iresnet.h).
ACTIVATION_CODES = {"elu": 0, "relu": 1, "tanh": 2, "softplus": 3, "lipswish": 4}
assert sorted(ACTIVATION_CODES) == sorted(ACTIVATIONS)

#: Why a row can end at ``max_iter``: the text of the warning.
NOT_CONVERGED = (
    "{n} of {B} rows did not converge in max_iter={max_iter} iterations (their n_iter == max_iter). Causes: "
    "Lip(g) >= 1 (the iteration diverges; keep every layer's spectral norm below 1); a tolerance below the "
    "rounding floor of the iterate, about 2^-23·‖x‖∞ in float32, which can never be met (use rtol >= 1e-6 or "
    "float64); a NaN/inf in y; or too small a max_iter for a contraction close to 1"
)


def validate(op, y, weights, biases, activation, max_iter, atol, rtol, *, y_name="y") -> None:
    """Raises a clear error naming the argument (docs/iresnet.md); changes nothing."""
    _checks.tensor(op, y_name, y)
    if y.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {y_name} must be float32 or float64, got {y.dtype}")
    if y.dim() != 2:
        raise ValueError(f"{op}: {y_name} must be 2-D (B, D), got shape {tuple(y.shape)}")
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError(f"{op}: weights and biases must be lists of Tensors")
    if len(weights) < 1 or len(weights) != len(biases):
        raise ValueError(f"{op}: weights and biases need the same number (>= 1) of layers, got "
                         f"{len(weights)} and {len(biases)}")  # fmt: skip
    width = y.shape[1]
    if width < 1:
        raise ValueError(f"{op}: {y_name} must have D >= 1 columns, got shape {tuple(y.shape)}")
    for k, (w, b) in enumerate(zip(weights, biases)):
        for name, t, rank in ((f"weights[{k}]", w, 2), (f"biases[{k}]", b, 1)):
            _checks.tensor(op, name, t)
            if t.dtype != y.dtype:
                raise TypeError(f"{op}: {name} must have {y_name}'s dtype {y.dtype}, got {t.dtype}")
            if t.device != y.device:
                raise ValueError(f"{op}: {name} is on {t.device} but {y_name} is on {y.device}")
            if t.dim() != rank:
                raise ValueError(f"{op}: {name} must be {rank}-D, got shape {tuple(t.shape)}")
        if w.shape[1] != width:
            source = f"{y_name} has D = {width}" if k == 0 else f"weights[{k - 1}] has {width} outputs"
            raise ValueError(
                f"{op}: weights[{k}] has shape {tuple(w.shape)} but {source} (need in_features == {width})"
            )
        if w.shape[0] < 1:
            raise ValueError(f"{op}: weights[{k}] must have at least one output, got shape {tuple(w.shape)}")
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"{op}: biases[{k}] has shape {tuple(b.shape)} but weights[{k}] has {w.shape[0]} outputs")
        width = w.shape[0]
    if width != y.shape[1]:
        raise ValueError(f"{op}: the last layer weights[{len(weights) - 1}] has {width} outputs but {y_name} has "
                         f"D = {y.shape[1]} (g must map D to D)")  # fmt: skip
    if not isinstance(activation, str) or activation not in ACTIVATION_CODES:
        raise ValueError(f"{op}: activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"{op}: max_iter must be an int >= 0, got {max_iter!r}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        _checks.number(op, name, value, non_negative=True, float32=y.dtype == torch.float32)


def layer_table(weights, second_slot, what: str):
    """The launchers' table: slots (weight, ``second_slot[k]``), sizes (rows, cols); entries of
    ``second_slot`` may be None (a null pointer, the weights' dtype code). Returns the table and
    the contiguous weights it points to (the caller keeps them alive during the call)."""
    weights = [w.contiguous() for w in weights]
    sizes = list(itertools.chain.from_iterable(w.shape for w in weights))
    return _tables.build(what, (weights, second_slot), sizes, 2, null_dtype=weights[0].dtype), weights


@functools.cache
def launcher(kernel: str, device: torch.device):
    """The ``_C`` launcher ``kernel`` (iresnet_inverse or iresnet_adjoint) for ``device``; on CUDA
    it allocates the kernels' scratch with torch and passes it on (kexue/cuda_common.cuh)."""
    launch = _native.launcher(kernel, device)
    if device.type != "cuda":
        return launch
    scratch_elems = _native.native("iresnet_scratch_elems", device)

    def with_scratch(dtype_code, table, *args):
        rows = args[2] if kernel == "iresnet_inverse" else args[1]  # (activation, y, B, ...) / (grad_x, B, ...)
        with torch.cuda.device(device):  # the sizes depend on the device's shared memory
            elems = scratch_elems(table, rows)
        dtype = torch.float64 if dtype_code == _native.DTYPE_CODES[torch.float64] else torch.float32
        scratch = torch.empty(max(elems, 1), dtype=dtype, device=device)
        launch(dtype_code, table, *args, scratch.data_ptr(), elems)

    return with_scratch


def _empty_outputs(y):
    return torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty(
        y.shape[0], dtype=torch.int32, device=y.device
    )


def _native_inverse(y, weights, biases, activation="elu", max_iter=100, atol=1e-6, rtol=1e-6):
    validate("iresnet_inverse", y, weights, biases, activation, max_iter, atol, rtol)
    x, n_iter = _empty_outputs(y)
    if y.shape[0] == 0:
        return x, n_iter
    y = y.contiguous()
    table, _alive = layer_table(weights, [b.contiguous() for b in biases], "iresnet_inverse")
    launcher("iresnet_inverse", y.device)(
        _native.DTYPE_CODES[y.dtype], table, ACTIVATION_CODES[activation], y.data_ptr(), y.shape[0], max_iter,
        atol, rtol, x.data_ptr(), n_iter.data_ptr(),
    )  # fmt: skip
    return x, n_iter


def _triton_inverse(y, weights, biases, activation="elu", max_iter=100, atol=1e-6, rtol=1e-6):
    validate("iresnet_inverse_triton", y, weights, biases, activation, max_iter, atol, rtol)
    if y.shape[0] == 0:
        return _empty_outputs(y)
    weights = [w.contiguous() for w in weights]
    biases = [b.contiguous() for b in biases]
    return triton_kernels("iresnet").iresnet_inverse(
        y.contiguous(), weights, biases, ACTIVATION_CODES[activation], max_iter, atol, rtol
    )


def _inverse_fake(y, weights, biases, activation="elu", max_iter=100, atol=1e-6, rtol=1e-6):
    validate("iresnet_inverse", y, weights, biases, activation, max_iter, atol, rtol)
    return _empty_outputs(y)


def forward_at(x, weights, biases, activation):
    """The branch evaluated at ``x`` layer by layer with torch: ``(inputs, derivs)`` where
    ``inputs[k]`` is the input of layer ``k`` (``inputs[0] = x``) and ``derivs[k] = a'(h_k)``
    (``h_k`` the output of layer ``k``) for every layer but the last."""
    act = ACTIVATIONS[activation]
    inputs, derivs = [x], []
    for w, b in zip(weights[:-1], biases[:-1]):
        h = F.linear(inputs[-1], w, b)
        derivs.append(activation_derivative(activation, h).contiguous())
        inputs.append(act(h))
    return inputs, derivs


def parameter_gradients(a, inputs, derivs, weights):
    """``∂L/∂W_k, ∂L/∂b_k = −(∂g/∂θ)ᵀ a``: back-propagate ``−a`` through the layers
    (``δ_L = −a``, ``δ_k = (δ_{k+1} W_{k+1}) ⊙ a'(h_k)``; ``∂W_k = δ_kᵀ inputs_k``, ``∂b_k = Σ δ_k``)."""
    grad_w, grad_b = [None] * len(weights), [None] * len(weights)
    delta = -a
    for k in reversed(range(len(weights))):
        grad_w[k] = delta.t().mm(inputs[k])
        grad_b[k] = delta.sum(0)
        if k:
            delta = delta.mm(weights[k]) * derivs[k - 1]
    return grad_w, grad_b


def _validate_backward(grad_x, x, weights, biases, activation, max_iter, atol, rtol) -> None:
    op = "iresnet_inverse_backward"
    validate(op, x, weights, biases, activation, max_iter, atol, rtol, y_name="x")
    _checks.tensor(op, "grad_x", grad_x)
    _checks.like_x(op, "grad_x", grad_x, x)


def _native_backward(grad_x, x, weights, biases, activation, max_iter, atol, rtol):
    op = "iresnet_inverse_backward"
    _validate_backward(grad_x, x, weights, biases, activation, max_iter, atol, rtol)
    x, grad_x = x.contiguous(), grad_x.contiguous()
    weights = [w.contiguous() for w in weights]
    if x.device.type == "cuda":
        return _cuda_backward(grad_x, x, weights, biases, activation, max_iter, atol, rtol)
    a = torch.empty_like(grad_x)
    B, outs, ins = x.shape[0], [w.shape[0] for w in weights], [w.shape[1] for w in weights]
    workspace = x.new_empty(B * (sum(outs) + sum(ins[1:])))
    if B:
        table, _alive = layer_table(weights, [b.contiguous() for b in biases], op)
        _native.launcher(op, x.device)(
            _native.DTYPE_CODES[x.dtype], table, ACTIVATION_CODES[activation], x.data_ptr(), grad_x.data_ptr(), B,
            max_iter, atol, rtol, a.data_ptr(), workspace.data_ptr(),
        )  # fmt: skip
    # workspace: δ_k (B × out_k) for every layer, then the inputs of layers 2 … L (kexue/iresnet.h).
    widths = outs + ins[1:]
    parts = [t.view(B, n) for t, n in zip(workspace.split([B * n for n in widths]), widths)]
    deltas, inputs = parts[: len(outs)], [x, *parts[len(outs) :]]
    grad_w = [delta.t().mm(inputs_k) for delta, inputs_k in zip(deltas, inputs)]
    grad_b = [delta.sum(0) for delta in deltas]
    return a, grad_w, grad_b


def _cuda_backward(grad_x, x, weights, biases, activation, max_iter, atol, rtol):
    """The backward on CUDA: the branch at ``x`` and the parameter gradients with torch, the adjoint
    solve in the CUDA kernel (the CPU kernel does all of it: kexue/iresnet.h)."""
    a = torch.empty_like(grad_x)
    inputs, derivs = forward_at(x, weights, biases, activation)
    if x.shape[0]:
        table, _alive = layer_table(weights, [*derivs, None], "iresnet_inverse_backward")
        launcher("iresnet_adjoint", x.device)(
            _native.DTYPE_CODES[x.dtype], table, grad_x.data_ptr(), x.shape[0], max_iter, atol, rtol, a.data_ptr(), 0
        )
    return (a, *parameter_gradients(a, inputs, derivs, weights))


def _backward_fake(grad_x, x, weights, biases, activation, max_iter, atol, rtol):
    _validate_backward(grad_x, x, weights, biases, activation, max_iter, atol, rtol)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights],
        [torch.empty_like(b, memory_format=torch.contiguous_format) for b in biases],
    )


def _setup_context(ctx, inputs, output):
    _, weights, biases, activation, max_iter, atol, rtol = inputs
    ctx.save_for_backward(output[0], *weights, *biases)
    ctx.settings = (activation, max_iter, atol, rtol)


def _backward(ctx, grad_x, _grad_n_iter):
    x, *params = ctx.saved_tensors
    n = len(params) // 2
    if grad_x is None:
        grad_x = torch.zeros_like(x)
    grad_y, grad_w, grad_b = torch.ops.kexue.iresnet_inverse_backward(grad_x, x, params[:n], params[n:], *ctx.settings)
    # One entry per argument the op was called with (trailing defaults are not among them).
    return grad_y, grad_w, grad_b, *[None] * (len(ctx.needs_input_grad) - 3)


def _samples(device) -> list[tuple]:
    def branch(dims, dtype=torch.float32, c=0.7, grad=False):
        gen = torch.Generator().manual_seed(sum(dims))
        weights, biases = [], []
        for n_in, n_out in itertools.pairwise(dims):
            w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
            w *= c / torch.linalg.matrix_norm(w, 2)
            weights.append(w.to(dtype).to(device).requires_grad_(grad))
            biases.append((0.1 * torch.randn(n_out, generator=gen, dtype=dtype)).to(device).requires_grad_(grad))
        return weights, biases

    def y(B, D, dtype=torch.float32, grad=False):
        return torch.randn(B, D, dtype=dtype, device=device).requires_grad_(grad)

    return [
        (y(5, 3), *branch([3, 7, 3]), "elu", 100, 1e-6, 1e-6),
        (y(4, 2, torch.float64, True), *branch([2, 5, 4, 2], torch.float64, grad=True), "tanh", 200, 1e-10, 1e-10),
        (y(3, 4, grad=True), *branch([4, 4], grad=True), "relu", 50, 1e-5, 0.0),
        (y(0, 3), *branch([3, 6, 3]), "softplus", 100, 1e-6, 1e-6),
        (y(6, 1), *branch([1, 9, 1], grad=True), "lipswish", 3, 1e-6, 1e-6),
    ]


def _backward_samples(device) -> list[tuple]:
    """The backward op has no autograd of its own (no double backward): inputs without grad."""
    samples = []
    for y, weights, biases, *settings in _samples(device):
        weights, biases = [w.detach() for w in weights], [b.detach() for b in biases]
        x, _ = iresnet_inverse_op(y.detach(), weights, biases, *settings)
        samples.append((torch.randn_like(x), x, weights, biases, *settings))
    return samples


iresnet_inverse_op = define_op(
    "iresnet_inverse", INVERSE_SCHEMA, cpu=_native_inverse, cuda=_native_inverse, fake=_inverse_fake,
    samples=_samples, backward=_backward, setup_context=_setup_context,
)  # fmt: skip
iresnet_inverse_backward_op = define_op(
    "iresnet_inverse_backward", BACKWARD_SCHEMA, cpu=_native_backward, cuda=_native_backward, fake=_backward_fake,
    samples=_backward_samples,
)  # fmt: skip
iresnet_inverse_triton_op = (
    define_op(
        "iresnet_inverse_triton",
        INVERSE_SCHEMA,
        cpu=_triton_inverse,
        cuda=_triton_inverse,
        fake=_inverse_fake,
        samples=_samples,
        backward=_backward,
        setup_context=_setup_context,
        triton=True,
    )
    if TRITON_AVAILABLE
    else None
)


def warn_if_not_converged(n_iter: torch.Tensor, max_iter: int) -> None:
    """One warning (:data:`NOT_CONVERGED`) when some row ended at ``max_iter``; nothing under
    ``torch.compile`` or CUDA-graph capture (the test would synchronise with the device)."""
    if max_iter == 0 or n_iter.numel() == 0 or torch.compiler.is_compiling():
        return
    if n_iter.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    n = int((n_iter == max_iter).sum())
    if n:
        warnings.warn(NOT_CONVERGED.format(n=n, B=n_iter.numel(), max_iter=max_iter), RuntimeWarning, stacklevel=3)


def iresnet_inverse(
    y, weights, biases, activation: str = "elu", max_iter: int = 100, atol: float = 1e-6, rtol: float = 1e-6,
    *, warn: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The ``x`` with ``x + g(x) = y`` for the MLP branch ``g(x) = W_L a(… a(W_1 x + b_1) …) + b_L``,
    each row solved on its own; ``torch.ops.kexue.iresnet_inverse``.

    Args:
        y: ``(B, D)`` float32 or float64 (any strides).
        weights: ``L >= 1`` Tensors, ``weights[k]`` of shape ``(out_k, in_k)`` as in ``nn.Linear``
            with ``in_1 = out_L = D``; same dtype and device as ``y`` (any strides).
        biases: ``L`` Tensors, ``biases[k]`` of shape ``(out_k,)``.
        activation: ``"elu"``, ``"relu"``, ``"tanh"``, ``"softplus"`` or ``"lipswish"``, applied
            between the layers.
        max_iter: the most iterations per row (``>= 0``).
        atol, rtol: a row stops once ``‖x_{k+1} − x_k‖_∞ <= atol + rtol·‖x_{k+1}‖_∞`` (finite, ``>= 0``).
            In float32 a tolerance below about ``2⁻²³·‖x‖∞`` can never be met.
        warn: warn once when some rows did not converge (a device sync on CUDA; skipped under
            ``torch.compile`` and graph capture).

    Returns:
        ``(x, n_iter)``: ``x`` like ``y`` (contiguous), differentiable in ``y``, weights and biases
        by the implicit function theorem (memory independent of the iterations); ``n_iter`` int32
        ``(B,)``, ``max_iter`` for rows that did not converge (NaN/inf rows among them).

    Raises:
        TypeError / ValueError naming the argument, before anything runs. See docs/iresnet.md.
    """
    x, n_iter = iresnet_inverse_op(y, list(weights), list(biases), activation, max_iter, atol, rtol)
    if warn:
        warn_if_not_converged(n_iter, max_iter)
    return x, n_iter
