"""Small end-to-end demos behind ``kexue-fast demo <name>``: each trains something small on the
CPU in minutes, with a progress bar, and writes a PNG.

A demo is a module here with

* ``DEFAULT_OUT`` — the PNG written when ``--out`` is not given;
* ``run(steps=None, seed=0, out=DEFAULT_OUT, quick=False, progress=True) -> dict`` — the run
  itself (``steps=None``: the demo's default, or its quick default with ``quick``);
* ``summary(result) -> str`` — the lines the command prints after the run;
* optionally ``DATA_SETS`` — the names ``--data`` accepts, passed to ``run(data=...)``.

``DEMOS`` names them; modules are imported only when their demo runs. :func:`checksum`,
:func:`progress_bar`, :func:`figure` and :func:`save_figure` are what the demos share.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from types import ModuleType

# name -> (module, one-line description for --help)
DEMOS: dict[str, tuple[str, str]] = {
    "dirac": (
        "kexue_fast.demos.dirac",
        "the 2-D Dirac-GAN dynamics of the GAN-dynamics post: phase portraits of 6 systems",
    ),
    "ebm": ("kexue_fast.demos.ebm", "energy-based model on a ring of 8 Gaussians (IGEBM recipe, Langevin sampling)"),
    "gan": (
        "kexue_fast.demos.gan",
        "DCGAN on the 8×8 digits: baseline, +SELF-MOD, +Cascading Rejection, +EMA, scored by kernel MMD",
    ),
    "iresnet": ("kexue_fast.demos.iresnet", "i-ResNet flow fitting a 2-D density (moons, checkerboard or rings)"),
}


def load(name: str) -> ModuleType:
    """The module of demo ``name``."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; known: {', '.join(sorted(DEMOS))}")
    return importlib.import_module(DEMOS[name][0])


def checksum(model) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer of ``model``, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar of ``total`` steps on stderr, or None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)


def figure(*args, **kwargs):
    """``plt.subplots(*args, **kwargs)`` on matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str, title: str, fontsize: int = 11, dpi: int = 80) -> None:
    """Titles ``fig``, lays it out, writes it to ``path`` and closes it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
