"""An independent NumPy model of the noise definition in docs/langevin.md, for the tests only.

Written straight from that text (Philox4x32-10 with the Random123 constants, the 23-bit
uniform, Box–Muller lane order) with NumPy's uint64 arithmetic and float32 transcendental
functions; it shares no code with the kernels or with ``kexue_fast.reference``.
"""

from __future__ import annotations

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
LOW32 = np.uint64(0xFFFFFFFF)
SHIFT32 = np.uint64(32)


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of a ``(G, 4)`` uint array of counters under one key; returns ``(G, 4)`` uint32."""
    c = [counter[:, k].astype(np.uint64) for k in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + W0) & LOW32, (k1 + W1) & LOW32
        p0, p1 = M0 * c[0], M1 * c[2]  # 32 x 32 -> 64 bits, exact in uint64
        hi0, lo0 = p0 >> SHIFT32, p0 & LOW32
        hi1, lo1 = p1 >> SHIFT32, p1 & LOW32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return np.stack(c, axis=1).astype(np.uint32)


def philox_normal(numel: int, seed: int, offset: int) -> np.ndarray:
    """The first ``numel`` noise elements of the stream ``(seed, offset)`` as float32."""
    seed, offset = seed % 2**64, offset % 2**64  # negative values: two's complement
    groups = np.arange((numel + 3) // 4, dtype=np.uint64)
    counter = np.stack(
        [groups & LOW32, groups >> SHIFT32, np.full_like(groups, offset % 2**32), np.full_like(groups, offset >> 32)],
        axis=1,
    )
    words = philox4x32_10(counter, (seed % 2**32, seed >> 32))
    u = (((words >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)).astype(np.float32)
    rho01 = np.sqrt(np.float32(-2.0) * np.log(u[:, 0]))
    rho23 = np.sqrt(np.float32(-2.0) * np.log(u[:, 2]))
    theta01 = np.float32(2 * np.pi) * u[:, 1]
    theta23 = np.float32(2 * np.pi) * u[:, 3]
    lanes = [rho01 * np.cos(theta01), rho01 * np.sin(theta01), rho23 * np.cos(theta23), rho23 * np.sin(theta23)]
    return np.stack(lanes, axis=1).astype(np.float32).reshape(-1)[:numel]


def within_spec_tolerance(actual: np.ndarray, expected: np.ndarray) -> bool:
    """docs/langevin.md: every element within ``1e-5·(1 + |ξ|)`` of the definition."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return bool(np.all(np.abs(actual - expected) <= 1e-5 * (1 + np.abs(expected))))
