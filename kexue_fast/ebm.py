r"""Energy-based models sampled by Langevin dynamics (IGEBM, Du & Mordatch 2019; see docs/langevin.md).

A model ``q(x) ∝ exp(−U(x))`` is trained with samples drawn by Langevin dynamics. IGEBM's
recipe, with its defaults:

* :class:`LangevinSampler` — ``n_steps=60`` steps of, in IGEBM's order (``noise_first=True``)::

      x ← x + noise_std·ξ_t
      g ← ∇ₓ U(x)                                   (at the noised point)
      x ← clamp(x − step_size·clamp(g, −grad_clip, grad_clip), bounds)

  or the textbook order (``noise_first=False``): ``x ← clamp(x − step_size·clip(∇U(x)) +
  noise_std·ξ_t, bounds)``. The chains are written by one fused ``kexue::langevin_step_``
  per step (in IGEBM's order the noised point the gradient needs is a separate copy, and the
  update adds the same ``ξ_t`` to ``x`` itself), so a step that raises leaves them as they were; the noise
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
import numbers
from collections.abc import Callable

import torch

from kexue_fast.ops.langevin import langevin_step_, philox_normal

__all__ = ["LangevinSampler", "ReplayBuffer", "contrastive_divergence_loss", "energy_gradient"]


def _check_number(owner: str, name: str, value, *, low: float = 0.0, high: float = math.inf, integer: bool = False):
    """TypeError unless ``value`` is a real number (an int if ``integer``), ValueError unless it is
    finite and in ``[low, high]``."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{owner}: {name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{owner}: {name} must be finite and {bound}, got {value!r}")


def _check_stream(owner: str, seed, offset) -> None:
    """A noise stream position: ints that fit 64 bits, signed or unsigned (as the ops take them)."""
    for name, value in (("seed", seed), ("offset", offset)):
        _check_number(owner, name, value, low=-(2**63), high=2**64 - 1, integer=True)


def _check_bounds(owner: str, bounds) -> None:
    if not (len(bounds) == 2 and all(isinstance(b, numbers.Real) for b in bounds) and bounds[0] <= bounds[1]):
        raise ValueError(f"{owner}: bounds must be (low, high) with low <= high, got {bounds}")


def energy_gradient(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``∇ₓ Σ U(x)`` at ``x``: the gradient of the summed per-sample energies, a new tensor of
    ``x``'s shape and dtype. ``energy`` maps a batch ``(n, ...)`` to energies ``(n,)`` (any shape:
    they are summed). The parameters' ``.grad`` are not touched; works inside ``no_grad``.
    Raises what ``energy`` or autograd raise (e.g. an energy that does not depend on ``x``)."""
    with torch.enable_grad():
        point = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(point).sum(), point)
    return grad


class LangevinSampler:
    """Draws samples of ``q(x) ∝ exp(−energy(x))`` by ``n_steps`` Langevin steps (see the
    module docstring and docs/langevin.md).

    Args:
        energy: maps a batch of chains ``(n, ...)`` to per-sample energies ``(n,)``.
        n_steps: steps per ``__call__`` (an int >= 0).
        step_size, noise_std: the gradient step and the noise scale (finite, >= 0).
        grad_clip: clamp of each gradient element to ``[−grad_clip, grad_clip]`` (finite, >= 0),
            or ``None`` for no clipping.
        bounds: ``(low, high)`` the chains are clamped to after each step, or ``None``.
        seed, offset: the noise stream (ints; seeds may be unsigned 64-bit). ``offset``
            advances by one per step, so ``sampler.offset`` is where a resumed run continues.
            Under ``torch.distributed`` give every rank its own ``seed`` (e.g. ``seed + rank``):
            the noise is a function of ``(seed, offset, index)`` only.
        noise_first: IGEBM's order (noise, then the gradient at the noised point) if True,
            else the textbook order.

    Chains must be float32, bfloat16 or float16 (the fused update's dtypes), on any device
    the ops support, and must not require grad.

    Raises:
        TypeError: a scale, ``n_steps``, ``seed`` or ``offset`` of the wrong type.
        ValueError: a negative, NaN or infinite scale, ``n_steps < 0``, bad ``bounds``.
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
        owner = "LangevinSampler"
        _check_number(owner, "n_steps", n_steps, integer=True)
        for name, value in (("step_size", step_size), ("noise_std", noise_std), ("grad_clip", grad_clip)):
            if value is not None or name != "grad_clip":
                _check_number(owner, name, value)
        _check_stream(owner, seed, offset)
        if bounds is not None:
            _check_bounds(owner, bounds)
        self.energy = energy
        self.n_steps = n_steps
        self.step_size, self.noise_std, self.grad_clip = step_size, noise_std, grad_clip
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        self.seed, self.offset = seed, offset
        self.noise_first = noise_first

    def step_(self, x: torch.Tensor) -> torch.Tensor:
        """One Langevin step of the chains ``x`` (any shape, a dtype above) in place, with the
        noise ``philox_normal(x.shape, seed, offset)``; advances ``offset`` by one and returns
        ``x``. If anything raises (the energy, autograd, the op's checks) ``x`` and ``offset``
        are left exactly as they were: ``x`` is written only by the last, validated op call."""
        low, high = self.bounds if self.bounds is not None else (None, None)
        point = x
        if self.noise_first:
            point = x.detach().clone()
            langevin_step_(point, point, 0.0, self.noise_std, self.seed, self.offset)  # point += σ·ξ (grad unread)
        grad = energy_gradient(self.energy, point)
        # x − step·clip(g) + σ·ξ: in IGEBM's order the same ξ as in `point`, with g taken there.
        langevin_step_(x, grad, self.step_size, self.noise_std, self.seed, self.offset, self.grad_clip, low, high)
        self.offset += 1
        return x

    def __call__(self, x: torch.Tensor, n_steps: int | None = None) -> torch.Tensor:
        """Runs ``n_steps`` (default: the sampler's) steps from ``x`` and returns the final chains
        as a new, detached tensor of ``x``'s shape and dtype (``x`` is not modified)."""
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
    float32 (see docs/langevin.md).

    ``sample(n)`` returns ``n`` initial chains: each slot is a buffered chain drawn uniformly
    with replacement, or with probability ``reinit_prob`` (and always while the buffer holds
    fewer than ``n`` chains, as IGEBM) fresh uniform noise in ``bounds``. ``push(x)`` stores the
    final chains of a batch, overwriting the oldest. Random draws use the counter-based noise
    stream ``(seed, offset)``; ``offset`` advances by one per ``sample``. ``state_dict()`` /
    ``load_state_dict()`` save and restore all of it, the stream position included.

    Args:
        shape: the shape of one chain (without the batch dimension).
        capacity: the most chains kept (an int >= 1).
        reinit_prob: probability in [0, 1] that a slot restarts from fresh noise.
        bounds: ``(low, high)``, the range of the fresh noise.
        device: where the chains are kept and returned.
        seed, offset: the buffer's own random stream (ints).

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range (named).
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
        self._check_settings(capacity, reinit_prob, bounds, seed, offset)
        self.shape = tuple(shape)
        self.capacity, self.reinit_prob = capacity, float(reinit_prob)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.storage = torch.empty((capacity, *self.shape), dtype=torch.float32, device=device)
        self.size = 0  # chains stored so far (at most capacity)
        self.next_slot = 0  # where the next pushed chain goes
        self.seed, self.offset = seed, offset

    @staticmethod
    def _check_settings(capacity, reinit_prob, bounds, seed, offset, owner: str = "ReplayBuffer") -> None:
        _check_number(owner, "capacity", capacity, low=1, integer=True)
        _check_number(owner, "reinit_prob", reinit_prob, high=1.0)
        _check_bounds(owner, bounds)
        _check_stream(owner, seed, offset)

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

    def state_dict(self) -> dict:
        """Everything ``load_state_dict`` needs to continue exactly where this buffer is: the
        settings, the random stream position (``seed``, ``offset``), the ring position and the
        stored chains (``chains``: a float32 copy of the ``size`` filled slots, on the buffer's
        device). Only tensors, ints, floats and lists: it survives ``torch.save`` and
        ``torch.load(weights_only=True)``."""
        return {
            "shape": list(self.shape),
            "capacity": self.capacity,
            "reinit_prob": self.reinit_prob,
            "bounds": list(self.bounds),
            "seed": self.seed,
            "offset": self.offset,
            "size": self.size,
            "next_slot": self.next_slot,
            "chains": self.storage[: self.size].clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a ``state_dict()``: afterwards ``sample`` and ``push`` behave exactly as they
        would have in the saved buffer. ``shape`` must be this buffer's; capacity, settings and
        stream come from the state; the chains are moved to this buffer's device. Everything is
        checked first: a rejected state changes nothing.

        Raises:
            KeyError: a key missing. TypeError / ValueError: a value of the wrong type or out of
            range, a ``shape`` other than this buffer's, ``chains`` not ``(size, *shape)``
            floating point, or a ring position that a buffer cannot have (the key is named).
        """
        owner = "ReplayBuffer.load_state_dict"
        keys = ("shape", "capacity", "reinit_prob", "bounds", "seed", "offset", "size", "next_slot", "chains")
        missing = [key for key in keys if key not in state]
        if missing:
            raise KeyError(f"{owner}: state has no {missing}")
        if not isinstance(state["shape"], (list, tuple)) or tuple(state["shape"]) != self.shape:
            raise ValueError(f"{owner}: shape is {state['shape']}, but this buffer's chains have shape {self.shape}")
        capacity, size, next_slot, chains = state["capacity"], state["size"], state["next_slot"], state["chains"]
        self._check_settings(capacity, state["reinit_prob"], state["bounds"], state["seed"], state["offset"], owner)
        _check_number(owner, "size", size, integer=True)
        _check_number(owner, "next_slot", next_slot, integer=True)
        if size > capacity:
            raise ValueError(f"{owner}: size {size} exceeds capacity {capacity}")
        if next_slot != size % capacity and not (size == capacity and next_slot < capacity):
            raise ValueError(f"{owner}: next_slot {next_slot} is impossible with size {size} and capacity {capacity}")
        if not (isinstance(chains, torch.Tensor) and chains.is_floating_point()):
            what = chains.dtype if isinstance(chains, torch.Tensor) else type(chains).__name__
            raise TypeError(f"{owner}: chains must be a floating-point tensor, got {what}")
        if tuple(chains.shape) != (size, *self.shape):
            raise ValueError(f"{owner}: chains has shape {tuple(chains.shape)}, expected {(size, *self.shape)}")
        storage = self.storage
        if capacity != self.capacity:
            storage = torch.empty((capacity, *self.shape), dtype=torch.float32, device=self.storage.device)
        storage[:size] = chains.to(storage.device, torch.float32)
        self.storage, self.capacity, self.size, self.next_slot = storage, capacity, size, next_slot
        self.reinit_prob = float(state["reinit_prob"])
        self.bounds = (float(state["bounds"][0]), float(state["bounds"][1]))
        self.seed, self.offset = state["seed"], state["offset"]


def contrastive_divergence_loss(energy_pos: torch.Tensor, energy_neg: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """IGEBM's objective: ``mean U(x⁺) − mean U(x⁻) + α·(mean U(x⁺)² + mean U(x⁻)²)``.

    ``energy_pos``: energies of data; ``energy_neg``: energies of (detached) Langevin samples.
    ``energy_pos``, ``energy_neg``: any shapes (each is averaged), floating point, on one
    device; ``alpha``: the weight of the regulariser. Returns a 0-dim tensor.
    Minimising it lowers the data's energy, raises the samples', and the α-term keeps the
    energies near zero (both squares added, as in IGEBM's code)."""
    return energy_pos.mean() - energy_neg.mean() + alpha * (energy_pos.square().mean() + energy_neg.square().mean())
