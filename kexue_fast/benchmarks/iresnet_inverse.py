r"""Benchmark cases of ``kexue::iresnet_inverse``: the inverse of ``y = x + g(x)`` for an MLP branch
``g`` (three layers, elu, float32), every provider on the same weights and inputs, solved to
``atol = rtol = 1e-6`` (the stopping rule of :mod:`kexue_fast.reference.iresnet`).

Providers (in place of ``eager``/``compiled``, see :attr:`OpBench.baselines`):

* ``fixed-100`` — the original i-ResNet code's loop: 100 iterations of ``x = y − g(x)``, eager,
  no test;
* ``batch-wide`` — residual-flows' loop: every row iterates until all rows meet the rule
  (``‖x_{k+1} − x_k‖_∞ ≤ atol + rtol·‖x_{k+1}‖_∞`` per row, ``.all()`` checked on the host after
  each iteration), eager; ``batch-wide-compiled`` the same with the loop body (``g``, the update
  and the per-row test) under ``torch.compile``, the loop and its host check in Python;
* ``native`` — :func:`kexue_fast.ops.iresnet.iresnet_inverse` (``warn=False``), ``triton`` —
  ``kexue::iresnet_inverse_triton`` (on CUDA only).

Each reports (:func:`stats`, once per case, outside the timing) its iterations — per row for the
kernels (mean and max), the loop count for the loops — and its final error
``‖x + g(x) − y‖_∞``, computed in float64. The native kernel also reports its rate, the FLOPs
of the rows still active, ``2·Σ_rows n_iter·Σ_k in_k·out_k`` per second, and on the mid cases
that rate as a fraction of ``torch.mm``'s on a 4096×256×256 float32 product timed in the same
run (the issue's goal: at least half).

``forward+backward``: ``loss = (x·w).sum()`` for a fixed ``w ~ N(0, I)`` (the framework's
``grad_out``), differentiated in ``y``, the weights and the biases — through the native op (the
implicit-function backward) and by autograd through the unrolled ``batch-wide`` loop (eager) —
with the peak memory of each step: on CUDA ``torch.cuda.max_memory_allocated``, on CPU the peak of
the running sum of torch's allocations recorded by ``torch.profiler`` (memory the C++ kernel
takes for itself, its per-thread row block and packed weights, is not among them).

Cases (weights: Gaussian, each layer scaled to spectral norm ``c`` exactly, biases ``0.1·N(0, 1)``;
``y = x₀ + g(x₀)`` with ``x₀ ~ N(0, I)``, so ``x₀`` is the solution): **toy** ``2→64→64→2`` at
B = 4096 and B = 64, **mid** ``64→256→256→64`` at B = 4096, ``c = 0.9`` and ``c = 0.97``, and
**stiff** ``16→64→64→16`` at B = 4096 (:func:`stiff_branch`, ``max_iter = 500``): a third of its
rows need 100–260 iterations, more than half under 20. On the Gaussian weights every toy and mid
row stops after 4–7 iterations (three random layers have a gain well below the bound ``c³``), so
``fixed-100`` does 15–25 times the work there. Sizes are those of the issue; :func:`smoke_bench`
has the same cases at B = 64 for CI's ``pytest bench --benchmark-disable``.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass, replace

import torch

from kexue_fast._library import REGISTERED
from kexue_fast.benchmarks import Case, Check, OpBench, make_thunk
from kexue_fast.ops.iresnet import iresnet_inverse
from kexue_fast.reference.iresnet import mlp_residual

ACTIVATION = "elu"
ATOL = RTOL = 1e-6
FIXED_ITERATIONS = 100  # the original i-ResNet code's count
MM_SHAPE = (4096, 256, 256)  # torch.mm's reference product: (M, K) @ (K, N)


@dataclass(frozen=True)
class Settings:
    """The solve's settings, the last input of every case (not a tensor: autograd leaves it be)."""

    max_iter: int = 100
    atol: float = ATOL
    rtol: float = RTOL
    lip: float = 0.9**3  # the branch's Lipschitz bound (in the 2-norm): the product of the layers' norms


def _split(inputs):
    """``[y, W_1 … W_L, b_1 … b_L, settings]`` -> ``(y, weights, biases, settings)``."""
    y, *params, settings = inputs
    n = len(params) // 2
    return y, params[:n], params[n:], settings


def _rows_converged(new: torch.Tensor, old: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """Per row: ``‖new − old‖_∞ ≤ atol + rtol·‖new‖_∞`` (the rule the loops test)."""
    return (new - old).abs().amax(1) <= atol + rtol * new.abs().amax(1)


class Solver:
    """A provider: ``solver(*inputs) -> x`` is what is timed; ``solver.solve(*inputs) -> (x, n)``
    the same computation with its iterations (``n``: per row, int32 ``(B,)``, or the loop count)."""

    def __init__(self, solve):
        self.solve = solve

    def __call__(self, *inputs):
        return self.solve(*inputs)[0]


def fixed_100(y, *rest):
    """The original i-ResNet inverse: ``x = y − g(x)`` 100 times from ``x = y``, no test."""
    _, weights, biases, _ = _split([y, *rest])
    x = y
    for _ in range(FIXED_ITERATIONS):
        x = y - mlp_residual(x, weights, biases, ACTIVATION)
    return x, FIXED_ITERATIONS


def _step(x, y, weights, biases, atol: float, rtol: float):
    """One iteration of the batch-wide loop: the new iterate and whether every row has stopped."""
    new = y - mlp_residual(x, weights, biases, ACTIVATION)
    return new, _rows_converged(new, x, atol, rtol).all()


def batch_wide_loop(step):
    """Residual-flows' inverse with ``step`` as its body: iterate every row until all rows meet
    the rule (checked on the host each iteration) or ``max_iter``; ``n`` is the loop count."""

    def solve(y, *rest):
        _, weights, biases, s = _split([y, *rest])
        x = y
        for k in range(s.max_iter):
            x, done = step(x, y, weights, biases, s.atol, s.rtol)
            if bool(done):
                return x, k + 1
        return x, s.max_iter

    return solve


def _native(y, *rest):
    _, weights, biases, s = _split([y, *rest])
    return iresnet_inverse(y, weights, biases, ACTIVATION, s.max_iter, s.atol, s.rtol, warn=False)


def _triton(y, *rest):
    _, weights, biases, s = _split([y, *rest])
    return torch.ops.kexue.iresnet_inverse_triton(y, weights, biases, ACTIVATION, s.max_iter, s.atol, s.rtol)


def baselines(mode: str, quick: bool, compiled: bool) -> dict:
    """The loops users run (module docstring): all three in ``forward`` (``--quick``: only the
    eager ``batch-wide``; ``fixed-100`` is the slowest provider by far), only the eager
    ``batch-wide`` (the unrolled loop autograd goes through) in ``forward+backward``."""
    fns = {"batch-wide": Solver(batch_wide_loop(_step))}  # first: the plot's speedups are over it
    if not quick:
        fns["fixed-100"] = Solver(fixed_100)
    if compiled:
        fns["batch-wide-compiled"] = Solver(batch_wide_loop(torch.compile(_step)))
    if mode != "forward":
        fns = {"batch-wide": fns["batch-wide"]}
    return fns


def per_row_solve(y, *rest):
    """The rule of :mod:`kexue_fast.reference.iresnet` (each row stops on its own, NaN/inf rows
    stop at once with ``n_iter = max_iter``) with the rows still running iterated together:
    ``(x, n_iter)``. The reference itself solves one row at a time, too slow for B = 4096."""
    _, weights, biases, s = _split([y, *rest])
    x = y.clone()
    n_iter = torch.full((y.shape[0],), s.max_iter, dtype=torch.int32, device=y.device)
    active = torch.arange(y.shape[0], device=y.device)
    for k in range(s.max_iter):
        if active.numel() == 0:
            break
        old = x[active]
        new = y[active] - mlp_residual(old, weights, biases, ACTIVATION)
        converged = _rows_converged(new, old, s.atol, s.rtol)
        stops = converged | ~torch.isfinite(new).all(1)
        x[active] = new
        n_iter[active[converged]] = k + 1
        active = active[~stops]
    return x, n_iter


def _float64(inputs):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]


def residual_error(x: torch.Tensor, inputs) -> float:
    """``‖x + g(x) − y‖_∞`` over every row, in float64 (0 for B = 0)."""
    y, weights, biases, _ = _split(_float64(inputs))
    with torch.no_grad():
        r = x.double() + mlp_residual(x.double(), weights, biases, ACTIVATION) - y
    return r.abs().max().item() if r.numel() else 0.0


def residual_bound(x: torch.Tensor, inputs) -> tuple[float, str]:
    """What the rule guarantees for ``‖x + g(x) − y‖_∞`` and how it is made up: a row stops with
    ``x = x_{k+1}``, ``‖x_{k+1} − x_k‖_∞ ≤ τ = atol + rtol·‖x_{k+1}‖_∞``, and its residual is
    ``g(x_{k+1}) − g(x_k)``, at most ``√D·Lip(g)·τ`` in the ∞-norm; plus the rounding of
    ``y − g(x)`` in the dtype (64 ulps of ``max(1, ‖y‖_∞)``)."""
    y, _, _, s = _split(inputs)
    if y.numel() == 0:
        return 0.0, "nothing to solve"
    tau = s.atol + s.rtol * x.abs().max().item()
    rounding = 64 * torch.finfo(y.dtype).eps * max(1.0, y.abs().max().item())
    bound = math.sqrt(y.shape[1]) * s.lip * tau + rounding
    return bound, f"√D·Lip·(atol + rtol·‖x‖∞) + 64 ulps = {bound:.1e}"


def verify(kernel, reference, inputs) -> list[Check]:
    """A kernel's ``x`` meets the bound of :func:`residual_bound` in every row, no row ran to
    ``max_iter``, and its ``n_iter`` is within 2 + 5% of the float64 per-row solve's
    (``reference``: rows near the line of the rule may stop an iteration earlier or later in
    float32)."""
    s = inputs[-1]
    with torch.no_grad():
        x, n_iter = kernel.solve(*inputs)
        _, n64 = reference(*_float64(inputs))
    error = residual_error(x, inputs)
    bound, how = residual_bound(x, inputs)
    stuck = int((n_iter == s.max_iter).sum())
    off = (n_iter.long() - n64.long()).abs()
    allowed = 2 + 0.05 * n64.double()
    worst_off = int(off.max()) if off.numel() else 0
    n_ok = bool((off <= allowed).all())
    return [
        Check("residual ‖x + g(x) − y‖∞", error, how, error <= bound, "" if error <= bound else "above the bound"),
        Check("rows at max_iter", float(stuck), "0", stuck == 0, f"{stuck} rows did not converge" if stuck else ""),
        Check(
            "n_iter vs the float64 per-row solve (max |difference|)",
            float(worst_off),
            "2 + 5% of the float64 count",
            n_ok,
            "" if n_ok else f"a row is {worst_off} iterations off",
        ),
    ]


def _flops_per_row_iteration(inputs) -> int:
    """The multiply-adds of one ``g`` per row, ×2: ``2·Σ_k in_k·out_k``."""
    _, weights, _, _ = _split(inputs)
    return 2 * sum(w.shape[0] * w.shape[1] for w in weights)


def mm_gflops(device: torch.device, rounds: int = 5, min_round_s: float = 0.05) -> float:
    """``torch.mm``'s GFLOP/s on a :data:`MM_SHAPE` float32 product: the median of ``rounds``
    turns of at least ``min_round_s`` each."""
    m, k, n = MM_SHAPE
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)

    def turn(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / calls

    turn(1)
    calls = max(1, int(min_round_s / max(turn(1), 1e-7)))
    return 2 * m * k * n / statistics.median(turn(calls) for _ in range(rounds)) / 1e9


def peak_bytes(thunk, device: torch.device) -> int:
    """The peak of memory allocated by torch while ``thunk()`` runs, above what was allocated
    before (module docstring: ``max_memory_allocated`` on CUDA, torch.profiler's record of
    every allocation and free of the CPU allocator on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        thunk()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        thunk()
    changes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(changes):
        held += size
        peak = max(peak, held)
    return peak


def stats(case: Case, mode: str, fns: dict, inputs: list, seconds: dict) -> dict:
    """provider -> what it reports (module docstring). ``forward``: iterations, final error and,
    for the kernels, the rate; ``forward+backward``: peak memory, and its ratio to native's."""
    device = inputs[0].device
    if mode != "forward":
        peaks = {name: peak_bytes(make_thunk(fn, inputs, mode), device) for name, fn in fns.items()}
        native = peaks.get("native")
        return {
            name: {"peak MB": peak / 2**20}
            | ({"peak / native's": peak / native} if native and name != "native" else {})
            for name, peak in peaks.items()
        }
    reported = {}
    mm = mm_gflops(device) if getattr(case, "versus_mm", False) else None
    for name, fn in fns.items():
        with torch.no_grad():
            x, n = fn.solve(*inputs)
        if isinstance(n, int):
            values = {"loop count": n}
        else:
            values = {"n_iter mean": n.double().mean().item(), "n_iter max": int(n.max())}
        values["max error"] = residual_error(x, inputs)
        if not isinstance(n, int):
            rate = _flops_per_row_iteration(inputs) * int(n.sum()) / seconds[name] / 1e9
            values["GFLOP/s (active rows)"] = rate
            if mm is not None:
                values |= {"torch.mm GFLOP/s": mm, "of torch.mm": rate / mm}
        reported[name] = values
    return reported


def _layers(dims, c: float, gen: torch.Generator):
    """Gaussian weights of shape ``(out, in)`` for consecutive ``dims``, each scaled to spectral
    norm ``c`` (in float64), and biases ``0.1·N(0, 1)``."""
    weights, biases = [], []
    for n_in, n_out in itertools.pairwise(dims):
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        weights.append(w * (c / torch.linalg.matrix_norm(w, 2)))
        biases.append(0.1 * torch.randn(n_out, generator=gen, dtype=torch.float64))
    return weights, biases


#: The stiff branch (:func:`stiff_branch`): its widths, the layers' spectral norm, the threshold of
#: the slow rows and the weight of the Gaussian part of every layer.
STIFF_DIMS, STIFF_C, STIFF_THRESHOLD, STIFF_NOISE = (16, 64, 64, 16), 0.99, 0.5, 0.1


def stiff_branch(gen: torch.Generator):
    r"""Weights on which some rows need hundreds of iterations and others a handful.

    One chain carries the first input coordinate ``s = x[0]`` to the first output: input 0 →
    hidden unit 0 of layer 1 (bias ``−c·t``, ``t`` = :data:`STIFF_THRESHOLD` = 0.5) → hidden unit 0
    of layer 2 → output 0, with link weights 1, 1 and −1, plus :data:`STIFF_NOISE` = 0.1 times a
    Gaussian matrix of norm 1 on every layer, every layer then scaled to spectral norm ``c = 0.99``
    (:data:`STIFF_C`; the other biases ``0.1·N(0, 1)``, none on the chain's later links). Where
    ``s > t`` both pre-activations of the chain are positive, elu is the identity on them and the
    branch is nearly linear, with gain about ``−c³ ≈ −0.96`` along ``x[0]``: the error shrinks by
    that factor per iteration, 100–260 of them to the rule (a third of the rows with
    ``x₀ ~ N(0, I)``). Where ``s < t − 0.5`` elu is saturated enough (``a'(h) = e^h``) that the
    gain is at most about 0.4 and a row stops in under 20 iterations (more than half of the rows); the rows
    between are in between. The sign matters in float32: with gain ``+c³`` the error alternates in
    sign and the rounding of ``y − g(x)`` is amplified about ``√((1 + c³)/(1 − c³)) ≈ 7×`` in the step,
    over the rule's floor at ``rtol = 1e-6``: rows would never stop (docs/iresnet.md, the rounding floor)."""
    dims, c = STIFF_DIMS, STIFF_C
    weights, biases = [], []
    for k, (n_in, n_out) in enumerate(itertools.pairwise(dims)):
        noise = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        w = STIFF_NOISE * noise / torch.linalg.matrix_norm(noise, 2)
        w[0, 0] += -1.0 if k == len(dims) - 2 else 1.0
        weights.append(w * (c / torch.linalg.matrix_norm(w, 2)))
        b = 0.1 * torch.randn(n_out, generator=gen, dtype=torch.float64)
        b[0] = -c * STIFF_THRESHOLD if k == 0 else 0.0
        biases.append(b)
    return weights, biases


@dataclass
class SolveCase(Case):
    """A case of this family: ``versus_mm`` reports the native rate as a fraction of torch.mm's."""

    versus_mm: bool = False


def _inputs(B: int, dims, c: float, *, stiff: bool = False, max_iter: int = 100, seed: int = 0):
    """``[y, W_1 … W_L, b_1 … b_L, Settings]`` in float32 for the module docstring's cases."""

    def make(device):
        gen = torch.Generator().manual_seed(seed)
        weights, biases = stiff_branch(gen) if stiff else _layers(dims, c, gen)
        x0 = torch.randn(B, weights[0].shape[1], generator=gen, dtype=torch.float64)
        y = x0 + mlp_residual(x0, weights, biases, ACTIVATION)
        lip = math.prod(torch.linalg.matrix_norm(w, 2).item() for w in weights)
        as32 = [t.to(device=device, dtype=torch.float32) for t in (y, *weights, *biases)]
        return [*as32, Settings(max_iter=max_iter, lip=lip)]

    return make


BOTH = ("forward", "forward+backward")
TOY, MID = (2, 64, 64, 2), (64, 256, 256, 64)
STIFF_MAX_ITER = 500  # the slow rows need up to about 260 iterations (float64: 262)


def _cases(B_large: int = 4096, B_small: int = 64) -> list[SolveCase]:
    stiff = "-".join(map(str, STIFF_DIMS))
    return [
        SolveCase(f"toy B={B_large} 2-64-64-2 c=0.9", _inputs(B_large, TOY, 0.9), BOTH, quick=True),
        SolveCase(f"toy B={B_small} 2-64-64-2 c=0.9", _inputs(B_small, TOY, 0.9), BOTH),
        SolveCase(f"mid B={B_large} 64-256-256-64 c=0.9", _inputs(B_large, MID, 0.9), BOTH, versus_mm=True),
        SolveCase(f"mid B={B_large} 64-256-256-64 c=0.97", _inputs(B_large, MID, 0.97), ("forward",), versus_mm=True),
        SolveCase(
            f"stiff B={B_large} {stiff} c=0.99",
            _inputs(B_large, STIFF_DIMS, STIFF_C, stiff=True, max_iter=STIFF_MAX_ITER),
            BOTH,  # autograd through ~260 unrolled iterations: about 1.3 GB at B = 4096
        ),
    ]


BENCH = OpBench(
    name="iresnet_inverse",
    reference=per_row_solve,
    native=Solver(_native),
    triton=Solver(_triton) if "iresnet_inverse_triton" in REGISTERED else None,
    ops=("iresnet_inverse", "iresnet_inverse_backward", "iresnet_inverse_triton"),
    cases=_cases(),
    floor=None,
    verify=verify,
    baselines=baselines,
    stats=stats,
)


def smoke_bench() -> OpBench:
    """:data:`BENCH` with every case at B = 64 and ``batch-wide-compiled`` in the first only: CI's
    smoke run (``pytest bench --benchmark-disable``), a few seconds, not a measurement."""
    cases = list({c.label: c for c in _cases(B_large=64)}.values())  # the two toy cases are one here
    return replace(BENCH, cases=[replace(c, compiled=i == 0) for i, c in enumerate(cases)])
