"""Triton helpers shared by the kernels (installed as ``kexue_fast.triton_kernels._common``)."""

import triton
import triton.language as tl


@triton.jit
def to_output(v, out_ptr, ROUND_BF16: tl.constexpr):
    """Casts float32/float64 values to ``out_ptr``'s element type, rounding to nearest even.
    bfloat16 is rounded by hand: the GPU cast does that anyway, but the CPU interpreter's cast
    truncates."""
    if ROUND_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), rounded)
    else:
        return v.to(out_ptr.dtype.element_ty)


@triton.jit
def to_compute(v, IS_FP64: tl.constexpr):
    """Widens loaded values to the arithmetic type: float64 for float64 data, else float32."""
    if IS_FP64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)
