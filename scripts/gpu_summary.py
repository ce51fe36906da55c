"""The summary table of scripts/gpu_check.sh: one row per phase (status, seconds, pytest's counts)
and, when OUTDIR/bench.json exists, its verification verdict and speedups.

usage: python scripts/gpu_summary.py PHASES_TSV OUTDIR
PHASES_TSV: one line per phase, tab-separated: name, status, seconds, log file (in OUTDIR)."""

import json
import re
import sys
from pathlib import Path

# pytest's last line, bare (-q) or between "=" signs: "3 failed, 140 passed, 2 skipped in 12.3s", or
# "146/1403 tests collected (1257 deselected) in 1.2s" for --collect-only.
PYTEST_TOTALS = re.compile(r"^=*\s*(\d.*?(?:passed|failed|skipped|errors?|collected|deselected).*?) in [\d.]+s")


def pytest_counts(log: Path, phase: str) -> str:
    """pytest's totals: the last result line between the phase's header and its end line in ``log``
    (several phases may share one log)."""
    if not log.is_file():
        return ""
    found, inside = "", False
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(f"== {phase} ("):
            inside = True
        elif line.startswith(f"== {phase}: "):
            inside = False
        elif inside and (match := PYTEST_TOTALS.match(line)):
            found = match.group(1).strip()
    return found


def columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def bench_lines(path: Path) -> list[str]:
    if not path.is_file():
        return ["bench.json: none"]
    result = json.loads(path.read_text())
    checks = [c for by_kernel in result["verified"].values() for cs in by_kernel.values() for c in cs]
    failed = [c for c in checks if not c["passed"]]
    lines = [
        f"bench on {result['machine'].get('device', '?')}, {'--quick' if result['quick'] else 'full'}: "
        f"{len(checks) - len(failed)}/{len(checks)} verification checks passed"
        + (f" (FAILED: {', '.join(c['quantity'] for c in failed)})" if failed else ""),
    ]
    rows = [["op", "case", "mode", "ratio", "median (min–max)"]]
    for r in result["ratios"]:
        ratio = f"{r['median']:.2f}x ({r['low']:.2f}–{r['high']:.2f})"
        rows.append([r["op"], r["case"], r["mode"], f"{r['slow']}/{r['fast']}", ratio])
    return lines + (columns(rows) if len(rows) > 1 else ["no ratios"])


def main(phases_tsv: str, outdir: str) -> None:
    out = Path(outdir)
    rows = [["phase", "status", "seconds", "tests"]]
    for line in Path(phases_tsv).read_text().splitlines():
        name, status, seconds, log = line.split("\t")
        rows.append([name, status, seconds, pytest_counts(out / log, name) if name.startswith("tests") else ""])
    print("\n".join(["", "== gpu_check summary", *columns(rows), "", *bench_lines(out / "bench.json")]))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
