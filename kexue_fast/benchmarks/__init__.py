"""Benchmark cases shared by ``kexue-fast bench`` and the pytest-benchmark suites in ``bench/``.

Each op family contributes one module here with a :class:`OpBench`: its reference, its kernels,
the names of the ops it covers and a list of :class:`Case` s. Providers, timed in the same
process, round-robin:

* ``eager``     — the pure-PyTorch reference (the code a user writes by hand),
* ``compiled``  — the same reference under ``torch.compile`` (not in ``--quick``),
* ``native``    — the C++ / CUDA op,
* ``triton``    — the Triton op (on CUDA only: the CPU interpreter is not a benchmark),
* ``floor``     — a memory-bound lower bound such as ``x.clone()`` (``forward``/``call`` only),
* extras        — what else users reach for (``torch._foreach_*``, peer libraries), where installed
  (not in ``--quick``); and our own module APIs, named with ``()`` (``EMA.update()``), next to
  :data:`BARE`, the bare ``_C`` launch of the table the module caches: ``module()/_C launch``
  is the per-call cost of the module's Python (the goal: at most 2×).

A family whose baseline is not one reference function (the i-ResNet inversion: the loops of
the peers, ``fixed-100`` and ``batch-wide``, and the latter's body under ``torch.compile``) names
its own providers in place of ``eager``/``compiled`` (:attr:`OpBench.baselines`), and a family
whose providers say more than their time (iterations, final error, peak memory) reports it by
:attr:`OpBench.stats`, measured once per case and mode after the timing, outside it.

Modes of ops with autograd: ``forward`` (under ``no_grad``), ``backward`` (``autograd.grad`` of a
kept graph) and ``forward+backward``. Ops without autograd (in-place updates, noise) have one
mode, ``call``: one call of the op. A family that times a whole training step (the i-ResNet
log-determinant: forward, log-det and gradients) has the mode ``step``: one call of a provider
that does its own backward. Such a family names its kernel (:attr:`OpBench.native_name`, the
i-ResNet log-det's ``ours``) and the ratios it reports (:attr:`OpBench.pairs`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kexue_fast import testing

#: Modules under kexue_fast.benchmarks that define ``BENCH`` (one per op family).
OP_MODULES = [
    "cond_layer_norm", "ema_update", "spectral_norm", "langevin_step", "philox_normal", "iresnet_inverse",
    "iresnet_logdet", "modulated_batch_norm", "cascading_rejection", "self_orthogonality", "orthogonal_regularizer",
    "gan_step",
]  # fmt: skip
AUTOGRAD_MODES = ("forward", "backward", "forward+backward")
CALL = "call"  # the one mode of an op without autograd
STEP = "step"  # one training step, its backward included (one call, under grad mode)
#: The provider that runs a module API's cached table by the bare ``_C`` launcher.
BARE = "_C launch"


@dataclass
class Case:
    """One shape/dtype/layout of an op, timed in every mode listed."""

    label: str
    make_inputs: Callable[[torch.device], list]
    modes: Sequence[str] = AUTOGRAD_MODES
    quick: bool = False  # part of ``--quick``
    #: time the ``torch.compile``d reference (False where compiling it takes minutes: a Python
    #: loop over thousands of tensors is unrolled into one graph)
    compiled: bool = True


@dataclass
class Check:
    """One verified quantity of a kernel: its max abs error against the float64 truth, the
    tolerance it is held to (in words, with numbers) and the verdict of ``kexue_fast.testing``."""

    quantity: str
    error: float
    tolerance: str
    passed: bool
    message: str = ""  # why it failed


@dataclass
class OpBench:
    name: str
    reference: Callable  # fn(*inputs)
    native: Callable
    triton: Callable | None
    cases: list[Case]
    #: the ``torch.ops.kexue`` ops this family covers (``bench --ops`` accepts any of them)
    ops: Sequence[str] = ()
    input_names: Sequence[str] = ()  # names of the inputs' gradients in the verification report
    floor: Callable | None = field(default=lambda x, *rest: x.clone())  # memory floor of the forward
    #: name -> factory(inputs) returning fn(*inputs), or None where the peer is not installed
    #: (called with inputs=None to ask only whether it is available)
    extra: dict[str, Callable[[list], Callable | None]] = field(default_factory=dict)
    #: verify(kernel, reference, inputs) -> list of Check; default: outputs and gradients
    verify: Callable | None = None
    #: baselines(mode, quick, compiled) -> name -> fn(*inputs): the providers that replace ``eager``
    #: and ``compiled`` (``compiled``: False in ``--quick`` and for a case with ``compiled`` False —
    #: leave the ``torch.compile``d ones out then); the reference still verifies the kernels
    baselines: Callable[[str, bool, bool], dict[str, Callable]] | None = None
    #: stats(case, mode, fns, inputs, seconds) -> provider -> {quantity: number}: what the providers
    #: ``fns`` (as timed, ``seconds`` their median per call) report besides their time
    stats: Callable | None = None
    #: the name of the ``native`` provider in the table and the JSON (the one that is verified)
    native_name: str = "native"
    #: the (slow, fast) ratios reported (each where both are timed), in place of the runner's
    #: default (every provider over ``native`` …, :func:`kexue_fast.benchmarks.runner.ratio_pairs`)
    pairs: Sequence[tuple[str, str]] | None = None


def module_and_bare(build: Callable[[list], object], call: Callable, bare: Callable) -> tuple[Callable, Callable]:
    """The two extras of a module API (see the module docstring): ``call(obj)`` (``"X()"``) and
    ``bare(obj)`` (:data:`BARE`, the cached table through the ``_C`` launcher), each on its own
    ``obj = build(inputs)``, which builds the module and calls it once so that its table exists.
    The provider keeps ``obj`` alive: the table points into its tensors."""

    def provider(run):
        def factory(inputs):
            if inputs is None:
                return True
            obj = build(inputs)
            return lambda *_: run(obj)

        return factory

    return provider(call), provider(bare)


def compare(quantity: str, actual: torch.Tensor, truth: torch.Tensor, same_dtype: torch.Tensor | None = None) -> Check:
    """``actual`` against the float64 ``truth`` by the rule of :func:`kexue_fast.testing.assert_matches`
    (``same_dtype``: the reference run in ``actual``'s dtype, needed for float16/bfloat16)."""
    try:
        testing.assert_matches(actual, truth, same_dtype, what=quantity)
        passed, message = True, ""
    except AssertionError as error:
        passed, message = False, "; ".join(line.strip() for line in str(error).splitlines()[:4] if line.strip())
    if actual.shape != truth.shape:
        return Check(quantity, float("nan"), "same shape", False, message)
    if actual.dtype in testing.LOW_PRECISION:
        dtype = str(actual.dtype).removeprefix("torch.")
        reference_error = testing.max_error(same_dtype, truth)
        tolerance = f"{dtype} rule of docs/conventions.md (the {dtype} reference errs {reference_error:.1e})"
    else:
        rtol, abs_tol = testing.tolerance(actual.dtype)
        scale = max(1.0, truth.abs().max().item() if truth.numel() else 0.0)
        tolerance = f"atol {abs_tol * scale:.1e} + rtol {rtol:.0e}·|truth|"
    return Check(quantity, testing.max_error(actual, truth), tolerance, passed, message)


def worst(quantity: str, checks: list[Check]) -> Check:
    """One check standing for many (e.g. every tensor of a list): the first that failed, else
    the one with the largest error."""
    failed = [c for c in checks if not c.passed]
    shown = failed[0] if failed else max(checks, key=lambda c: c.error)
    return Check(f"{quantity} (worst of {len(checks)})", shown.error, shown.tolerance, not failed, shown.message)


def verify_update(kernel: Callable, reference: Callable, inputs: list) -> list[Check]:
    """For ops that update the list of tensors ``inputs[0]`` in place: ``kernel`` and
    ``reference`` on copies, every updated tensor against the float64 truth."""
    targets, rest = inputs[0], inputs[1:]
    actual = [t.clone() for t in targets]
    kernel(actual, *rest)
    truth = [t.to(torch.float64, copy=True) for t in targets]
    reference(truth, *[[t.double() for t in r] if isinstance(r, list) else r for r in rest])
    same_dtype = [t.clone() for t in targets]
    reference(same_dtype, *rest)
    return [
        worst(
            "updated tensors",
            [compare(f"updated[{i}]", *c) for i, c in enumerate(zip(actual, truth, same_dtype))],
        )
    ]


def verify_autograd(kernel: Callable, reference: Callable, inputs: list, names: Sequence[str] = ()) -> list[Check]:
    """The output and the gradient of every floating-point input of ``kernel`` against
    ``reference`` run in float64 (and, for 16-bit inputs, in their own dtype)."""
    y = kernel(*inputs)
    grad_out = torch.randn_like(y)
    y, grads = testing.forward_backward(kernel, inputs, grad_out)
    as64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    y64, grads64 = testing.forward_backward(reference, as64, grad_out.double())
    low = y.dtype in testing.LOW_PRECISION
    y_same, grads_same = testing.forward_backward(reference, inputs, grad_out) if low else (None, [None] * len(inputs))
    names = [f"grad_{n}" for n in names] or [f"grad[{i}]" for i in range(len(inputs))]
    checks = [compare("output", y, y64, y_same)]
    checks += [compare(n, g, g64, s) for n, g, g64, s in zip(names, grads, grads64, grads_same) if g64 is not None]
    return checks


def verify(bench: OpBench, kernel: Callable, inputs: list) -> list[Check]:
    """The checks of one kernel of ``bench`` on one case's ``inputs``."""
    if bench.verify is not None:
        return bench.verify(kernel, bench.reference, inputs)
    return verify_autograd(kernel, bench.reference, inputs, bench.input_names)


def kernels(bench: OpBench, device: torch.device) -> dict[str, Callable]:
    """The kernel providers of ``bench`` that run on ``device`` (those that are verified)."""
    found = {bench.native_name: bench.native}
    if bench.triton is not None and device.type == "cuda":
        found["triton"] = bench.triton
    return found


def _all() -> dict[str, OpBench]:
    return {name: importlib.import_module(f"kexue_fast.benchmarks.{name}").BENCH for name in OP_MODULES}


def names() -> dict[str, list[str]]:
    """module name -> every name ``load`` accepts for it (the family, its table name, its ops)."""
    return {module: list(dict.fromkeys([module, bench.name, *bench.ops])) for module, bench in _all().items()}


def load(ops: Sequence[str] | None = None) -> list[OpBench]:
    """The OpBench of every op family, or of the named ones: a family (``spectral_norm``), the
    name the table prints (``spectral_norm_power_iter``) or any op it covers as ``kexue-fast
    info`` prints it (``spectral_norm_power_iter_``, ``kexue::cond_layer_norm_triton``)."""
    benches = _all()
    if not ops:
        return list(benches.values())
    owner = {alias: module for module, aliases in names().items() for alias in aliases}
    wanted = [owner.get(op.removeprefix("torch.ops.").removeprefix("kexue::").removeprefix("kexue.")) for op in ops]
    unknown = [op for op, module in zip(ops, wanted) if module is None]
    if unknown:
        raise ValueError(
            f"unknown ops {unknown}; known: {', '.join(a for aliases in names().values() for a in aliases)}"
        )
    return [benches[module] for module in dict.fromkeys(wanted)]


def providers_for(
    bench: OpBench,
    device: torch.device,
    mode: str,
    inputs: list | None,
    *,
    quick: bool = False,
    case: Case | None = None,
) -> dict[str, Callable]:
    """provider name -> fn(*inputs) for this device and mode (``compiled`` compiles lazily;
    ``quick`` leaves out ``compiled`` and the extras, and so does a ``case`` with ``compiled``
    False for the former). With ``inputs=None`` only the names are meaningful (extras are
    probed, not built)."""
    compiled = not quick and (case is None or case.compiled)
    if bench.baselines is not None:
        fns = dict(bench.baselines(mode, quick, compiled))
    else:
        fns = {"eager": bench.reference}
        if compiled:
            fns["compiled"] = torch.compile(bench.reference)
    fns.update(kernels(bench, device))
    if mode in ("forward", CALL) and bench.floor is not None:
        fns["floor"] = bench.floor
    for name, factory in {} if quick else bench.extra.items():
        fn = factory(inputs)
        if fn is not None:
            fns[name] = fn
    return fns


def make_thunk(fn: Callable, inputs: list, mode: str) -> Callable[[], object]:
    """A zero-argument callable running one ``mode`` step of ``fn`` on ``inputs``."""
    if mode == STEP:
        return lambda: fn(*inputs)
    if mode in ("forward", CALL):

        def forward():
            with torch.no_grad():
                return fn(*inputs)

        return forward
    leaves = [
        t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs
    ]
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    y = fn(*leaves)
    grad_out = torch.randn_like(y)
    if mode == "backward":
        return lambda: torch.autograd.grad(y, wanted, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*leaves), wanted, grad_out)
