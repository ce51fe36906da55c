"""Every ```python block of README.md runs as written, each in a fresh interpreter on the CPU."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[str, str]]:
    """(the heading above it, code) of every python block, in order."""
    text = README.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.MULTILINE)
        blocks.append((headings[-1] if headings else "top", match.group(1)))
    return blocks


def test_every_python_block_is_found():
    # The pattern must see every block the README opens (a block it missed would go untested).
    assert len(python_blocks()) == README.read_text().count("```python") >= 4


@pytest.mark.parametrize("heading,code", python_blocks(), ids=[h for h, _ in python_blocks()])
def test_readme_block_runs(heading, code, tmp_path):
    # A fresh interpreter in an empty directory (snippets may write files there), on the CPU.
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "HOME": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 0, f"README block under '{heading}' failed:\n{result.stderr[-3000:]}"
