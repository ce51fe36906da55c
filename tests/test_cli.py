"""The ``kexue-fast`` command line (the full bench runs in CI through ``pytest bench``)."""

import json
import subprocess
import sys
import tempfile

import pytest


def run(*args, cwd=None):
    # Run outside the source tree: with `-m`, the current directory comes first on sys.path,
    # and the repository's kexue_fast/ has no built _C (the installed package has).
    return subprocess.run(
        [sys.executable, "-m", "kexue_fast.cli", *args], capture_output=True, text=True, timeout=600, cwd=cwd or tempfile.gettempdir()
    )


def test_info_reports_backends_and_ops():
    result = run("info")
    assert result.returncode == 0, result.stderr
    assert "native kernels built: cpu" in result.stdout
    assert "cond_layer_norm" in result.stdout


def test_bench_rejects_unknown_ops():
    result = run("bench", "--ops", "no_such_op", "--no-heap-reuse")
    assert result.returncode == 2 and "unknown ops" in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_cuda_says_so():
    result = run("bench", "--device", "cuda", "--no-heap-reuse")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


def test_quick_bench_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run("bench", "--quick", "--json", str(out), "--plot", str(png))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["heap_reuse"] is True  # the command restarts itself with heap reuse
    providers = {t["provider"] for t in data["timings"]}
    assert {"eager", "compiled", "native", "floor"} <= providers
    assert all(t["median_ms"] > 0 for t in data["timings"])
    assert set(data["verified"]) and png.stat().st_size > 1000
    assert "eager/native" in result.stdout


def test_demo_ebm_quick_writes_png_and_summary(tmp_path):
    png = tmp_path / "ebm.png"
    result = run("demo", "ebm", "--quick", "--out", str(png))
    assert result.returncode == 0, result.stderr
    assert png.exists() and png.stat().st_size > 1000
    assert f"wrote {png}" in result.stdout
    assert "final loss" in result.stdout and "parameters checksum" in result.stdout
    assert "within 3σ of one of the 8 modes" in result.stdout and "replay buffer:" in result.stdout
    assert "demo ebm" in result.stderr and "loss=" in result.stderr  # the progress bar, with the loss


def test_demo_rejects_unknown_names_and_bad_steps():
    result = run("demo", "no_such_demo")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = run("demo", "ebm", "--steps", "0")
    assert result.returncode == 2 and "steps must be >= 1" in result.stderr
