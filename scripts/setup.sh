#!/usr/bin/env bash
# Creates ./.venv (or $KEXUE_VENV) and installs kexue_fast into it with everything the tests and
# benchmarks need. Safe to run again: it rebuilds incrementally (build/ is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KEXUE_VENV:-.venv}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first, pinned: this takes the CPU wheel that lies on disk here. Anything that depends on
# torch installed before it would pull a multi-GB CUDA build instead.
"$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"

# The project: its build needs only scikit-build-core and pybind11 (no torch); CUDA kernels are
# compiled whenever nvcc is found (KEXUE_CUDA=AUTO|ON|OFF). The dev extra puts those two in the venv as well,
# for in-tree builds (README, Development; scripts/sanitize.sh).
"${pip[@]}" ".[test,triton,bench,dev]" -Ccmake.define.KEXUE_CUDA="${KEXUE_CUDA:-AUTO}"
"$venv/bin/kexue-fast" info
