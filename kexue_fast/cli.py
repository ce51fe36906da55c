"""The ``kexue-fast`` command line: ``info``, ``bench`` and ``demo`` (see docs/cli.md)."""

from __future__ import annotations

import argparse
import os
import sys

import kexue_fast
from kexue_fast.demos import DEMOS  # only names: a demo's module loads when it runs


def _info(args) -> int:
    import torch

    from kexue_fast import _C, _library
    from kexue_fast.benchmarks.runner import machine_info

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = machine_info(device)
    usable = ["cpu"] + (["cuda"] if "cuda" in _C.backends() and torch.cuda.is_available() else [])
    triton_on = (
        []
        if not _library.TRITON_AVAILABLE
        else (["cuda"] if torch.cuda.is_available() else [])
        + (["cpu (interpreter)"] if _library.TRITON_INTERPRET else [])
    )
    print(f"kexue_fast {kexue_fast.__version__}")
    print(f"  native kernels built: {', '.join(_C.backends())}; usable here: {', '.join(usable)}")
    print(
        f"  CPU kernels: {_C.cpu_isa()} (this CPU supports {', '.join(_C.cpu_isas())}; "
        "KEXUE_CPU_ISA=avx512bf16|avx512|avx2|baseline forces one)"
    )
    print(f"  triton: {m['triton'] or 'not installed'}; Triton kernels usable on: {', '.join(triton_on) or 'nothing'}")
    print(f"  torch {m['torch']}, python {m['python']}")
    print(
        f"  device: {m['device']}; {m['cores']} cores, threads torch={m['torch_threads']} native={m['native_threads']}"
    )
    print(f"  ops: {', '.join(sorted(_library.REGISTERED))}")
    print(f"  composite ops (made of the ops above): {', '.join(sorted(_library.COMPOSITES))}")
    return 0


def _output_problem(path: str, option: str, *, figure: bool = False) -> str | None:
    """Why ``path`` (the value of ``option``) cannot be written, or None. ``figure``: it is
    written by matplotlib, which must be importable and know the file type."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{option} {path}: is a directory"
    if not os.path.isdir(parent):
        return f"{option} {path}: directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{option} {path}: not writable (permission denied)"
    if figure:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            return f"{option} needs matplotlib, which is not installed (pip install matplotlib)"
        kinds = FigureCanvasBase.get_supported_filetypes()
        if os.path.splitext(path)[1].lower().lstrip(".") not in kinds:
            known = ", ".join("." + k for k in sorted(kinds))
            return f"{option} {path}: the name must end in a figure type matplotlib writes ({known})"
    return None


def _usage_error(command: str, message: str) -> int:
    print(f"kexue-fast {command}: {message}", file=sys.stderr)
    return 2


def _bench(args) -> int:
    import torch

    from kexue_fast import benchmarks
    from kexue_fast.benchmarks import runner

    # Every argument is checked before anything runs (and before the restart below).
    outputs = [(args.json, "--json", False), (args.plot, "--plot", True)]
    for problem in (
        _output_problem(path, option, figure=figure) for path, option, figure in outputs if path is not None
    ):
        if problem:
            return _usage_error("bench", problem)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return _usage_error("bench", "--device cuda, but torch sees no CUDA device here")
    try:
        benches = benchmarks.load(args.ops)
    except ValueError as error:
        return _usage_error("bench", f"--ops: {error}")

    if args.heap_reuse and os.environ.get("GLIBC_TUNABLES") != runner.HEAP_REUSE:
        # Large fresh tensors otherwise pay their page faults on every call (docs/cli.md): restart
        # this command with glibc keeping its heap, so every provider runs under the same rule.
        # The same command line again (sys.orig_argv), so the package is found the same way.
        sys.stdout.flush()
        os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=runner.HEAP_REUSE))

    from tqdm import tqdm

    print(f"kexue-fast bench: {runner.QUICK_NOTE if args.quick else runner.FULL_NOTE}", file=sys.stderr)
    bar = tqdm(total=None, unit="case", file=sys.stderr, dynamic_ncols=True)

    def progress(done, total, what):
        bar.total = total
        bar.n = done
        bar.set_description(what)
        bar.refresh()

    result = runner.run(benches, device, quick=args.quick, progress=progress)
    bar.close()
    print(runner.table(result))
    report, all_passed = runner.verification(result)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            f.write(runner.to_json(result))
        print(f"wrote {args.json}")
    if args.plot:
        runner.plot(result, args.plot)
        print(f"wrote {args.plot}")
    if not all_passed:
        print("kexue-fast bench: a kernel FAILED its verification (see above)", file=sys.stderr)
        return 1
    return 0


def _demo(args) -> int:
    from kexue_fast import demos

    demo = demos.load(args.name)
    out = args.out or demo.DEFAULT_OUT
    problem = _output_problem(out, "--out", figure=True)
    if problem:
        return _usage_error(f"demo {args.name}", problem)
    options = {}
    if args.data is not None:
        known = getattr(demo, "DATA_SETS", ())
        if args.data not in known:
            why = f"must be one of {', '.join(known)}" if known else "this demo has a single data set"
            return _usage_error(f"demo {args.name}", f"--data {args.data}: {why}")
        options["data"] = args.data
    try:
        result = demo.run(steps=args.steps, seed=args.seed, out=out, quick=args.quick, **options)
    except (ValueError, ModuleNotFoundError) as error:  # bad settings; a demo's optional dependency missing
        print(f"kexue-fast {error}", file=sys.stderr)
        return 2
    print(demo.summary(result))
    return 0


def _ops_help() -> str:
    from kexue_fast import benchmarks

    lines = ["op families and the names --ops accepts for each (any one of a line selects the family):"]
    lines += [f"  {module}: {', '.join(names)}" for module, names in benchmarks.names().items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kexue-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kexue-fast {kexue_fast.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,demo}")
    sub.add_parser("info", help="version, built and usable backends, versions, threads").set_defaults(func=_info)
    bench = sub.add_parser(
        "bench",
        help="verify every op against its reference, then time all providers",
        description="Verifies every kernel against its float64 reference, then times the providers of each case "
        "round-robin and prints medians and per-round ratios (docs/cli.md).",
        epilog=_ops_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--ops", nargs="+", metavar="OP", help="only these op families (default: all; names below)")
    bench.add_argument(
        "--quick",
        action="store_true",
        help="the headline case of each op, fewer rounds, no torch.compile (under a minute)",
    )
    bench.add_argument("--json", metavar="F", help="write the results as JSON")
    bench.add_argument("--plot", metavar="F.png", help="write a bar chart of the speedups (needs matplotlib)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument(
        "--no-heap-reuse", dest="heap_reuse", action="store_false", help="keep glibc's default malloc settings"
    )
    bench.set_defaults(func=_bench)
    demo = sub.add_parser(
        "demo",
        help="a small end-to-end training run on the CPU, with a progress bar and a PNG",
        description="; ".join(f"{name}: {text}" for name, (_, text) in DEMOS.items()),
    )
    demo.add_argument("name", choices=sorted(DEMOS), help="which demo")
    demo.add_argument("--steps", type=int, metavar="N", help="training steps (default: the demo's)")
    demo.add_argument("--seed", type=int, default=0, help="seeds everything; same seed, same result (default: 0)")
    demo.add_argument("--out", metavar="F.png", help="where the figure goes (default: <name>_demo.png here)")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (seconds), for tests")
    demo.add_argument(
        "--data", metavar="NAME", help="the data set, for demos with several (iresnet: moons, checkerboard, rings)"
    )
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
