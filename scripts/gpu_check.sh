#!/usr/bin/env bash
# The prepared GPU check: one command for a lent GPU machine (README, "GPU check").
#
#   bash scripts/gpu_check.sh OUTDIR            on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run OUTDIR  on a CPU machine (CI runs it, so it is never stale)
#
# Phases, each printed with its wall time and its log teed into OUTDIR (kept flat and to a few files,
# as the device tool returns at most 8):
#   env           nvidia-smi -L, python/torch/triton versions, the CUDA device; no CUDA device: stop here
#   build         a scratch venv layered over the interpreter's packages (nothing is installed into it),
#                 then `pip install --no-build-isolation --no-deps -e .` with CUDA for sm_90 (no network)
#   tests-cuda    pytest -m "gpu and not triton": the CUDA kernels
#   tests-triton  pytest -m triton without TRITON_INTERPRET: the Triton kernels on CUDA tensors (the cases
#                 on CPU tensors skip here; CI runs them under the interpreter)
#   bench-quick   kexue-fast bench --device cuda --quick --json --plot, every op
#   bench-full    the full bench (torch.compile'd references too) if time is left; its JSON and plot
#                 replace the quick ones only when it finishes
# then a summary table (scripts/gpu_summary.py) on stdout and in OUTDIR/summary.txt.
# A failed test phase does not stop the next one; the exit status is non-zero if any phase failed.
# Everything fits KEXUE_GPU_BUDGET seconds (default 480): each phase runs under `timeout`.
#
# --dry-run: the same plumbing on CPU, in a few minutes (mostly the build): the base interpreter is $KEXUE_VENV/bin/python
# (default .venv), the build has KEXUE_CUDA=OFF (build/gpu-dry), both test sets are only collected
# (they must collect without error) and then a CPU half runs (the gpu tests skip there), and the
# bench is the quick langevin_step case on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR" >&2
  exit 2
}
dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
[ $# -eq 1 ] && [ -n "$1" ] || usage
case $1 in -*) usage ;; esac
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
rm -f "$out"/{build,tests-cuda,tests-triton,bench}.log "$out"/{bench.json,bench.png,summary.txt}

if [ $dry = 1 ]; then
  # The dry run's phases have fixed limits; this only leaves the build its cap: a CPU-only build
  # of every ISA level takes 4-5 minutes on a 2-core CI machine (the GPU machine's cores build
  # CUDA too within 240 s). The phases after it: 60 + 60 + 180 + 90 s.
  budget=990
  build_cap=540
  base=${KEXUE_VENV:-.venv}/bin/python
  build=build/gpu-dry
  device=cpu
  cuda=OFF
else
  budget=${KEXUE_GPU_BUDGET:-480}
  case $budget in '' | *[!0-9]*)
    echo "gpu_check: KEXUE_GPU_BUDGET=$budget: expected whole seconds" >&2
    exit 2
    ;;
  esac
  build_cap=240
  base=${PYTHON:-python3}
  build=build/gpu
  device=cuda
  cuda=ON
fi
venv=$build-venv
py=$venv/bin/python
export base build device cuda venv py
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
phases=$scratch/phases.tsv # one line per phase: name, status, seconds, log file
: >"$phases"
failed=0
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

# limit CAP RESERVE: a phase's time limit, CAP seconds at most, leaving RESERVE seconds of the budget
# for the phases after it (10 s at the least).
limit() {
  local left=$((budget - SECONDS - $2))
  [ "$left" -lt "$1" ] || left=$1
  [ "$left" -gt 10 ] || left=10
  echo "$left"
}

# phase NAME LOG SECONDS CMD...: runs CMD under `timeout`, its output on stdout and appended to OUTDIR/LOG.
phase() {
  local name=$1 file=$2 log=$out/$2 seconds=$3 t0=$SECONDS rc status
  shift 3
  printf '\n== %s (at most %ss): %s\n' "$name" "$seconds" "$*" | tee -a "$log"
  # Through bash, so that CMD may be one of the exported functions below.
  timeout -k 10 "$seconds" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed($rc)" ;;
  esac
  [ $rc = 0 ] || failed=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$file" >>"$phases"
  printf '== %s: %s in %ss\n' "$name" "$status" "$((SECONDS - t0))" | tee -a "$log"
  return $rc
}

summary() {
  "$base" scripts/gpu_summary.py "$phases" "$out" | tee "$out/summary.txt"
}

# --- env: what the machine is; without a CUDA device nothing else can run.
env_check() {
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git)')"
  echo "nproc: $(nproc)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  "$base" - "$device" <<'EOF'
import sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
except ImportError as error:
    sys.exit(f"gpu_check: {sys.executable} cannot import torch ({error})")
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
elif sys.argv[1] == "cuda":
    sys.exit("gpu_check: no CUDA device: torch.cuda.is_available() is False (use --dry-run on a CPU machine)")
else:
    print("device: none (dry run on CPU)")
EOF
}
# nvcc and the interpreter's own tools (cmake, ninja) on PATH for the build.
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
base_bin=$(dirname "$(command -v "$base" || echo "$base")")
export PATH="$PATH:$base_bin"
export -f env_check
if ! phase env build.log 60 env_check; then
  summary
  echo "gpu_check: stopped: the environment check failed (see above)" >&2
  exit 1
fi

# --- build: a venv that sees the base interpreter's packages through a .pth file listing the base's
# sys.path (plain path lines: the .pth files in those folders, such as an editable kexue_fast of the
# base venv, are not run), with kexue_fast installed editable in it: the base is left untouched.
build_step() {
  "$base" -m venv --clear --without-pip "$venv" || return
  "$base" -c 'import os, sys; print(*(p for p in sys.path if p and os.path.isdir(p)), sep="\n")' \
    >"$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_kexue_gpu_check_base.pth" || return
  "$py" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -e . -Cbuild-dir="$build" \
    -Ccmake.define.KEXUE_CUDA=$cuda -Ccmake.define.KEXUE_CUDA_ARCHS=90 || return
  "$venv/bin/kexue-fast" info
}
export -f build_step
if ! phase build build.log "$(limit "$build_cap" 300)" build_step; then
  summary
  echo "gpu_check: stopped: the build failed (see build.log)" >&2
  exit 1
fi

pytest=("$py" -m pytest -p no:cacheprovider -q -rfE --durations=15 -o faulthandler_timeout=60)
if [ $dry = 1 ]; then
  phase tests-cuda tests-cuda.log 60 "${pytest[@]}" tests --collect-only -m "gpu and not triton"
  phase tests-triton tests-triton.log 60 "${pytest[@]}" tests --collect-only -m triton
  # One process: 85 s on a 2-core CI machine (2026-12-03), which ran past a 90 s cap once.
  phase tests-cpu tests-cuda.log 180 "${pytest[@]}" tests/test_gpu.py tests/test_native.py tests/test_contract.py \
    -m "not triton"
  phase bench-quick bench.log 90 "$venv/bin/kexue-fast" bench --device cpu --quick --ops langevin_step \
    --json "$out/bench.json" --plot "$out/bench.png"
else
  phase tests-cuda tests-cuda.log "$(limit 150 200)" "${pytest[@]}" tests -m "gpu and not triton"
  phase tests-triton tests-triton.log "$(limit 150 100)" "${pytest[@]}" tests -m triton
  phase bench-quick bench.log "$(limit 120 0)" "$venv/bin/kexue-fast" bench --device cuda --quick \
    --json "$out/bench.json" --plot "$out/bench.png"
  if [ $((budget - SECONDS)) -ge 150 ]; then
    failed_before=$failed
    phase bench-full bench.log "$(limit 600 10)" "$venv/bin/kexue-fast" bench --device cuda \
      --json "$scratch/bench.json" --plot "$scratch/bench.png"
    case $? in
      124 | 137) # out of time is no failure of the code: the quick results stand
        failed=$failed_before
        echo "gpu_check: the full bench ran out of time: bench.json is the --quick one" ;;
      *) # finished (a failed verification too: the JSON says which check)
        if [ -f "$scratch/bench.json" ]; then mv "$scratch"/bench.* "$out/"; fi ;;
    esac
  else
    echo "gpu_check: $((budget - SECONDS)) s left: no time for the full bench (bench.json is the --quick one)"
  fi
fi

summary
exit $failed
