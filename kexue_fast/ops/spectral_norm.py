r"""``kexue::spectral_norm_power_iter_`` and ``kexue::spectral_sigma`` — spectral normalisation
for every matrix of a model in one call each (docs/spectral_norm.md).

``W_i = weights[i].reshape(shape[0], -1)`` is ``m_i × n_i``; ``us[i]`` has ``m_i`` elements and
``vs[i]`` ``n_i``. ``spectral_norm_power_iter_`` runs ``n_iters`` rounds of::

    u ← normalize(W v),   v ← normalize(Wᵀ u),     normalize(a) = a / max(‖a‖, eps)

(the order of ``torch.nn.utils.parametrizations.spectral_norm``), updating ``us``/``vs`` in place,
and returns ``σ_i = u_iᵀ W_i v_i`` with the updated vectors, detached. ``n_iters = 0`` only
evaluates σ. ``spectral_sigma`` is the differentiable half: the same σ for given vectors, with
``∂σ_i/∂W_i = u_i v_iᵀ`` (u, v constants — torch's parametrization gradient). A module calls the
first under ``no_grad`` in training mode, then the second inside the graph.

Dtypes: float32/float16/bfloat16 weights take float32 vectors and give float32 σ; float64
weights (all of them) take and give float64. Shapes may all differ; empty lists give an empty
σ. Every entry is validated before any vector is written; the vectors must not require grad or
share memory with each other or the weights, and each call bumps their version counters.
"""

from __future__ import annotations

import functools
import math
from itertools import chain
from operator import attrgetter, floordiv, is_, itemgetter

import torch

from kexue_fast import _checks, _native, _tables
from kexue_fast._library import TRITON_AVAILABLE, define_op, triton_kernels

POWER_ITER_SCHEMA = "(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int n_iters=1, float eps=1e-12) -> Tensor"
SIGMA_SCHEMA = "(Tensor[] weights, Tensor[] us, Tensor[] vs) -> Tensor"


def _vector_dtype(weights) -> torch.dtype:
    return torch.float64 if weights and weights[0].dtype == torch.float64 else torch.float32


def matrix_shape(w: torch.Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of the matrix ``w.reshape(w.shape[0], -1)`` the ops see in ``w``."""
    m = w.shape[0]
    return m, math.prod(w.shape[1:])


def validate(weights, us, vs, n_iters=0, eps=0.0, *, written=False) -> tuple[torch.dtype, list[int]]:
    """Raises a clear error naming the argument; returns the vector (and σ) dtype and the table's
    sizes (``rows, cols`` of every matrix, flattened). ``written``: the call overwrites ``us``/``vs``
    (the power iteration), so they must not require grad and must not overlap each other or the
    weights."""
    op = "spectral_norm_power_iter_" if written else "spectral_sigma"
    if not (len(weights) == len(us) == len(vs)):
        raise ValueError(f"{op}: weights, us, vs have {len(weights)}, {len(us)}, {len(vs)} entries")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"{op}: n_iters must be an int >= 0, got {n_iters}")
    vec_dtype = _vector_dtype(weights)
    _checks.number(op, "eps", eps, non_negative=True, float32=vec_dtype != torch.float64)
    sizes = _sizes_if_all_valid(weights, us, vs, vec_dtype, written)
    if sizes is not None:
        return vec_dtype, sizes
    device = weights[0].device if weights else None
    for i, (w, u, v) in enumerate(zip(weights, us, vs)):  # names the first offending entry
        if w.dtype not in _native.DTYPE_CODES:
            raise TypeError(f"{op}: weights[{i}] must be float32/float64/float16/bfloat16, got {w.dtype}")
        if (w.dtype == torch.float64) != (vec_dtype == torch.float64):
            raise TypeError(f"{op}: weights[{i}] is {w.dtype}; float64 weights cannot be mixed with other dtypes")
        if w.dim() < 1:
            raise ValueError(f"{op}: weights[{i}] must have at least 1 dimension")
        m, n = matrix_shape(w)
        for name, vec, size in (("us", u, m), ("vs", v, n)):
            if vec.dim() != 1 or vec.numel() != size:
                raise ValueError(f"{op}: {name}[{i}] must be 1-D with {size} elements, got shape {tuple(vec.shape)}")
            if vec.dtype != vec_dtype:
                raise TypeError(f"{op}: {name}[{i}] must be {vec_dtype} for {w.dtype} weights, got {vec.dtype}")
            if vec.device != device or w.device != device:
                raise ValueError(
                    f"{op}: weights[{i}] / {name}[{i}] are on {w.device} / {vec.device}, expected {device}"
                )
            if not vec.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] must be contiguous")
            if written:
                _checks.not_requiring_grad(op, f"{name}[{i}]", vec)
    return vec_dtype, list(chain.from_iterable(map(matrix_shape, weights)))


#: The weight dtypes that take float32 vectors.
_FLOAT32_VECTOR_WEIGHTS = {torch.float32, torch.float16, torch.bfloat16}
_device_of, _is_cpu, _grad_required = attrgetter("device"), attrgetter("is_cpu"), attrgetter("requires_grad")
_first = itemgetter(0)


def _on_one_device(weights, vectors) -> bool:
    """Whether all tensors are on one device (on the CPU: checked by a flag, not a device object
    per tensor)."""
    if weights and weights[0].is_cpu:
        return all(map(_is_cpu, weights)) and all(map(_is_cpu, vectors))
    return len(set(map(_device_of, chain(weights, vectors)))) <= 1


def _sizes_if_all_valid(weights, us, vs, vec_dtype, written) -> list[int] | None:
    """The table's sizes if every entry passes the checks of :func:`validate`, found by C-level
    loops (a model has hundreds of matrices); else None, and ``validate``'s loop finds the entry
    to name. Matrices without rows take that loop too (their column count is not numel / rows)."""
    try:
        rows = list(map(_first, map(_tables.SHAPE, weights)))
    except IndexError:  # a 0-d weight
        return None
    if 0 in rows:
        return None
    cols = list(map(floordiv, map(torch.Tensor.numel, weights), rows))
    vectors = [*us, *vs]
    weight_dtypes = {torch.float64} if vec_dtype == torch.float64 else _FLOAT32_VECTOR_WEIGHTS
    valid = (
        set(map(_tables.DTYPE, weights)) <= weight_dtypes
        and list(map(_tables.SHAPE, us)) == list(zip(rows))
        and list(map(_tables.SHAPE, vs)) == list(zip(cols))
        and set(map(_tables.DTYPE, vectors)) <= {vec_dtype}
        and _on_one_device(weights, vectors)
        and all(map(torch.Tensor.is_contiguous, vectors))
        and not (written and any(map(_grad_required, vectors)))
    )
    return list(chain.from_iterable(zip(rows, cols))) if valid else None


#: The table's slots (weight, u, v) span rows·cols, rows and cols elements; u and v are written.
_EXTENTS, _WRITTEN = [[0, 1], [0], [1]], [False, True, True]


def check_disjoint(weights, us, vs, table=None, table_weights=None) -> None:
    """No vector the power iteration writes shares memory with another one or with a weight
    (needs real data pointers, so it runs in the kernels, not in the fake kernel). With the
    launch's ``table`` (and the ``table_weights`` it points to, from :func:`make_table`) a sweep
    in C++ over the table's ranges clears the usual case; where it finds a clash, or a weight was
    copied (non-contiguous: its own memory is not in the table), the check of
    ``kexue_fast._checks`` runs and names the two tensors."""
    if table is not None and all(map(is_, table_weights, weights)) and not table.overlapping(_EXTENTS, _WRITTEN):
        return
    _checks.disjoint("spectral_norm_power_iter_", [("us", us), ("vs", vs)], [("weights", weights)])


def make_table(weights, us, vs, sizes, vec_dtype):
    """The launchers' table (slots weight, u, v; ``sizes``: rows, cols, and ``vec_dtype``, the
    vectors' dtype, from :func:`validate`) and the contiguous weights it points to (the caller
    keeps them alive during the call)."""
    weights = list(map(torch.Tensor.contiguous, weights))
    table = _tables.build("spectral_norm", (weights, us, vs), sizes, 2, slot_dtypes=(None, vec_dtype, vec_dtype))
    return table, weights


@functools.cache
def launcher(kernel: str, device: torch.device):
    """The ``_C`` launcher ``kernel`` (spectral_norm_power_iter or spectral_sigma) for ``device``,
    called as ``(vec_code, table, *args, sigmas_ptr)``. On CUDA it also allocates, per call and
    with torch, the device scratch of the kernels' partial sums and passes it on (the scratch
    policy: csrc/include/kexue/cuda_common.cuh)."""
    launch = _native.launcher(kernel, device)
    if device.type != "cuda":
        return launch
    scratch_elems = _native.native("spectral_norm_scratch_elems", device)

    def with_scratch(vec_code, table, *args):
        elems = scratch_elems(table)
        dtype = torch.float64 if vec_code == _native.DTYPE_CODES[torch.float64] else torch.float32
        scratch = torch.empty(elems, dtype=dtype, device=device)
        launch(vec_code, table, *args, scratch.data_ptr(), elems)

    return with_scratch


def _native_power_iter(weights, us, vs, n_iters, eps, vec_dtype, sizes):
    table, contiguous_weights = make_table(weights, us, vs, sizes, vec_dtype)
    check_disjoint(weights, us, vs, table, contiguous_weights)
    sigmas = torch.empty(len(weights), dtype=vec_dtype, device=weights[0].device)
    launcher("spectral_norm_power_iter", sigmas.device)(
        _native.DTYPE_CODES[vec_dtype], table, n_iters, eps, sigmas.data_ptr()
    )
    return sigmas


def _triton_power_iter(weights, us, vs, n_iters, eps, vec_dtype, _sizes):
    check_disjoint(weights, us, vs)
    kernels = triton_kernels("spectral_norm")
    matrices = [w.contiguous().reshape(matrix_shape(w)) for w in weights]
    return kernels.spectral_norm_power_iter_(matrices, us, vs, n_iters, eps).to(vec_dtype)


def _power_iter_impl(launch):
    def power_iter(weights, us, vs, n_iters=1, eps=1e-12):
        vec_dtype, sizes = validate(weights, us, vs, n_iters, eps, written=True)
        if not weights:
            return torch.empty(0, dtype=vec_dtype)
        return launch(weights, us, vs, n_iters, eps, vec_dtype, sizes)

    return power_iter


def _sigma(weights, us, vs):
    vec_dtype, sizes = validate(weights, us, vs)
    if not weights:
        return torch.empty(0, dtype=vec_dtype)
    sigmas = torch.empty(len(weights), dtype=vec_dtype, device=weights[0].device)
    table, _alive = make_table(weights, us, vs, sizes, vec_dtype)
    launcher("spectral_sigma", sigmas.device)(_native.DTYPE_CODES[vec_dtype], table, sigmas.data_ptr())
    return sigmas


def _fake(weights, us, vs, n_iters=1, eps=1e-12):
    vec_dtype, _ = validate(weights, us, vs, n_iters, eps, written=True)
    return torch.empty(len(weights), dtype=vec_dtype, device=weights[0].device if weights else None)


def _sigma_fake(weights, us, vs):
    vec_dtype, _ = validate(weights, us, vs)
    return torch.empty(len(weights), dtype=vec_dtype, device=weights[0].device if weights else None)


def _sigma_setup_context(ctx, inputs, output):
    weights, us, vs = inputs
    ctx.save_for_backward(*us, *vs)
    ctx.weight_meta = [(w.shape, w.dtype) for w in weights]


def _sigma_backward(ctx, grad_sigmas):
    n = len(ctx.weight_meta)
    saved = ctx.saved_tensors
    us, vs = saved[:n], saved[n:]
    grads = [
        (grad_sigmas[i] * torch.outer(us[i], vs[i])).reshape(shape).to(dtype)
        for i, (shape, dtype) in enumerate(ctx.weight_meta)
    ]
    return grads, [None] * n, [None] * n


def _samples(device) -> list[tuple]:
    def make(*shapes, dtype=torch.float32, grad=False):
        weights = [torch.randn(s, dtype=dtype, device=device, requires_grad=grad) for s in shapes]
        vec = torch.float64 if dtype == torch.float64 else torch.float32
        us = [torch.randn(s[0], dtype=vec, device=device) for s in shapes]
        vs = [torch.randn(math.prod(s[1:]), dtype=vec, device=device) for s in shapes]
        return weights, us, vs

    return [
        (*make((4, 3), (5, 2, 3, 3)), 1, 1e-12),
        (*make((7, 7), dtype=torch.bfloat16), 3, 1e-12),
        (*make((3, 5), dtype=torch.float64), 0, 1e-12),
        ([], [], [], 1, 1e-12),
    ]


def _sigma_samples(device) -> list[tuple]:
    return [(w, u, v) for (w, u, v, _, _) in _samples(device)] + [
        tuple(_requires_grad(s) for s in _samples(device)[0][:3])
    ]


def _requires_grad(tensors):
    return [t.detach().requires_grad_() if t.dtype != torch.float64 else t for t in tensors]


spectral_norm_power_iter_op = define_op(
    "spectral_norm_power_iter_", POWER_ITER_SCHEMA, any_device=_power_iter_impl(_native_power_iter), fake=_fake,
    samples=_samples,
)  # fmt: skip
spectral_norm_power_iter_triton_op = (
    define_op(
        "spectral_norm_power_iter_triton_",
        POWER_ITER_SCHEMA,
        any_device=_power_iter_impl(_triton_power_iter),
        fake=_fake,
        samples=_samples,
        triton=True,
    )
    if TRITON_AVAILABLE
    else None
)
spectral_sigma_op = define_op(
    "spectral_sigma", SIGMA_SCHEMA, any_device=_sigma, fake=_sigma_fake, samples=_sigma_samples,
    backward=_sigma_backward, setup_context=_sigma_setup_context,
)  # fmt: skip


def spectral_norm_power_iter_(weights, us, vs, n_iters: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """``n_iters`` rounds of ``u ← normalize(W v)``, ``v ← normalize(Wᵀ u)`` for every matrix,
    updating ``us``/``vs`` in place; ``torch.ops.kexue.spectral_norm_power_iter_``.

    Args:
        weights: list of Tensors (float32/float16/bfloat16, or all float64), each viewed as the
            ``m × n`` matrix ``w.reshape(w.shape[0], -1)``; only read.
        us: list of contiguous 1-D Tensors with ``m_i`` elements (float32; float64 for float64
            weights), written in place.
        vs: the same with ``n_i`` elements. Vectors must not require grad nor share memory with
            each other or with a weight; each call bumps their version counters.
        n_iters: ``>= 0`` (0 only evaluates σ).
        eps: ``normalize(a) = a / max(‖a‖, eps)``; finite, ``>= 0``.

    Returns:
        ``σ`` as a ``(len(weights),)`` Tensor (float32, float64 for float64 weights), detached,
        ``σ_i = u_iᵀ W_i v_i`` with the updated vectors.

    Raises:
        TypeError: an unsupported or mixed dtype. ValueError: list lengths, a vector's size,
        device or layout, overlapping vectors, ``n_iters < 0`` or a bad ``eps``. RuntimeError: a
        vector that requires grad. Nothing is written when it raises. See docs/spectral_norm.md.
    """
    return spectral_norm_power_iter_op(weights, us, vs, n_iters, eps)


def spectral_sigma(weights, us, vs) -> torch.Tensor:
    """Differentiable ``σ_i = u_iᵀ W_i v_i`` for every matrix, with ``∂σ_i/∂W_i = u_i v_iᵀ``
    (``u``, ``v`` taken as constants, as in torch's spectral-norm parametrization);
    ``torch.ops.kexue.spectral_sigma``.

    Args:
        weights: list of Tensors (float32/float16/bfloat16, or all float64), each viewed as
            ``w.reshape(w.shape[0], -1)``.
        us: list of contiguous 1-D Tensors with ``m_i`` elements (float32; float64 for float64 weights).
        vs: the same with ``n_i`` elements. Only read: shared vectors, or ``u is v``, are fine.

    Returns:
        A ``(len(weights),)`` Tensor (float32, float64 for float64 weights).

    Raises:
        TypeError: an unsupported or mixed dtype. ValueError: list lengths, a vector's size,
        device or layout. See docs/spectral_norm.md.
    """
    return spectral_sigma_op(weights, us, vs)
