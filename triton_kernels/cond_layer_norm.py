"""Triton kernels and launchers for a fused *conditional* LayerNorm / RMSNorm.

Installed as ``kexue_fast.triton_kernels.cond_layer_norm``.  This module only holds
``@triton.jit`` kernels and plain-Python launchers; the torch.library registration
(``kexue::cond_layer_norm_triton``) and the argument validation live in
``kexue_fast.ops.cond_layer_norm``, the contract in docs/cond_layer_norm.md.

Layout conventions
------------------
``x`` / ``grad_out`` are contiguous ``(rows, D)`` tensors.  Row ``r`` belongs to
sample ``b = r // rows_per_sample`` at position ``m = r % rows_per_sample``.  The
affine weight (and bias) element used for ``(r, d)`` lives at element offset
``b * strides[0] + m * strides[1] + d`` from the tensor's data pointer, which covers
a shared weight (strides ``(0, 0)``), a per-sample weight (strides ``(ld, 0)``) and a
full per-row weight (strides ``(rows_per_sample * ld, ld)``) with one kernel.

Forward (per row, arithmetic in float32, or float64 for float64 inputs)::

    LayerNorm: mu = mean(x); var = mean((x - mu)^2)   (two-pass, never E[x^2]-mu^2)
               rstd = 1 / sqrt(var + eps); y = (x - mu) * rstd * w + b
    RMSNorm:   rstd = 1 / sqrt(mean(x^2) + eps);  y = x * rstd * w + b

Backward recomputes mu / rstd from ``x``; with ``xhat`` the normalised row and
``g = grad_out * w``::

    grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))     (RMS: no mean(g) term)
    grad_weight[group] = sum_rows grad_out * xhat;  grad_bias[group] = sum_rows grad_out

The weight/bias reduction is deterministic (no atomics): every group of
``group_rows`` consecutive rows is cut into ``K = ceil(group_rows / rows_per_block)``
blocks, one program per block accumulates its rows in registers and writes one
partial row; the launcher then sums the K partials with torch.

Design notes / what was learnt from public code (ideas only, no code copied):
  * flash-attention's ``flash_attn/ops/triton/layer_norm.py`` (Tri Dao): one row per
    program in the forward with the whole row held in one power-of-two block, and a
    backward where each program walks a range of rows, keeps dw/db partial sums in
    registers and writes them to a ``(n_programs, N)`` buffer that is summed
    afterwards on the host side -- the deterministic alternative to atomics.
  * Liger-Kernel's ``liger_kernel/ops/layer_norm.py`` / ``rms_norm.py``: choosing
    ``num_warps`` from the block size with a simple threshold rule instead of
    autotuning.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kexue_fast.triton_kernels._common import to_compute, to_output

__all__ = ["cond_layer_norm_backward", "cond_layer_norm_forward"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Largest number of elements Triton allows in one block (2**20 in every release we
# target); the whole row must fit in a single block.
_MAX_BLOCK_D = int(getattr(tl, "TRITON_MAX_TENSOR_NUMEL", 1 << 20))


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _centred_row_and_rstd(x, mask, D, eps_hi, eps_lo, RMS: tl.constexpr, IS_FP64: tl.constexpr):
    """(x − μ, rstd) of one row (RMS: (x, rstd)); masked lanes of x must be 0 and stay 0."""
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    if IS_FP64:
        # (var + eps_hi) + eps_lo is var + eps to within one float64 rounding.
        rstd = 1.0 / tl.sqrt(var + eps_hi + eps_lo)
    else:
        rstd = 1.0 / tl.sqrt(var + eps_hi)
    return xc, rstd


@triton.jit
def _cln_fwd_kernel(
    X,  # (rows, D) input, contiguous
    Y,  # (rows, D) output, contiguous, x's dtype
    W,  # weight base pointer (dummy when HAS_WEIGHT is False)
    B,  # bias base pointer (dummy when HAS_BIAS is False)
    D,  # row length
    rows_per_sample,
    w_stride_b,
    w_stride_m,
    b_stride_b,
    b_stride_m,
    eps_hi,  # eps rounded to float32
    eps_lo,  # eps - eps_hi (restores full eps precision for float64 arithmetic)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,
    IS_FP64: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    x = tl.load(X + row * D + cols, mask=mask, other=0.0)
    x = to_compute(x, IS_FP64)

    xc, rstd = _centred_row_and_rstd(x, mask, D, eps_hi, eps_lo, RMS, IS_FP64)
    y = xc * rstd

    sample = row // rows_per_sample
    pos = row - sample * rows_per_sample
    if HAS_WEIGHT:
        w = tl.load(W + (sample * w_stride_b + pos * w_stride_m) + cols, mask=mask, other=0.0)
        y = y * w.to(y.dtype)
    if HAS_BIAS:
        b = tl.load(B + (sample * b_stride_b + pos * b_stride_m) + cols, mask=mask, other=0.0)
        y = y + b.to(y.dtype)

    tl.store(Y + row * D + cols, to_output(y, Y, ROUND_BF16), mask=mask)


@triton.jit
def _cln_bwd_kernel(
    DY,  # (rows, D) upstream gradient, contiguous
    X,  # (rows, D) forward input, contiguous
    W,  # weight base pointer (dummy when HAS_WEIGHT is False)
    DX,  # (rows, D) grad_x output (dummy when NEED_DX is False)
    DW_PART,  # (n_groups * K, D) partial grad_weight sums (dummy when not NEED_DW)
    DB_PART,  # (n_groups * K, D) partial grad_bias sums (dummy when not NEED_DB)
    D,
    rows_per_sample,
    w_stride_b,
    w_stride_m,
    group_rows,  # rows per reduction group
    rows_per_block,  # rows handled by one program
    K,  # programs per group = ceil(group_rows / rows_per_block)
    eps_hi,
    eps_lo,
    HAS_WEIGHT: tl.constexpr,
    RMS: tl.constexpr,
    IS_FP64: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    group = pid // K
    blk = pid - group * K
    first_in_group = blk * rows_per_block
    row_start = group * group_rows + first_in_group
    n_rows = tl.minimum(group_rows - first_in_group, rows_per_block).to(tl.int32)

    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    if IS_FP64:
        dw_acc = tl.zeros([BLOCK_D], dtype=tl.float64)
        db_acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    else:
        dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    for i in range(0, n_rows):
        row = row_start + i
        x = tl.load(X + row * D + cols, mask=mask, other=0.0)
        dy = tl.load(DY + row * D + cols, mask=mask, other=0.0)
        x = to_compute(x, IS_FP64)
        dy = to_compute(dy, IS_FP64)

        # Recompute the statistics exactly as the forward does.
        xc, rstd = _centred_row_and_rstd(x, mask, D, eps_hi, eps_lo, RMS, IS_FP64)
        xhat = xc * rstd  # 0 on masked lanes

        if NEED_DW:
            dw_acc += dy * xhat
        if NEED_DB:
            db_acc += dy

        if NEED_DX:
            if HAS_WEIGHT:
                sample = row // rows_per_sample
                pos = row - sample * rows_per_sample
                w = tl.load(W + (sample * w_stride_b + pos * w_stride_m) + cols, mask=mask, other=0.0)
                g = dy * w.to(dy.dtype)
            else:
                g = dy
            c_xhat = tl.sum(g * xhat, axis=0) / D
            if RMS:
                dx = (g - xhat * c_xhat) * rstd
            else:
                c_g = tl.sum(g, axis=0) / D
                dx = (g - c_g - xhat * c_xhat) * rstd
            tl.store(DX + row * D + cols, to_output(dx, DX, ROUND_BF16), mask=mask)

    if NEED_DW:
        tl.store(DW_PART + pid * D + cols, dw_acc.to(DW_PART.dtype.element_ty), mask=mask)
    if NEED_DB:
        tl.store(DB_PART + pid * D + cols, db_acc.to(DB_PART.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------
def _num_warps(block_d: int) -> int:
    """One warp per 256 elements of the row block, clamped to [1, 8]; 16 for very wide rows."""
    if block_d >= 8192:
        return 16
    return max(1, min(8, block_d // 256))


def _block_d(d: int) -> int:
    block = triton.next_power_of_2(d)
    if block > _MAX_BLOCK_D:
        raise ValueError(
            f"cond_layer_norm: row length D={d} does not fit in one Triton block (max {_MAX_BLOCK_D} elements)"
        )
    return block


def _split_eps(eps: float) -> tuple[float, float]:
    """Split eps into a float32-representable head and the remainder.

    Triton passes Python floats as float32 scalars; for float64 arithmetic the kernel
    adds both parts to the float64 variance, recovering var + eps to float64 accuracy.
    """
    eps = float(eps)
    hi = float(torch.tensor(eps, dtype=torch.float32).item())
    return hi, eps - hi


def _check_rows_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"cond_layer_norm: {name} must be a tensor")
    if t.dim() != 2:
        raise ValueError(f"cond_layer_norm: {name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"cond_layer_norm: unsupported dtype {t.dtype} for {name}")


def _check_affine(name: str, t, strides, x: torch.Tensor):
    """Validate an optional weight/bias and return (pointer-arg, stride_b, stride_m)."""
    if t is None:
        return x, 0, 0  # dummy pointer, never dereferenced (HAS_* is False)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"cond_layer_norm: {name} must be a tensor or None")
    if t.device != x.device:
        raise ValueError(f"cond_layer_norm: {name} is on {t.device}, x is on {x.device}")
    if t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"cond_layer_norm: {name} must have unit stride along its last dim")
    if strides is None or len(strides) != 2:
        raise ValueError(f"cond_layer_norm: {name}_strides must be a pair (stride_b, stride_m)")
    return t, int(strides[0]), int(strides[1])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def cond_layer_norm_forward(x, weight, weight_strides, bias, bias_strides, rows_per_sample, eps, rms):
    """y = norm(x) * w + b for a (rows, D) x; returns a new contiguous tensor of x's dtype."""
    _check_rows_tensor("x", x)
    x = x.contiguous()
    rows, d = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rows == 0 or d == 0:
        return y
    rows_per_sample = int(rows_per_sample)
    if rows_per_sample <= 0:
        raise ValueError("cond_layer_norm: rows_per_sample must be positive")

    w_arg, ws_b, ws_m = _check_affine("weight", weight, weight_strides, x)
    b_arg, bs_b, bs_m = _check_affine("bias", bias, bias_strides, x)
    eps_hi, eps_lo = _split_eps(eps)
    block_d = _block_d(d)

    _cln_fwd_kernel[(rows,)](
        x,
        y,
        w_arg,
        b_arg,
        d,
        rows_per_sample,
        ws_b,
        ws_m,
        bs_b,
        bs_m,
        eps_hi,
        eps_lo,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        RMS=bool(rms),
        IS_FP64=x.dtype == torch.float64,
        ROUND_BF16=x.dtype == torch.bfloat16,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_d),
    )
    return y


def cond_layer_norm_backward(
    grad_out,
    x,
    weight,
    weight_strides,
    rows_per_sample,
    eps,
    rms,
    need_grad_x,
    group_rows,
    rows_per_block,
    need_grad_weight,
    need_grad_bias,
):
    """Returns (grad_x or None, grad_weight or None, grad_bias or None).

    grad_weight / grad_bias have shape (rows // group_rows, D) and x's dtype; row g is
    the sum over rows [g * group_rows, (g + 1) * group_rows).  Special case: rows == 0
    with group_rows == 0 is read as "one group covering all (zero) rows" and gives
    zeros of shape (1, D).
    """
    _check_rows_tensor("x", x)
    _check_rows_tensor("grad_out", grad_out)
    if grad_out.shape != x.shape:
        raise ValueError(f"cond_layer_norm: grad_out shape {tuple(grad_out.shape)} != x shape {tuple(x.shape)}")
    if grad_out.device != x.device:
        raise ValueError("cond_layer_norm: grad_out and x must be on the same device")
    x = x.contiguous()
    grad_out = grad_out.contiguous()
    rows, d = x.shape
    need_grad_x = bool(need_grad_x)
    need_grad_weight = bool(need_grad_weight)
    need_grad_bias = bool(need_grad_bias)
    need_params = need_grad_weight or need_grad_bias

    n_groups = 0
    if need_params:
        group_rows = int(group_rows)
        if group_rows < 0 or (group_rows == 0 and rows != 0):
            raise ValueError("cond_layer_norm: group_rows must be positive")
        if group_rows == 0:  # rows == 0: a single empty group
            n_groups = 1
        else:
            if rows % group_rows != 0:
                raise ValueError(f"cond_layer_norm: rows={rows} is not a multiple of group_rows={group_rows}")
            n_groups = rows // group_rows

    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_x else None
    grad_w = None
    grad_b = None

    if rows == 0 or d == 0:
        if need_grad_weight:
            grad_w = torch.zeros((n_groups, d), dtype=x.dtype, device=x.device)
        if need_grad_bias:
            grad_b = torch.zeros((n_groups, d), dtype=x.dtype, device=x.device)
        return grad_x, grad_w, grad_b
    if not (need_grad_x or need_params):
        return None, None, None

    rows_per_sample = int(rows_per_sample)
    if rows_per_sample <= 0:
        raise ValueError("cond_layer_norm: rows_per_sample must be positive")
    w_arg, ws_b, ws_m = _check_affine("weight", weight, weight_strides, x)
    eps_hi, eps_lo = _split_eps(eps)
    block_d = _block_d(d)

    if need_params:
        rows_per_block = int(rows_per_block)
        if rows_per_block <= 0:
            raise ValueError("cond_layer_norm: rows_per_block must be positive")
        rows_per_block = min(rows_per_block, group_rows)
        k = triton.cdiv(group_rows, rows_per_block)
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        dw_part = torch.empty((n_groups * k, d), dtype=acc_dtype, device=x.device) if need_grad_weight else x
        db_part = torch.empty((n_groups * k, d), dtype=acc_dtype, device=x.device) if need_grad_bias else x
        grid_rows, g_rows, r_per_block = n_groups * k, group_rows, rows_per_block
    else:
        # grad_x only: no reduction, so simply one row per program.
        k = 1
        dw_part = db_part = x
        grid_rows, g_rows, r_per_block = rows, 1, 1

    _cln_bwd_kernel[(grid_rows,)](
        grad_out,
        x,
        w_arg,
        grad_x if need_grad_x else x,
        dw_part,
        db_part,
        d,
        rows_per_sample,
        ws_b,
        ws_m,
        g_rows,
        r_per_block,
        k,
        eps_hi,
        eps_lo,
        HAS_WEIGHT=weight is not None,
        RMS=bool(rms),
        IS_FP64=x.dtype == torch.float64,
        NEED_DX=need_grad_x,
        NEED_DW=need_grad_weight,
        NEED_DB=need_grad_bias,
        ROUND_BF16=x.dtype == torch.bfloat16,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_d),
    )

    if need_grad_weight:
        grad_w = dw_part.view(n_groups, k, d).sum(1).to(x.dtype)
    if need_grad_bias:
        grad_b = db_part.view(n_groups, k, d).sum(1).to(x.dtype)
    return grad_x, grad_w, grad_b
