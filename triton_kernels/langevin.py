"""Triton kernels and launchers for counter-based Gaussian noise and a fused Langevin step.

Installed as ``kexue_fast.triton_kernels.langevin``.  This module only holds the
``@triton.jit`` kernels and plain-Python launchers; the argument validation and the
torch.library registration (``kexue::philox_normal_triton``, ``kexue::langevin_step_triton_``)
live in ``kexue_fast.ops.langevin``, the contract in docs/langevin.md.

Noise stream ``(seed, offset)`` (both 64-bit)
---------------------------------------------
Flat element ``i`` belongs to group ``j = i // 4``, lane ``i % 4``.  Group ``j`` is one
Philox4x32-10 evaluation with::

    counter = (j mod 2^32, j >> 32, offset mod 2^32, offset >> 32)
    key     = (seed mod 2^32, seed >> 32)

    round r = 0..9:  if r > 0: k0 += 0x9E3779B9, k1 += 0xBB67AE85          (mod 2^32)
                     hi0:lo0 = 0xD2511F53 * c0,  hi1:lo1 = 0xCD9E8D57 * c2   (32x32->64)
                     (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)

Each output word ``r_k`` becomes the float32 uniform ``u_k = ((r_k >> 9) + 0.5) * 2^-23``
(exact, in (0, 1)), and Box-Muller in float32 turns ``(u0, u1)`` into lanes 0/1 and
``(u2, u3)`` into lanes 2/3::

    rho = sqrt(-2 ln u0),  theta = fl(2 pi) * u1  ->  lane0 = rho cos theta, lane1 = rho sin theta

The value of element ``i`` depends on ``(seed, offset, i)`` only, never on the tensor's
shape or numel, and every program computes whole groups, so the stream is the same for
every launch geometry.  The rounds are written out here with ``tl.umulhi`` (rather than
calling ``tl.philox``) so that the key/counter layout is pinned by this file, not by the
Triton release; ``tl.philox`` in Triton 3.9 happens to compute the same function when given
``seed = key0 | key1 << 32`` (checked under the interpreter).

The 64-bit seed and offset are split by the launcher into 32-bit halves, each passed as a
*signed* int32 (``v - 2^32`` when ``v >= 2^31``) and bit-cast to uint32 in the kernel, so
the four arguments always have the type ``i32`` (Triton types an int argument by its value:
``[2^31, 2^32)`` would become ``i64`` on the GPU and a numpy ``uint32`` under the
interpreter).  They are also excluded from value specialisation (``do_not_specialize``), so
a new seed or offset never triggers a recompile and the value 1 is not turned into a
``constexpr``.

Accuracy on the GPU: ``tl.log`` / ``tl.sin`` / ``tl.cos`` on float32 lower to libdevice's
``__nv_logf`` / ``__nv_sinf`` / ``__nv_cosf`` (full-accuracy versions, verified in the PTX
of Triton 3.9 for sm_90), ``tl.sqrt_rn`` is the IEEE square root (``tl.sqrt`` would be
``sqrt.approx``).  An approximate log would not do: for ``u0`` next to 1 its absolute error
would dominate ``-2 ln u0``.

Langevin step (elementwise, float32 arithmetic, in place on ``x``)::

    v = x                                   if step_size == 0 (grad is not read)
    v = x - fl(step_size * clamp(g, -c, c)) otherwise (no clamp when c == inf)
    v = v + 0.0                             if noise_std == 0 (no noise is generated)
    v = v + fl(noise_std * xi_i)            otherwise
    x <- round(clamp(v, lo, hi))            (no clamp when lo == -inf and hi == inf)

Both clamps are ``where(v < lo, lo, where(v > hi, hi, v))``, which keeps NaN.  The kernel is
launched with ``enable_fp_fusion=False`` so that no product is contracted into an FMA:
each of the four operations above is rounded to float32 on its own, as in the other
backends.  The scalars are rounded once to float32.  bfloat16 results are rounded by hand
(``_common.to_output``) because the CPU interpreter's cast truncates.

Layout: a program handles ``BLOCK`` consecutive groups, i.e. ``4 * BLOCK`` consecutive
elements.  The four lanes are computed as four ``[BLOCK]`` vectors and interleaved with
``tl.interleave`` into one ``[4 * BLOCK]`` vector in element order, so loads and stores are
plain contiguous (vectorisable) accesses: for float32 each thread owns 4 consecutive
elements (128-bit loads and stores, no shared memory, 40 registers on sm_90).  For 16-bit
and float64 data the compiler exchanges the noise through shared memory once per block to
match the 8-wide (2-wide) vectors of the memory accesses, which is small next to the
Philox rounds and the transcendentals.  Group and element indices are int64, so tensors
with more than 2^31 elements (or 2^31 groups) are handled.

Design notes / what was learnt from public sources (ideas only, no code copied):
  * Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC'11) and
    the Random123 library: the Philox4x32 round function, its multipliers and Weyl key
    increments, and the counter-based (stateless) use of a block cipher as an RNG.
  * Triton's ``python/triton/language/random.py``: computing the Philox rounds on uint32
    tensors with ``umulhi`` for the high half and a wrapping multiply for the low half, and
    how ``tl.philox`` splits a 64-bit seed into the two key words.
  * Triton's ``python/triton/runtime/interpreter.py`` and ``runtime/jit.py``: how integer
    and float kernel arguments are typed (by value) and specialised, which motivated the
    signed-int32 halves, ``do_not_specialize`` and the explicit float32 casts of scalars.
  * Box, Muller, "A note on the generation of random normal deviates" (1958).
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from kexue_fast.triton_kernels._common import to_compute, to_output

__all__ = ["langevin_step_", "philox_normal"]

# Groups (of 4 elements) per program and the warps that process them: 1024 elements per
# program, 2 groups = 8 elements per thread.
_BLOCK = 256
_NUM_WARPS = 4

# Philox4x32 constants (Random123).
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)
# float32(2 * pi) and 2^-23 (exact in float32).
_TWO_PI = tl.constexpr(6.283185307179586)
_TWO_POW_M23 = tl.constexpr(1.1920928955078125e-07)

_U64_MASK = (1 << 64) - 1
_U32_MASK = (1 << 32) - 1
# Doubles of at least this magnitude round to +-inf in float32: (2 - 2^-24) * 2^127.
_F32_OVERFLOW = 2.0**128 - 2.0**103


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of uint32 counter words (c0..c3) under the uint32 key (k0, k1)."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + _PHILOX_W0
            k1 = k1 + _PHILOX_W1
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _uniform(r):
    """uint32 word -> float32 ((r >> 9) + 0.5) * 2^-23, exactly; in (0, 1)."""
    return ((r >> 9).to(tl.int32, bitcast=True).to(tl.float32) + 0.5) * _TWO_POW_M23


@triton.jit
def _box_muller(ra, rb):
    """Two uint32 words -> (rho cos theta, rho sin theta) in float32."""
    ua = _uniform(ra)
    ub = _uniform(rb)
    rho = tl.sqrt_rn(-2.0 * tl.log(ua))
    theta = _TWO_PI * ub
    return rho * tl.cos(theta), rho * tl.sin(theta)


@triton.jit
def _noise_block(pid, seed_lo, seed_hi, off_lo, off_hi, BLOCK: tl.constexpr):
    """Noise of elements [4 * BLOCK * pid, 4 * BLOCK * (pid + 1)) as one float32 [4 * BLOCK]
    vector in element order, and those elements' int64 indices."""
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c0 = j.to(tl.uint32)  # j mod 2^32
    c1 = (j >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + off_lo.to(tl.uint32, bitcast=True)
    c3 = zero + off_hi.to(tl.uint32, bitcast=True)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    z0, z1 = _box_muller(r0, r1)
    z2, z3 = _box_muller(r2, r3)
    # interleave(interleave(z0, z2), interleave(z1, z3)) = z0[0], z1[0], z2[0], z3[0], z0[1], ...
    xi = tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))
    offs = pid.to(tl.int64) * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    return xi, offs


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi"])
def _philox_normal_kernel(
    out_ptr,
    n,
    seed_lo,  # int32 bit patterns of the 32-bit halves of seed and offset
    seed_hi,
    off_lo,
    off_hi,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,  # groups per program
):
    pid = tl.program_id(0)
    xi, offs = _noise_block(pid, seed_lo, seed_hi, off_lo, off_hi, BLOCK)
    tl.store(out_ptr + offs, to_output(xi, out_ptr, ROUND_BF16), mask=offs < n)


@triton.jit
def _clamp(v, lo, hi):
    """min(max(v, lo), hi) that keeps NaN."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi"])
def _langevin_kernel(
    x_ptr,
    g_ptr,
    n,
    step_size,
    noise_std,
    grad_clip,
    lo,
    hi,
    seed_lo,  # int32 bit patterns of the 32-bit halves of seed and offset
    seed_hi,
    off_lo,
    off_hi,
    USE_GRAD: tl.constexpr,  # step_size != 0
    USE_NOISE: tl.constexpr,  # noise_std != 0
    CLIP: tl.constexpr,  # grad_clip != inf
    BOUNDED: tl.constexpr,  # lo != -inf or hi != inf
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,  # groups per program
):
    pid = tl.program_id(0)
    if USE_NOISE:
        xi, offs = _noise_block(pid, seed_lo, seed_hi, off_lo, off_hi, BLOCK)
    else:
        offs = pid.to(tl.int64) * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    mask = offs < n

    v = to_compute(tl.load(x_ptr + offs, mask=mask, other=0.0), False)
    if USE_GRAD:
        g = to_compute(tl.load(g_ptr + offs, mask=mask, other=0.0), False)
        if CLIP:
            c = tl.to_tensor(grad_clip).to(tl.float32)
            g = _clamp(g, -c, c)
        v = v - tl.to_tensor(step_size).to(tl.float32) * g
    if USE_NOISE:
        v = v + tl.to_tensor(noise_std).to(tl.float32) * xi
    else:
        v = v + 0.0
    if BOUNDED:
        v = _clamp(v, tl.to_tensor(lo).to(tl.float32), tl.to_tensor(hi).to(tl.float32))
    tl.store(x_ptr + offs, to_output(v, x_ptr, ROUND_BF16), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def _i32_halves(v: int) -> tuple[int, int]:
    """The low and high 32-bit halves of a 64-bit value, each as a signed int32 value."""
    v = int(v) & _U64_MASK
    lo, hi = v & _U32_MASK, v >> 32
    return lo - (lo >> 31 << 32), hi - (hi >> 31 << 32)


def _f32(v: float) -> float:
    """v rounded to the nearest float32 (overflowing to +-inf), as a Python float.  The GPU
    launcher does the same C cast; doing it here keeps the interpreter (which would turn
    an out-of-float32-range Python float into a float64 constant) quiet and identical."""
    v = float(v)
    if abs(v) >= _F32_OVERFLOW:
        return math.copysign(math.inf, v)
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _grid(n: int) -> tuple[int]:
    groups = -(-n // 4)
    return (-(-groups // _BLOCK),)


def philox_normal(out: torch.Tensor, seed: int, offset: int) -> None:
    """Fills the contiguous tensor ``out`` (float32/float64/float16/bfloat16, any numel
    incl. 0) with noise elements 0..numel-1 of the stream (seed, offset).  ``seed`` and
    ``offset`` are ints in [0, 2^64).  Nothing is launched for an empty tensor."""
    n = out.numel()
    if n == 0:
        return
    seed_lo, seed_hi = _i32_halves(seed)
    off_lo, off_hi = _i32_halves(offset)
    _philox_normal_kernel[_grid(n)](
        out,
        n,
        seed_lo,
        seed_hi,
        off_lo,
        off_hi,
        ROUND_BF16=out.dtype == torch.bfloat16,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )


def langevin_step_(
    x: torch.Tensor,
    grad: torch.Tensor,
    step_size: float,
    noise_std: float,
    seed: int,
    offset: int,
    grad_clip: float,
    lo: float,
    hi: float,
) -> None:
    """In place on contiguous x (float32/float16/bfloat16); grad contiguous, same shape and
    dtype:  x <- clamp(x - step_size * clamp(grad, -grad_clip, grad_clip)
    + noise_std * xi, lo, hi)  with xi the noise stream (seed, offset).  grad_clip = inf:
    no clip; lo = -inf / hi = inf: unbounded.  step_size == 0: grad is not read;
    noise_std == 0: no noise is generated.  Nothing is launched for an empty tensor."""
    n = x.numel()
    if n == 0:
        return
    # The 0 / inf shortcuts are decided on the caller's doubles, the arithmetic uses the
    # float32-rounded scalars.
    use_grad = float(step_size) != 0.0
    use_noise = float(noise_std) != 0.0
    clip = float(grad_clip) != math.inf
    bounded = float(lo) != -math.inf or float(hi) != math.inf
    seed_lo, seed_hi = _i32_halves(seed)
    off_lo, off_hi = _i32_halves(offset)
    _langevin_kernel[_grid(n)](
        x,
        grad,
        n,
        _f32(step_size),
        _f32(noise_std),
        _f32(grad_clip),
        _f32(lo),
        _f32(hi),
        seed_lo,
        seed_hi,
        off_lo,
        off_hi,
        USE_GRAD=use_grad,
        USE_NOISE=use_noise,
        CLIP=clip,
        BOUNDED=bounded,
        ROUND_BF16=x.dtype == torch.bfloat16,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
