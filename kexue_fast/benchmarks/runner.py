"""Runs the benchmark cases: checks every kernel against its reference, times every provider in
one process, prints a table of medians and speedups, writes JSON and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from kexue_fast import testing
from kexue_fast.benchmarks import OpBench, make_thunk, providers_for

HEAP_REUSE = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"


@dataclass
class Timing:
    op: str
    case: str
    mode: str
    provider: str
    median_ms: float
    min_ms: float
    max_ms: float
    rounds: int
    calls_per_round: int

    @property
    def spread(self) -> float:
        """(max − min) / median over the rounds."""
        return (self.max_ms - self.min_ms) / self.median_ms if self.median_ms else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_thunk(thunk, device, *, rounds: int, min_round_s: float) -> tuple[list[float], int]:
    """Per-call seconds of each of ``rounds`` rounds (each long enough to time reliably)."""
    for _ in range(2):
        thunk()
    _sync(device)
    start = time.perf_counter()
    thunk()
    _sync(device)
    calls = max(1, int(min_round_s / max(time.perf_counter() - start, 1e-7)))
    samples = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            thunk()
        _sync(device)
        samples.append((time.perf_counter() - start) / calls)
    return samples, calls


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
    from kexue_fast import __version__, _C

    return {
        "kexue_fast": __version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "torch_threads": torch.get_num_threads(),
        "native_threads": _C.max_threads(),
        "native_backends": _C.backends(),
        "heap_reuse": os.environ.get("GLIBC_TUNABLES", "") == HEAP_REUSE,
        "python": sys.version.split()[0],
    }


def verify(bench: OpBench, inputs: list, device: torch.device) -> dict[str, dict]:
    """Max errors of each kernel provider against the float64 reference (raises on failure)."""
    kernels = {"native": bench.native}
    if bench.triton is not None and device.type == "cuda":
        kernels["triton"] = bench.triton
    if bench.verify is not None:
        return {name: bench.verify(fn, bench.reference, inputs) for name, fn in kernels.items()}
    names = [f"grad_{n}" for n in bench.input_names] or None
    return {name: testing.check_against_reference(fn, bench.reference, inputs, names=names) for name, fn in kernels.items()}


def run(benches: list[OpBench], device: torch.device, *, quick: bool, progress=None) -> dict:
    """Verifies and times every case; returns {"machine", "verified", "timings"}."""
    rounds, min_round_s = (5, 0.1) if quick else (9, 0.25)
    jobs = [(b, c) for b in benches for c in b.cases if c.quick or not quick]
    total = sum(len(c.modes) for _, c in jobs)
    timings, verified, done = [], {}, 0
    for bench, case in jobs:
        inputs = case.make_inputs(device)
        verified[f"{bench.name} {case.label}"] = verify(bench, inputs, device)
        for mode in case.modes:
            torch._dynamo.reset()
            for provider, fn in providers_for(bench, device, mode, inputs).items():
                if progress:
                    progress(done, total, f"{bench.name} {case.label} {mode}: {provider}")
                samples, calls = time_thunk(make_thunk(fn, inputs, mode), device, rounds=rounds, min_round_s=min_round_s)
                ms = [s * 1e3 for s in samples]
                timings.append(Timing(bench.name, case.label, mode, provider, statistics.median(ms), min(ms), max(ms), rounds, calls))
            done += 1
    if progress:
        progress(done, total, "done")
    return {"machine": machine_info(device), "verified": verified, "timings": timings}


def table(result: dict) -> str:
    """Medians in ms (spread = (max−min)/median over rounds) and speedups of the kernels."""
    m = result["machine"]
    lines = [
        f"kexue_fast {m['kexue_fast']} on {m['device']} ({m['cores']} cores; torch {m['torch']}, "
        f"triton {m['triton']}, threads torch={m['torch_threads']} native={m['native_threads']}, "
        f"heap reuse {'on' if m['heap_reuse'] else 'OFF'})",
        "times: median ms over rounds [spread]; a/b = time of a / time of b (the speedup of b over a)",
        "",
    ]
    by_op: dict[str, dict[tuple, dict[str, Timing]]] = {}
    for t in result["timings"]:
        by_op.setdefault(t.op, {}).setdefault((t.case, t.mode), {})[t.provider] = t
    for op, rows in by_op.items():
        providers = list(dict.fromkeys(p for by in rows.values() for p in by))
        # Speedup of the native kernel over every other provider (triton: over compiled), and
        # the native time in units of the memory floor.
        ratios = [(p, "native") for p in providers if p not in ("native", "triton", "floor")]
        ratios += [("compiled", "triton")] * ("triton" in providers) + [("native", "floor")] * ("floor" in providers)
        names = [f"{a}/{b}" if b != "floor" else "native÷floor" for a, b in ratios]
        lines.append(f"{op + ' / case / mode':<44}" + "".join(f"{p:>18}" for p in providers) + "".join(f"{n:>{max(14, len(n) + 2)}}" for n in names))
        for (case, mode), by in rows.items():
            line = f"{case + ' ' + mode:<44}" + "".join(f"{_cell(by, p):>18}" for p in providers)
            line += "".join(f"{_ratio(by, a, b):>{max(14, len(n) + 2)}}" for (a, b), n in zip(ratios, names))
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def _cell(by: dict[str, Timing], provider: str) -> str:
    return f"{by[provider].median_ms:9.3f} [{by[provider].spread:4.0%}]" if provider in by else ""


def _ratio(by: dict[str, Timing], slow: str, fast: str) -> str:
    return f"{by[slow].median_ms / by[fast].median_ms:.2f}x" if slow in by and fast in by else ""


def to_json(result: dict) -> str:
    return json.dumps(
        {"machine": result["machine"], "verified": result["verified"], "timings": [asdict(t) for t in result["timings"]]},
        indent=2,
    )


def plot(result: dict, path: str) -> None:
    """Bar chart of each provider's speedup over eager, per case and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, dict[str, float]] = {}
    for t in result["timings"]:
        rows.setdefault(f"{t.op}\n{t.case}\n{t.mode}", {})[t.provider] = t.median_ms
    providers = [p for p in ("compiled", "native", "triton", "floor") if any(p in r for r in rows.values())]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(rows)), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs = [j + i * width for j, r in enumerate(rows.values()) if provider in r]
        ys = [r["eager"] / r[provider] for r in rows.values() if provider in r]
        bars = ax.bar(xs, ys, width, label=provider)
        ax.bar_label(bars, fmt="%.1fx", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(rows))], list(rows), fontsize=7)
    ax.set_ylabel("speedup over eager PyTorch")
    ax.set_title(f"kexue_fast on {result['machine']['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
