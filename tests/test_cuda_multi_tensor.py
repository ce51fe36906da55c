"""The CUDA multi-tensor batch template (csrc/include/kexue/cuda_multi_tensor.cuh) on the host:
tests/cuda_host/multi_tensor_test.cu, built with nvcc and run here; it needs no GPU, so the
batching of the EMA and spectral-norm CUDA launchers is checked wherever nvcc is."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (a host-only C++ test; no GPU needed)")
def test_batches_cover_every_chunk_of_every_entry_once(tmp_path):
    exe = tmp_path / "multi_tensor_test"
    source = ROOT / "tests" / "cuda_host" / "multi_tensor_test.cu"
    subprocess.run([NVCC, "-std=c++17", "-I", str(ROOT / "csrc" / "include"), str(source), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stdout + result.stderr
