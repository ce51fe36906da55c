"""``kexue_fast.EMA``: an exponential moving average of a model's weights (see docs/ema.md).

    Θ_t = α_t·Θ_{t−1} + (1 − α_t)·θ_t          at the t-th ``update()`` (t = 1, 2, …)

* ``bias_correction=False`` (Su's semantics, the default): the shadows start at the current
  weights, Θ_0 = θ_0, and are used as they are.
* ``bias_correction=True`` (bert4keras): the shadows start at zero and are read as
  ``Θ_t / (1 − Π_k α_k)``, an average of the iterates only.
* ``warmup=W``: the decay ramps up as ``α_t = min(decay, (1 + t)/(W + t))``, t counting the
  updates from 1 — with ``W = 10`` exactly torch-ema's ``use_num_updates`` (first decays 2/11,
  3/12, 4/13); ``None`` keeps ``α_t = decay``.

Every floating-point parameter and (with ``include_buffers``) floating-point buffer is averaged
with one ``kexue::ema_update_`` call per step, into float32 shadows for bfloat16/float16
tensors (a bfloat16 shadow at decay 0.9999 never moves). Integer buffers (e.g. BatchNorm's
``num_batches_tracked``) and the power-iteration vectors of spectral norm are copied, never
averaged: an average of unit vectors is shorter than one and would inflate σ. The vectors are
found by the layer that owns them, whichever of the three kinds it is:
``kexue_fast.nn.spectral_norm`` and ``torch.nn.utils.parametrizations.spectral_norm`` (buffers
``_u``/``_v`` of the parametrization) and the old ``torch.nn.utils.spectral_norm`` hook
(``<name>_u``/``<name>_v``).

``with ema.applied():`` swaps the averaged weights into the model and restores the training
weights on exit, also when the body raises. Names are those of the model with any
``_orig_mod.`` (``torch.compile``) removed, so state dicts move between compiled and plain models.
Under FSDP2 (``fully_shard``) each rank averages its own shards (the shadows are DTensors too).

Interrupts: ``update()``, the swap in and out of ``applied()`` and ``load_state_dict`` hold a
Ctrl-C (SIGINT, main thread) back until they are done, then raise it, so the EMA is never one
step ahead of its own counters and the model never half on averaged weights.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import signal
import threading
from collections.abc import Callable
from itertools import starmap
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _TorchSpectralNormHook

from kexue_fast import _checks, _native, _tables
from kexue_fast.nn.spectral import SpectralNorm
from kexue_fast.ops import ema_update as ema_ops
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
        if isinstance(module, (SpectralNorm, _TorchSpectralNorm)):  # parametrizations (ours and torch's)
            names |= {dot + "_u", dot + "_v"}
        for hook in module._forward_pre_hooks.values():  # torch.nn.utils.spectral_norm
            if isinstance(hook, _TorchSpectralNormHook):
                names |= {dot + hook.name + "_u", dot + hook.name + "_v"}
    return {_clean(n) for n in names}


@contextlib.contextmanager
def _interrupts_held():
    """Holds a SIGINT (Ctrl-C) that arrives during the block until the block is done, then
    delivers it to the handler that was installed before. Signals reach Python only in the
    main thread, so elsewhere (and where the handler was not set from Python) it does nothing."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


def _copy_all(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]) -> None:
    """``targets[name].copy_(sources[name])`` for every name. A copy that raises (an injected
    KeyboardInterrupt, say) does not stop the others; the failed ones are retried once at the
    end and the first error is raised after that, so the copy is complete unless one fails twice."""
    failed, error = [], None
    for name, t in targets.items():
        try:
            t.copy_(sources[name])
        except BaseException as e:  # re-raised below, after the other copies
            failed.append(name)
            error = error or e
    for name in failed:
        targets[name].copy_(sources[name])
    if error is not None:
        raise error


class _UpdatePlan(NamedTuple):
    """The cached launch of ``EMA.update``: the ``_C`` launcher and its table (shadow, param)."""

    launch: Callable | None  # None when nothing is averaged
    table: object  # _C.TensorTable


def _check_settings(decay, warmup, bias_correction) -> None:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not (math.isfinite(decay) and 0 <= decay <= 1):
        raise ValueError(f"EMA: decay must be a number in [0, 1], got {decay!r}")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 1):
        raise ValueError(f"EMA: warmup must be a positive number of steps or None, got {warmup!r}")
    if not isinstance(bias_correction, bool):
        raise TypeError(f"EMA: bias_correction must be a bool, got {bias_correction!r}")


class EMA:
    """Exponential moving average of ``model``'s weights (see the module docstring and docs/ema.md).

    Args:
        model: the module to average; a ``torch.compile``d, DDP-wrapped or FSDP2-sharded module
            works too. Its tensors are found by name once, at construction: parameters added
            later are not averaged, but a tensor replaced under its name (``m.weight =
            nn.Parameter(…)``, ``load_state_dict(assign=True)``, ``.to()``) is followed.
        decay: α in [0, 1]; the weight of the old average at each ``update()``.
        warmup: ``None`` (constant decay) or W ≥ 1: ``α_t = min(decay, (1 + t)/(W + t))`` at the
            t-th update (W = 10 is torch-ema's ``use_num_updates``).
        include_buffers: also average floating-point buffers (BatchNorm statistics) and copy
            the others; ``False`` averages parameters only.
        bias_correction: start the shadows at zero and divide by ``1 − Π α_t`` when reading
            them (bert4keras); ``False`` starts them at the current weights (Su).

    Attributes:
        shadow: name → shadow tensor (float32 for float16/bfloat16 tensors, else the tensor's
            dtype; contiguous, on the tensor's device).
        averaged / copied: name → the model's live tensor that is averaged / copied (looked up
            again in the model by ``update()`` and ``applied()``).
        step: number of ``update()`` calls so far; decay_product: ``Π α_t`` over them.

    Raises:
        ValueError: ``decay`` outside [0, 1] or not finite, ``warmup`` not a positive int.
        TypeError: ``bias_correction`` not a bool.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        warmup: int | None = None,
        include_buffers: bool = True,
        bias_correction: bool = False,
    ):
        _check_settings(decay, warmup, bias_correction)
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
        owners: dict[str, tuple[dict, str]] = {}  # name -> (the dict that holds it in the model, its key)
        for raw_name, t in tensors.items():
            name = _clean(raw_name)
            target = self.averaged if t.is_floating_point() and name not in copied else self.copied
            target[name] = t
            module_name, _, key = raw_name.rpartition(".")
            module = model.get_submodule(module_name)
            owners[name] = (module._parameters if key in module._parameters else module._buffers, key)
        self._averaged_owners = [owners[name] for name in self.averaged]
        self._copied_owners = [owners[name] for name in self.copied]
        with torch.no_grad():
            #: name -> shadow (float32 for 16-bit tensors)
            self.shadow: dict[str, torch.Tensor] = {
                name: torch.zeros_like(t, dtype=self._shadow_dtype(t), memory_format=torch.contiguous_format)
                if bias_correction
                else t.detach().to(self._shadow_dtype(t), memory_format=torch.contiguous_format, copy=True)
                for name, t in self.averaged.items()
            }
            self.shadow.update({name: t.detach().clone() for name, t in self.copied.items()})
        self._plan = _tables.Cache(self._build_plan)

    @staticmethod
    def _shadow_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype

    def current_decay(self) -> float:
        """α for the next ``update()``: ``decay``, or under warm-up ``min(decay, (1 + t)/(W + t))``
        with ``t = step + 1`` (that update's number)."""
        if self.warmup is None:
            return self.decay
        t = self.step + 1
        return min(self.decay, (1 + t) / (self.warmup + t))

    @torch.no_grad()
    def update(self) -> None:
        """Folds the model's current weights into the average (call after each optimizer step):
        one ``ema_update_`` over every averaged tensor, a copy of every copied one, and
        ``step``/``decay_product`` advanced with them. All of it or nothing: everything is
        validated before any shadow is written, and a Ctrl-C during the update is raised after it.

        The table of the call is built and validated once and kept: each update looks the
        tensors up afresh and re-checks them in O(1) Python calls (``kexue_fast._tables.Cache``),
        rebuilding after ``.to()``, a replaced shadow or a changed dtype or size. Under
        ``torch.compile`` (and for FSDP2 shards or non-contiguous parameters) it calls
        ``torch.ops.kexue.ema_update_`` instead."""
        decay = self.current_decay()
        plan = None
        if not torch.compiler.is_compiling():
            try:
                shadows = list(map(self.shadow.__getitem__, self.averaged))
                params = list(starmap(dict.__getitem__, self._averaged_owners))
                copy_targets = list(map(self.shadow.__getitem__, self.copied))
                copy_sources = list(starmap(dict.__getitem__, self._copied_owners))
                key = [
                    _tables.fingerprint(shadows),
                    _tables.fingerprint(params, _tables.SHAPE),
                    _tables.fingerprint(copy_targets + copy_sources, _tables.DTYPE, _tables.SHAPE),
                ]
            except (KeyError, TypeError) as error:
                raise self._lost_tensors() or error from None
            plan = self._plan.get(key, shadows, params, copy_targets, copy_sources)
        if plan is None:
            self._update_by_op(decay)
            return
        ema_ops.validate([], [], decay)  # the op's check of the decay (the tensors were checked by the build)
        with _interrupts_held():
            if copy_targets:
                torch._foreach_copy_(copy_targets, copy_sources)
            if shadows:
                plan.launch(plan.table, decay)
            torch.autograd.graph.increment_version(shadows)
            self.step += 1
            self.decay_product *= decay

    def _update_by_op(self, decay: float) -> None:
        """update() through ``torch.ops.kexue.ema_update_`` (what torch.compile traces)."""
        self._follow_model()
        names = list(self.averaged)
        shadows = [_local(self.shadow[n]) for n in names]
        params = [_local(self.averaged[n].detach()) for n in names]
        copies = {name: t.detach().clone() for name, t in self.copied.items()}
        with _interrupts_held():
            ema_update_(shadows, params, decay)
            self.shadow.update(copies)
            self.step += 1
            self.decay_product *= decay

    def _build_plan(self, shadows, params, copy_targets, copy_sources) -> _UpdatePlan | None:
        """The launch of update(), validated as the op validates its arguments; None (update()
        then calls the op) for FSDP2 shards (DTensors), non-contiguous parameters (the op copies
        them) and copied tensors whose shadow no longer matches them in dtype and shape."""
        self.averaged = dict(zip(self.averaged, params))
        self.copied = dict(zip(self.copied, copy_sources))
        if any(hasattr(t, "to_local") for t in shadows + params + copy_targets + copy_sources):
            return None
        if not all(p.is_contiguous() for p in params):
            return None
        if any(t.dtype != s.dtype or t.shape != s.shape for t, s in zip(copy_targets, copy_sources)):
            return None
        ema_ops.validate(shadows, params, 0.0)
        table, _ = ema_ops.make_table(shadows, params)  # the params are contiguous: no copies
        ema_ops.check_disjoint(shadows, params, table, params)
        _checks.disjoint("EMA.update", [("copied shadows", copy_targets)], [("copied tensors", copy_sources)])
        launch = _native.launcher("ema_update", shadows[0].device) if shadows else None
        return _UpdatePlan(launch, table)

    def _lost_tensors(self) -> ValueError | None:
        """The error for names under which the model or ``shadow`` no longer holds a tensor
        (``del m.weight``, ``m.weight = None``, a shadow deleted); None if there are none."""
        owners = dict(zip([*self.averaged, *self.copied], [*self._averaged_owners, *self._copied_owners]))
        lost = [
            name
            for name, (owner, key) in owners.items()
            if not isinstance(owner.get(key), torch.Tensor) or not isinstance(self.shadow.get(name), torch.Tensor)
        ]
        if not lost:
            return None
        return ValueError(f"EMA.update: the model or the shadows no longer hold a tensor under the names {lost}")

    def _follow_model(self) -> None:
        """``averaged`` and ``copied`` hold the tensors the model holds now under their names."""
        self.averaged = dict(zip(self.averaged, starmap(dict.__getitem__, self._averaged_owners)))
        self.copied = dict(zip(self.copied, starmap(dict.__getitem__, self._copied_owners)))

    def averaged_value(self, name: str) -> torch.Tensor:
        """The averaged weight ``name`` as the model would use it: the shadow, divided by
        ``1 − decay_product`` under bias correction (copied tensors as they are). Raises
        KeyError for a name that is not in ``shadow``."""
        shadow = self.shadow[name]
        if self.bias_correction and name in self.averaged and self.decay_product < 1.0:
            shadow = shadow / (1.0 - self.decay_product)
        return shadow

    @contextlib.contextmanager
    def applied(self):
        """Context manager: inside it the model holds the averaged weights (``averaged_value``,
        cast to each tensor's dtype); on exit, also by an exception, the training weights are
        copied back bit for bit. The body runs in the caller's grad mode. Yields the model.

        The swap in and the restore are each complete: a Ctrl-C arriving during either is
        raised once it is done, and a copy that fails during the restore does not stop the
        others (it is retried once; then the error is raised)."""
        self._follow_model()
        live = {**self.averaged, **self.copied}
        with torch.no_grad():
            training = {name: t.detach().clone() for name, t in live.items()}
            averaged = {name: self.averaged_value(name) for name in live}
        try:
            with torch.no_grad(), _interrupts_held():
                for name, t in live.items():
                    t.copy_(averaged[name])
            yield self.model
        finally:
            with torch.no_grad(), _interrupts_held():
                _copy_all(live, training)

    def state_dict(self) -> dict:
        """The EMA's state: ``decay``, ``warmup``, ``bias_correction``, ``step``,
        ``decay_product`` and ``shadow`` (name → a clone of each shadow). Only tensors, numbers,
        bools and None: it loads with ``torch.load(weights_only=True)``."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "bias_correction": self.bias_correction,
            "step": self.step,
            "decay_product": self.decay_product,
            "shadow": {name: t.clone() for name, t in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a ``state_dict()`` (settings, counters and shadows; tensors are copied into
        the existing shadows, so they may come from another device, and floating-point dtypes
        are converted). Everything is checked before anything changes: a rejected state leaves
        the EMA exactly as it was.

        Raises:
            KeyError: a top-level key or a shadow name missing, or unexpected shadow names.
            ValueError: a shadow whose shape differs from this EMA's (no broadcasting; the
                message names the key and both shapes), or a setting/counter out of range.
            TypeError: a shadow that is not a tensor, or floating-point where this EMA's is not
                (or the reverse); ``bias_correction`` not a bool.
        """
        missing = {"decay", "warmup", "bias_correction", "step", "decay_product", "shadow"} - set(state)
        if missing:
            raise KeyError(f"EMA.load_state_dict: state has no {sorted(missing)}")
        _check_settings(state["decay"], state["warmup"], state["bias_correction"])
        step, product = state["step"], state["decay_product"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"EMA.load_state_dict: step must be an int >= 0, got {step!r}")
        if isinstance(product, bool) or not isinstance(product, numbers.Real) or not 0 <= product <= 1:
            raise ValueError(f"EMA.load_state_dict: decay_product must be a number in [0, 1], got {product!r}")
        missing = set(self.shadow) - set(state["shadow"])
        unexpected = set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA.load_state_dict: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, mine in self.shadow.items():
            theirs = state["shadow"][name]
            if not isinstance(theirs, torch.Tensor):
                raise TypeError(f"EMA.load_state_dict: shadow {name!r} must be a tensor, got {type(theirs).__name__}")
            if theirs.shape != mine.shape:
                raise ValueError(
                    f"EMA.load_state_dict: shadow {name!r} has shape {tuple(theirs.shape)}, "
                    f"but this EMA's has shape {tuple(mine.shape)}"
                )
            if theirs.is_floating_point() != mine.is_floating_point() or theirs.is_complex() != mine.is_complex():
                raise TypeError(
                    f"EMA.load_state_dict: shadow {name!r} is {theirs.dtype}, but this EMA's is {mine.dtype}"
                )
        with torch.no_grad(), _interrupts_held():
            for name, mine in self.shadow.items():
                mine.copy_(state["shadow"][name])
            self.decay, self.warmup, self.bias_correction = state["decay"], state["warmup"], state["bias_correction"]
            self.step, self.decay_product = int(step), float(product)
