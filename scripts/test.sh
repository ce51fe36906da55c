#!/usr/bin/env bash
# The full test suite: set-up and lint (scripts/lint.sh, fails on any finding), then
#   1. kernels vs references, opcheck, compile/export, native, bad input, properties, modules
#      (and the gpu-marked tests when a CUDA device is present), the kernel tests at every CPU
#      ISA level; then the rest again with each other level forced (KEXUE_CPU_ISA),
#   2. the Triton kernels in a separate process (through the interpreter on a CPU machine),
#   3. the benchmark suites, each case once (--benchmark-disable) as a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
venv="${KEXUE_VENV:-.venv}"
pytest="$venv/bin/pytest"

"$pytest" tests -m "not triton" -q -p no:cacheprovider "$@"

# Every other CPU ISA level forced through KEXUE_CPU_ISA for the tests that have no target axis
# (the kernels' own tests ran at every level above: -k leaves those cases out).
levels=$("$venv/bin/python" -P -c "from kexue_fast import _C; print(*_C.cpu_isas()[1:])")  # -P: the installed package
for isa in $levels; do
  echo "== KEXUE_CPU_ISA=$isa"
  KEXUE_CPU_ISA=$isa "$pytest" tests -m "not triton and not gpu" -q -p no:cacheprovider \
    -k "not cpu-avx512 and not cpu-avx2 and not cpu-baseline" "$@"
done

if "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$pytest" tests -m triton -q -p no:cacheprovider "$@"
else
  TRITON_INTERPRET=1 "$pytest" tests -m triton -q -p no:cacheprovider "$@"
fi

GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296 \
  "$pytest" bench --benchmark-disable -q -p no:cacheprovider "$@"
