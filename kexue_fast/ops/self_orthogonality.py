r"""``kexue::self_orthogonality`` — the Self-Orthogonality penalty of a layer's pre-bias output
``y`` ``(b, k)`` (docs/gan.md) — made of ``kexue::self_orthogonality_forward`` and
``kexue::self_orthogonality_backward``. The definition — ``T``, ``t̂``,
``ϑ``, ``S₁``, ``S₂``, the reductions, dead columns — is in :mod:`kexue_fast.reference.orthogonality`.

How it is computed: by the smaller Gram matrix. With ``n_i = max(‖T[:, i]‖, eps)``,
``t̂_i = T[:, i]/n_i``, the row sums ``s = T̂·1`` (``b`` entries) and the squared column norms
``d_i = ‖t̂_i‖²`` (the diagonal of ϑ: 1, or ``< 1`` for a column clamped by ``eps``, 0 for a dead
one)::

    k ≤ b:  ϑ = T̂ᵀT̂ (k × k) is formed; S₁ and S₂ are the sum and the sum of squares of its
            off-diagonal part (the diagonal zeroed in place, no mask)
    k > b:  S₁ = ‖s‖² − Σ_i d_i,   S₂ = ‖T̂T̂ᵀ‖_F² − Σ_i d_i²   (b × b; ‖T̂T̂ᵀ‖_F = ‖T̂ᵀT̂‖_F)

In the second form ``‖s‖² ≈ k + S₁`` minus ``Σd ≈ k`` would lose the digits of a small S₁ in
float32, so ``s`` and ``d`` are summed in float64 from the same float32 T̂ (S₂ ≥ k(k − b)/b has no
such cancellation). Either way the forward costs one GEMM of the smaller Gram.

Backward, for the upstream ``g`` of ``R`` and the weights ``α = ∂R/∂S₁ = 2λ₁S₁/c²``,
``β = ∂R/∂S₂ = λ₂/c`` (``c = 1`` for "sum", ``k(k − 1)`` for "mean")::

    ∂R/∂T̂ = g·(2α·s 1ᵀ + 4β·T̂(T̂ᵀT̂) − T̂·diag(2α + 4β·d))      (k ≤ b: T̂(T̂ᵀT̂) − T̂·diag(d) = T̂·ϑ_off;
                                                                  k > b: T̂(T̂ᵀT̂) = (T̂T̂ᵀ)T̂)
    ∂R/∂T[:, i] = (∂R/∂t̂_i − t̂_i·⟨t̂_i, ∂R/∂t̂_i⟩)/n_i           (‖T[:, i]‖ ≥ eps; else ∂R/∂t̂_i / eps)
    ∂R/∂y = ∂R/∂T ⊙ γ(1 − T²)

The forward op also returns ``T`` and the Gram it formed (not differentiable), which autograd
saves for the backward op: two GEMMs of the smaller Gram's size in all and one tanh, where
recomputing them would cost a third GEMM and a second tanh. ``kexue::self_orthogonality`` (the
schema of docs/gan.md, returning the penalty alone) is the ``CompositeImplicitAutograd`` op that
calls the forward op and drops the two. Both ops are compositions of torch ops, in float32 for
float32/float16/bfloat16 ``y`` and float64 for float64, except that on the CPU ``T`` and its column
sums of squares come from one native pass (csrc/cpu/self_orthogonality.cpp, kexue's vector tanh:
within a few ulps of torch's); the value and the gradient are returned in ``y``'s dtype. No
double backward.
"""

from __future__ import annotations

import torch

from kexue_fast import _checks, _native
from kexue_fast._library import define_composite, define_op

OP = "self_orthogonality"
ARGUMENTS = 'float gamma=10.0, float lam1=100.0, float lam2=1.0, str reduction="sum", float eps=1e-12'
SCHEMA = f"(Tensor y, {ARGUMENTS}) -> Tensor"
FORWARD_SCHEMA = f"(Tensor y, {ARGUMENTS}) -> (Tensor, Tensor, Tensor)"
BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor y, Tensor t, Tensor gram, float gamma, float lam1, float lam2, str reduction, float eps) "
    "-> Tensor"
)
REDUCTIONS = ("sum", "mean")


def validate(y, gamma, lam1, lam2, reduction, eps, op: str = OP) -> None:
    """Raises a clear error naming the argument; changes nothing."""
    _checks.floating(op, "y", y)
    if y.dim() != 2:
        raise ValueError(f"{op}: y must be 2-D (b, k): rows by output columns, got shape {tuple(y.shape)}")
    validate_arguments(op, gamma, lam1, lam2, reduction, eps, float32=y.dtype != torch.float64)


def validate_arguments(op: str, gamma, lam1, lam2, reduction, eps, *, float32: bool = True) -> None:
    """The checks of the non-tensor arguments (``float32``: they must fit the float32 arithmetic)."""
    for name, value in (("gamma", gamma), ("lam1", lam1), ("lam2", lam2)):
        _checks.number(op, name, value, float32=float32)
    _checks.number(op, "eps", eps, non_negative=True, float32=float32)
    if reduction not in REDUCTIONS:
        raise ValueError(f'{op}: reduction must be "sum" or "mean", got {reduction!r}')


def _validate_backward(grad, y, t, gram, gamma, lam1, lam2, reduction, eps) -> None:
    op = f"{OP}_backward"
    validate(y, gamma, lam1, lam2, reduction, eps, op)
    compute = _compute_dtype(y)
    side = min(y.shape)
    for name, value, shape in (("t", t, tuple(y.shape)), ("gram", gram, (side, side))):
        _checks.tensor(op, name, value)
        if tuple(value.shape) != shape or value.dtype != compute or value.device != y.device:
            raise ValueError(f"{op}: {name} must be the forward's {shape} {compute} tensor on {y.device}, got "
                             f"{tuple(value.shape)} {value.dtype} on {value.device}")  # fmt: skip
    _checks.tensor(op, "grad", grad)
    if grad.shape != () or grad.dtype != y.dtype or grad.device != y.device:
        raise ValueError(f"{op}: grad must be a 0-d {y.dtype} tensor on {y.device} (the gradient of the penalty), "
                         f"got {grad.dtype} of shape {tuple(grad.shape)} on {grad.device}")  # fmt: skip


def _pairs(k: int, reduction: str) -> int:
    """``c``: what S₁ and S₂ are divided by (1 for "sum"; for "mean" the off-diagonal count, 1 if none)."""
    return max(k * (k - 1), 1) if reduction == "mean" else 1


def _compute_dtype(y: torch.Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


class _Normalised:
    """``T``, ``T̂``, ``1/n``, ``S₁`` and the smaller Gram of ``y``, in the compute dtype. With the
    k × k Gram it holds ϑ's off-diagonal part itself, whose sum is S₁; with the b × b one, ``s`` and
    ``d`` give S₁. ``t`` and ``gram``: the forward's, when the backward has them (not recomputed)."""

    def __init__(self, y: torch.Tensor, gamma: float, eps: float, t=None, gram=None):
        self.t, squares = _tanh_and_column_squares(y, gamma, t)
        norms = squares.sqrt_()
        self.unclamped = norms >= eps
        clamped = norms.clamp_min(eps)
        self.scale = clamped.reciprocal()
        self.t_hat = self.t / clamped  # (t · (1/n) can miss ±1 by an ulp where t / n cannot: b = 1)
        b, k = y.shape
        self.columns_gram = k <= b
        if self.columns_gram:
            if gram is None:
                gram = self.t_hat.T @ self.t_hat
                gram.diagonal().zero_()
            self.gram = gram
            self.s1, self.s, self.d = self.gram.sum(), None, None
        else:
            self.gram = self.t_hat @ self.t_hat.T if gram is None else gram
            # ‖s‖² ≈ k + S₁ cancels down to S₁: both sums are taken in float64 from the same T̂.
            wide = self.t_hat.to(torch.float64, copy=True)
            s, d = wide.sum(1), wide.square_().sum(0)
            compute = self.t.dtype
            self.s1 = (torch.dot(s, s) - d.sum()).to(compute)
            self.s, self.d = s.to(compute), d.to(compute)

    def s2(self) -> torch.Tensor:
        flat = self.gram.reshape(-1)
        squares = torch.dot(flat, flat)
        return squares if self.columns_gram else squares - torch.dot(self.d, self.d)

    def row_sums(self) -> torch.Tensor:
        return self.t_hat.sum(1) if self.s is None else self.s


def _tanh_and_column_squares(y, gamma: float, t=None):
    """``T = tanh(γy)`` (or the given ``t``) and ``Σ_r T[r, i]²`` per column, in the compute dtype. On
    the CPU one native pass (csrc/cpu/self_orthogonality.cpp: torch's float32 tanh alone took 2.3 ns
    a value on a Zen 5, the whole pass takes a fraction of that); elsewhere torch ops."""
    compute = _compute_dtype(y)
    if y.device.type != "cpu":
        t = torch.tanh(y.to(compute) * gamma) if t is None else t  # (faster than tanh_ in place, measured)
        return t, t.square().sum(0)  # (10× faster than vector_norm over dim 0 here)
    b, k = y.shape
    given = t is not None
    y = y.contiguous()
    t = torch.empty((b, k), dtype=compute) if t is None else t.contiguous()
    squares = torch.empty(k, dtype=compute)
    _native.launcher("self_orthogonality_tanh", y.device)(
        _native.DTYPE_CODES[y.dtype], y.data_ptr(), t.data_ptr(), squares.data_ptr(), b, k, gamma, given
    )
    return t, squares


def _empty_side_outputs(y):
    side = min(y.shape)
    compute = _compute_dtype(y)
    return y.new_zeros(y.shape, dtype=compute), y.new_zeros((side, side), dtype=compute)


def _forward(y, gamma=10.0, lam1=100.0, lam2=1.0, reduction="sum", eps=1e-12):
    validate(y, gamma, lam1, lam2, reduction, eps)
    if y.numel() == 0:
        return y.new_zeros(()), *_empty_side_outputs(y)
    terms = _Normalised(y, gamma, eps)
    c = _pairs(y.shape[1], reduction)
    value = ((terms.s1 / c).square() * lam1 + terms.s2() * (lam2 / c)).to(y.dtype)
    return value, terms.t, terms.gram


def _backward(grad, y, t, gram, gamma, lam1, lam2, reduction, eps):
    _validate_backward(grad, y, t, gram, gamma, lam1, lam2, reduction, eps)
    if y.numel() == 0:
        return torch.zeros_like(y, memory_format=torch.contiguous_format)
    terms = _Normalised(y, gamma, eps, t, gram)
    t_hat, c = terms.t_hat, _pairs(y.shape[1], reduction)
    g = grad.to(t_hat.dtype)
    alpha2 = g * terms.s1 * (4 * lam1 / c**2)  # 2α·g
    beta4 = g * (4 * lam2 / c)  # 4β·g
    if terms.columns_gram:  # T̂(T̂ᵀT̂) − T̂·diag(d) = T̂·(ϑ ⊙ (1 − I))
        off_diagonal = terms.gram * beta4
        off_diagonal.diagonal().sub_(alpha2)
        grad_t_hat = t_hat @ off_diagonal
    else:
        grad_t_hat = (terms.gram * beta4) @ t_hat
        grad_t_hat.addcmul_(t_hat, alpha2 + beta4 * terms.d, value=-1)
    grad_t_hat.add_((terms.row_sums() * alpha2).unsqueeze(1))
    along = (t_hat * grad_t_hat).sum(0) * terms.unclamped
    grad_t = grad_t_hat.addcmul_(t_hat, along, value=-1).mul_(terms.scale * gamma)
    return grad_t.mul_(1 - terms.t.square()).to(y.dtype)


def _fake(y, gamma=10.0, lam1=100.0, lam2=1.0, reduction="sum", eps=1e-12):
    validate(y, gamma, lam1, lam2, reduction, eps)
    side = min(y.shape)
    compute = _compute_dtype(y)
    return y.new_empty(()), y.new_empty(y.shape, dtype=compute), y.new_empty((side, side), dtype=compute)


def _backward_fake(grad, y, t, gram, gamma, lam1, lam2, reduction, eps):
    _validate_backward(grad, y, t, gram, gamma, lam1, lam2, reduction, eps)
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    y, *ctx.arguments = inputs
    _, t, gram = output
    ctx.mark_non_differentiable(t, gram)
    ctx.save_for_backward(y, t, gram)


def _autograd_backward(ctx, grad, _grad_t, _grad_gram):
    y, t, gram = ctx.saved_tensors
    return self_orthogonality_backward_op(grad, y, t, gram, *ctx.arguments), None, None, None, None, None


def _samples(device) -> list[tuple]:
    """opcheck inputs: both Gram branches, both reductions, 16-bit and float64, a strided view, a
    dead column, an empty batch."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=True):
        return (torch.randn(*shape, generator=generator) * 0.2).to(dtype=dtype, device=device).requires_grad_(grad)

    dead = randn(9, 4, grad=False)
    dead[:, 2] = 0
    return [
        (randn(9, 4), 10.0, 100.0, 1.0, "sum", 1e-12),  # k <= b: the k × k Gram
        (randn(3, 7), 10.0, 100.0, 1.0, "mean", 1e-12),  # k > b: the b × b Gram
        (randn(6, 5, dtype=torch.float64), 2.0, 3.0, 0.5, "sum", 1e-12),
        (randn(8, 3, dtype=torch.bfloat16), 10.0, 100.0, 1.0, "sum", 1e-12),
        (randn(10, 8, grad=False)[::2, 1::2], 4.0, 1.0, 2.0, "mean", 1e-6),
        (dead.requires_grad_(), 10.0, 100.0, 1.0, "sum", 1e-3),
        (randn(0, 5), 10.0, 100.0, 1.0, "sum", 1e-12),
    ]


def _backward_samples(device) -> list[tuple]:
    """The backward op has no autograd of its own (no double backward): inputs without grad, with
    the forward's ``T`` and Gram."""
    samples = []
    for y, *arguments in _samples(device):
        _, t, gram = _forward(y.detach(), *arguments)
        samples.append((torch.randn((), dtype=y.dtype, device=device), y.detach(), t, gram, *arguments))
    return samples


self_orthogonality_backward_op = define_op(
    f"{OP}_backward", BACKWARD_SCHEMA, cpu=_backward, cuda=_backward, fake=_backward_fake, samples=_backward_samples
)
self_orthogonality_forward_op = define_op(
    f"{OP}_forward", FORWARD_SCHEMA, cpu=_forward, cuda=_forward, fake=_fake, samples=_samples,
    backward=_autograd_backward, setup_context=_setup_context,
)  # fmt: skip
self_orthogonality_op = define_composite(
    OP, SCHEMA, lambda y, *arguments: self_orthogonality_forward_op(y, *arguments)[0]
)


def self_orthogonality(
    y, gamma: float = 10.0, lam1: float = 100.0, lam2: float = 1.0, reduction: str = "sum", eps: float = 1e-12
) -> torch.Tensor:
    """The Self-Orthogonality penalty of ``y`` ``(b, k)``; ``torch.ops.kexue.self_orthogonality``.

    Args:
        y: a layer's pre-bias output, ``(b, k)``: ``b`` rows (samples, or every spatial position
            of a conv), ``k`` output columns; float32, float64, float16 or bfloat16; any strides.
        gamma: the tanh sharpness γ (finite).
        lam1, lam2: the weights λ₁ of ``S₁²`` and λ₂ of ``S₂`` (finite).
        reduction: ``"sum"`` (Su's formula) or ``"mean"`` (``S₁``, ``S₂`` divided by ``k(k − 1)``).
        eps: the floor of a column's norm (finite, ``>= 0``; ``> 0`` keeps a dead column finite).

    Returns:
        ``R`` as a 0-d tensor of ``y``'s dtype, differentiable in ``y`` (no double backward).
        0 for an empty ``y``.

    Raises:
        TypeError: ``y`` not a Tensor or of another dtype. ValueError: ``y`` not 2-D, a reduction
        other than "sum"/"mean", a NaN/infinite ``gamma``/``lam1``/``lam2``/``eps`` or a negative ``eps``.

    The definition: :mod:`kexue_fast.reference.orthogonality`; how it is computed: this module.
    """
    return self_orthogonality_op(y, gamma, lam1, lam2, reduction, eps)
