r"""Energy-based models sampled by Langevin dynamics (TECHNIQUES.md §8; IGEBM, Du & Mordatch 2019).

A model ``q(x) ∝ exp(−U(x))`` is trained with samples drawn by Langevin dynamics. IGEBM's
recipe, with its defaults:

* :class:`LangevinSampler` — ``n_steps=60`` steps of, in IGEBM's order (``noise_first=True``)::

      x ← x + noise_std·ξ_t
      g ← ∇ₓ U(x)                                   (at the noised point)
      x ← clamp(x − step_size·clamp(g, −grad_clip, grad_clip), bounds)

  or the textbook order (``noise_first=False``): ``x ← clamp(x − step_size·clip(∇U(x)) +
  noise_std·ξ_t, bounds)``. Each update is one fused ``kexue::langevin_step_``; the noise
  ``ξ_t`` is the counter-based ``philox_normal(x.shape, seed, offset + t)``, so a chain is a
  pure function of its start, ``seed`` and ``offset``: reproducible on any device and resumable
  (the sampler's ``offset`` advances by one per step).
* :class:`ReplayBuffer` — a ring buffer of past chains on the compute device; each batch slot
  restarts from a buffered chain, or with probability ``reinit_prob`` from uniform noise in
  the data range. Its randomness is counter-based too (``seed``, ``offset``).
* :func:`contrastive_divergence_loss` — ``mean U(x⁺) − mean U(x⁻) + α·(mean U(x⁺)² +
  mean U(x⁻)²)``, with both squares *added* (IGEBM's code; not the sign in Su's summary).

Deliberate differences from IGEBM's code: the buffer keeps chains in float32 (IGEBM stores
``uint8`` and reads them back as ``q/256`` plus dither, which shrinks them by 255/256 per round
trip); the gradient is clipped elementwise only (IGEBM's ``li`` option, its default).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kexue_fast.ops.langevin import langevin_step_, philox_normal

__all__ = ["LangevinSampler", "ReplayBuffer", "contrastive_divergence_loss", "energy_gradient"]


def energy_gradient(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``∇ₓ Σ U(x)`` at ``x`` (per-sample energies summed), without touching the parameters'
    ``.grad``; works inside ``no_grad``."""
    with torch.enable_grad():
        point = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(point).sum(), point)
    return grad


class LangevinSampler:
    """Draws samples of ``q(x) ∝ exp(−energy(x))`` by ``n_steps`` Langevin steps (see the
    module docstring). ``energy`` maps a batch to per-sample energies. ``bounds=None`` leaves the
    chain unbounded; ``grad_clip=None`` does not clip. ``seed``/``offset``: the noise stream;
    ``offset`` advances by one per step, so ``sampler.offset`` is where a resumed run continues.
    Under ``torch.distributed`` give every rank its own ``seed`` (e.g. ``seed + rank``): the
    noise is a function of ``(seed, offset, index)`` only, so equal seeds mean equal noise.
    Chains must be float32, bfloat16 or float16 (the fused update's dtypes).
    """

    def __init__(
        self,
        energy: Callable[[torch.Tensor], torch.Tensor],
        n_steps: int = 60,
        step_size: float = 10.0,
        noise_std: float = 0.005,
        grad_clip: float | None = 0.01,
        bounds: tuple[float, float] | None = (0.0, 1.0),
        seed: int = 0,
        offset: int = 0,
        noise_first: bool = True,
    ):
        if n_steps < 0:
            raise ValueError(f"LangevinSampler: n_steps must be >= 0, got {n_steps}")
        if bounds is not None and not (len(bounds) == 2 and bounds[0] <= bounds[1]):
            raise ValueError(f"LangevinSampler: bounds must be (low, high) with low <= high, got {bounds}")
        self.energy = energy
        self.n_steps = n_steps
        self.step_size, self.noise_std, self.grad_clip = step_size, noise_std, grad_clip
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        self.seed, self.offset = seed, offset
        self.noise_first = noise_first

    def step_(self, x: torch.Tensor) -> torch.Tensor:
        """One Langevin step of the chains ``x`` in place (noise stream ``(seed, offset)``);
        advances ``offset`` by one."""
        low, high = self.bounds if self.bounds is not None else (None, None)
        if self.noise_first:
            langevin_step_(x, x, 0.0, self.noise_std, self.seed, self.offset)  # x += σ·ξ (grad unread)
            noise_std = 0.0
        else:
            noise_std = self.noise_std
        grad = energy_gradient(self.energy, x)
        langevin_step_(x, grad, self.step_size, noise_std, self.seed, self.offset, self.grad_clip, low, high)
        self.offset += 1
        return x

    def __call__(self, x: torch.Tensor, n_steps: int | None = None) -> torch.Tensor:
        """Runs ``n_steps`` (default: the sampler's) steps from ``x`` and returns the final chains
        as a new, detached tensor (``x`` is not modified)."""
        chains = x.detach().clone()
        for _ in range(self.n_steps if n_steps is None else n_steps):
            self.step_(chains)
        return chains


def _uniform(shape, seed: int, offset: int, device) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): Φ of the Philox normal stream (float32)."""
    noise = philox_normal(shape, seed, offset, torch.float32, device)
    return (0.5 * (1.0 + torch.erf(noise * (1.0 / math.sqrt(2.0))))).clamp_(1e-7, 1 - 1e-7)


class ReplayBuffer:
    """IGEBM's replay buffer: up to ``capacity`` past chains in a ring on ``device``, kept in
    float32.

    ``sample(n)`` returns ``n`` initial chains: each slot is a buffered chain drawn uniformly
    with replacement, or with probability ``reinit_prob`` (and always while the buffer holds
    fewer than ``n`` chains, as IGEBM) fresh uniform noise in ``bounds``. ``push(x)`` stores the
    final chains of a batch, overwriting the oldest. Random draws use the counter-based noise
    stream ``(seed, offset)``; ``offset`` advances by one per ``sample``.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        capacity: int = 10000,
        reinit_prob: float = 0.05,
        bounds: tuple[float, float] = (0.0, 1.0),
        device: torch.device | str | None = None,
        seed: int = 1,
        offset: int = 0,
    ):
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be >= 1, got {capacity}")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"ReplayBuffer: reinit_prob must be in [0, 1], got {reinit_prob}")
        if not (len(bounds) == 2 and bounds[0] <= bounds[1]):
            raise ValueError(f"ReplayBuffer: bounds must be (low, high) with low <= high, got {bounds}")
        self.shape = tuple(shape)
        self.capacity, self.reinit_prob = capacity, reinit_prob
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.storage = torch.empty((capacity, *self.shape), dtype=torch.float32, device=device)
        self.size = 0  # chains stored so far (at most capacity)
        self.next_slot = 0  # where the next pushed chain goes
        self.seed, self.offset = seed, offset

    def __len__(self) -> int:
        return self.size

    def sample(self, n: int) -> torch.Tensor:
        """``n`` initial chains, float32, on the buffer's device (see the class docstring)."""
        device = self.storage.device
        numel = math.prod(self.shape)
        # One stream per call: n·numel uniforms for fresh chains, then n for the reuse coin, n for the index.
        draws = _uniform([n * (numel + 2)], self.seed, self.offset, device)
        self.offset += 1
        low, high = self.bounds
        fresh = (low + (high - low) * draws[: n * numel]).reshape(n, *self.shape)
        if self.size < n or self.reinit_prob >= 1.0:
            return fresh
        coins, picks = draws[n * numel : n * numel + n], draws[n * numel + n :]
        index = (picks * self.size).long().clamp_(max=self.size - 1)
        reuse = (coins >= self.reinit_prob).view(n, *([1] * len(self.shape)))
        return torch.where(reuse, self.storage[index], fresh)

    def push(self, x: torch.Tensor) -> None:
        """Stores the chains ``x`` (shape ``(n, *shape)``), overwriting the oldest ones."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"ReplayBuffer.push: chains must have shape (n, {self.shape}), got {tuple(x.shape)}")
        x = x.detach()[-self.capacity :]  # of a batch larger than the buffer, the last ones stay
        slots = (self.next_slot + torch.arange(x.shape[0], device=self.storage.device)) % self.capacity
        self.storage[slots] = x.to(self.storage.device, torch.float32)
        self.next_slot = (self.next_slot + x.shape[0]) % self.capacity
        self.size = min(self.capacity, self.size + x.shape[0])


def contrastive_divergence_loss(energy_pos: torch.Tensor, energy_neg: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """IGEBM's objective: ``mean U(x⁺) − mean U(x⁻) + α·(mean U(x⁺)² + mean U(x⁻)²)``.

    ``energy_pos``: energies of data; ``energy_neg``: energies of (detached) Langevin samples.
    Minimising it lowers the data's energy, raises the samples', and the α-term keeps the
    energies near zero (both squares added: TECHNIQUES.md §8.2)."""
    return energy_pos.mean() - energy_neg.mean() + alpha * (energy_pos.square().mean() + energy_neg.square().mean())
