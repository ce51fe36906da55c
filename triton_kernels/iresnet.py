"""Triton kernel and launcher for the i-ResNet inversion of an MLP residual branch.

Installed as ``kexue_fast.triton_kernels.iresnet``.  This module only holds the
``@triton.jit`` kernel and a plain-Python launcher; the torch.library registration
(``kexue::iresnet_inverse_triton``), the argument validation and the backward (the native
``kexue::iresnet_inverse_backward``) live in ``kexue_fast.ops.iresnet``, the math -- the branch
``g``, the per-row stopping rule, what NaN/inf rows and ``max_iter = 0`` give -- once, in
``kexue_fast.reference.iresnet``.

One launch for the whole solve
------------------------------
Program ``p`` owns the tile of ``BLOCK_B`` rows ``[p * BLOCK_B, (p + 1) * BLOCK_B)`` and runs its
whole solve: it loops over the iterations inside the kernel and leaves the loop as soon as none
of its rows is still running (per-tile early exit), or at ``max_iter``.  A row that stops
(converged, or its new iterate holds a NaN or an infinity) is frozen: its iterate is no longer
updated and its ``n_iter`` is fixed; it keeps riding along in the tile's products (the result of
a tile row depends only on that row, so it disturbs nobody) until the tile is done.  The stop
test runs in the data's dtype exactly as in the CPU kernel: ``max|x_new - x| <= atol + rtol *
max|x_new|`` with ``atol`` and ``rtol`` rounded once to that dtype, a non-finite row detected by
``sum(x_new - x_new)`` being NaN (it wins over the test, so such a row ends at ``max_iter``).

Layers and widths
-----------------
The layers are reached through a pointer table (``_common.pointer_table``)::

    [ atol, rtol                 (float64 bit patterns)
    | layers  (L x 4)            per layer: address of W_k, address of b_k, out_k, in_k ]

and a runtime loop over them, so any depth ``L >= 1`` is one compiled kernel.  Widths are
runtime values too: every product is cut into chunks of ``BLOCK_C`` outputs by ``BLOCK_K`` inputs
(powers of two; loads masked at the ragged ends), so no width is too large and none
needs to be a multiple of anything.  A layer's input and output pass through a per-program
scratch in global memory (three ``BLOCK_B x S`` buffers, ``S`` the widest layer rounded up to 16:
the iterate, and two buffers the hidden layers ping-pong between; the last layer writes the new
iterate into the one its input is not in, and the rows that ran copy it into the iterate once
their stop test is done).  A tile's scratch is a few KiB to a few tens of KiB, written and read
back by the same program, so on a GPU it stays in L1/L2; the weights are read from global memory
on every iteration (L2-resident: all tiles share them).  ``tl.debug_barrier()`` separates a
layer's writes from the next layer's reads (and a buffer's reads from its being overwritten),
since different threads of the program store and load the same scratch elements.

The products and the launch sizes
---------------------------------
float32: ``tl.dot`` on ``[BLOCK_B, BLOCK_K] x [BLOCK_K, BLOCK_C]`` chunks with
``input_precision="ieee"`` -- full float32 products (TF32 would cost ~3 decimal digits, far more
than the float32 rounding of the reference allows, and the stop test would see that noise),
accumulated in float32.  Every chunk is at least 16 in every dimension (``tl.dot``'s minimum),
narrower layers are padded by the masks, so every float32 width takes this path.  float64: a
broadcast-multiply-sum ``sum(a[:, :, None] * w[None, :, :], axis=1)``, because a float64
``tl.dot`` is not supported on every GPU Triton targets (and float64 is mostly there for
``gradcheck``, on CPU); its chunks are kept small so the product stays in registers.
On a GPU (``_GPU_F32`` / ``_GPU_F64``; register counts from ptxas for sm_90): float32 tiles of 32
rows, chunks of 32 outputs by 16 inputs, 8 warps (184 registers, no spills -- input chunks of 32 or
64 spill); float64 tiles of 16 rows, chunks of 16 outputs by 8 inputs, 4 warps (128 registers,
no spills).  The sizes are not tuned on a GPU yet: no GPU was at hand when this was written.
Under the interpreter a program costs per operation, not per element, so the launcher makes the
tiles as tall as the batch (up to 256 rows) and the chunks as wide as the layers (up to 64): the
same kernel, fewer operations (``tests/test_iresnet_triton.py`` also runs the GPU sizes under the
interpreter).

Activations (``ACT``, the codes of ``kexue_fast.ops.iresnet.ACTIVATION_CODES``) are written with
``exp`` and ``log`` only, so they lower alike on every GPU and under the interpreter: elu
``where(h > 0, h, exp(h) - 1)``, relu ``where(h < 0, 0, h)`` (keeps NaN), tanh
``sign(h) (1 - e) / (1 + e)`` with ``e = exp(-2|h|)``, softplus ``where(h > 20, h, max(h, 0) +
log(1 + exp(-|h|)))`` (torch's beta 1, threshold 20), lipswish ``h sigmoid(h) / 1.1``.  Their
absolute errors are a few ulps of 1, well inside the float32 (and float64) rounding the
reference allows.

Under ``TRITON_INTERPRET=1`` this runs unchanged on CPU tensors (``_common`` module docstring);
tensors on another device are solved on host copies.  Index math is 64-bit.

Design notes / what was learnt from public sources (ideas only, no code copied):
  * Behrmann et al., "Invertible Residual Networks" (2019), and Chen et al., "Residual Flows
    for Invertible Generative Modeling" (2019): the fixed-point inverse ``x <- y - g(x)`` and the
    batch-wide stopping rule the per-row rule here replaces.
  * The Triton tutorials (``03-matrix-multiplication.py``): ``tl.dot`` over K-chunks of 2-D
    tiles addressed as ``base + rows[:, None] * stride + cols[None, :]`` with masked edges.
  * NVIDIA apex ``csrc/multi_tensor_apply.cuh``: a table of tensor addresses and sizes so one
    launch reaches many separately allocated tensors (here, the layers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kexue_fast.triton_kernels._common import (
    f64_bits,
    interpreted,
    pointer_table,
    run_on_host_copies,
)

__all__ = ["iresnet_inverse"]

# Launch sizes (_config; powers of two, tl.dot needs at least 16 in every dimension).  On a GPU:
# float32 tiles of 32 rows, output chunks of up to 32 and input chunks of 16, 8 warps (ptxas for
# sm_90: 184 registers, no spills; K chunks of 32 or 64 spill); float64 tiles of 16 rows, chunks of
# 16 outputs by 8 inputs, 4 warps (128 registers, no spills; 16 inputs spill).
_GPU_F32 = (32, 32, 16, 8)  # BLOCK_B, largest BLOCK_C, BLOCK_K, num_warps
_GPU_F64 = (16, 16, 8, 4)
_MIN_CHUNK = 16
# Under the interpreter: rows per program and chunk width at most.
_INTERPRETER_MAX_ROWS = 256
_INTERPRETER_MAX_CHUNK = 64

# Layout of one layer's entry in the layer table (int64 fields).
_LAYER_FIELDS = 4
_LAYER_STRIDE = tl.constexpr(_LAYER_FIELDS)
_F_W = tl.constexpr(0)  # address of W_k, (out_k, in_k) contiguous
_F_B = tl.constexpr(1)  # address of b_k, (out_k,)
_F_OUT = tl.constexpr(2)  # out_k
_F_IN = tl.constexpr(3)  # in_k

# Activation codes (kexue_fast.ops.iresnet.ACTIVATION_CODES).
_ELU = tl.constexpr(0)
_RELU = tl.constexpr(1)
_TANH = tl.constexpr(2)
_SOFTPLUS = tl.constexpr(3)
_LIPSWISH = tl.constexpr(4)


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------
# The loop body calls no @triton.jit helper: under the interpreter every such call re-patches
# triton.language (milliseconds each, more than the operations of a small layer), so the
# product, the activation and the table lookups are written out where they are used.
@triton.jit(do_not_specialize=["max_iter"])
def _inverse_kernel(
    HEAD,  # int64[2]: float64 bit patterns of atol, rtol
    LAYERS,  # int64[L * 4]: per layer (see _F_*)
    n_layers,
    Y,  # (B, D) contiguous
    X,  # (B, D) contiguous, written
    N_ITER,  # int32 (B,), written
    SCRATCH,  # per program 3 * BLOCK_B * S elements (buffer 0: iterate, 1 and 2: layer outputs)
    B,
    D,
    S,
    max_iter,
    ACT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    elem_ty = SCRATCH.dtype.element_ty
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_B)
    rows = pid.to(tl.int64) * BLOCK_B + r
    rmask = rows < B
    buf_elems = BLOCK_B * S.to(tl.int64)
    scratch = SCRATCH + pid.to(tl.int64) * (3 * buf_elems)
    local = r[:, None] * S  # offsets of the tile's rows in a scratch buffer
    atol = tl.load(HEAD).to(tl.float64, bitcast=True).to(elem_ty)
    rtol = tl.load(HEAD + 1).to(tl.float64, bitcast=True).to(elem_ty)

    # x_0 = y into buffer 0 (rows past B: zeros, never active).
    for c0 in range(0, D, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < D
        yv = tl.load(Y + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        tl.store(scratch + local + cols[None, :], yv, mask=cmask[None, :])
    tl.debug_barrier()

    # Layer k reads buffer 0 (k = 0) or 1 + (k - 1) % 2 and writes buffer 1 + k % 2, never the one
    # it reads; the last layer's output is the new iterate, compared with buffer 0.
    fresh = scratch + (1 + (n_layers - 1) % 2) * buf_elems
    active = rmask
    n_iter = tl.zeros([BLOCK_B], dtype=tl.int32)
    it = 0
    n_active = tl.sum(active.to(tl.int32), axis=0)
    while (it < max_iter) & (n_active > 0):
        change = tl.zeros([BLOCK_B], dtype=elem_ty)  # max |x_new - x| per row
        size = tl.zeros([BLOCK_B], dtype=elem_ty)  # max |x_new|
        poison = tl.zeros([BLOCK_B], dtype=elem_ty)  # sum(x_new - x_new): 0, or NaN if not finite
        for k in range(0, n_layers):
            entry = LAYERS + k * _LAYER_STRIDE
            w_ptr = tl.load(entry + _F_W).to(tl.pointer_type(elem_ty))  # _common.typed_pointer
            b_ptr = tl.load(entry + _F_B).to(tl.pointer_type(elem_ty))
            n_out = tl.load(entry + _F_OUT).to(tl.int32)
            n_in = tl.load(entry + _F_IN).to(tl.int32)
            src = scratch + tl.where(k == 0, 0, 1 + (k - 1) % 2) * buf_elems
            dst = scratch + (1 + k % 2) * buf_elems
            for n0 in range(0, n_out, BLOCK_C):
                # h = outputs [n0, n0 + BLOCK_C) of src W^T + b (zeros past n_out).
                cols = n0 + tl.arange(0, BLOCK_C)
                cmask = cols < n_out
                h = tl.zeros([BLOCK_B, BLOCK_C], dtype=elem_ty)
                for k0 in range(0, n_in, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    kmask = kk < n_in
                    a = tl.load(src + local + kk[None, :], mask=kmask[None, :], other=0.0)
                    wt = tl.load(  # wt[i, j] = W[cols[j], kk[i]]: a chunk of W^T
                        w_ptr + cols[None, :].to(tl.int64) * n_in + kk[:, None],
                        mask=kmask[:, None] & cmask[None, :],
                        other=0.0,
                    )
                    if USE_DOT:
                        h = tl.dot(a, wt, h, input_precision="ieee")
                    else:
                        h += tl.sum(a[:, :, None] * wt[None, :, :], axis=1)
                h += tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
                if k == n_layers - 1:  # x_new = y - g(x) and the stop test's maxima
                    yv = tl.load(Y + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
                    x_new = tl.where(cmask[None, :], yv - h, 0.0)
                    x_old = tl.load(scratch + local + cols[None, :], mask=cmask[None, :], other=0.0)
                    change = tl.maximum(change, tl.max(tl.abs(x_new - x_old), axis=1))
                    size = tl.maximum(size, tl.max(tl.abs(x_new), axis=1))
                    poison += tl.sum(x_new - x_new, axis=1)
                    tl.store(dst + local + cols[None, :], x_new, mask=cmask[None, :])
                else:  # the activation (module docstring)
                    if ACT == _ELU:
                        h = tl.where(h > 0, h, tl.exp(h) - 1.0)
                    elif ACT == _RELU:
                        h = tl.where(h < 0, 0.0, h)
                    elif ACT == _TANH:
                        e = tl.exp(-2.0 * tl.abs(h))
                        t = (1.0 - e) / (1.0 + e)
                        h = tl.where(h < 0, -t, t)
                    elif ACT == _SOFTPLUS:
                        h = tl.where(h > 20.0, h, tl.maximum(h, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(h))))
                    else:  # _LIPSWISH
                        h = h * (1.0 / (1.0 + tl.exp(-h))) / 1.1
                    tl.store(dst + local + cols[None, :], h, mask=cmask[None, :])
            tl.debug_barrier()

        non_finite = poison != poison
        converged = change <= atol + rtol * size
        n_iter = tl.where(active & converged, it + 1, n_iter)
        n_iter = tl.where(active & non_finite, max_iter, n_iter)
        # The rows that ran this iteration take x_new (the stopped ones too: x = x_{k+1}).
        for c0 in range(0, D, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = active[:, None] & (cols < D)[None, :]
            tl.store(scratch + local + cols[None, :], tl.load(fresh + local + cols[None, :], mask=cmask), mask=cmask)
        tl.debug_barrier()
        active = active & (converged == 0) & (non_finite == 0)
        n_active = tl.sum(active.to(tl.int32), axis=0)
        it += 1

    n_iter = tl.where(active, max_iter, n_iter)  # still running at max_iter: not converged
    tl.store(N_ITER + rows, n_iter, mask=rmask)
    for c0 in range(0, D, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < D
        xv = tl.load(scratch + local + cols[None, :], mask=cmask[None, :])
        tl.store(X + rows[:, None] * D + cols[None, :], xv, mask=rmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _config(dtype: torch.dtype, B: int, widest: int, on_interpreter: bool) -> tuple[int, int, int, bool, int]:
    """``(BLOCK_B, BLOCK_C, BLOCK_K, USE_DOT, num_warps)`` for ``B`` rows whose widest layer has
    ``widest`` units: ``tl.dot`` for float32, the broadcast product for float64 (module docstring).

    On a GPU the sizes of ``_GPU_F32`` / ``_GPU_F64``.  Under the interpreter a program costs per
    operation rather than per element (each is one numpy call), so tiles are as tall as the batch
    allows (up to ``_INTERPRETER_MAX_ROWS`` rows) and chunks as wide as the layers (up to
    ``_INTERPRETER_MAX_CHUNK``): the same kernel, fewer and larger operations.
    """
    fit = max(_MIN_CHUNK, triton.next_power_of_2(widest))
    use_dot = dtype != torch.float64
    if on_interpreter:
        chunk = min(_INTERPRETER_MAX_CHUNK, fit)
        return min(_INTERPRETER_MAX_ROWS, max(_MIN_CHUNK, triton.next_power_of_2(B))), chunk, chunk, use_dot, 1
    block_b, max_chunk, block_k, num_warps = _GPU_F32 if use_dot else _GPU_F64
    return block_b, min(max_chunk, fit), min(block_k, fit), use_dot, num_warps


def _launch(y, weights, biases, activation_code, max_iter, atol, rtol):
    B, D = y.shape
    device = y.device
    x = torch.empty_like(y)
    n_iter = torch.empty(B, dtype=torch.int32, device=device)
    table = []
    for w, b in zip(weights, biases):
        table += [w.data_ptr(), b.data_ptr(), w.shape[0], w.shape[1]]
    head_t, layers_t = pointer_table([[f64_bits(atol), f64_bits(rtol)], table], device)

    widest = max(D, *(w.shape[0] for w in weights))
    block_b, chunk, block_k, use_dot, num_warps = _config(y.dtype, B, widest, interpreted(_inverse_kernel))
    stride = -(-widest // _MIN_CHUNK) * _MIN_CHUNK  # scratch rows 64-byte aligned (float32)
    grid = triton.cdiv(B, block_b)
    scratch = torch.empty(grid * 3 * block_b * stride, dtype=y.dtype, device=device)
    _inverse_kernel[(grid,)](
        head_t,
        layers_t,
        len(weights),
        y,
        x,
        n_iter,
        scratch,
        B,
        D,
        stride,
        max_iter,
        ACT=activation_code,
        BLOCK_B=block_b,
        BLOCK_C=chunk,
        BLOCK_K=block_k,
        USE_DOT=use_dot,
        num_warps=num_warps,
        enable_fp_fusion=True,  # products and the stop test may use FMAs, as the CPU kernel does
    )
    return x, n_iter


def iresnet_inverse(
    y: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    activation_code: int,
    max_iter: int,
    atol: float,
    rtol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, n_iter)`` with ``x + g(x) = y`` solved row by row in one launch (module docstring);
    ``x`` like ``y`` (contiguous), ``n_iter`` int32 ``(B,)``.

    The caller has validated the inputs: ``y`` contiguous ``(B, D)`` with ``B >= 1``, float32 or
    float64; ``weights[k]`` contiguous ``(out_k, in_k)`` and ``biases[k]`` contiguous ``(out_k,)``
    of ``y``'s dtype and device with ``in_1 = out_L = D``; ``activation_code`` one of
    ``kexue_fast.ops.iresnet.ACTIVATION_CODES``; ``max_iter >= 0``; ``atol, rtol >= 0``.
    """
    if y.device.type != "cpu" and interpreted(_inverse_kernel):
        run = lambda ys, ws, bs: _launch(ys[0], ws, bs, activation_code, max_iter, atol, rtol)  # noqa: E731
        x, n_iter = run_on_host_copies(run, [[y], weights, biases], written=[])
        return x.to(y.device), n_iter.to(y.device)
    return _launch(y, weights, biases, int(activation_code), int(max_iter), float(atol), float(rtol))
