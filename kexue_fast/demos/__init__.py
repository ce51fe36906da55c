"""Small end-to-end demos behind ``kexue-fast demo <name>``: each trains something small on the
CPU in minutes, with a progress bar, and writes a PNG.

A demo is a module here with

* ``DEFAULT_OUT`` — the PNG written when ``--out`` is not given;
* ``run(steps=None, seed=0, out=DEFAULT_OUT, quick=False, progress=True) -> dict`` — the run
  itself (``steps=None``: the demo's default, or its quick default with ``quick``);
* ``summary(result) -> str`` — the lines the command prints after the run.

``DEMOS`` names them; modules are imported only when their demo runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> (module, one-line description for --help)
DEMOS: dict[str, tuple[str, str]] = {
    "ebm": ("kexue_fast.demos.ebm", "energy-based model on a ring of 8 Gaussians (IGEBM recipe, Langevin sampling)"),
}


def load(name: str) -> ModuleType:
    """The module of demo ``name``."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; known: {', '.join(sorted(DEMOS))}")
    return importlib.import_module(DEMOS[name][0])
