r"""``kexue-fast demo ebm``: an energy-based model of a ring of eight Gaussians, trained with
IGEBM's recipe (:mod:`kexue_fast.ebm`) on the CPU.

* data: eight Gaussians (std ``STD``) evenly spaced on a circle of radius ``RADIUS``, in the
  box ``BOUNDS``;
* energy: an MLP 2→128→128→1 with SiLU, every ``Linear`` spectrally normalised
  (:func:`kexue_fast.nn.spectral_norm`, the power iteration run once per step for all layers by
  :class:`kexue_fast.nn.SpectralNormGroup`);
* negatives: :class:`~kexue_fast.ebm.LangevinSampler` chains started from a
  :class:`~kexue_fast.ebm.ReplayBuffer` (5% fresh uniform noise), trained by
  :func:`~kexue_fast.ebm.contrastive_divergence_loss` with Adam.

The Langevin update (noise first, as IGEBM) is ``x ← x + σξ; x ← x − s·clip(∇U(x))``: it
samples ``exp(−U/T)`` at the temperature ``T = σ²/(2s)``, so a 1-Lipschitz energy (spectral
norm) still gives sharp modes. The landscape panel shows ``exp(−U/T)``, the density the
sampler targets.

Everything random comes from ``seed``: the initialisation (``torch.manual_seed``, inside
``torch.random.fork_rng`` so the caller's generator is left alone), the data (a generator
seeded with ``seed``) and the counter-based noise of the sampler and the buffer. Two runs with
the same seed on the same machine and thread count give bitwise-identical parameters.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time

import torch
from torch import nn

from kexue_fast.ebm import LangevinSampler, ReplayBuffer, contrastive_divergence_loss
from kexue_fast.nn import SpectralNormGroup, spectral_norm

DEFAULT_OUT = "ebm_demo.png"

# The toy distribution.
N_MODES, RADIUS, STD = 8, 1.0, 0.07
BOUNDS = (-1.5, 1.5)

# The recipe. DEFAULT: the command's run; QUICK: --quick (tests).
DEFAULT = dict(steps=1500, batch=256, hidden=128, lr=1e-3, betas=(0.0, 0.999), alpha=0.1,
               n_steps=30, step_size=0.05, noise_std=0.02, grad_clip=None, reinit_prob=0.05,
               capacity=10000, n_eval=2000, eval_steps=200)
QUICK = dict(DEFAULT, steps=150, n_eval=500, eval_steps=60)


def mode_centres() -> torch.Tensor:
    """The eight mode centres, shape (8, 2)."""
    angle = torch.arange(N_MODES, dtype=torch.float64) * (2 * math.pi / N_MODES)
    return (RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)).float()


def sample_data(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points of the ring of Gaussians (float32, shape (n, 2))."""
    which = torch.randint(N_MODES, (n,), generator=generator)
    return mode_centres()[which] + STD * torch.randn(n, 2, generator=generator)


class Energy(nn.Module):
    """``U(x)``: a spectrally normalised MLP 2→hidden→hidden→1 with SiLU; returns shape (n,)."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Linear(2, hidden)), nn.SiLU(),
            spectral_norm(nn.Linear(hidden, hidden)), nn.SiLU(),
            spectral_norm(nn.Linear(hidden, 1)),
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


def checksum(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run(steps: int | None = None, seed: int = 0, out: str | None = DEFAULT_OUT, quick: bool = False,
        progress: bool = True, **overrides) -> dict:
    """Trains the EBM for ``steps`` steps (default 1500; 150 with ``quick``), writes the PNG to
    ``out`` (``None``: no plot) and returns the summary: ``loss`` (last step), ``seconds``
    (training), ``checksum`` (of the final parameters), the :func:`quality` of the replay
    buffer (``buffer``) and of fresh chains from uniform noise (``fresh``), ``config`` and
    ``out``. ``overrides``: recipe entries (see ``DEFAULT``), for experiments."""
    if seed < 0:
        raise ValueError(f"demo ebm: seed must be >= 0, got {seed}")
    cfg = dict(QUICK if quick else DEFAULT, **overrides)
    if steps is not None:
        cfg["steps"] = steps
    if cfg["steps"] < 1:
        raise ValueError(f"demo ebm: steps must be >= 1, got {cfg['steps']}")
    # Two independent counter-based noise streams: key (seed, 0) for the sampler, (seed, 1) for the buffer.
    stream = seed % 2**32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        data_rng = torch.Generator().manual_seed(seed)
        model = Energy(cfg["hidden"])
        group = SpectralNormGroup(model)
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=cfg["betas"])
        sampler = LangevinSampler(model, n_steps=cfg["n_steps"], step_size=cfg["step_size"], noise_std=cfg["noise_std"],
                                  grad_clip=cfg["grad_clip"], bounds=BOUNDS, seed=stream)
        buffer = ReplayBuffer((2,), capacity=cfg["capacity"], reinit_prob=cfg["reinit_prob"], bounds=BOUNDS,
                              seed=stream + 2**32)
        bar = _progress_bar(cfg["steps"], progress)
        losses = []
        start = time.perf_counter()
        for _ in range(cfg["steps"]):
            group.refresh()  # one power iteration for all layers; the forwards below only compute σ
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
        group.release()
        model.eval()
        # Chains from fresh noise, on their own stream (key (seed, 2)).
        fresh_sampler = LangevinSampler(model, n_steps=cfg["eval_steps"], step_size=cfg["step_size"],
                                        noise_std=cfg["noise_std"], grad_clip=cfg["grad_clip"], bounds=BOUNDS,
                                        seed=stream + 2 * 2**32)
        noise = ReplayBuffer((2,), capacity=1, reinit_prob=1.0, bounds=BOUNDS, seed=stream + 3 * 2**32).sample(cfg["n_eval"])
        fresh = fresh_sampler(noise)
        chains = buffer.storage[: len(buffer)]
        result = {
            "loss": losses[-1],
            "seconds": seconds,
            "steps": cfg["steps"],
            "seed": seed,
            "checksum": checksum(model),
            "buffer": quality(chains),
            "fresh": quality(fresh),
            "config": cfg,
            "out": out,
        }
        if out is not None:
            temperature = cfg["noise_std"] ** 2 / (2 * cfg["step_size"])
            _plot(out, model, sample_data(cfg["n_eval"], data_rng), chains, fresh, losses, temperature, result)
    return result


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="ebm", unit="step", file=sys.stderr, dynamic_ncols=True)


@torch.no_grad()
def _plot(path, model, data, chains, fresh, losses, temperature, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = BOUNDS
    grid = torch.linspace(low, high, 200)
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    u = model(torch.stack([gx.flatten(), gy.flatten()], dim=1)).view(200, 200)
    density = torch.exp(-(u - u.min()) / temperature)

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    shown = 1000
    panels = [
        ("data", data),
        (f"learnt density exp(−U/T), T={temperature:.3g}", None),
        (f"replay buffer chains ({result['buffer']['on_modes']:.0%} on modes)", chains),
        (f"fresh noise, {result['config']['eval_steps']} Langevin steps ({result['fresh']['on_modes']:.0%} on modes)", fresh),
    ]
    for ax, (title, points) in zip(axes, panels):
        if points is None:
            ax.imshow(density.numpy(), extent=(low, high, low, high), origin="lower", cmap="magma")
        else:
            pts = points[:shown].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.5, color="tab:blue" if ax is axes[0] else "tab:red")
        centres = mode_centres().numpy()
        ax.scatter(centres[:, 0], centres[:, 1], s=25, marker="+", color="tab:green" if points is None else "black")
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"kexue-fast demo ebm: seed {result['seed']}, {result['steps']} steps, final loss {result['loss']:+.4f}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(result: dict) -> str:
    """The lines ``kexue-fast demo ebm`` prints after the run."""
    lines = []
    if result["out"] is not None:
        lines.append(f"wrote {result['out']}")
    lines.append(f"trained {result['steps']} steps in {result['seconds']:.1f} s; final loss {result['loss']:+.4f}; "
                 f"parameters checksum {result['checksum']}")
    for key, what in (("buffer", "replay buffer"), ("fresh", f"fresh chains ({result['config']['eval_steps']} steps from noise)")):
        q = result[key]
        lines.append(f"  {what}: {q['on_modes']:.1%} within 3σ of a mode; {q['modes_hit']}/{N_MODES} modes hit; "
                     f"per mode {q['per_mode']}")
    return "\n".join(lines)
