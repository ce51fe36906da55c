"""Runs the benchmark cases: checks every kernel against its reference, times the providers of a
case round-robin in one process, prints a table of medians and speedups, writes JSON and a PNG.

Timing: the providers of one case and mode run in turns (A B C A B C …), each turn long enough
to time reliably, so that a machine whose speed drifts (this host's memory bandwidth flips
between two levels every few minutes) slows every provider of a round alike. A ratio of two
providers is the median over rounds of that round's ratio, with its range. CUDA turns are timed
with CUDA events."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from kexue_fast import benchmarks
from kexue_fast.benchmarks import OpBench, make_thunk, providers_for

HEAP_REUSE = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"
QUICK_NOTE = (
    "--quick: the headline case of each op, 5 short rounds of eager (the i-ResNet inversion: batch-wide), native, "
    "Triton and the memory floor only; no torch.compile'd references (compiling them takes minutes on a fresh "
    "machine) and no peer libraries: run without --quick for those"
)
FULL_NOTE = (
    "the torch.compile'd references compile first (minutes on a fresh machine, seconds once "
    "the inductor cache is warm); --quick leaves them out"
)


@dataclass
class Timing:
    """The per-call times of one provider in one case and mode, one per round."""

    op: str
    case: str
    mode: str
    provider: str
    samples_ms: list[float]
    calls_per_round: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def spread(self) -> float:
        """(max − min) / median over the rounds."""
        return (max(self.samples_ms) - min(self.samples_ms)) / self.median_ms if self.median_ms else 0.0


@dataclass
class Stat:
    """What one provider reported besides its time in one case and mode (``OpBench.stats``)."""

    op: str
    case: str
    mode: str
    provider: str
    values: dict[str, float]


@dataclass
class Ratio:
    """time(slow) / time(fast) in each round: their median and range (the speedup of fast)."""

    op: str
    case: str
    mode: str
    slow: str
    fast: str
    median: float
    low: float
    high: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _turn(thunk, calls: int, device: torch.device) -> float:
    """Seconds per call over ``calls`` calls of ``thunk`` (CUDA: measured by events)."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            thunk()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    start = time.perf_counter()
    for _ in range(calls):
        thunk()
    return (time.perf_counter() - start) / calls


def time_round_robin(
    thunks: dict, device: torch.device, *, rounds: int, min_round_s: float
) -> dict[str, tuple[list[float], int]]:
    """name -> (seconds per call in each of ``rounds`` rounds, calls per turn). Every thunk is
    warmed up and sized (calls per turn of at least ``min_round_s``), then each round runs one
    turn of every thunk in order."""
    calls = {}
    for name, thunk in thunks.items():
        thunk()  # warm-up (and, for torch.compile, the compilation)
        calls[name] = max(1, int(min_round_s / max(_turn(thunk, 1, device), 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in thunks}
    for _ in range(rounds):
        for name, thunk in thunks.items():
            samples[name].append(_turn(thunk, calls[name], device))
    return {name: (samples[name], calls[name]) for name in thunks}


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from kexue_fast import _C, __version__

    return {
        "kexue_fast": __version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "torch_threads": torch.get_num_threads(),
        "native_threads": _C.max_threads(),
        "cpu_isa": _C.cpu_isa(),
        "native_backends": _C.backends(),
        "heap_reuse": os.environ.get("GLIBC_TUNABLES", "") == HEAP_REUSE,
        "python": sys.version.split()[0],
    }


def ratio_pairs(providers) -> list[tuple[str, str]]:
    """(slow, fast) pairs reported: every other provider over native (triton: over compiled and
    eager), native over the memory floor, and each module API (``…()``) over the bare launch of
    its table."""
    pairs = [(p, "native") for p in providers if p not in ("native", "triton", "floor")]
    if benchmarks.BARE in providers:
        pairs += [(p, benchmarks.BARE) for p in providers if p.endswith("()")]
    if "triton" in providers:
        pairs += [(p, "triton") for p in ("eager", "compiled") if p in providers]
    if "floor" in providers:
        pairs.append(("native", "floor"))
    return pairs


def ratios(op: str, case: str, mode: str, samples: dict[str, list[float]], pairs=None) -> list[Ratio]:
    """The :class:`Ratio` of every pair of :func:`ratio_pairs` (or of ``pairs``, those whose two
    providers are timed), from the rounds' own times."""
    found = []
    pairs = ratio_pairs(list(samples)) if pairs is None else [p for p in pairs if set(p) <= samples.keys()]
    for slow, fast in pairs:
        per_round = [a / b for a, b in zip(samples[slow], samples[fast])]
        found.append(Ratio(op, case, mode, slow, fast, statistics.median(per_round), min(per_round), max(per_round)))
    return found


def run(benches: list[OpBench], device: torch.device, *, quick: bool, progress=None) -> dict:
    """Verifies and times every case; returns {"machine", "quick", "verified", "timings", "ratios",
    "stats"} (``stats``: a list of :class:`Stat`, from the ops that report any).
    ``verified``: "<op> <case>" -> kernel -> list of :class:`~kexue_fast.benchmarks.Check`."""
    rounds, min_round_s = (5, 0.05) if quick else (9, 0.25)
    jobs = [(b, c) for b in benches for c in b.cases if c.quick or not quick]
    total = sum(len(c.modes) for _, c in jobs)
    timings, found, verified, stats, done = [], [], {}, [], 0
    for bench, case in jobs:
        inputs = case.make_inputs(device)
        kernels = benchmarks.kernels(bench, device)
        verified[f"{bench.name} {case.label}"] = {
            name: benchmarks.verify(bench, fn, inputs) for name, fn in kernels.items()
        }
        for mode in case.modes:
            torch._dynamo.reset()
            fns = providers_for(bench, device, mode, inputs, quick=quick, case=case)
            if progress:
                progress(done, total, f"{bench.name} {case.label} {mode}: {', '.join(fns)}")
            thunks = {name: make_thunk(fn, inputs, mode) for name, fn in fns.items()}
            measured = time_round_robin(thunks, device, rounds=rounds, min_round_s=min_round_s)
            samples = {name: [s * 1e3 for s in per_call] for name, (per_call, _) in measured.items()}
            timings += [
                Timing(bench.name, case.label, mode, name, samples[name], calls)
                for name, (_, calls) in measured.items()
            ]
            found += ratios(bench.name, case.label, mode, samples, bench.pairs)
            if bench.stats is not None:
                seconds = {name: statistics.median(per_call) for name, (per_call, _) in measured.items()}
                reported = bench.stats(case, mode, fns, inputs, seconds)
                stats += [Stat(bench.name, case.label, mode, name, values) for name, values in reported.items()]
            done += 1
    if progress:
        progress(done, total, "done")
    return {
        "machine": machine_info(device),
        "quick": quick,
        "verified": verified,
        "timings": timings,
        "ratios": found,
        "stats": stats,
    }


def _columns(rows: list[list[str]]) -> list[str]:
    """Lines of a table: the first column left-aligned, the others right-aligned, two spaces
    at least between any two cells."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]


def table(result: dict) -> str:
    """Per op: median ms of each provider [spread over rounds] and the ratios (median over rounds
    and min–max)."""
    m = result["machine"]
    lines = [
        (
            f"kexue_fast {m['kexue_fast']} on {m['device']} ({m['cores']} cores; torch {m['torch']}, "
            f"triton {m['triton']}, threads torch={m['torch_threads']} native={m['native_threads']}, "
            f"native CPU kernels {m.get('cpu_isa', '?')}, "
            f"heap reuse {'on' if m['heap_reuse'] else 'OFF'})"
        ),
        "times: median ms per call over rounds [spread = (max − min)/median]; providers run round-robin",
        "a/b: time of a / time of b in the same round (the speedup of b over a), median (min–max over rounds)",
        (
            f"modes: forward, backward, forward+backward (ops with autograd); {benchmarks.CALL}: one call (ops "
            f"without); {benchmarks.STEP}: one training step, its backward included"
        ),
        "",
    ]
    timings: dict[str, dict[tuple, dict[str, Timing]]] = {}
    for t in result["timings"]:
        timings.setdefault(t.op, {}).setdefault((t.case, t.mode), {})[t.provider] = t
    by_pair: dict[tuple, Ratio] = {(r.op, r.case, r.mode, r.slow, r.fast): r for r in result["ratios"]}
    for op, rows in timings.items():
        providers = list(dict.fromkeys(p for by in rows.values() for p in by))
        pairs = list(dict.fromkeys((r.slow, r.fast) for r in result["ratios"] if r.op == op))
        cells = [[f"{op}: case, mode", *providers, *(f"{a}/{b}" for a, b in pairs)]]
        for (case, mode), by in rows.items():
            cells.append(
                [f"{case}, {mode}"]
                + [f"{by[p].median_ms:.3f} [{by[p].spread:.0%}]" if p in by else "" for p in providers]
                + [_ratio(by_pair.get((op, case, mode, a, b))) for a, b in pairs]
            )
        lines += _columns(cells) + [""]
        reported = [s for s in result.get("stats", []) if s.op == op]
        if reported:
            lines.append(f"{op}: what each provider reported (measured once, outside the timing)")
            lines += [
                f"  {s.case}, {s.mode}, {s.provider}: " + ", ".join(f"{k} {v:.3g}" for k, v in s.values.items())
                for s in reported
            ]
            lines.append("")
    return "\n".join(lines)


def _ratio(r: Ratio | None) -> str:
    return f"{r.median:.2f}x ({r.low:.2f}–{r.high:.2f})" if r is not None else ""


def verification(result: dict) -> tuple[str, bool]:
    """The verification block (each checked quantity: error, tolerance, pass/FAIL) and whether
    every check passed."""
    lines, ok = ["verified against the float64 reference (max abs error, tolerance, verdict):"], True
    for case, by_kernel in result["verified"].items():
        for kernel, checks in by_kernel.items():
            lines.append(f"  {case}, {kernel}:")
            cells = []
            for c in checks:
                ok &= c.passed
                cells.append(
                    [
                        f"    {c.quantity}",
                        f"{c.error:.1e}",
                        f"tolerance {c.tolerance}",
                        "pass" if c.passed else f"FAIL: {c.message}",
                    ]
                )
            lines += _columns(cells)
    return "\n".join(lines), ok


def to_json(result: dict) -> str:
    return json.dumps(
        {
            "machine": result["machine"],
            "quick": result["quick"],
            "verified": {
                case: {k: [asdict(c) for c in checks] for k, checks in by.items()}
                for case, by in result["verified"].items()
            },
            "timings": [{**asdict(t), "median_ms": t.median_ms} for t in result["timings"]],
            "ratios": [asdict(r) for r in result["ratios"]],
            "stats": [asdict(s) for s in result.get("stats", [])],
        },
        indent=2,
    )


def plot(result: dict, path: str) -> None:
    """Bar chart of each provider's speedup over eager (median over rounds, whiskers min–max),
    per case and mode; for an op with its own baselines (``OpBench.baselines``), over the first
    of them (the i-ResNet inversion: ``batch-wide``, residual-flows' loop)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, dict[str, list[float]]] = {}
    for t in result["timings"]:
        rows.setdefault(f"{t.op}\n{t.case}\n{t.mode}", {})[t.provider] = t.samples_ms
    base = {row: "eager" if "eager" in r else next(iter(r)) for row, r in rows.items()}
    shown = ("compiled", "native", "triton", "floor")
    providers = list(
        dict.fromkeys(
            p for row, r in rows.items() for p in r if p != base[row] and (p in shown or base[row] != "eager")
        )
    )
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(rows)), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs, ys, lows, highs = [], [], [], []
        for j, (row, r) in enumerate(rows.items()):
            if provider in r and provider != base[row]:
                per_round = [e / p for e, p in zip(r[base[row]], r[provider])]
                median = statistics.median(per_round)
                xs.append(j + i * width)
                ys.append(median)
                lows.append(median - min(per_round))
                highs.append(max(per_round) - median)
        bars = ax.bar(xs, ys, width, yerr=[lows, highs], capsize=2, label=provider)
        ax.bar_label(bars, fmt="%.1fx", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(rows))], list(rows), fontsize=7)
    ax.set_ylabel("speedup over eager PyTorch (median over rounds, min–max)")
    if any(b != "eager" for b in base.values()):
        ax.set_ylabel("speedup over eager PyTorch, or over an op's first baseline\n(median over rounds, min–max)")
    ax.set_title(f"kexue_fast on {result['machine']['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
