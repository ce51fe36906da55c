"""The ``kexue-fast`` command line: ``info``, ``bench`` and ``demo``."""

from __future__ import annotations

import argparse
import os
import sys

from kexue_fast.demos import DEMOS  # only names: a demo's module loads when it runs


def _info(args) -> int:
    import torch

    import kexue_fast
    from kexue_fast import _C, _library
    from kexue_fast.benchmarks.runner import machine_info

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = machine_info(device)
    usable = ["cpu"] + (["cuda"] if "cuda" in _C.backends() and torch.cuda.is_available() else [])
    triton_on = [] if not _library.TRITON_AVAILABLE else (["cuda"] if torch.cuda.is_available() else []) + (["cpu (interpreter)"] if _library.TRITON_INTERPRET else [])
    print(f"kexue_fast {kexue_fast.__version__}")
    print(f"  native kernels built: {', '.join(_C.backends())}; usable here: {', '.join(usable)}")
    print(f"  triton: {m['triton'] or 'not installed'}; Triton kernels usable on: {', '.join(triton_on) or 'nothing here'}")
    print(f"  torch {m['torch']}, python {m['python']}")
    print(f"  device: {m['device']}; {m['cores']} cores, threads torch={m['torch_threads']} native={m['native_threads']}")
    print(f"  ops: {', '.join(sorted(_library.REGISTERED))}")
    return 0


def _bench(args) -> int:
    from kexue_fast.benchmarks.runner import HEAP_REUSE

    if args.heap_reuse and os.environ.get("GLIBC_TUNABLES") != HEAP_REUSE:
        # Large fresh tensors otherwise pay their page faults on every call (DESIGN.md): restart
        # this command with glibc keeping its heap, so every provider runs under the same rule.
        # The same command line again (sys.orig_argv), so the package is found the same way.
        os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=HEAP_REUSE))

    import torch
    from tqdm import tqdm

    from kexue_fast import benchmarks
    from kexue_fast.benchmarks import runner

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kexue-fast bench: --device cuda, but torch sees no CUDA device here", file=sys.stderr)
        return 2
    try:
        benches = benchmarks.load(args.ops)
    except ValueError as error:
        print(f"kexue-fast bench: {error}", file=sys.stderr)
        return 2
    bar = tqdm(total=None, unit="case", file=sys.stderr, dynamic_ncols=True)

    def progress(done, total, what):
        bar.total = total
        bar.n = done
        bar.set_description(what)
        bar.refresh()

    result = runner.run(benches, device, quick=args.quick, progress=progress)
    bar.close()
    print(runner.table(result))
    print("\nverified against the float64 reference (max abs error): ")
    for case, errors in result["verified"].items():
        print(f"  {case}: " + "; ".join(f"{k} " + ", ".join(f"{n}={e:.1e}" for n, e in v.items()) for k, v in errors.items()))
    if args.json:
        with open(args.json, "w") as f:
            f.write(runner.to_json(result))
        print(f"wrote {args.json}")
    if args.plot:
        runner.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _demo(args) -> int:
    from kexue_fast import demos

    demo = demos.load(args.name)
    try:
        result = demo.run(steps=args.steps, seed=args.seed, out=args.out or demo.DEFAULT_OUT, quick=args.quick)
    except ValueError as error:
        print(f"kexue-fast {error}", file=sys.stderr)
        return 2
    print(demo.summary(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kexue-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, built and usable backends, versions, threads").set_defaults(func=_info)
    bench = sub.add_parser("bench", help="verify every op against its reference, then time all providers")
    bench.add_argument("--ops", nargs="+", metavar="OP", help="only these ops (default: all)")
    bench.add_argument("--quick", action="store_true", help="only the headline cases, fewer rounds")
    bench.add_argument("--json", metavar="F", help="write the results as JSON")
    bench.add_argument("--plot", metavar="F.png", help="write a bar chart of the speedups")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument("--no-heap-reuse", dest="heap_reuse", action="store_false", help="keep glibc's default malloc settings")
    bench.set_defaults(func=_bench)
    demo = sub.add_parser("demo", help="a small end-to-end training run on the CPU, with a progress bar and a PNG",
                          description="; ".join(f"{name}: {text}" for name, (_, text) in DEMOS.items()))
    demo.add_argument("name", choices=sorted(DEMOS), help="which demo")
    demo.add_argument("--steps", type=int, metavar="N", help="training steps (default: the demo's)")
    demo.add_argument("--seed", type=int, default=0, help="seeds everything; same seed, same result (default: 0)")
    demo.add_argument("--out", metavar="F.png", help="where the figure goes (default: <name>_demo.png here)")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (seconds), for tests")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
