r"""``kexue-fast demo iresnet``: an invertible residual network (:class:`~kexue_fast.iresnet.flow.IResNetFlow`)
fitting a 2-D density on the CPU by maximum likelihood.

* data (``DATA_SETS``, drawn by :func:`sample_data`): ``moons`` (two interleaved half circles),
  ``checkerboard`` (the dark squares of a 4×4 board on [−2, 2]², uniform) or ``rings`` (three
  concentric circles, radii 1, 2, 3, as many points per length on each); a training set of
  ``n_train`` points and a held-out test set of ``n_test``;
* the flow: ``n_blocks`` × [ActNorm, ``x + g(x)``], each ``g`` an MLP 2→hidden→hidden→2 under
  spectral norm with ``coeff`` (``Lip(g) < 1``), a standard-normal base;
* training: minibatches of the training set, loss ``−mean log p(x)`` with the truncated power
  series of the log-det (``n_terms`` terms, one Gaussian probe, fresh probes each step:
  ``offset = step``), every spectral norm refreshed once per step by one
  :class:`~kexue_fast.nn.SpectralNormGroup`, Adam with a cosine decay of the learning rate;
* evaluation: the trained weights in a flow with ``estimator="exact"`` (``slogdet`` of the 2×2
  Jacobian of every block), giving the test NLL and the density on a grid; samples through
  ``flow.sample`` (the fused fixed-point inverse); ``inverse(forward(x))`` of the test set for
  the reconstruction error and the iteration counts of every block's inverse. The baseline is a
  Gaussian with the training set's mean and covariance, scored on the same test set.

Everything random comes from ``seed``: the initialisation (``torch.manual_seed`` inside
``torch.random.fork_rng``, the caller's generator is left alone), the data and the minibatches
(a ``torch.Generator`` seeded with ``seed``), the log-det probes (Philox keys ``seed + i`` for
block ``i``, offset the step) and the samples (key ``seed + n_blocks``). The same seed gives
bitwise-identical parameters and numbers.
"""

from __future__ import annotations

import math
import time

import torch

from kexue_fast.demos import checksum, figure, progress_bar, save_figure
from kexue_fast.iresnet import IResNetFlow
from kexue_fast.nn import SpectralNormGroup

DEFAULT_OUT = "iresnet_demo.png"
DATA_SETS = ("moons", "checkerboard", "rings")
#: The square each data set is drawn in (the density grid and the scatter panels).
BOUNDS = {"moons": (-2.0, 2.0), "checkerboard": (-2.5, 2.5), "rings": (-3.75, 3.75)}
MOONS_NOISE, RINGS_NOISE, RING_RADII = 0.06, 0.08, (1.0, 2.0, 3.0)

# The recipe. DEFAULT: the command's run; QUICK: --quick.
DEFAULT = {
    "steps": 2500, "batch": 512, "n_blocks": 16, "hidden": 64, "n_layers": 3, "activation": "elu", "coeff": 0.9,
    "n_power_iterations": 1, "n_terms": 5, "lr": 5e-3, "n_train": 20000, "n_test": 5000, "n_samples": 2000,
    "grid": 160,
}  # fmt: skip
QUICK = {**DEFAULT, "steps": 800, "batch": 128, "n_test": 2000, "n_samples": 1000, "grid": 100}
#: The recipe entries that build the flow.
FLOW_SETTINGS = ("n_blocks", "hidden", "n_layers", "activation", "coeff", "n_power_iterations", "n_terms")


def sample_data(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points (float32, shape (n, 2)) of the data set ``name`` (module docstring)."""
    if name == "moons":
        upper = torch.rand(n, generator=generator) < 0.5
        angle = math.pi * torch.rand(n, generator=generator)
        x = torch.where(upper, angle.cos(), 1 - angle.cos()) - 0.5
        y = torch.where(upper, angle.sin(), 0.5 - angle.sin()) - 0.25
        return torch.stack([x, y], 1) + MOONS_NOISE * torch.randn(n, 2, generator=generator)
    if name == "checkerboard":  # square (i, j) of the 4×4 board is dark when i + j is even
        cell = torch.randint(8, (n,), generator=generator)
        row = cell // 2
        column = 2 * (cell % 2) + row % 2
        corner = torch.stack([column, row], 1).float() - 2
        return corner + torch.rand(n, 2, generator=generator)
    if name == "rings":
        radii = torch.tensor(RING_RADII)
        ring = torch.multinomial(radii, n, replacement=True, generator=generator)  # ∝ the circumference
        angle = 2 * math.pi * torch.rand(n, generator=generator)
        circle = torch.stack([angle.cos(), angle.sin()], 1) * radii[ring, None]
        return circle + RINGS_NOISE * torch.randn(n, 2, generator=generator)
    raise ValueError(f"demo iresnet: data must be one of {', '.join(DATA_SETS)}, got {name!r}")


def gaussian_nll(train: torch.Tensor, test: torch.Tensor) -> float:
    """The mean NLL (nats per point) of ``test`` under the Gaussian with ``train``'s mean and covariance."""
    train = train.double()
    gaussian = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    return -gaussian.log_prob(test.double()).mean().item()


def _flow(cfg: dict, seed: int, estimator: str) -> IResNetFlow:
    settings = {name: cfg[name] for name in FLOW_SETTINGS}
    return IResNetFlow(2, settings.pop("n_blocks"), settings.pop("hidden"), **settings, estimator=estimator, seed=seed)


def run(
    steps: int | None = None,
    seed: int = 0,
    out: str | None = DEFAULT_OUT,
    quick: bool = False,
    progress: bool = True,
    data: str = "moons",
    **overrides,
) -> dict:
    """Trains the flow on ``data`` for ``steps`` steps (default 2500; 800 with ``quick``), writes
    the PNG to ``out`` (``None``: no plot) and returns the summary: ``nll`` (the flow's test NLL,
    exact log-dets), ``gaussian_nll`` (the fitted Gaussian's), ``train_nll`` (the running mean of
    the training loss at the end), ``seconds`` (training), ``checksum`` (of the final parameters
    and buffers), ``reconstruction`` (max and median of ``‖inverse(forward(x)) − x‖_∞`` over the
    test set), ``iterations`` (mean and max per block of that inverse), ``data``, ``steps``,
    ``seed``, ``config`` and ``out``. ``overrides``: recipe entries (see ``DEFAULT``)."""
    if data not in DATA_SETS:
        raise ValueError(f"demo iresnet: data must be one of {', '.join(DATA_SETS)}, got {data!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"demo iresnet: seed must be an int >= 0, got {seed!r}")
    unknown = set(overrides) - set(DEFAULT)
    if unknown:
        raise TypeError(f"demo iresnet: unknown settings {sorted(unknown)}")
    cfg = {**(QUICK if quick else DEFAULT), **overrides}
    if steps is not None:
        cfg["steps"] = steps
    if cfg["steps"] < 1:
        raise ValueError(f"demo iresnet: steps must be >= 1, got {cfg['steps']}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rng = torch.Generator().manual_seed(seed)
        train = sample_data(data, cfg["n_train"], rng)
        test = sample_data(data, cfg["n_test"], rng)
        flow = _flow(cfg, seed, "series")
        group = SpectralNormGroup(flow)  # one power-iteration op per step for all layers
        opt = torch.optim.Adam(flow.parameters(), lr=cfg["lr"])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["steps"])

        bar = progress_bar(cfg["steps"], f"demo iresnet ({data})", progress)
        losses, running = [], None
        start = time.perf_counter()
        for step in range(cfg["steps"]):
            group.refresh()
            batch = train[torch.randint(len(train), (cfg["batch"],), generator=rng)]
            loss = -flow.log_prob(batch, offset=step).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
            running = losses[-1] if running is None else 0.98 * running + 0.02 * losses[-1]
            if bar is not None:
                bar.set_postfix(nll=f"{running:.3f}", refresh=False)
                bar.update()
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        group.release()

        # The trained weights with exact log-dets (the state dict holds ActNorm's init and the σ vectors).
        exact = _flow(cfg, seed, "exact")
        exact.load_state_dict(flow.state_dict())
        exact.eval()
        with torch.no_grad():
            nll = -exact.log_prob(test).mean().item()
            z, _ = exact(test)
            recovered, n_iter = exact.inverse(z, return_n_iter=True)
            error = (recovered - test).abs().amax(1)
            samples = exact.sample(cfg["n_samples"], seed=seed + cfg["n_blocks"])
        result = {
            "nll": nll,
            "gaussian_nll": gaussian_nll(train, test),
            "train_nll": running,
            "seconds": seconds,
            "checksum": checksum(flow),
            "reconstruction": {"max": error.max().item(), "median": error.median().item()},
            "iterations": {"mean": n_iter.double().mean().item(), "max": int(n_iter.max())},
            "data": data,
            "steps": cfg["steps"],
            "seed": seed,
            "config": cfg,
            "out": out,
        }
        if out is not None:
            _plot(out, exact, train, samples, error, n_iter, losses, result)
    return result


@torch.no_grad()
def _plot(path, flow, train, samples, error, n_iter, losses, result) -> None:
    cfg = result["config"]
    low, high = BOUNDS[result["data"]]
    grid = torch.linspace(low, high, cfg["grid"])
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    density = flow.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().view(cfg["grid"], cfg["grid"])

    fig, axes = figure(2, 3, figsize=(15, 9.4))
    shown = len(samples)
    for ax, points, color, title in (
        (axes[0, 0], train[:shown], "tab:blue", f"data: {result['data']} (first {shown} training points)"),
        (axes[0, 2], samples, "tab:red", f"{shown} samples: flow.sample (fixed-point inverse)"),
    ):
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.6, color=color, linewidths=0, label=title.split(":")[0])
        ax.set_title(title, fontsize=10)
    ax = axes[0, 1]
    image = ax.imshow(density.numpy(), origin="lower", extent=(low, high, low, high), cmap="magma")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("density p(x)", fontsize=9)
    ax.set_title(f"learnt density exp(log p), exact log-det; test NLL {result['nll']:.3f}", fontsize=10)
    for ax in axes[0]:
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_aspect("equal")
        ax.set_xlabel("x₁")
        ax.set_ylabel("x₂")
    for ax in (axes[0, 0], axes[0, 2]):
        ax.legend(loc="upper right", fontsize=8, markerscale=3)

    ax = axes[1, 0]
    ax.plot(losses, linewidth=0.5, color="grey", label="training loss (series log-det, each step)")
    ax.axhline(result["nll"], color="tab:red", label=f"flow, test NLL (exact) {result['nll']:.3f}")
    ax.axhline(result["gaussian_nll"], color="tab:blue", linestyle="--",
               label=f"fitted Gaussian, test NLL {result['gaussian_nll']:.3f}")  # fmt: skip
    ax.set_ylim(min(losses + [result["nll"]]) - 0.1, result["gaussian_nll"] + 0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("NLL (nats per point)")
    ax.set_title("negative log-likelihood", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[1, 1]
    floor, exact = 1e-9, int((error == 0).sum())  # an exact reconstruction shows at 1e-9
    label = f"{len(error)} test points" + (f" ({exact} exact, shown at 1e-9)" if exact else "")
    ax.hist(error.clamp_min(floor).log10().numpy(), bins=50, color="tab:green", label=label)
    ax.set_xlabel("log₁₀ ‖inverse(forward(x)) − x‖∞")
    ax.set_ylabel("test points")
    ax.set_title(f"reconstruction error: median {result['reconstruction']['median']:.1e}, "
                 f"max {result['reconstruction']['max']:.1e}", fontsize=10)  # fmt: skip
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[1, 2]
    counts = n_iter.flatten()
    ax.hist(counts.numpy(), bins=torch.arange(counts.min(), counts.max() + 2).numpy() - 0.5, color="tab:purple",
            label=f"{n_iter.shape[1]} blocks × {n_iter.shape[0]} points")  # fmt: skip
    ax.set_xlabel("iterations of one block's inverse (atol = rtol = 1e-6)")
    ax.set_ylabel("count")
    ax.set_title(f"inverse iterations: mean {result['iterations']['mean']:.1f}, max {result['iterations']['max']}",
                 fontsize=10)  # fmt: skip
    ax.legend(loc="upper right", fontsize=8)

    save_figure(
        fig,
        path,
        f"kexue-fast demo iresnet: {cfg['n_blocks']} blocks (ActNorm + MLP 2→{cfg['hidden']}→{cfg['hidden']}→2, "
        f"coeff {cfg['coeff']}), {cfg['n_terms']}-term series log-det, {result['steps']} steps, seed {result['seed']}",
    )


def summary(result: dict) -> str:
    """The lines ``kexue-fast demo iresnet`` prints after the run."""
    lines = [f"wrote {result['out']}"] if result["out"] is not None else []
    rec, it = result["reconstruction"], result["iterations"]
    lines += [
        f"data {result['data']}: trained {result['steps']} steps in {result['seconds']:.1f} s; running training NLL "
        f"{result['train_nll']:.3f}; parameters checksum {result['checksum']}",
        f"test NLL (nats per point, {result['config']['n_test']} held-out points, exact log-det): "
        f"i-ResNet flow {result['nll']:.3f}, fitted Gaussian {result['gaussian_nll']:.3f} "
        f"(flow better by {result['gaussian_nll'] - result['nll']:.3f})",
        f"inverse(forward(x)) of the test points: error max {rec['max']:.1e}, median {rec['median']:.1e}; "
        f"iterations per block mean {it['mean']:.1f}, max {it['max']}",
    ]
    return "\n".join(lines)
