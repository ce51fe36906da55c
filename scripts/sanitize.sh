#!/usr/bin/env bash
# The sanitizer job: builds _C with AddressSanitizer + UndefinedBehaviorSanitizer (CPU kernels only, in
# build/asan) and runs the CPU tests against it. Needs the venv that scripts/setup.sh makes (for torch, pytest
# and pybind11), and leaves that venv's own kexue_fast alone: the tests run in build/asan/venv, a bare venv whose
# site-packages holds kexue_fast (its Python sources with the sanitized _C) and a .pth line that adds the main
# venv's site-packages after it, so nothing there (an editable install's import hook included) can hand out the
# main venv's _C instead.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KEXUE_VENV:-.venv}"
python="$venv/bin/python"
build=build/asan

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DKEXUE_CUDA=OFF -DKEXUE_SANITIZE=ON \
  -DPython_EXECUTABLE="$(realpath "$python")" -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$build"

asan_python="$PWD/$build/venv/bin/python"
[ -x "$asan_python" ] || "$python" -m venv --without-pip "$build/venv"
site="$("$asan_python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
"$python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' >"$site/main-venv.pth"
rm -rf "$site/kexue_fast"
cp -r kexue_fast "$site/kexue_fast"
cp -r triton_kernels "$site/kexue_fast/triton_kernels"  # where the wheel puts it (pyproject.toml)
cmake --install "$build" --prefix "$site" >/dev/null    # kexue_fast/_C*.so
# pytest started like a console script: the working directory (this checkout, whose kexue_fast has no _C) is not
# put on sys.path; the __main__ guard keeps the processes the tests spawn from running pytest again.
printf '#!%s\nimport sys\n\nimport pytest\n\nif __name__ == "__main__":\n    sys.exit(pytest.main())\n' "$asan_python" \
  >"$build/venv/bin/pytest"
chmod +x "$build/venv/bin/pytest"

# libasan first (python itself is not instrumented), libstdc++ right after it: ASan hooks __cxa_throw when it
# starts, and with libstdc++ loaded only later (by torch) the first C++ exception aborts the process.
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
# CPython and torch keep allocations until exit on purpose: no leak report. Any other report stops the process.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:print_summary=1
export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1

(cd "$site" && "$asan_python" -c 'import kexue_fast._C as C; print("sanitizer build:", C.__file__)') | grep "$site"
# The tests that run C++ on the CPU (Triton and GPU tests run none of ours), less the whole programs: the command
# line (its quick benchmark alone takes 260 s under ASan) and the demos drive the same kernels as the kernel,
# module and sampler tests, which stay in. test_readme runs each snippet with an emptied environment, so without
# the sanitizer runtime preloaded. test_cuda_host compiles host programs with nvcc, which crashes with libasan
# preloaded (and runs none of _C). The tests are spread over KEXUE_TEST_WORKERS processes as in scripts/test.sh.
# --capture=sys: a sanitizer writes its report to file descriptor 2 and then aborts, before pytest could show
# anything it had captured there.
workers="${KEXUE_TEST_WORKERS:-$(($(nproc) < 4 ? $(nproc) : 4))}"
parallel=()
[ "$workers" -le 1 ] || parallel=(-n "$workers")
"$build/venv/bin/pytest" tests -m "not triton and not gpu" -q -p no:cacheprovider --capture=sys "${parallel[@]}" \
  --ignore-glob="tests/test_demo_*.py" --ignore=tests/test_cli.py --ignore=tests/test_readme.py \
  --ignore=tests/test_cuda_host.py "$@"
