"""The ``kexue-fast`` command line and the benchmark runner behind ``bench`` (the full bench runs
in CI through ``pytest bench``)."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import kexue_fast
from kexue_fast import _C, benchmarks, cli
from kexue_fast.benchmarks import Case, OpBench, runner
from kexue_fast.benchmarks import philox_normal as philox_bench

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, env=None):
    # Run outside the source tree: with `-m`, the current directory comes first on sys.path,
    # and the repository's kexue_fast/ has no built _C (the installed package has).
    return subprocess.run(
        [sys.executable, "-m", "kexue_fast.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd or tempfile.gettempdir(),
        env=env,
        check=False,
    )


def test_info_reports_backends_and_ops():
    result = run("info")
    assert result.returncode == 0, result.stderr
    assert "native kernels built: cpu" in result.stdout
    assert "cond_layer_norm" in result.stdout


def test_info_reports_the_cpu_isa_level_in_use_and_a_forced_one():
    assert f"CPU kernels: {_C.cpu_isa()} (this CPU supports {', '.join(_C.cpu_isas())};" in run("info").stdout
    forced = run("info", env=dict(os.environ, KEXUE_CPU_ISA="baseline"))
    assert forced.returncode == 0, forced.stderr
    assert "CPU kernels: baseline (" in forced.stdout


def test_version_and_bare_command_prints_help():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"kexue-fast {kexue_fast.__version__}", result.stderr
    result = run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kexue-fast") and all(c in result.stdout for c in ("info", "bench", "demo"))


def info_ops() -> list[str]:
    (line,) = [line for line in run("info").stdout.splitlines() if line.strip().startswith("ops:")]
    return line.split(":", 1)[1].strip().split(", ")


def test_bench_ops_accepts_every_name_info_and_the_table_print(capsys):
    printed = info_ops()
    assert len(printed) >= 13  # the registered ops, backward and Triton variants included
    table_names = [b.name for b in benchmarks.load()]  # what the table and the JSON call them
    for name in printed + table_names + benchmarks.OP_MODULES + ["kexue::cond_layer_norm"]:
        (bench,) = benchmarks.load([name])
        assert name.removeprefix("kexue::") in (*bench.ops, bench.name, bench.name.removesuffix("_power_iter"))
    assert [b.name for b in benchmarks.load(["ema_update_", "ema_update"])] == ["ema_update"]  # each family once
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    helptext = capsys.readouterr().out
    assert all(name in helptext for name in printed + benchmarks.OP_MODULES)


def test_bench_rejects_unknown_ops():
    result = run("bench", "--ops", "no_such_op", "--no-heap-reuse")
    assert (
        result.returncode == 2 and "unknown ops ['no_such_op']" in result.stderr and "spectral_sigma" in result.stderr
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_cuda_says_so():
    result = run("bench", "--device", "cuda", "--no-heap-reuse")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


BAD_OUTPUTS = {
    "json in a missing directory": (["bench", "--json", "{tmp}/missing/b.json"], "--json", "does not exist"),
    "plot in a missing directory": (["bench", "--plot", "{tmp}/missing/b.png"], "--plot", "does not exist"),
    "plot is a directory": (["bench", "--plot", "{tmp}"], "--plot", "is a directory"),
    "plot of an unknown file type": (["bench", "--plot", "{tmp}/b.pnx"], "--plot", "figure type"),
    "demo figure in a missing directory": (
        ["demo", "ebm", "--quick", "--out", "{tmp}/missing/e.png"],
        "--out",
        "does not exist",
    ),
}


@pytest.mark.parametrize("args,option,why", BAD_OUTPUTS.values(), ids=BAD_OUTPUTS)
def test_output_paths_are_checked_before_anything_runs(tmp_path, args, option, why):
    extra = ["--quick", "--no-heap-reuse", "--ops", "philox_normal"] if args[0] == "bench" else []
    result = run(*[a.format(tmp=tmp_path) for a in args], *extra)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()  # the error alone: no note, no progress bar
    assert option in line and why in line
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_plot_and_demo_say_when_matplotlib_is_missing(tmp_path):
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    for args in (["bench", "--quick", "--no-heap-reuse", "--plot", "b.png"], ["demo", "ebm", "--quick"]):
        result = run(*args, cwd=tmp_path, env=env)
        assert result.returncode == 2 and "needs matplotlib" in result.stderr and result.stdout == "", result.stderr


def test_modes_of_ops_without_autograd_are_not_forward():
    modes = {b.name: {m for c in b.cases for m in c.modes} for b in benchmarks.load()}
    assert modes == {
        "cond_layer_norm": {"forward", "backward", "forward+backward"},
        "ema_update": {"call"},
        "spectral_norm_power_iter": {"call"},
        "langevin_step": {"call"},
        "philox_normal": {"call"},
        "iresnet_inverse": {"forward", "forward+backward"},
        "iresnet_logdet": {"step"},
        "modulated_batch_norm": {"forward", "forward+backward"},
        "cascading_rejection": {"forward", "forward+backward"},
        "self_orthogonality": {"forward", "forward+backward"},
        "orthogonal_regularizer": {"forward", "forward+backward"},
        "gan_step": {"step"},
    }


def test_providers_are_timed_round_robin():
    calls = []
    thunks = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timed = runner.time_round_robin(thunks, torch.device("cpu"), rounds=4, min_round_s=1e-4)
    assert {name: len(samples) for name, (samples, _) in timed.items()} == {"a": 4, "b": 4, "c": 4}
    turns = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert turns == ["a", "b", "c"] * 5  # warm-up and sizing of each, then four rounds A B C


def test_ratios_are_medians_of_per_round_ratios_with_their_range():
    # Rounds at 2, 4 and 9 ms for eager, 1, 1 and 3 ms for native: per-round ratios 2, 4, 3.
    (ratio,) = runner.ratios("op", "case", "call", {"eager": [2.0, 4.0, 9.0], "native": [1.0, 1.0, 3.0]})
    assert (ratio.slow, ratio.fast, ratio.median, ratio.low, ratio.high) == ("eager", "native", 3.0, 2.0, 4.0)


def tiny_bench(native=lambda x: x + x, extra_name="a-very-long-provider-name") -> OpBench:
    return OpBench(
        name="tiny_op_with_a_long_name",
        reference=lambda x: 2 * x,
        native=native,
        triton=None,
        cases=[
            Case("a case with a long label 4x4 float32", lambda device: [torch.randn(4, 4)], ("forward",), quick=True)
        ],
        extra={extra_name: lambda inputs: True if inputs is None else (lambda x: x * 2.0)},
    )


def test_table_headers_and_cells_do_not_run_together(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # the column, not the compilation, is under test
    result = runner.run([tiny_bench()], torch.device("cpu"), quick=False)
    lines = runner.table(result).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("tiny_op_with_a_long_name"))
    columns = re.split(r"\s{2,}", lines[header])
    assert columns == [
        "tiny_op_with_a_long_name: case, mode",
        "eager",
        "compiled",
        "native",
        "floor",
        "a-very-long-provider-name",
        "eager/native",
        "compiled/native",
        "a-very-long-provider-name/native",
        "native/floor",
    ]
    assert len(re.split(r"\s{2,}", lines[header + 1])) == len(columns)  # a cell per column, two spaces apart


def test_verification_prints_each_tolerance_and_verdict_and_fails_a_wrong_kernel():
    good = runner.run([tiny_bench()], torch.device("cpu"), quick=True)
    text, ok = runner.verification(good)
    assert ok and re.search(r"output\s+\S+\s+tolerance atol .+ rtol .+\s+pass$", text, re.MULTILINE), text
    bad = runner.run([tiny_bench(native=lambda x: x + x + 1e-3)], torch.device("cpu"), quick=True)
    text, ok = runner.verification(bad)
    assert not ok and re.search(r"output\s+1\.0e-03\s+tolerance .+FAIL", text), text


def test_bench_exits_1_when_a_kernel_fails_its_verification(monkeypatch, capsys):
    wrong = dataclasses.replace(tiny_bench(native=lambda x: x + x + 1e-3), name="philox_normal")
    monkeypatch.setattr(philox_bench, "BENCH", wrong)
    assert cli.main(["bench", "--quick", "--no-heap-reuse", "--ops", "philox_normal"]) == 1
    out, err = capsys.readouterr()
    assert "FAIL" in out and "FAILED its verification" in err


def test_quick_bench_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run(
        "bench",
        "--quick",
        "--ops",
        "kexue::cond_layer_norm",
        "philox_normal_triton",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("kexue-fast bench: --quick:") and "torch.compile" in result.stderr.splitlines()[0]
    data = json.loads(out.read_text())
    assert data["machine"]["heap_reuse"] is True  # the command restarts itself with heap reuse
    assert data["quick"] is True
    assert {t["provider"] for t in data["timings"]} == {"eager", "native", "floor"}  # no compile in --quick
    assert {(t["op"], t["mode"]) for t in data["timings"]} == {
        ("cond_layer_norm", "forward"),
        ("cond_layer_norm", "backward"),
        ("cond_layer_norm", "forward+backward"),
        ("philox_normal", "call"),
    }
    assert all(len(t["samples_ms"]) == 5 and min(t["samples_ms"]) > 0 for t in data["timings"])
    assert data["ratios"] and all(0 < r["low"] <= r["median"] <= r["high"] for r in data["ratios"])
    checks = [c for by_kernel in data["verified"].values() for cs in by_kernel.values() for c in cs]
    assert {c["quantity"] for c in checks} >= {"output", "grad_x", "grad_weight", "grad_bias"}
    assert all(c["passed"] and c["tolerance"] for c in checks)
    assert png.stat().st_size > 1000
    assert "eager/native" in result.stdout and "tolerance" in result.stdout and " pass" in result.stdout


def test_bench_suite_fails_on_a_wrong_kernel(tmp_path):
    # pytest bench (as CI runs it) with the native Langevin step planted wrong by a plugin.
    (tmp_path / "plant_wrong_kernel.py").write_text(
        "import dataclasses\n"
        "import kexue_fast.benchmarks.langevin_step as m\n"
        "right = m.BENCH.native\n"
        "m.BENCH = dataclasses.replace(m.BENCH, native=lambda x, grad: right(x, grad).mul_(0.999))\n"
    )
    test = "bench/test_langevin_step.py::test_langevin_step[128x3x32x32_float32-call-native]"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    # The venv's pytest script, not `python -m pytest`: that would put the repository root (cwd) on
    # sys.path and import the source tree's kexue_fast, which has no _C in a non-editable install.
    pytest = str(Path(sys.executable).with_name("pytest"))
    command = [pytest, test, "--benchmark-disable", "-q", "-p", "no:cacheprovider"]
    right = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert right.returncode == 0, right.stdout[-3000:]
    wrong = subprocess.run(
        [*command, "-p", "plant_wrong_kernel"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert wrong.returncode == 1 and "langevin_step 128x3x32x32 float32 native is wrong" in wrong.stdout, wrong.stdout[
        -3000:
    ]


def test_demo_ebm_quick_writes_png_and_summary(tmp_path):
    png = tmp_path / "ebm.png"
    result = run("demo", "ebm", "--quick", "--out", str(png))
    assert result.returncode == 0, result.stderr
    assert png.exists() and png.stat().st_size > 1000
    assert f"wrote {png}" in result.stdout
    assert "final loss" in result.stdout and "parameters checksum" in result.stdout
    assert "within 3σ of one of the 8 modes" in result.stdout and "replay buffer:" in result.stdout
    assert "demo ebm" in result.stderr and "loss=" in result.stderr  # the progress bar, with the loss


def test_demo_iresnet_writes_png_and_summary(tmp_path):
    png = tmp_path / "iresnet.png"
    result = run("demo", "iresnet", "--quick", "--steps", "20", "--data", "rings", "--seed", "3", "--out", str(png))
    assert result.returncode == 0, result.stderr
    assert png.exists() and png.stat().st_size > 1000
    assert f"wrote {png}" in result.stdout and "data rings: trained 20 steps" in result.stdout
    assert "i-ResNet flow" in result.stdout and "fitted Gaussian" in result.stdout and "iterations" in result.stdout
    assert "demo iresnet (rings)" in result.stderr and "nll=" in result.stderr  # the progress bar, with the NLL


def test_demo_rejects_unknown_names_and_bad_steps():
    result = run("demo", "no_such_demo")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = run("demo", "ebm", "--steps", "0")
    assert result.returncode == 2 and "steps must be >= 1" in result.stderr


@pytest.mark.parametrize(
    "name,data,why",
    [
        ("iresnet", "spiral", "must be one of moons, checkerboard, rings"),
        ("ebm", "moons", "this demo has a single data set"),
        ("gan", "digits", "this demo has a single data set"),
    ],
)
def test_demo_data_is_checked_before_anything_runs(tmp_path, monkeypatch, capsys, name, data, why):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", name, "--data", data]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"kexue-fast demo {name}: --data {data}: {why}\n" and list(tmp_path.iterdir()) == []


def test_module_apis_are_reported_over_the_bare_launch_of_their_table():
    providers = ["eager", "native", "foreach_lerp", "EMA.update()", benchmarks.BARE]
    pairs = runner.ratio_pairs(providers)
    assert ("EMA.update()", benchmarks.BARE) in pairs and ("foreach_lerp", "native") in pairs
    assert ("foreach_lerp", benchmarks.BARE) not in pairs  # only module APIs (named "…()")
    assert not any(fast == benchmarks.BARE for _, fast in runner.ratio_pairs(["eager", "native", "EMA.update()"]))


def test_a_case_can_leave_out_the_compiled_reference():
    bench = benchmarks.load(["ema_update"])[0]
    small = next(c for c in bench.cases if not c.compiled)
    names = lambda case: benchmarks.providers_for(bench, torch.device("cpu"), benchmarks.CALL, None, case=case)  # noqa: E731
    assert "compiled" not in names(small) and "compiled" in names(bench.cases[0])
