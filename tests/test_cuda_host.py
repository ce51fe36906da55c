"""The host side of the CUDA foundations, without a GPU: the C++ programs in tests/cuda_host/,
built with nvcc and run here, check the multi-tensor batch template
(csrc/include/kexue/cuda_multi_tensor.cuh: every CTA of every grid maps back to exactly one
(entry, chunk), the batch limits hold) and the host helpers of cuda_common.cuh (ceil_div,
alignment, grid sizing, the dtype dispatch)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (host-only C++ tests; no GPU needed)")
@pytest.mark.parametrize("program", ["multi_tensor_test", "common_test", "iresnet_test"])
def test_cuda_host_program(program, tmp_path):
    exe = tmp_path / program
    source = ROOT / "tests" / "cuda_host" / f"{program}.cu"
    subprocess.run([NVCC, "-std=c++17", "-I", str(ROOT / "csrc" / "include"), str(source), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stdout + result.stderr
