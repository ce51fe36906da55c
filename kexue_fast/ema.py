"""``kexue_fast.EMA``: an exponential moving average of a model's weights (SPEC §5, TECHNIQUES §4).

    Θ_t = α_t·Θ_{t−1} + (1 − α_t)·θ_t          after every optimizer step (``update()``)

* ``bias_correction=False`` (Su's semantics, the default): the shadows start at the current
  weights, Θ_0 = θ_0, and are used as they are.
* ``bias_correction=True`` (bert4keras): the shadows start at zero and are read as
  ``Θ_t / (1 − Π_k α_k)``, an average of the iterates only.
* ``warmup=W``: the decay ramps up as ``α_t = min(decay, (1 + t)/(W + t))`` (``W = 10`` is
  torch-ema's ``use_num_updates``); ``None`` keeps ``α_t = decay``.

Every floating-point parameter and (with ``include_buffers``) floating-point buffer is averaged
with one ``kexue::ema_update_`` call per step, into float32 shadows for bfloat16/float16
tensors (a bfloat16 shadow at decay 0.9999 never moves). Integer buffers (e.g. BatchNorm's
``num_batches_tracked``) and the power-iteration vectors of spectral norm (``_u``/``_v`` of a
``torch.nn.utils.parametrizations.spectral_norm``, ``<name>_u``/``<name>_v`` of the old hook) are
copied, never averaged: an average of unit vectors is shorter than one and would inflate σ.

``with ema.applied():`` swaps the averaged weights into the model and restores the training
weights on exit, also when the body raises. Names are those of the model with any
``_orig_mod.`` (``torch.compile``) removed, so state dicts move between compiled and plain models.
Under FSDP2 (``fully_shard``) each rank averages its own shards (the shadows are DTensors too).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from kexue_fast.ops.ema_update import ema_update_


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 ``fully_shard`` parameters), else ``t`` itself:
    shadows are created with the parameters' placements, so shards pair up element by element."""
    return t.to_local() if hasattr(t, "to_local") else t


def _clean(name: str) -> str:
    return name.replace("_orig_mod.", "")


def _power_iteration_buffers(model: nn.Module) -> set[str]:
    """Full names of the spectral-norm u/v buffers of ``model`` (copied, never averaged)."""
    names = set()
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        if type(module).__name__ == "_SpectralNorm":  # torch.nn.utils.parametrizations
            names |= {dot + "_u", dot + "_v"}
        for hook in module._forward_pre_hooks.values():  # torch.nn.utils.spectral_norm
            if type(hook).__name__ == "SpectralNorm":
                names |= {dot + hook.name + "_u", dot + hook.name + "_v"}
    return {_clean(n) for n in names}


class EMA:
    """Exponential moving average of ``model``'s weights; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        warmup: int | None = None,
        include_buffers: bool = True,
        bias_correction: bool = False,
    ):
        if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        if warmup is not None and warmup < 1:
            raise ValueError(f"EMA: warmup must be a positive number of steps or None, got {warmup}")
        self.model, self.decay, self.warmup, self.bias_correction = model, decay, warmup, bias_correction
        self.step = 0
        self.decay_product = 1.0  # Π_k α_k, for the bias correction
        tensors = dict(model.named_parameters())
        if include_buffers:
            tensors.update(model.named_buffers())
        copied = _power_iteration_buffers(model)
        #: name -> live tensor of the model, averaged / copied
        self.averaged: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            name = _clean(name)
            target = self.averaged if t.is_floating_point() and name not in copied else self.copied
            target[name] = t
        with torch.no_grad():
            #: name -> shadow (float32 for 16-bit tensors)
            self.shadow: dict[str, torch.Tensor] = {
                name: torch.zeros_like(t, dtype=self._shadow_dtype(t), memory_format=torch.contiguous_format)
                if bias_correction
                else t.detach().to(self._shadow_dtype(t), memory_format=torch.contiguous_format, copy=True)
                for name, t in self.averaged.items()
            }
            self.shadow.update({name: t.detach().clone() for name, t in self.copied.items()})

    @staticmethod
    def _shadow_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype

    def current_decay(self) -> float:
        """α for the next ``update()``."""
        if self.warmup is None:
            return self.decay
        return min(self.decay, (1 + self.step) / (self.warmup + self.step))

    @torch.no_grad()
    def update(self) -> None:
        """Folds the model's current weights into the average (call after each optimizer step)."""
        decay = self.current_decay()
        names = list(self.averaged)
        ema_update_([_local(self.shadow[n]) for n in names], [_local(self.averaged[n].detach()) for n in names], decay)
        for name, t in self.copied.items():
            self.shadow[name].copy_(t)
        self.step += 1
        self.decay_product *= decay

    def averaged_value(self, name: str) -> torch.Tensor:
        """The averaged weight ``name`` as the model would use it (bias-corrected if enabled)."""
        shadow = self.shadow[name]
        if self.bias_correction and name in self.averaged and self.decay_product < 1.0:
            shadow = shadow / (1.0 - self.decay_product)
        return shadow

    @contextlib.contextmanager
    def applied(self):
        """Swaps the averaged weights into the model; restores the training weights on exit."""
        live = {**self.averaged, **self.copied}
        with torch.no_grad():
            backup = {name: t.detach().clone() for name, t in live.items()}
            try:
                for name, t in live.items():
                    t.copy_(self.averaged_value(name))
                yield self.model
            finally:
                for name, t in live.items():
                    t.copy_(backup[name])

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "bias_correction": self.bias_correction,
            "step": self.step,
            "decay_product": self.decay_product,
            "shadow": {name: t.clone() for name, t in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        unexpected = set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA.load_state_dict: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        self.decay, self.warmup, self.bias_correction = state["decay"], state["warmup"], state["bias_correction"]
        self.step, self.decay_product = state["step"], state["decay_product"]
        with torch.no_grad():
            for name, t in state["shadow"].items():
                self.shadow[name].copy_(t)
