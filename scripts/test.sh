#!/usr/bin/env bash
# The full test suite: set-up and lint (scripts/lint.sh, fails on any finding), then
#   1. kernels vs references, opcheck, compile/export, native, bad input, properties, modules
#      (and the gpu-marked tests when a CUDA device is present), the kernel tests at every CPU
#      ISA level; then the module-level tests again with each other level forced (KEXUE_CPU_ISA),
#   2. the Triton kernels in a separate process (through the interpreter on a CPU machine),
#   3. the benchmark suites, each case once (--benchmark-disable) as a smoke test.
# Each pytest run spreads its tests over KEXUE_TEST_WORKERS processes (pytest-xdist; default: one
# per core, at most 4; 1 runs them in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
venv="${KEXUE_VENV:-.venv}"
workers="${KEXUE_TEST_WORKERS:-$(($(nproc) < 4 ? $(nproc) : 4))}"
pytest=("$venv/bin/pytest" -q -p no:cacheprovider)
[ "$workers" -le 1 ] || pytest+=(-n "$workers")

"${pytest[@]}" tests -m "not triton" "$@"

# Every other CPU ISA level forced through KEXUE_CPU_ISA for the tests that have no target axis
# (the kernels' own tests ran at every level above: -k leaves those cases out), less what drives
# the same kernels as a whole program or checks what no level changes: the CLI, demos, README and
# docs examples, DDP runs, the registration (test_contract), nvcc's host programs and the level
# switch itself (test_cpu_isa).
levels=$("$venv/bin/python" -P -c "from kexue_fast import _C; print(*_C.cpu_isas()[1:])")  # -P: the installed package
for isa in $levels; do
  echo "== KEXUE_CPU_ISA=$isa"
  KEXUE_CPU_ISA=$isa "${pytest[@]}" tests -m "not triton and not gpu" \
    -k "not cpu-avx512 and not cpu-avx2 and not cpu-baseline" \
    --ignore=tests/test_cli.py --ignore-glob="tests/test_demo_*.py" --ignore=tests/test_readme.py \
    --ignore=tests/test_package.py --ignore=tests/test_distributed.py --ignore=tests/test_contract.py \
    --ignore=tests/test_cuda_host.py --ignore=tests/test_cpu_isa.py "$@"
done

if "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "${pytest[@]}" tests -m triton "$@"
else
  TRITON_INTERPRET=1 "${pytest[@]}" tests -m triton "$@"
fi

GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296 \
  "${pytest[@]}" bench --benchmark-disable "$@"
