"""Triton kernels and launchers for a batched spectral-norm power iteration.

Installed as ``kexue_fast.triton_kernels.spectral_norm``.  This module only holds the
``@triton.jit`` kernels and plain-Python launchers; the torch.library registration
(``kexue::spectral_norm_power_iter_triton_``) and the argument validation live in
``kexue_fast.ops.spectral_norm``, the contract in docs/spectral_norm.md.

Math (for every matrix ``W_i`` of shape ``(m_i, n_i)`` with vectors ``u_i`` (m_i) and
``v_i`` (n_i); ``normalize(a) = a / max(||a||_2, eps)``)::

    repeat n_iters times:
        u <- normalize(W v)
        v <- normalize(W^T u)
    sigma = u^T W v

After at least one round, with ``t = W^T u`` of the last round, ``v = t / max(||t||, eps)``
so ``sigma = u^T W v = t . v = ||t||^2 / max(||t||, eps)``: no extra pass over ``W``.
With ``n_iters = 0`` sigma is ``u^T W v`` of the vectors as given (one pass over ``W``).

The arithmetic is float32 (float64 for float64 weights); float16 / bfloat16 weights are
widened on load, the vectors are float32 / float64.  Square roots and divisions are the
correctly rounded ones (``tl.sqrt_rn`` / ``tl.div_rn`` in float32).

Multi-matrix launch
-------------------
The matrices are grouped by weight dtype (at most three groups: float32, float16,
bfloat16 -- or float64 alone); matrices with 0 rows or 0 columns are dropped (sigma 0,
vectors untouched).  Each matrix is cut into row blocks of ``BLOCK_M`` rows and column
blocks of ``BLOCK_N`` columns.  Per group the launcher builds one pointer table
(``_common.pointer_table``, copied to the device once)::

    [ eps, 0              (float64 bit pattern, pad)
    | meta      (T x 10)  per matrix: W, u, v addresses, m, n, first row-block program,
    |                     row-block count, first column-block program, column-block
    |                     count, index of its sigma in the output
    | row progs (R x 2)   row-block program p: (matrix, first row)
    | col progs (C x 2) ] column-block program p: (matrix, first column)

and one scratch buffer of ``R + C`` floats for per-program partial sums.  A round is two
launches, whatever the number of matrices:

    1. ``_wv_kernel``, one program per (matrix, row block): ``x = W[rows, :] @ v'`` over
       the whole row width, stored *unnormalised* into ``u[rows]``, and ``sum(x^2)``
       into ``part_u[p]``.  ``v'`` is the given ``v`` in the first round and, later,
       the unnormalised ``v`` of the previous round divided by its norm floor, which
       every program recomputes from that matrix's ``part_v`` entries.
    2. ``_wtu_kernel``, one program per (matrix, column block): the same for
       ``x = W[:, cols]^T @ (u / max(||u||, eps))``, into ``v[cols]`` and ``part_v[p]``.

Both divide the loaded vector by its norm floor before the product, as the CPU and CUDA
kernels do: dividing the product instead underflows for tiny weights (``W^T (W v)`` is
~1e-60 for 1e-30 weights) and loses the result when ``||W v|| < eps``.

Neither kernel reads the vector it writes, so ``u`` and ``v`` themselves hold the
unnormalised iterates and no vector scratch is needed.  A last launch, ``_finish_kernel``
(one program per matrix), divides ``u`` and ``v`` by their norm floors in place and
writes ``sigma = ||t||^2 / max(||t||, eps)``.  For ``n_iters = 0`` (and
``spectral_sigma``) ``_wv_kernel`` instead writes the partial dot products
``u[rows] . (W v)[rows]`` and ``_finish_kernel`` adds them up.

Every sum is taken in a fixed order (no atomics): a program accumulates its tile in a
``[BLOCK_M, BLOCK_N]`` register block reduced once at the end, and a matrix's partials
are always added by the same loop, so every program that needs a norm computes the
identical value and the whole result is run-to-run deterministic.

The matrices and vectors are reached through the addresses in the table, turned into
typed pointers (``_common.typed_pointer``); the element types come from type witnesses (the
table's header viewed as the weight dtype; the partial-sum buffer for the vectors).  How this
runs under ``TRITON_INTERPRET=1`` too: the ``_common`` module docstring.

Design notes / what was learnt from public code (ideas only, no code copied):
  * Miyato et al., "Spectral Normalization for Generative Adversarial Networks" (2018),
    and PyTorch's ``torch/nn/utils/parametrizations.py`` (``_SpectralNorm``): the power
    iteration ``u = normalize(W v)``, ``v = normalize(W^T u)``, ``sigma = u^T W v`` on
    the weight reshaped to ``(shape[0], -1)``, with ``normalize`` clamping the norm at
    ``eps``.
  * NVIDIA apex ``csrc/multi_tensor_apply.cuh``: one launch over many separately
    allocated tensors via a small table of addresses and (tensor, chunk) entries per
    block -- here (matrix, row block) and (matrix, column block).
  * The Triton tutorials (``03-matrix-multiplication.py``, ``05-layer-norm.py``): 2-D
    tiles addressed as ``base + rows[:, None] * stride + cols[None, :]`` with masks on
    the ragged edges, and the layer-norm backward's per-program partial sums reduced in
    a second step instead of with atomics.
"""

from __future__ import annotations

import array

import torch
import triton
import triton.language as tl
from kexue_fast.triton_kernels._common import (
    f64_bits,
    interpreted,
    pointer_table,
    run_on_host_copies,
    type_witness,
    typed_pointer,
)

__all__ = ["spectral_norm_power_iter_", "spectral_sigma"]

# Rows per row-block program (and rows per step of a column-block program) and columns per
# column-block program (and per step of a row-block program).  Powers of two.
_BLOCK_M = 32
_BLOCK_N = 128
_NUM_WARPS = 4
# Elements per step when summing a matrix's partials / rescaling its vectors.
_PART_BLOCK = 128
_VEC_BLOCK = 1024

# Layout of one matrix's entry in the meta table (int64 fields).
_META_FIELDS = 10
_META_STRIDE = tl.constexpr(_META_FIELDS)
_F_W = tl.constexpr(0)  # address of W (weight dtype)
_F_U = tl.constexpr(1)  # address of u (accumulator dtype)
_F_V = tl.constexpr(2)  # address of v (accumulator dtype)
_F_M = tl.constexpr(3)  # rows
_F_N = tl.constexpr(4)  # columns
_F_RB_FIRST = tl.constexpr(5)  # index of the matrix's first row-block program
_F_RB_COUNT = tl.constexpr(6)  # number of row-block programs (follows its first: _norm_floor)
_F_CB_FIRST = tl.constexpr(7)  # index of the matrix's first column-block program
_F_CB_COUNT = tl.constexpr(8)  # number of column-block programs (follows its first: _norm_floor)
_F_OUT = tl.constexpr(9)  # position of the matrix's sigma in the output

# _wv_kernel / _finish_kernel modes.
_MODE_FIRST = 0  # u = W v with v as given
_MODE_NEXT = 1  # u = W (v / max(||v||, eps)), v unnormalised from the previous round
_MODE_SIGMA = 2  # partial dot products u . W v (no update)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _sqrt(x):
    """Correctly rounded square root (float64 sqrt is always correctly rounded)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y):
    """Correctly rounded division (float64 division is always correctly rounded)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _sum_parts(PART, first, count, PART_BLOCK: tl.constexpr):
    """PART[first] + ... + PART[first + count - 1], always in the same order."""
    offs = tl.arange(0, PART_BLOCK)
    acc = tl.zeros([PART_BLOCK], dtype=PART.dtype.element_ty)
    for s in range(0, count.to(tl.int32), PART_BLOCK):
        idx = s + offs
        acc += tl.load(PART + first + idx, mask=idx < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _norm_floor(PART, meta, FIRST: tl.constexpr, eps, PART_BLOCK: tl.constexpr):
    """(max(sqrt(s), eps), s) with s the sum of squares stored in the partials of the matrix at
    ``meta``: meta[FIRST + 1] of them from PART[meta[FIRST]] on (FIRST: _F_RB_FIRST for the row
    blocks' partials of u, _F_CB_FIRST for the column blocks' of v; each count follows its first)."""
    s = _sum_parts(PART, tl.load(meta + FIRST), tl.load(meta + FIRST + 1), PART_BLOCK)
    return tl.maximum(_sqrt(s), eps), s


@triton.jit
def _load_eps(HEAD, acc_ty: tl.constexpr):
    return tl.load(HEAD).to(tl.float64, bitcast=True).to(acc_ty)


@triton.jit
def _program_matrix(META, PROGS, pid, W_WITNESS, acc_ty: tl.constexpr):
    """The matrix of program ``pid``: its META entry, the program's first row (or column), the
    sizes m, n and typed pointers to W, u and v."""
    meta = META + tl.load(PROGS + 2 * pid) * _META_STRIDE
    first = tl.load(PROGS + 2 * pid + 1)
    m = tl.load(meta + _F_M)
    n = tl.load(meta + _F_N)
    w_ptr = typed_pointer(tl.load(meta + _F_W), W_WITNESS.dtype.element_ty)
    u_ptr = typed_pointer(tl.load(meta + _F_U), acc_ty)
    v_ptr = typed_pointer(tl.load(meta + _F_V), acc_ty)
    return meta, first, m, n, w_ptr, u_ptr, v_ptr


@triton.jit
def _wv_kernel(
    HEAD,  # int64[2]: bit pattern of float64 eps, pad
    META,  # int64[T * 10]: per-matrix fields (see _F_*)
    PROGS,  # int64[R * 2]: (matrix, first row) of every row-block program
    PART_U,  # acc[R]: written, one partial per program
    PART_V,  # acc[C]: read in MODE_NEXT (sums of squares of the unnormalised v)
    W_WITNESS,  # typed pointer carrying the weights' element type (never dereferenced)
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PART_BLOCK: tl.constexpr,
):
    acc_ty = PART_U.dtype.element_ty
    pid = tl.program_id(0)
    meta, r0, m, n, w_ptr, u_ptr, v_ptr = _program_matrix(META, PROGS, pid, W_WITNESS, acc_ty)

    if MODE == 1:  # _MODE_NEXT: v is unnormalised; use v / max(||v||, eps)
        denom, _ = _norm_floor(PART_V, meta, _F_CB_FIRST, _load_eps(HEAD, acc_ty), PART_BLOCK)
    rows = r0 + tl.arange(0, BLOCK_M)  # int64
    rmask = rows < m
    row_offs = rows[:, None] * n
    cols0 = tl.arange(0, BLOCK_N)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
    for c0 in range(0, n.to(tl.int32), BLOCK_N):
        cols = c0 + cols0
        cmask = cols < n
        w = tl.load(
            w_ptr + row_offs + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )
        x = tl.load(v_ptr + cols, mask=cmask, other=0.0)
        if MODE == 1:
            # Normalised before the product, not after: W (v / d) stays representable where
            # (W v) / d would underflow (tiny W and ||v|| < eps).
            x = _div(x, denom)
        acc2 += w.to(acc_ty) * x[None, :]
    acc = tl.sum(acc2, axis=1)  # (W v)[rows]; 0 on masked rows

    if MODE == 2:  # _MODE_SIGMA
        uu = tl.load(u_ptr + rows, mask=rmask, other=0.0)
        tl.store(PART_U + pid, tl.sum(uu * acc, axis=0))
    else:
        tl.store(u_ptr + rows, acc, mask=rmask)
        tl.store(PART_U + pid, tl.sum(acc * acc, axis=0))


@triton.jit
def _wtu_kernel(
    HEAD,  # int64[2]: bit pattern of float64 eps, pad
    META,  # int64[T * 10]: per-matrix fields (see _F_*)
    PROGS,  # int64[C * 2]: (matrix, first column) of every column-block program
    PART_U,  # acc[R]: read (sums of squares of the unnormalised u)
    PART_V,  # acc[C]: written, one partial per program
    W_WITNESS,  # typed pointer carrying the weights' element type (never dereferenced)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PART_BLOCK: tl.constexpr,
):
    acc_ty = PART_V.dtype.element_ty
    pid = tl.program_id(0)
    meta, c0, m, n, w_ptr, u_ptr, v_ptr = _program_matrix(META, PROGS, pid, W_WITNESS, acc_ty)

    denom, _ = _norm_floor(PART_U, meta, _F_RB_FIRST, _load_eps(HEAD, acc_ty), PART_BLOCK)
    cols = c0 + tl.arange(0, BLOCK_N)  # int64
    cmask = cols < n
    rows0 = tl.arange(0, BLOCK_M)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
    for r0 in range(0, m.to(tl.int32), BLOCK_M):
        rows = r0 + rows0
        rmask = rows < m
        offs = rows[:, None].to(tl.int64) * n + cols[None, :]
        w = tl.load(w_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0.0)
        x = _div(tl.load(u_ptr + rows, mask=rmask, other=0.0), denom)  # normalised first, as in _wv_kernel
        acc2 += w.to(acc_ty) * x[:, None]
    acc = tl.sum(acc2, axis=0)  # (W^T u)[cols] with u normalised; 0 on masked columns

    tl.store(v_ptr + cols, acc, mask=cmask)
    tl.store(PART_V + pid, tl.sum(acc * acc, axis=0))


@triton.jit
def _finish_kernel(
    HEAD,  # int64[2]: bit pattern of float64 eps, pad
    META,  # int64[T * 10]: per-matrix fields (see _F_*)
    PART_U,  # acc[R]: sums of squares of u (after rounds) / partial dots (MODE_SIGMA)
    PART_V,  # acc[C]: sums of squares of v (after rounds)
    OUT,  # acc[n_total]: sigmas
    MODE: tl.constexpr,  # _MODE_SIGMA, or anything else for "normalise after rounds"
    VEC_BLOCK: tl.constexpr,
    PART_BLOCK: tl.constexpr,
):
    acc_ty = OUT.dtype.element_ty
    meta = META + tl.program_id(0) * _META_STRIDE
    if MODE == 2:  # _MODE_SIGMA: sigma = sum of the partial dots
        sigma = _sum_parts(PART_U, tl.load(meta + _F_RB_FIRST), tl.load(meta + _F_RB_COUNT), PART_BLOCK)
    else:
        eps = _load_eps(HEAD, acc_ty)
        du, _ = _norm_floor(PART_U, meta, _F_RB_FIRST, eps, PART_BLOCK)
        dv, sv = _norm_floor(PART_V, meta, _F_CB_FIRST, eps, PART_BLOCK)
        m = tl.load(meta + _F_M)
        n = tl.load(meta + _F_N)
        u_ptr = typed_pointer(tl.load(meta + _F_U), acc_ty)
        v_ptr = typed_pointer(tl.load(meta + _F_V), acc_ty)
        offs0 = tl.arange(0, VEC_BLOCK)
        for s in range(0, m.to(tl.int32), VEC_BLOCK):
            offs = s + offs0
            mask = offs < m
            x = tl.load(u_ptr + offs, mask=mask, other=0.0)
            tl.store(u_ptr + offs, _div(x, du), mask=mask)
        for s in range(0, n.to(tl.int32), VEC_BLOCK):
            offs = s + offs0
            mask = offs < n
            x = tl.load(v_ptr + offs, mask=mask, other=0.0)
            tl.store(v_ptr + offs, _div(x, dv), mask=mask)
        sigma = _div(sv, dv)  # ||t||^2 / max(||t||, eps), t = W^T u
    tl.store(OUT + tl.load(meta + _F_OUT), sigma)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _run_group(
    items: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
    out: torch.Tensor,
    n_iters: int,
    eps: float,
) -> None:
    """All launches for non-empty matrices sharing one weight dtype.

    ``items`` holds ``(output index, W, u, v)``; sigmas go to ``out[output index]``.
    """
    device = items[0][1].device
    acc_dtype = out.dtype
    meta = array.array("q")
    row_progs = array.array("q")
    col_progs = array.array("q")
    for k, w, u, v in items:
        m, n = w.shape[0], w.numel() // w.shape[0]
        rb = range(0, m, _BLOCK_M)
        cb = range(0, n, _BLOCK_N)
        t = len(meta) // _META_FIELDS
        meta.extend(
            [
                w.data_ptr(),
                u.data_ptr(),
                v.data_ptr(),
                m,
                n,
                len(row_progs) // 2,
                len(rb),
                len(col_progs) // 2,
                len(cb),
                k,
            ]
        )
        for r0 in rb:
            row_progs.extend((t, r0))
        for c0 in cb:
            col_progs.extend((t, c0))
    n_mat = len(items)
    n_row = len(row_progs) // 2
    n_col = len(col_progs) // 2
    head_t, meta_t, row_t, col_t = pointer_table([[f64_bits(eps), 0], meta, row_progs, col_progs], device)
    w_witness = type_witness(head_t, items[0][1].dtype)

    parts = torch.empty(n_row + n_col, dtype=acc_dtype, device=device)
    part_u = parts[:n_row]
    part_v = parts[n_row:]

    common = {
        "BLOCK_M": _BLOCK_M,
        "BLOCK_N": _BLOCK_N,
        "PART_BLOCK": _PART_BLOCK,
        "num_warps": _NUM_WARPS,
    }
    if n_iters == 0:
        _wv_kernel[(n_row,)](head_t, meta_t, row_t, part_u, part_v, w_witness, MODE=_MODE_SIGMA, **common)
    for it in range(n_iters):
        _wv_kernel[(n_row,)](
            head_t,
            meta_t,
            row_t,
            part_u,
            part_v,
            w_witness,
            MODE=_MODE_FIRST if it == 0 else _MODE_NEXT,
            **common,
        )
        _wtu_kernel[(n_col,)](head_t, meta_t, col_t, part_u, part_v, w_witness, **common)
    _finish_kernel[(n_mat,)](
        head_t,
        meta_t,
        part_u,
        part_v,
        out,
        MODE=_MODE_SIGMA if n_iters == 0 else _MODE_NEXT,
        VEC_BLOCK=_VEC_BLOCK,
        PART_BLOCK=_PART_BLOCK,
        num_warps=_NUM_WARPS,
    )


def _run(
    weights: list[torch.Tensor],
    us: list[torch.Tensor],
    vs: list[torch.Tensor],
    n_iters: int,
    eps: float,
) -> torch.Tensor:
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    device = weights[0].device
    acc_dtype = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    if device.type != "cpu" and interpreted(_wv_kernel):
        run = lambda w, u, v: _run(w, u, v, n_iters, eps)  # noqa: E731
        return run_on_host_copies(run, [weights, us, vs], written=[1, 2] if n_iters > 0 else []).to(device)

    out = torch.zeros(len(weights), dtype=acc_dtype, device=device)
    groups: dict[torch.dtype, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for k, (w, u, v) in enumerate(zip(weights, us, vs)):
        if w.numel() == 0:  # 0 rows or 0 columns: sigma 0, vectors untouched
            continue
        groups.setdefault(w.dtype, []).append((k, w, u, v))
    for items in groups.values():
        _run_group(items, out, n_iters, eps)
    return out


def spectral_norm_power_iter_(
    weights: list[torch.Tensor],
    us: list[torch.Tensor],
    vs: list[torch.Tensor],
    n_iters: int,
    eps: float,
) -> torch.Tensor:
    """``n_iters`` power-iteration rounds on every matrix, then its sigma.

    For every i, ``n_iters`` times: ``us[i] <- normalize(W_i vs[i])``, then
    ``vs[i] <- normalize(W_i^T us[i])`` (in place), ``normalize(a) = a / max(||a||, eps)``;
    returns the 1-D tensor of ``sigma_i = us[i]^T W_i vs[i]`` (float32, float64 for float64
    weights) on the weights' device.

    The caller has validated the inputs: ``weights[i]`` contiguous 2-D ``(m_i, n_i)`` of
    dtype float32 / float16 / bfloat16 with float32 vectors, or all float64 with float64
    vectors; ``us[i]`` / ``vs[i]`` contiguous with ``m_i`` / ``n_i`` elements; one device.
    Matrices with no elements get sigma 0 and keep their vectors.  Launches: per weight
    dtype, two per round plus one (two when ``n_iters == 0``).
    """
    return _run(weights, us, vs, int(n_iters), float(eps))


def spectral_sigma(weights: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """``sigma_i = us[i]^T W_i vs[i]`` for every i, vectors used as given (not updated)."""
    return _run(weights, us, vs, 0, 0.0)
