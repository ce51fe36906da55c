r"""``kexue-fast demo ebm``: an energy-based model of a ring of eight Gaussians, trained on the
CPU with IGEBM's recipe (:mod:`kexue_fast.ebm`).

* data: eight Gaussians (std ``STD``) evenly spaced on a circle of radius ``RADIUS``, in the
  box ``BOUNDS``, where the chains live too;
* energy ``U``: an MLP 2→128→128→1 with LeakyReLU(0.2);
* negatives: :class:`~kexue_fast.ebm.LangevinSampler` chains (30 steps) started from a
  :class:`~kexue_fast.ebm.ReplayBuffer` (5% fresh uniform noise), trained with
  :func:`~kexue_fast.ebm.contrastive_divergence_loss` (α = 0.1) and Adam (betas (0, 0.999)).

Choices made for this 2-D toy, where IGEBM's image settings do not carry over:

* no spectral norm by default: a 1-Lipschitz energy can hardly tell modes 0.38 apart (the
  energy gap between data and noise grows ~100× slower), and the parametrization makes every
  Langevin step 2–3× dearer. ``sn_coeff=c`` (Python API) wraps every layer in
  :func:`kexue_fast.nn.spectral_norm` with the soft bound ``coeff=c``; ``c = 4`` learns the
  modes as well, ~2.7× slower;
* LeakyReLU instead of SiLU: the smooth SiLU MLP learns the ring but not, within the time
  budget, the eight modes on it (spectral bias);
* the sampler works in data units, bounds ``BOUNDS``: ``step_size`` 0.01, the gradient clipped
  at ±5 per coordinate (a guard: at most 0.05 per step), ``noise_std`` 0.05. That is a hot
  sampler, ``T = σ²/2s = 0.125``: chains still cross between modes, so the CD loss keeps the
  eight wells at about the same depth. With IGEBM's cold ratio (``noise_std`` 0.01, T = 0.005)
  the samples land on the modes too, but ``U`` is a tilted ring with shallow dents (the
  mode energies differ by ~70 T; the chains just cannot cross) and chains from noise stop
  off-centre.

Everything random comes from ``seed``: the initialisation (``torch.manual_seed``, inside
``torch.random.fork_rng`` so the caller's generator is left alone), the data (a generator
seeded with ``seed``) and the counter-based noise of the sampler and the buffer (Philox keys
``(seed mod 2³², 0..3)``, one per stream). Two runs with the same seed give bitwise-identical
parameters (the same on 1 and 2 threads here: every op involved is deterministic on the CPU).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from kexue_fast.demos import checksum, figure, progress_bar, save_figure
from kexue_fast.ebm import LangevinSampler, ReplayBuffer, contrastive_divergence_loss
from kexue_fast.nn import SpectralNormGroup, spectral_norm

DEFAULT_OUT = "ebm_demo.png"

# The toy distribution.
N_MODES, RADIUS, STD = 8, 1.0, 0.07
BOUNDS = (-1.5, 1.5)

# The recipe. DEFAULT: the command's run; QUICK: --quick (tests). n_eval chains from fresh noise
# run eval_steps Langevin steps at the end, for the last panel and the quality numbers.
DEFAULT = {
    "steps": 1000, "batch": 256, "hidden": 128, "sn_coeff": None, "lr": 1e-3, "betas": (0.0, 0.999), "alpha": 0.1,
    "n_steps": 30, "step_size": 0.01, "noise_std": 0.05, "grad_clip": 5.0, "reinit_prob": 0.05, "capacity": 10000,
    "n_eval": 2000, "eval_steps": 200,
}  # fmt: skip
QUICK = {**DEFAULT, "steps": 150, "n_eval": 500, "eval_steps": 60}


def mode_centres() -> torch.Tensor:
    """The eight mode centres, shape (8, 2)."""
    angle = torch.arange(N_MODES, dtype=torch.float64) * (2 * math.pi / N_MODES)
    return (RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)).float()


def sample_data(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points of the ring of Gaussians (float32, shape (n, 2))."""
    which = torch.randint(N_MODES, (n,), generator=generator)
    return mode_centres()[which] + STD * torch.randn(n, 2, generator=generator)


class Energy(nn.Module):
    """``U(x)``: an MLP 2→hidden→hidden→1 with LeakyReLU(0.2); returns shape (n,).
    ``sn_coeff``: ``None``, no spectral norm; a number ``c``, every ``Linear`` wrapped in
    :func:`kexue_fast.nn.spectral_norm` with ``coeff=c`` (``W / max(1, σ/c)``)."""

    def __init__(self, hidden: int = 128, sn_coeff: float | None = None):
        super().__init__()
        wrap = (lambda m: m) if sn_coeff is None else (lambda m: spectral_norm(m, coeff=sn_coeff))
        self.net = nn.Sequential(
            wrap(nn.Linear(2, hidden)), nn.LeakyReLU(0.2),
            wrap(nn.Linear(hidden, hidden)), nn.LeakyReLU(0.2),
            wrap(nn.Linear(hidden, 1)),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def quality(samples: torch.Tensor) -> dict:
    """How well ``samples`` cover the ring: the fraction within 3σ (Euclidean) of a mode centre
    (the data have 98.9% there), the count per mode of those, and how many modes hold at least
    2% of the samples (an even split is 12.5%)."""
    dist = torch.cdist(samples.double(), mode_centres().double())
    nearest, which = dist.min(dim=1)
    near = nearest <= 3 * STD
    counts = torch.bincount(which[near], minlength=N_MODES)
    return {
        "on_modes": near.double().mean().item(),
        "per_mode": counts.tolist(),
        "modes_hit": int((counts >= 0.02 * samples.shape[0]).sum()),
    }


def run(
    steps: int | None = None,
    seed: int = 0,
    out: str | None = DEFAULT_OUT,
    quick: bool = False,
    progress: bool = True,
    **overrides,
) -> dict:
    """Trains the EBM for ``steps`` steps (default 1000; 150 with ``quick``), writes the PNG to
    ``out`` (``None``: no plot) and returns the summary: ``loss`` (last step), ``seconds``
    (training), ``checksum`` (of the final parameters), the :func:`quality` of the data
    (``data``, the reference), of the replay buffer (``buffer``) and of fresh chains from
    uniform noise (``fresh``), ``steps``, ``seed``, ``config`` and ``out``. ``overrides``:
    recipe entries (see ``DEFAULT``), for experiments."""
    if seed < 0:
        raise ValueError(f"demo ebm: seed must be >= 0, got {seed}")
    unknown = set(overrides) - set(DEFAULT)
    if unknown:
        raise TypeError(f"demo ebm: unknown settings {sorted(unknown)}")
    cfg = {**(QUICK if quick else DEFAULT), **overrides}
    if steps is not None:
        cfg["steps"] = steps
    if cfg["steps"] < 1:
        raise ValueError(f"demo ebm: steps must be >= 1, got {cfg['steps']}")
    key = seed % 2**32  # Philox key (key, stream): one stream each for sampler, buffer, eval noise, eval chains

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        data_rng = torch.Generator().manual_seed(seed)
        model = Energy(cfg["hidden"], cfg["sn_coeff"])
        # With spectral norm, one power iteration per step for all layers (not one per Langevin step).
        group = SpectralNormGroup(model) if cfg["sn_coeff"] is not None else None
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=cfg["betas"])
        langevin = {
            "step_size": cfg["step_size"],
            "noise_std": cfg["noise_std"],
            "grad_clip": cfg["grad_clip"],
            "bounds": BOUNDS,
        }
        sampler = LangevinSampler(model, n_steps=cfg["n_steps"], seed=key, **langevin)
        buffer = ReplayBuffer(
            (2,), capacity=cfg["capacity"], reinit_prob=cfg["reinit_prob"], bounds=BOUNDS, seed=key + 2**32
        )

        bar = progress_bar(cfg["steps"], "demo ebm", progress)
        losses = []
        start = time.perf_counter()
        for _ in range(cfg["steps"]):
            if group is not None:
                group.refresh()
            pos = sample_data(cfg["batch"], data_rng)
            neg = sampler(buffer.sample(cfg["batch"]))
            buffer.push(neg)
            energy = model(torch.cat([pos, neg]))
            loss = contrastive_divergence_loss(energy[: len(pos)], energy[len(pos) :], cfg["alpha"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:+.4f}", refresh=False)
                bar.update()
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        if group is not None:
            group.release()
        model.eval()

        # Chains from fresh uniform noise (a buffer that always reinitialises draws it), run longer.
        noise = ReplayBuffer((2,), capacity=1, reinit_prob=1.0, bounds=BOUNDS, seed=key + 2 * 2**32).sample(
            cfg["n_eval"]
        )
        fresh = LangevinSampler(model, n_steps=cfg["eval_steps"], seed=key + 3 * 2**32, **langevin)(noise)
        chains = buffer.storage[: len(buffer)]
        data = sample_data(cfg["n_eval"], data_rng)
        result = {
            "loss": losses[-1],
            "seconds": seconds,
            "steps": cfg["steps"],
            "seed": seed,
            "checksum": checksum(model),
            "data": quality(data),
            "buffer": quality(chains),
            "fresh": quality(fresh),
            "config": cfg,
            "out": out,
        }
        if out is not None:
            _plot(out, model, data, chains, fresh, losses, result)
    return result


@torch.no_grad()
def _plot(path, model, data, chains, fresh, losses, result) -> None:
    low, high = BOUNDS
    n_grid = 200
    grid = torch.linspace(low, high, n_grid)
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    u = model(torch.stack([gx.flatten(), gy.flatten()], dim=1)).view(n_grid, n_grid)

    fig, axes = figure(1, 5, figsize=(20, 4.3), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.1]})
    shown = 1000  # points per scatter panel
    centres = mode_centres().numpy()
    cfg = result["config"]
    panels = [
        (f"data ({result['data']['on_modes']:.0%} within 3σ of a mode)", data, "tab:blue", "data"),
        ("learnt energy U (Langevin targets ∝ exp(−U/T), T = σ²/2s)", None, None, None),
        (
            f"replay buffer ({result['buffer']['on_modes']:.0%} on modes, {result['buffer']['modes_hit']}/8 hit)",
            chains,
            "tab:red",
            "buffered chains",
        ),
        (
            f"{cfg['eval_steps']} Langevin steps from noise "
            f"({result['fresh']['on_modes']:.0%}, {result['fresh']['modes_hit']}/8)",
            fresh,
            "tab:purple",
            "chains from noise",
        ),
    ]
    for ax, (title, points, color, label) in zip(axes, panels):
        if points is None:  # low energy bright
            image = ax.contourf(gx.numpy(), gy.numpy(), u.numpy(), levels=30, cmap="magma_r")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("energy U(x) (low: likely)", fontsize=8)
        else:
            pts = points[:shown].numpy()
            ax.scatter(
                pts[:, 0], pts[:, 1], s=4, alpha=0.6, color=color, linewidths=0, label=f"{label} (first {len(pts)})"
            )
        ax.scatter(
            centres[:, 0],
            centres[:, 1],
            s=30,
            marker="+",
            color="tab:green" if points is None else "black",
            label="mode centres",
        )
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_aspect("equal")
        ax.set_xlabel("x₁", fontsize=8)
        ax.set_ylabel("x₂", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper right", fontsize=7, markerscale=2)
    ax = axes[-1]
    ax.plot(losses, linewidth=0.6, color="grey", label="loss of each step")
    ax.axhline(0.0, color="black", linewidth=0.5, label="zero")
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel("contrastive-divergence loss", fontsize=8)
    ax.set_title(f"CD loss (α={cfg['alpha']}), final {result['loss']:+.4f}", fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    ax.tick_params(labelsize=8)
    save_figure(
        fig,
        path,
        f"kexue-fast demo ebm: ring of 8 Gaussians, seed {result['seed']}, {result['steps']} steps, "
        f"Langevin {cfg['n_steps']} steps of size {cfg['step_size']}, noise {cfg['noise_std']}",
        fontsize=10,
        dpi=100,
    )


def summary(result: dict) -> str:
    """The lines ``kexue-fast demo ebm`` prints after the run."""
    lines = []
    if result["out"] is not None:
        lines.append(f"wrote {result['out']}")
    lines.append(
        f"trained {result['steps']} steps in {result['seconds']:.1f} s; final loss {result['loss']:+.4f}; "
        f"parameters checksum {result['checksum']}"
    )
    lines.append("samples within 3σ of one of the 8 modes (modes holding ≥ 2% of them):")
    eval_steps = result["config"]["eval_steps"]
    for key, what in (
        ("data", "data (reference)"),
        ("buffer", "replay buffer"),
        ("fresh", f"{eval_steps} steps from noise"),
    ):
        q = result[key]
        lines.append(
            f"  {what + ':':<22}{q['on_modes']:6.1%}, {q['modes_hit']}/{N_MODES} modes; per mode {q['per_mode']}"
        )
    return "\n".join(lines)
