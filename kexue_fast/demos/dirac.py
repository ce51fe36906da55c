r"""``kexue-fast demo dirac``: the phase portraits of every Dirac-GAN system of the GAN-dynamics
post (:mod:`kexue_fast.gan.dirac`) side by side — the generator's path θ(t), its EMA and the
equilibrium θ = 0 — each titled with the system's name and how it ends.

Each system of :data:`~kexue_fast.gan.dirac.SYSTEMS` is integrated from the script's initial
state to its own horizon by the adaptive RK45 (``--quick``: the fixed-step RK4, one step per
output sample, which reaches the same outcomes in a third of the time), and θ is averaged with
Su's EMA (decay :data:`~kexue_fast.gan.dirac.EMA_DECAY` per sample). Nothing is random: the
seed is accepted and ignored, and there are no training steps to set.
"""

from __future__ import annotations

import time

from kexue_fast.demos import progress_bar
from kexue_fast.gan import dirac

DEFAULT_OUT = "dirac_demo.png"


def run(
    steps: int | None = None,
    seed: int = 0,
    out: str | None = DEFAULT_OUT,
    quick: bool = False,
    progress: bool = True,
) -> dict:
    """Simulates every system (by RK45, or with ``quick`` by RK4; a progress bar on stderr with
    ``progress``), writes the figure to ``out`` (``None``: no figure) and returns
    ``systems`` (name → ``label``, ``outcome`` (text), ``kind``, ``distance`` and ``ema_distance``:
    ‖θ‖ and ‖EMA of θ‖ at the end, ``T``), ``method``, ``seconds``, ``seed`` and ``out``.
    ``steps`` must be None (the horizons are the systems' own)."""
    if steps is not None:
        raise ValueError("demo dirac: --steps does not apply (each system runs to its own horizon T)")
    method = "rk4" if quick else "rk45"
    bar = progress_bar(len(dirac.SYSTEMS), "demo dirac", progress)
    trajectories = []
    start = time.perf_counter()
    for name in dirac.SYSTEMS:
        trajectories.append(dirac.simulate(name, method=method))
        if bar is not None:
            bar.set_postfix(system=name, refresh=False)
            bar.update()
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if out is not None:
        dirac.plot(
            trajectories,
            out,
            title=f"kexue-fast demo dirac: the 2-D Dirac GAN from (φ₁, φ₂, θ₁, θ₂) = {dirac.INITIAL_STATE}, "
            f"{method.upper()}, EMA decay {dirac.EMA_DECAY} per sample",
        )
    return {
        "systems": {
            tr.system.name: {
                "label": tr.system.label,
                "outcome": str(tr.outcome),
                "kind": tr.outcome.kind,
                "distance": tr.theta[-1].norm().item(),
                "ema_distance": tr.ema[-1].norm().item(),
                "T": tr.system.T,
            }
            for tr in trajectories
        },
        "method": method,
        "seconds": seconds,
        "seed": seed,
        "out": out,
    }


def summary(result: dict) -> str:
    """The lines ``kexue-fast demo dirac`` prints after the run, from its ``result``."""
    lines = []
    if result["out"] is not None:
        lines.append(f"wrote {result['out']}")
    lines.append(
        f"{len(result['systems'])} systems integrated by {result['method'].upper()} in {result['seconds']:.1f} s"
    )
    width = max(len(s["label"]) for s in result["systems"].values()) + 1
    for s in result["systems"].values():
        lines.append(
            f"  {s['label'] + ':':<{width}} {s['outcome']}; at T = {s['T']:g}: "
            f"‖θ‖ = {s['distance']:.4f}, ‖EMA of θ‖ = {s['ema_distance']:.4f}"
        )
    return "\n".join(lines)
