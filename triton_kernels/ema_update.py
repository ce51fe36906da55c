"""Triton kernel and launcher for a multi-tensor, in-place weight EMA.

Installed as ``kexue_fast.triton_kernels.ema_update``.  This module only holds the
``@triton.jit`` kernel and a plain-Python launcher; the torch.library registration
(``kexue::ema_update_triton_``) and the argument validation live in ``kexue_fast.ops.ema_update``,
the contract in docs/ema.md.

Math (elementwise, for every pair ``(shadow_i, param_i)``)::

    w = 1 - decay                         (Python double)
    shadow_i <- round(decay * shadow_i + w * param_i)

The arithmetic is float32 (float64 when the shadow is float64): ``decay`` and ``w`` are
rounded once to that type, then the two products and the sum are each rounded, with
no fused multiply-add (the kernel is launched with ``enable_fp_fusion=False``).  The
result is therefore bit-identical to ``(decay * s.float() + w * p.float()).to(s.dtype)``
in PyTorch, on the GPU and under the CPU interpreter alike.  ``round`` is round to
nearest even into the shadow's dtype; bfloat16 is rounded by hand (`_common.to_output`)
because the CPU interpreter's float32 -> bfloat16 cast truncates.

Multi-tensor launch
-------------------
The pairs are grouped by ``(shadow dtype, param dtype)``; each group is one launch over a
chunk table, never one launch per tensor.  For a group of ``T`` tensors cut into ``P``
chunks the launcher builds one pointer table (``_common.pointer_table``: int64 segments,
each padded to an even length, copied to the device once)::

    [ decay, w          (float64 bit patterns)
    | shadow addresses  (T)   data_ptr() of every shadow
    | param addresses   (T)
    | numels            (T)
    | chunk tensor idx  (P)   program p works on tensor chunk_tensor[p] ...
    | chunk start       (P)   ... elements [chunk_start[p], chunk_start[p] + CHUNK) ]

Program ``p`` loads its tensor index, then that tensor's two addresses, and turns each
into a typed pointer (``_common.typed_pointer``); the element types come from two type
witnesses (the header viewed as the shadow / param dtype).  How this runs under
``TRITON_INTERPRET=1`` too: the ``_common`` module docstring.

Inside a chunk the full ``BLOCK``-element blocks are processed without a mask and the
ragged end of a tensor with one masked block: the numel is a runtime value loaded from
the table, so a mask over it would hide the contiguity from the compiler and prevent
vectorised loads; with the unmasked main loop, the 16-byte alignment hint on the
addresses (given only when every address of the group is 16-byte aligned) and chunk
starts that are multiples of ``BLOCK``, the compiler can emit 128-bit accesses.

Design notes / what was learnt from public code (ideas only, no code copied):
  * NVIDIA apex ``csrc/multi_tensor_apply.cuh`` (and PyTorch's
    ``aten/src/ATen/native/cuda/MultiTensorApply.cuh`` behind ``torch._foreach_*``): cut
    each tensor into fixed-size chunks and let every CUDA block look up
    ``(tensor, chunk)`` from a small metadata table of addresses, sizes and block->chunk
    maps, so one launch covers many separately allocated tensors.
  * Triton's ``python/triton/language/semantic.py`` (``cast``): an int64 scalar cast to a
    ``pointer_type`` becomes ``tt.int_to_ptr``, and ``tl.multiple_of`` attaches a
    divisibility hint to any value, pointers included.
  * Triton's ``python/triton/runtime/interpreter.py``: how the interpreter turns tensor
    arguments into host addresses and implements ``int_to_ptr`` as a bit-cast, which is
    why the address-table scheme runs unchanged there for CPU tensors.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from kexue_fast.triton_kernels._common import (
    f64_bits,
    interpreted,
    pointer_table,
    run_on_host_copies,
    to_compute,
    to_output,
    type_witness,
    typed_pointer,
)

__all__ = ["ema_update_"]

# Elements per block iteration (power of two) and the warps that process one block.
_BLOCK = 1024
_NUM_WARPS = 4
# A chunk is CHUNK_BLOCKS * _BLOCK elements; CHUNK_BLOCKS is picked per group so that a
# group gets about _TARGET_PROGRAMS programs, capped at _MAX_CHUNK_BLOCKS (64 Ki
# elements per chunk) so very large groups keep a small table.
_TARGET_PROGRAMS = 4096
_MAX_CHUNK_BLOCKS = 64
# Every address must be a multiple of this for the alignment hint to be given.
_ALIGN_BYTES = 16


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------
@triton.jit
def _ema_block(
    s_ptr,
    p_ptr,
    offs,
    mask,
    decay,
    w,
    MASKED: tl.constexpr,
    IS_FP64: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """shadow[offs] = decay * shadow[offs] + w * param[offs] for one block."""
    if MASKED:
        s = tl.load(s_ptr + offs, mask=mask, other=0.0)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    else:
        s = tl.load(s_ptr + offs)
        p = tl.load(p_ptr + offs)
    s = to_compute(s, IS_FP64)
    p = to_compute(p, IS_FP64)
    out = to_output(decay * s + w * p, s_ptr, ROUND_BF16)
    if MASKED:
        tl.store(s_ptr + offs, out, mask=mask)
    else:
        tl.store(s_ptr + offs, out)


@triton.jit
def _ema_multi_tensor_kernel(
    COEFS,  # int64[2]: bit patterns of float64 decay and w = 1 - decay
    S_ADDR,  # int64[T]: shadow data pointers
    P_ADDR,  # int64[T]: param data pointers
    NUMEL,  # int64[T]: element counts
    CHUNK_TENSOR,  # int64[P]: tensor index of program p's chunk
    CHUNK_START,  # int64[P]: first element of program p's chunk (a multiple of BLOCK)
    S_WITNESS,  # typed pointer carrying the shadows' element type (never dereferenced)
    P_WITNESS,  # typed pointer carrying the params' element type (never dereferenced)
    chunk_elems,  # elements per chunk (a multiple of BLOCK)
    IS_FP64: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address of the group is 16-byte aligned
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(CHUNK_TENSOR + pid)
    start = tl.multiple_of(tl.load(CHUNK_START + pid), BLOCK)
    numel = tl.load(NUMEL + t)

    s_ptr = typed_pointer(tl.load(S_ADDR + t), S_WITNESS.dtype.element_ty)
    p_ptr = typed_pointer(tl.load(P_ADDR + t), P_WITNESS.dtype.element_ty)
    if ALIGNED:
        s_ptr = tl.multiple_of(s_ptr, 16)
        p_ptr = tl.multiple_of(p_ptr, 16)

    decay = tl.load(COEFS).to(tl.float64, bitcast=True)
    w = tl.load(COEFS + 1).to(tl.float64, bitcast=True)
    if not IS_FP64:
        decay = decay.to(tl.float32)
        w = w.to(tl.float32)

    end = tl.minimum(start + chunk_elems, numel)
    n_full = ((end - start) // BLOCK).to(tl.int32)
    cols = tl.arange(0, BLOCK)
    for b in range(n_full):
        offs = start + b * BLOCK + cols
        _ema_block(s_ptr, p_ptr, offs, None, decay, w, False, IS_FP64, ROUND_BF16)

    tail = start + n_full * BLOCK
    if tail < end:
        offs = tail + cols
        _ema_block(s_ptr, p_ptr, offs, offs < end, decay, w, True, IS_FP64, ROUND_BF16)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _launch_group(shadows: list[torch.Tensor], params: list[torch.Tensor], decay: float, w: float) -> None:
    """One launch for non-empty pairs that share (shadow dtype, param dtype)."""
    device = shadows[0].device
    n = len(shadows)
    numels = [s.numel() for s in shadows]
    s_addr = [s.data_ptr() for s in shadows]
    p_addr = [p.data_ptr() for p in params]
    aligned = all(a % _ALIGN_BYTES == 0 for a in s_addr) and all(a % _ALIGN_BYTES == 0 for a in p_addr)

    blocks = [-(-k // _BLOCK) for k in numels]
    chunk_blocks = max(1, min(_MAX_CHUNK_BLOCKS, -(-sum(blocks) // _TARGET_PROGRAMS)))
    chunk_elems = chunk_blocks * _BLOCK
    n_chunks = [-(-b // chunk_blocks) for b in blocks]  # all >= 1: empty tensors were dropped
    n_prog = sum(n_chunks)

    # Per-program (tensor index, chunk start) as two running sums over the programs:
    # the tensor index steps by 1 at each tensor's first program, the chunk start steps
    # by chunk_elems and drops back to 0 at each tensor's first program.
    if n_prog == n:  # one chunk per tensor (the common case for small groups)
        chunk_tensor, chunk_start = range(n), [0] * n
    else:
        firsts = list(itertools.accumulate(n_chunks[:-1]))  # first program of tensors 1..n-1
        resets = [(1 - c) * chunk_elems for c in n_chunks[:-1]]
        idx_val = torch.tensor([firsts, resets], dtype=torch.int64)
        steps = torch.zeros(n_prog, dtype=torch.int64)
        steps[idx_val[0]] = 1
        chunk_tensor = torch.cumsum(steps, 0)
        steps.fill_(chunk_elems)
        steps[0] = 0
        steps[idx_val[0]] = idx_val[1]
        chunk_start = torch.cumsum(steps, 0)
    coefs, s_tab, p_tab, numel_tab, chunk_tensor_tab, chunk_start_tab = pointer_table(
        [[f64_bits(decay), f64_bits(w)], s_addr, p_addr, numels, chunk_tensor, chunk_start], device
    )

    s_dtype = shadows[0].dtype
    _ema_multi_tensor_kernel[(n_prog,)](
        coefs,
        s_tab,
        p_tab,
        numel_tab,
        chunk_tensor_tab,
        chunk_start_tab,
        type_witness(coefs, s_dtype),
        type_witness(coefs, params[0].dtype),
        chunk_elems,
        IS_FP64=s_dtype == torch.float64,
        ROUND_BF16=s_dtype == torch.bfloat16,
        ALIGNED=aligned,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )


def ema_update_(shadows: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """In place, for every i: shadows[i] = decay * shadows[i] + (1 - decay) * params[i].

    The caller has validated the inputs: equal list lengths, pairwise equal shapes, all
    tensors contiguous and on one device, (shadow, param) dtypes among (f32, f32),
    (f32, bf16), (f32, f16), (f64, f64), (bf16, bf16), (f16, f16).  One launch per
    dtype pair present; nothing is launched for empty lists or 0-element tensors.
    """
    decay = float(decay)
    w = 1.0 - decay

    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for s, p in zip(shadows, params):
        if s.numel() == 0:
            continue
        g = groups.setdefault((s.dtype, p.dtype), ([], []))
        g[0].append(s)
        g[1].append(p)
    if not groups:
        return

    on_host = next(iter(groups.values()))[0][0].device.type != "cpu" and interpreted(_ema_multi_tensor_kernel)
    for s_list, p_list in groups.values():
        if on_host:
            run_on_host_copies(lambda s, p: _launch_group(s, p, decay, w), [s_list, p_list], written=[0])
        else:
            _launch_group(s_list, p_list, decay, w)
