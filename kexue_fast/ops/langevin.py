r"""``kexue::philox_normal`` and ``kexue::langevin_step_`` — counter-based Gaussian noise and the
fused Langevin update (docs/langevin.md).

**Noise, defined bit for bit.** Element ``i`` (flat, row-major) of the noise tensor is lane
``i % 4`` of group ``j = i // 4``: one Philox4x32-10 call with counter
``(j mod 2³², j >> 32, offset mod 2³², offset >> 32)`` and key ``(seed mod 2³², seed >> 32)``,
whose words become ``u = ((r >> 9) + 0.5)·2⁻²³`` and, by Box–Muller in float32, the lanes
``ρ cos θ, ρ sin θ`` (``ρ = √(−2 ln u0)``, ``θ = 2π u1``) and the same from ``(u2, u3)``. So
the noise depends only on ``(seed, offset, i)``: not on the device, the thread count or the
shape, and a chain is reproducible and resumable from ``(seed, offset)``. ``seed`` and
``offset`` are unsigned 64-bit; the ops take them as ``int`` (int64), so values ≥ 2⁶³ are passed
as their two's-complement negatives (the Python wrappers accept either form).

**Langevin update**, in place, in one pass over memory, arithmetic in float32::

    x ← clamp(x − step_size·clamp(grad, −grad_clip, grad_clip) + noise_std·ξ, min, max)

with ``ξ = philox_normal(x.shape, seed, offset)``; ``None`` means no clip / unbounded. ``x``
is float32, float16 or bfloat16 and ``grad`` has its shape, dtype and device. Choices of ours:
``step_size == 0`` skips the gradient term without reading ``grad`` (so ``grad`` may be ``x``
itself — that is how the noise-first sampler noises the point where it takes the gradient), and
``noise_std == 0`` skips the noise; ``step_size``, ``noise_std ≥ 0``, ``grad_clip ≥ 0`` and the
bounds must be finite numbers (not NaN) that fit in float32, ``min ≤ max``. A non-contiguous
``x`` is updated through a contiguous copy (the noise follows the logical row-major index); an
``x`` whose elements overlap in memory (``expand``, ``as_strided``) or that partly overlaps
``grad`` is rejected (``grad`` may be exactly ``x``). No autograd: ``x`` must not require grad.
Each call bumps ``x``'s autograd version counter.
"""

from __future__ import annotations

import math

import torch

from kexue_fast import _checks, _native
from kexue_fast._library import TRITON_AVAILABLE, define_op, triton_kernels

PHILOX_SCHEMA = "(int[] size, SymInt seed, SymInt offset, ScalarType? dtype=None, Device? device=None) -> Tensor"
LANGEVIN_SCHEMA = (
    "(Tensor(a!) x, Tensor grad, float step_size, float noise_std, SymInt seed, SymInt offset, "
    "float? grad_clip=None, float? min=None, float? max=None) -> Tensor(a!)"
)
NOISE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
STEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT64_MIN, UINT64_LIMIT = -(2**63), 2**64


def as_int64(value: int, name: str) -> int:
    """A seed or offset in [-2⁶³, 2⁶⁴) as the op's int64 (values ≥ 2⁶³ wrap to negatives). A
    symbolic one (``torch.compile`` traces a changing offset as a ``SymInt``, so a new step does
    not recompile) passes through: its range is checked when the op runs."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not INT64_MIN <= value < UINT64_LIMIT:
        raise ValueError(f"{name} must be in [-2**63, 2**64), got {value}")
    return value - UINT64_LIMIT if value >= 2**63 else value


def _philox_dtype(size, dtype) -> torch.dtype:
    if any(not isinstance(s, int) or s < 0 for s in size):
        raise ValueError(f"philox_normal: size must be non-negative ints, got {list(size)}")
    dtype = dtype or torch.float32
    if dtype not in NOISE_DTYPES:
        raise TypeError(f"philox_normal: dtype must be float32/float64/float16/bfloat16, got {dtype}")
    return dtype


def _philox_device(device) -> torch.device:
    """Where the noise goes: ``device`` (default: torch's default device); a plain error where
    no kernel can run (torch's own "Torch not compiled with CUDA enabled" is an AssertionError)."""
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"philox_normal: no kernel for device {device}; kexue_fast has CPU and CUDA kernels")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"philox_normal: device {device} requested, but this torch sees no CUDA device")
    return device


def _philox_impl(launch):
    def philox_normal(size, seed, offset, dtype=None, device=None):
        dtype, device = _philox_dtype(size, dtype), _philox_device(device)
        out = torch.empty(size, dtype=dtype, device=device)
        if out.numel() and device.type != "meta":  # a meta result has a shape and no values
            launch(out, seed % UINT64_LIMIT, offset % UINT64_LIMIT)
        return out

    return philox_normal


def _philox_fake(size, seed, offset, dtype=None, device=None):
    return torch.empty(size, dtype=_philox_dtype(size, dtype), device=device)


def _philox_native(out, seed, offset):
    _native.launcher("philox_normal", out.device)(
        _native.DTYPE_CODES[out.dtype], out.data_ptr(), out.numel(), seed, offset
    )


def _philox_triton(out, seed, offset):
    triton_kernels("langevin").philox_normal(out, seed, offset)


def _philox_samples(device) -> list[tuple]:
    return [
        ([3, 5], 0, 0, None, device),
        ([17], 2**64 - 1 - 2**64, 7, torch.bfloat16, device),
        ([2, 0, 3], 1, 2, torch.float16, device),
        ([4, 9], -5, 2**40, torch.float64, device),
        ([], 3, 4, None, device),
    ]


def validate(x, grad, step_size, noise_std, grad_clip, min, max) -> None:
    """Raises a clear error naming the argument for anything the op does not accept."""
    op = "langevin_step_"
    _checks.tensor(op, "x", x)
    _checks.tensor(op, "grad", grad)
    if x.dtype not in STEP_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    _checks.like_x(op, "grad", grad, x)
    _checks.not_requiring_grad(op, "x", x)
    _checks.number(op, "step_size", step_size)
    _checks.number(op, "noise_std", noise_std, non_negative=True)
    for name, value in (("grad_clip", grad_clip), ("min", min), ("max", max)):
        if value is not None:
            _checks.number(op, name, value, non_negative=name == "grad_clip")
    if min is not None and max is not None and min > max:
        raise ValueError(f"{op}: min must be <= max, got min={min}, max={max}")


def check_disjoint(x, grad, step_size) -> None:
    """``x`` must not overlap itself (``expand``, ``as_strided``) nor partly overlap ``grad``. As
    in PyTorch's elementwise in-place ops, ``grad`` may be exactly ``x`` (each element is read
    before it is written); it is not read at all when ``step_size == 0``. Needs real data
    pointers: runs in the kernels only."""
    if _checks.overlaps_itself(x):
        raise ValueError("langevin_step_: x has elements that overlap in memory (e.g. from expand); pass a real tensor")
    same_view = grad.data_ptr() == x.data_ptr() and grad.stride() == x.stride()
    if step_size != 0 and not same_view:
        _checks.disjoint("langevin_step_", [("x", x)], [("grad", grad)])


def _langevin_impl(launch):
    def langevin_step_(x, grad, step_size, noise_std, seed, offset, grad_clip=None, min=None, max=None):
        validate(x, grad, step_size, noise_std, grad_clip, min, max)
        check_disjoint(x, grad, step_size)
        if x.numel():
            target = x if x.is_contiguous() else x.contiguous()
            grad = target if step_size == 0 else grad.contiguous()  # grad is not read when step_size == 0
            inf = math.inf
            launch(
                target, grad, step_size, noise_std, seed % UINT64_LIMIT, offset % UINT64_LIMIT,
                inf if grad_clip is None else grad_clip, -inf if min is None else min, inf if max is None else max,
            )  # fmt: skip
            if target is not x:
                x.copy_(target)
        return x

    return langevin_step_


def _langevin_fake(x, grad, step_size, noise_std, seed, offset, grad_clip=None, min=None, max=None):
    validate(x, grad, step_size, noise_std, grad_clip, min, max)
    return x


def _langevin_native(x, grad, *args):
    _native.launcher("langevin_step", x.device)(
        _native.DTYPE_CODES[x.dtype], x.data_ptr(), grad.data_ptr(), x.numel(), *args
    )


def _langevin_triton(x, grad, *args):
    triton_kernels("langevin").langevin_step_(x, grad, *args)


def _langevin_samples(device) -> list[tuple]:
    make = lambda *shape, dtype=torch.float32: torch.rand(shape, dtype=dtype, device=device)  # noqa: E731
    return [
        (make(3, 5), make(3, 5), 10.0, 0.005, 0, 0, 0.01, 0.0, 1.0),
        (make(2, 3, 7), make(2, 3, 7), 0.5, 0.1, 7, 3, None, None, None),
        (make(17, dtype=torch.bfloat16), make(17, dtype=torch.bfloat16), 1.0, 0.01, -3, 2**40, 0.5, None, 1.0),
        (make(4, 6, dtype=torch.float16).t(), make(6, 4, dtype=torch.float16), 0.1, 0.0, 1, 1, None, -1.0, None),
        (make(0, 3), make(0, 3), 1.0, 1.0, 0, 0, None, None, None),
    ]


_INPLACE = (torch.Tag.inplace,)
philox_normal_op = define_op(
    "philox_normal", PHILOX_SCHEMA, any_device=_philox_impl(_philox_native), fake=_philox_fake, samples=_philox_samples
)
langevin_step_op = define_op(
    "langevin_step_", LANGEVIN_SCHEMA, cpu=_langevin_impl(_langevin_native), cuda=_langevin_impl(_langevin_native),
    fake=_langevin_fake, samples=_langevin_samples, tags=_INPLACE,
)  # fmt: skip
if TRITON_AVAILABLE:
    philox_normal_triton_op = define_op(
        "philox_normal_triton", PHILOX_SCHEMA, any_device=_philox_impl(_philox_triton), fake=_philox_fake,
        samples=_philox_samples, triton=True,
    )  # fmt: skip
    langevin_step_triton_op = define_op(
        "langevin_step_triton_", LANGEVIN_SCHEMA, any_device=_langevin_impl(_langevin_triton), fake=_langevin_fake,
        samples=_langevin_samples, triton=True, tags=_INPLACE,
    )  # fmt: skip


def philox_normal(size, seed: int, offset: int = 0, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Standard normal noise of shape ``size``, a pure function of ``(seed, offset)`` and the
    element index, the same on every device and thread count; ``torch.ops.kexue.philox_normal``.

    Args:
        size: an int or a sequence of non-negative ints.
        seed, offset: ints in ``[-2⁶³, 2⁶⁴)``, taken as unsigned 64-bit (values ≥ 2⁶³ are passed
            to the raw op as their two's-complement negatives).
        dtype: float32 (default), float64, float16 or bfloat16; computed in float32.
        device: CPU or CUDA (default: torch's default device); ``meta`` gives a shape only.

    Raises:
        TypeError: a non-int seed/offset or an unsupported dtype. ValueError: a negative size or
        a seed/offset out of range. RuntimeError: a device without a kernel.

    The bit-exact definition (Philox4x32-10 + Box–Muller): docs/langevin.md.
    """
    size = [size] if isinstance(size, int) else list(size)
    return philox_normal_op(size, as_int64(seed, "seed"), as_int64(offset, "offset"), dtype, device)


def langevin_step_(
    x: torch.Tensor,
    grad: torch.Tensor,
    step_size: float,
    noise_std: float,
    seed: int,
    offset: int,
    grad_clip: float | None = None,
    min: float | None = None,
    max: float | None = None,
) -> torch.Tensor:
    """One fused Langevin update of ``x`` in place, returning ``x``;
    ``torch.ops.kexue.langevin_step_``::

        x ← clamp(x − step_size·clamp(grad, −grad_clip, grad_clip) + noise_std·ξ, min, max)

    with ``ξ = philox_normal(x.shape, seed, offset)``.

    Args:
        x: float32, float16 or bfloat16 Tensor that does not require grad and whose elements do
            not overlap; updated in place (its version counter is bumped).
        grad: Tensor of ``x``'s shape, dtype and device; may be ``x`` itself but must not partly
            overlap it; not read when ``step_size == 0``.
        step_size: finite float (within float32 range).
        noise_std: finite float ``>= 0``.
        seed, offset: ints in ``[-2⁶³, 2⁶⁴)`` (see :func:`philox_normal`).
        grad_clip: ``None`` (no clip) or a finite float ``>= 0``.
        min, max: ``None`` (unbounded) or finite floats with ``min <= max``.

    Raises:
        TypeError: a non-tensor or an unsupported/mismatched dtype. ValueError: a shape or device
        mismatch, overlapping memory, a NaN/infinite/out-of-range scalar. RuntimeError: ``x``
        requires grad. Nothing is written when it raises. See docs/langevin.md.
    """
    return langevin_step_op(
        x, grad, step_size, noise_std, as_int64(seed, "seed"), as_int64(offset, "offset"), grad_clip, min, max
    )
