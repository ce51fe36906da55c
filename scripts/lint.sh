#!/usr/bin/env bash
# Lint: ruff's rules and its formatter over the Python (configured in pyproject.toml), clang-format over the C++
# and CUDA in csrc/ (.clang-format). Reports and fails on any finding, changes nothing. To apply the fixes:
#   ruff check --fix . && ruff format . && clang-format -i $(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${KEXUE_VENV:-.venv}/bin"  # both linters are pinned in the test extra

status=0  # all three run, so one pass shows every finding
"$bin/ruff" check . || status=1
"$bin/ruff" format --check . || status=1
find csrc \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print0 |
  xargs -0 "$bin/clang-format" --dry-run --Werror || status=1
exit $status
