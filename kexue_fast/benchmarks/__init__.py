"""Benchmark cases shared by ``kexue-fast bench`` and the pytest-benchmark suites in ``bench/``.

Each op contributes one module here with a :class:`OpBench`: its reference, its kernels and a
list of :class:`Case` s. Providers, timed in the same process and run:

* ``eager``     — the pure-PyTorch reference (the code a user writes by hand),
* ``compiled``  — the same reference under ``torch.compile``,
* ``native``    — the C++ / CUDA op,
* ``triton``    — the Triton op (on CUDA only: the CPU interpreter is not a benchmark),
* ``floor``     — a memory-bound lower bound such as ``x.clone()`` (forward cases only),
* extras        — what else users reach for (``torch._foreach_*``, peer libraries), where installed.

Modes: ``forward`` (under ``no_grad``), ``backward`` (``autograd.grad`` of a kept graph) and
``forward+backward``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

#: Modules under kexue_fast.benchmarks that define ``BENCH`` (one per op).
OP_MODULES = ["cond_layer_norm", "ema_update", "spectral_norm", "langevin_step", "philox_normal"]
MODES = ("forward", "backward", "forward+backward")
PROVIDERS = ("eager", "compiled", "native", "triton", "floor")


@dataclass
class Case:
    """One shape/dtype/layout of an op, timed in every mode listed."""

    label: str
    make_inputs: Callable[[torch.device], list]
    modes: Sequence[str] = MODES
    quick: bool = False  # part of ``--quick``


@dataclass
class OpBench:
    name: str
    reference: Callable  # fn(*inputs)
    native: Callable
    triton: Callable | None
    cases: list[Case]
    input_names: Sequence[str] = ()  # names of the inputs' gradients in the verification report
    floor: Callable | None = field(default=lambda x, *rest: x.clone())  # memory floor of the forward
    #: name -> factory(inputs) returning fn(*inputs), or None where the peer is not installed
    #: (called with inputs=None to ask only whether it is available)
    extra: dict[str, Callable[[list], Callable | None]] = field(default_factory=dict)
    #: verify(kernel, reference, inputs) -> max errors; default: outputs and gradients
    verify: Callable | None = None


def load(ops: Sequence[str] | None = None) -> list[OpBench]:
    """The OpBench of every op (or of the named ones)."""
    names = OP_MODULES if not ops else list(ops)
    unknown = sorted(set(names) - set(OP_MODULES))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {OP_MODULES}")
    return [importlib.import_module(f"kexue_fast.benchmarks.{name}").BENCH for name in names]


def providers_for(bench: OpBench, device: torch.device, mode: str, inputs: list | None) -> dict[str, Callable]:
    """provider name -> fn(*inputs) for this device and mode (``compiled`` compiles lazily).
    With ``inputs=None`` only the names are meaningful (extras are probed, not built)."""
    fns = {"eager": bench.reference, "compiled": torch.compile(bench.reference), "native": bench.native}
    if bench.triton is not None and device.type == "cuda":
        fns["triton"] = bench.triton
    if mode == "forward" and bench.floor is not None:
        fns["floor"] = bench.floor
    for name, factory in bench.extra.items():
        fn = factory(inputs)
        if fn is not None:
            fns[name] = fn
    return fns


def make_thunk(fn: Callable, inputs: list, mode: str) -> Callable[[], object]:
    """A zero-argument callable running one ``mode`` step of ``fn`` on ``inputs``."""
    if mode == "forward":

        def forward():
            with torch.no_grad():
                return fn(*inputs)

        return forward
    leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    y = fn(*leaves)
    grad_out = torch.randn_like(y)
    if mode == "backward":
        return lambda: torch.autograd.grad(y, wanted, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*leaves), wanted, grad_out)
