r"""Reference counter-based noise and Langevin update (docs/langevin.md), in plain PyTorch
integer and float ops: slow, but every step of the definition is visible.

Noise element ``i`` (flat, row-major) is lane ``i % 4`` of group ``j = i // 4``: one
Philox4x32-10 call with counter ``(j mod 2³², j >> 32, offset mod 2³², offset >> 32)`` and key
``(seed mod 2³², seed >> 32)``; its words ``r`` become ``u = ((r >> 9) + 0.5)·2⁻²³`` and, by
Box–Muller in float32, lanes ``(ρ cos θ, ρ sin θ)`` from ``(u0, u1)`` and the same from
``(u2, u3)``, with ``ρ = √(−2 ln u_a)`` and ``θ = 2π u_b``.
"""

from __future__ import annotations

import math

import torch

_LOW32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``multiplier·a`` for int64 tensors holding 32-bit values.
    The multiplier is split into 16-bit halves so no int64 product overflows."""
    high_half, low_half = multiplier >> 16, multiplier & 0xFFFF
    low_product = a * low_half  # < 2⁴⁸
    high_product = a * high_half  # < 2⁴⁸, weighs 2¹⁶
    low_sum = low_product + ((high_product & 0xFFFF) << 16)  # < 2⁴⁹
    return (high_product >> 16) + (low_sum >> 32), low_sum & _LOW32


def philox4x32_10(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 of counters given as four int64 tensors of 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + _W0) & _LOW32, (k1 + _W1) & _LOW32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def philox_normal(size, seed: int, offset: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Standard normal noise of shape ``size`` (a sequence of ints) on ``device``, defined by
    ``seed`` and ``offset`` (unsigned 64-bit; negative values are read as two's complement) as
    docs/langevin.md says: computed in float32, returned in ``dtype`` (default float32)."""
    seed, offset = seed % 2**64, offset % 2**64
    numel = math.prod(size)
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    offset_words = (torch.full_like(groups, offset & _LOW32), torch.full_like(groups, offset >> 32))
    counter = [groups & _LOW32, groups >> 32, *offset_words]
    words = philox4x32_10(counter, (seed & _LOW32, seed >> 32))
    u = [((r >> 9).to(torch.float32) + 0.5) * 2.0**-23 for r in words]
    radius01, radius23 = (torch.sqrt(-2.0 * torch.log(u[k])) for k in (0, 2))
    theta01, theta23 = (2 * math.pi * u[k] for k in (1, 3))
    lanes = [
        radius01 * torch.cos(theta01), radius01 * torch.sin(theta01),
        radius23 * torch.cos(theta23), radius23 * torch.sin(theta23),
    ]  # fmt: skip
    noise = torch.stack(lanes, dim=1).reshape(-1)[:numel]
    return noise.reshape(tuple(size)).to(dtype or torch.float32)


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
    """``x ← clamp(x − step_size·clamp(grad, −grad_clip, grad_clip) + noise_std·ξ, min, max)`` in
    place, in float32 (float64 for float64 ``x``), ``ξ = philox_normal(x.shape, seed, offset)``;
    returns ``x``. ``grad`` has ``x``'s shape; ``None`` for ``grad_clip``, ``min``, ``max`` means no
    clip / no bound. ``step_size == 0`` skips the gradient term and ``noise_std == 0`` the noise,
    as the kernels do. No validation (torch's own errors). See docs/langevin.md."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        value = x.to(compute)
        if step_size != 0:
            clipped = grad.to(compute) if grad_clip is None else grad.to(compute).clamp(-grad_clip, grad_clip)
            value = value - step_size * clipped
        if noise_std != 0:
            value = value + noise_std * philox_normal(x.shape, seed, offset, compute, x.device)
        if min is not None or max is not None:
            value = value.clamp(min, max)
        return x.copy_(value)
