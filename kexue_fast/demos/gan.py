r"""``kexue-fast demo gan``: a small DCGAN on scikit-learn's 8×8 digits, trained on the CPU, and
the cumulative ablation of the GAN posts' tricks — each variant adds one to the previous:

==========================  ===============================================================
``baseline``                G with plain ``nn.BatchNorm2d``; D ends in a linear logit
``+SELF-MOD``               G's BatchNorms become :class:`~kexue_fast.gan.SelfModulatedBatchNorm2d` (γ, β from z)
``+SELF-MOD+CR``            D's head becomes :class:`~kexue_fast.gan.CascadingRejectionHead` (``n_stages`` scores)
``+SELF-MOD+CR+EMA``        the ``+SELF-MOD+CR`` runs, evaluated with a :class:`~kexue_fast.EMA` of G's weights
==========================  ===============================================================

The EMA is evaluation-only (it does not change the training trajectory), so the last variant
reuses the third one's training runs: three trainings per seed, four evaluations.

* data: the 1797 digits of ``sklearn.datasets.load_digits`` (shipped with scikit-learn, no
  download), pixels 0..16 scaled to [−1, 1]; per seed a random ``n_heldout`` of them are held
  out, the rest train;
* G: ``z`` (``z_dim``) → Linear → ``(2·width, 2, 2)`` → [norm, ReLU, ConvTranspose 4×4 stride 2]
  twice (→ 4×4 → 8×8) → norm, ReLU, Conv 3×3 → tanh, the norm a BatchNorm or SELF-MOD;
* D: Conv 3×3 → Conv 4×4 stride 2 → Conv 4×4 stride 2 (LeakyReLU 0.2), flattened, then the
  head; :func:`kexue_fast.nn.spectral_norm` on every layer, head included, the power iterations
  of all of them run once per step by one :class:`~kexue_fast.nn.SpectralNormGroup`;
* loss: hinge, through :func:`~kexue_fast.gan.cascading_rejection_loss` for both heads (the
  linear logit is the one-stage case, ``(B, 1)`` scores), plus ``r1/2`` times the R1 penalty
  :func:`~kexue_fast.gan.zero_centered_gradient_penalty` on the real batch, in every variant;
  one D step, then one G step, Adam;
* EMA: ``kexue_fast.EMA(G, decay, warmup=10)``, updated after each G step (the warm-up makes
  it an average of roughly the last tenth of the run, so the random initialisation is
  forgotten); G's BatchNorm statistics are averaged with the weights;
* evaluation: G in eval mode (running statistics) on a fixed batch of ``n_heldout`` noise
  vectors; sample quality is the unbiased kernel MMD² (:func:`mmd2`, Gaussian kernel) between
  those samples and the held-out digits, in pixel space and in the 64 hidden features of a
  small classifier (:class:`DigitClassifier`) that the demo trains on the training digits; the
  bandwidth of each space is the median pairwise distance of the held-out digits (median
  heuristic, fixed per seed and space, so the variants are measured with one ruler). The floor
  is the MMD² of ``n_heldout`` training digits (real against real); the ceiling that of uniform
  noise on [−1, 1]⁶⁴.

Everything random comes from the seeds ``seed, seed + 1, …`` (``seeds`` of them): one
``torch.Generator`` per seed draws the split, the evaluation noise, the floor and ceiling sets
and the seeds of the initialisation and of the training stream (minibatches and z), which all
variants of that seed share; the initialisation runs under ``torch.manual_seed`` inside
``torch.random.fork_rng``, so the caller's generator is left alone. The same seed gives
bitwise-identical weights and numbers.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from kexue_fast.demos import checksum, figure, progress_bar, save_figure
from kexue_fast.ema import EMA
from kexue_fast.gan import (
    CascadingRejectionHead,
    SelfModulatedBatchNorm2d,
    cascading_rejection_loss,
    zero_centered_gradient_penalty,
)
from kexue_fast.nn import SpectralNormGroup, spectral_norm

DEFAULT_OUT = "gan_demo.png"

#: variant -> (SELF-MOD in G, Cascading Rejection head in D, evaluated with the EMA of G)
VARIANTS = {
    "baseline": (False, False, False),
    "+SELF-MOD": (True, False, False),
    "+SELF-MOD+CR": (True, True, False),
    "+SELF-MOD+CR+EMA": (True, True, True),
}
#: The variants that are trained (the EMA one is the +SELF-MOD+CR run, evaluated with its EMA).
TRAINED = ("baseline", "+SELF-MOD", "+SELF-MOD+CR")
SPACES = ("pixels", "features")

# The recipe. DEFAULT: the command's run; QUICK: --quick.
DEFAULT = {
    "steps": 1000, "seeds": 3, "batch": 64, "z_dim": 32, "width": 32, "hidden": 32, "n_stages": 4, "lr": 2e-4,
    "betas": (0.5, 0.999), "r1": 1.0, "ema_decay": 0.999, "n_heldout": 500, "eval_every": 100,
    "classifier_steps": 300,
}  # fmt: skip
QUICK = {**DEFAULT, "steps": 250, "seeds": 2, "eval_every": 50}
PIXELS = 64  # 8×8


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits as ``(1797, 1, 8, 8)`` float32 images in [−1, 1] and their labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ModuleNotFoundError(
            'demo gan: needs scikit-learn (its 8×8 digits), which is not installed: pip install "kexue_fast[demo]"'
        ) from None
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # pixels 0..16
    return images, torch.tensor(digits.target, dtype=torch.long)


class Generator(nn.Module):
    """G: ``z`` ``(N, z_dim)`` → images ``(N, 1, 8, 8)`` in (−1, 1) (module docstring); ``self_mod``:
    ``modulated(channels, z_dim, hidden)`` layers (:class:`~kexue_fast.gan.SelfModulatedBatchNorm2d`;
    the benchmark passes its plain-PyTorch twin) instead of ``nn.BatchNorm2d``."""

    def __init__(self, z_dim: int, width: int, self_mod: bool, hidden: int = 32, modulated=SelfModulatedBatchNorm2d):
        super().__init__()
        self.self_mod, self.width = self_mod, width
        channels = (2 * width, width, width // 2)
        self.fc = nn.Linear(z_dim, channels[0] * 4)
        self.norms = nn.ModuleList(modulated(c, z_dim, hidden) if self_mod else nn.BatchNorm2d(c) for c in channels)
        self.layers = nn.ModuleList([
            nn.ConvTranspose2d(channels[0], channels[1], 4, stride=2, padding=1),  # 2×2 → 4×4
            nn.ConvTranspose2d(channels[1], channels[2], 4, stride=2, padding=1),  # 4×4 → 8×8
            nn.Conv2d(channels[2], 1, 3, padding=1),
        ])  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(len(z), 2 * self.width, 2, 2)
        for norm, layer in zip(self.norms, self.layers):
            x = layer(F.relu(norm(x, z) if self.self_mod else norm(x)))
        return torch.tanh(x)


def discriminator(
    width: int, cascading: bool, n_stages: int, normalize=spectral_norm, cascade=CascadingRejectionHead
) -> nn.Sequential:
    """D: images ``(N, 1, 8, 8)`` → scores ``(N, 1)`` (a linear logit) or, with ``cascading``,
    ``(N, n_stages)`` (``cascade(d, n_stages)``: a :class:`~kexue_fast.gan.CascadingRejectionHead`);
    every layer under ``normalize`` (:func:`kexue_fast.nn.spectral_norm`; the benchmark passes
    torch's and its plain cascade)."""
    d = 4 * width * 2 * 2
    head = cascade(d, n_stages) if cascading else nn.Linear(d, 1)
    return nn.Sequential(
        normalize(nn.Conv2d(1, width, 3, padding=1)), nn.LeakyReLU(0.2),
        normalize(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),  # 8×8 → 4×4
        normalize(nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),  # 4×4 → 2×2
        nn.Flatten(), normalize(head),
    )  # fmt: skip


def build(cfg: dict, variant: str) -> tuple[Generator, nn.Sequential]:
    """G and D of ``variant`` (a key of :data:`VARIANTS`) with the recipe ``cfg``, initialised
    from the global generator."""
    self_mod, cascading, _ = VARIANTS[variant]
    G = Generator(cfg["z_dim"], cfg["width"], self_mod, cfg["hidden"])
    return G, discriminator(cfg["width"], cascading, cfg["n_stages"])


class DigitClassifier(nn.Module):
    """The ruler of the feature-space MMD: an MLP 64→128→64→10 (ReLU); ``features`` is its 64-unit
    hidden layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def train_classifier(images, labels, steps: int, generator: torch.Generator) -> DigitClassifier:
    """A :class:`DigitClassifier` trained by Adam (lr 3e-3, batches of 128) for ``steps`` steps."""
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        index = torch.randint(len(images), (128,), generator=generator)
        loss = F.cross_entropy(model(images[index]), labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def median_distance(x: torch.Tensor) -> float:
    """The median of the pairwise Euclidean distances between the rows of ``x`` (``i < j``)."""
    x = x.flatten(1).double()
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return torch.cdist(x, x)[i, j].median().item()


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    r"""The unbiased estimate of the squared MMD between the samples ``x`` ``(m, …)`` and ``y``
    ``(n, …)`` (flattened to vectors; ``m, n >= 2``) with the Gaussian kernel
    ``k(a, b) = exp(−‖a − b‖² / (2·bandwidth²))``::

        MMD²ᵤ = Σ_{i≠i'} k(x_i, x_i') / (m(m−1)) + Σ_{j≠j'} k(y_j, y_j') / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / (mn)

    in float64. It can be slightly negative when the two distributions are the same."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"mmd2: needs at least 2 samples on each side, got {m} and {n}")
    scale = -0.5 / bandwidth**2
    kxx = torch.cdist(x, x).square().mul(scale).exp()
    kyy = torch.cdist(y, y).square().mul(scale).exp()
    kxy = torch.cdist(x, y).square().mul(scale).exp()
    within = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return (within - 2 * kxy.mean()).item()


class _Ruler:
    """MMD² to the held-out digits of one seed, in pixel space and in the classifier's features,
    with one median-heuristic bandwidth per space."""

    def __init__(self, heldout: torch.Tensor, classifier: DigitClassifier):
        self.classifier = classifier
        self.reference = {"pixels": heldout, "features": self.features(heldout)}
        self.bandwidth = {space: median_distance(ref) for space, ref in self.reference.items()}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)

    def __call__(self, images: torch.Tensor, spaces=SPACES) -> dict[str, float]:
        points = {"pixels": images, "features": self.features(images) if "features" in spaces else None}
        return {s: mmd2(points[s], self.reference[s], self.bandwidth[s]) for s in spaces}


@torch.no_grad()
def _samples(G: Generator, z: torch.Tensor) -> torch.Tensor:
    """G's images of ``z`` in eval mode (running BatchNorm statistics); G is left in training mode."""
    G.eval()
    try:
        return G(z)
    finally:
        G.train()


def d_losses(D, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D's hinge loss on ``real`` and ``fake`` (through :func:`~kexue_fast.gan.cascading_rejection_loss`)
    and the R1 penalty on ``real`` (its forward reused for the loss)."""
    r1, real_scores = zero_centered_gradient_penalty(D, real, return_scores=True)
    return cascading_rejection_loss(real_scores, "real") + cascading_rejection_loss(D(fake), "fake"), r1


def g_loss_of(D, fake: torch.Tensor) -> torch.Tensor:
    """G's hinge loss on ``fake``."""
    return cascading_rejection_loss(D(fake), "generator")


def train_step(G, D, opt_g, opt_d, real, z, r1_weight: float, d_losses=d_losses, g_loss_of=g_loss_of):
    """One training step (module docstring): ``fake = G(z)``, one D step on
    ``d_loss + r1_weight/2·r1`` of ``d_losses(D, real, fake.detach())``, one G step on
    ``g_loss_of(D, fake)``; returns the detached ``(d_loss, g_loss)``. The spectral-norm refresh and
    the EMA update are the caller's (before and after)."""
    fake = G(z)
    d_loss, r1 = d_losses(D, real, fake.detach())
    opt_d.zero_grad(set_to_none=True)
    (d_loss + r1_weight / 2 * r1).backward()
    opt_d.step()
    g_loss = g_loss_of(D, fake)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return d_loss.detach(), g_loss.detach()


def _train(cfg, variant, train, init_seed, stream_seed, bar, record):
    """Trains ``variant`` (one of :data:`TRAINED`); returns ``G``, its EMA (``None`` but for the
    ``+SELF-MOD+CR`` run) and the losses (``D``, ``G``: one float per step).
    ``record(variant, step, G, ema)`` is called every ``eval_every`` steps and at the end."""
    torch.manual_seed(init_seed)
    G, D = build(cfg, variant)
    ema = EMA(G, decay=cfg["ema_decay"], warmup=10) if variant == "+SELF-MOD+CR" else None
    group = SpectralNormGroup(D)  # every layer's power iteration in one op call per step
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg["lr"], betas=cfg["betas"])
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg["lr"], betas=cfg["betas"])
    rng = torch.Generator().manual_seed(stream_seed)
    losses = {"D": [], "G": []}
    for step in range(cfg["steps"]):
        if step % cfg["eval_every"] == 0:
            record(variant, step, G, ema)
        group.refresh()
        real = train[torch.randint(len(train), (cfg["batch"],), generator=rng)]
        z = torch.randn(cfg["batch"], cfg["z_dim"], generator=rng)
        d_loss, g_loss = train_step(G, D, opt_g, opt_d, real, z, cfg["r1"])
        if ema is not None:
            ema.update()
        losses["D"].append(d_loss.item())
        losses["G"].append(g_loss.item())
        if bar is not None:
            bar.set_postfix(variant=variant, d=f"{losses['D'][-1]:.3f}", g=f"{losses['G'][-1]:.3f}", refresh=False)
            bar.update()
    record(variant, cfg["steps"], G, ema)
    group.release()
    return G, ema, losses


def _check(seed, steps, overrides) -> dict:
    """The recipe entries ``run`` was given (``steps`` among them when set), validated."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"demo gan: seed must be an int >= 0, got {seed!r}")
    unknown = set(overrides) - set(DEFAULT)
    if unknown:
        raise TypeError(f"demo gan: unknown settings {sorted(unknown)}")
    cfg = {**overrides}
    if steps is not None:
        cfg["steps"] = steps
    for name, low in (("steps", 1), ("seeds", 1), ("eval_every", 1), ("n_heldout", 2)):
        if name in cfg and cfg[name] < low:
            raise ValueError(f"demo gan: {name} must be >= {low}, got {cfg[name]}")
    return cfg


def run(
    steps: int | None = None,
    seed: int = 0,
    out: str | None = DEFAULT_OUT,
    quick: bool = False,
    progress: bool = True,
    **overrides,
) -> dict:
    """Trains the three variants of :data:`TRAINED` for ``steps`` steps (default 1000; 250 with
    ``quick``) on each of the seeds ``seed, seed + 1, …`` (3; 2 with ``quick``), writes the PNG to
    ``out`` (``None``: no plot) and returns:

    * ``mmd``: variant → space (``pixels``, ``features``) → the final MMD² of each seed;
    * ``floor`` / ``ceiling``: space → the MMD² of ``n_heldout`` training digits / of uniform noise, per seed;
    * ``curves``: variant → ``steps`` (where measured) and ``pixels`` (per seed, the MMD² there);
      ``losses``: trained variant → ``D`` / ``G`` → per seed, the loss of every step;
    * ``checksums``: variant → per seed, the checksum of G's weights and buffers (the averaged
      ones for the EMA variant); ``accuracy``: the classifier's held-out accuracy, per seed;
    * ``seeds``, ``steps``, ``seconds`` (everything but the plot), ``config``, ``out``.

    ``overrides``: recipe entries (see ``DEFAULT``). Raises ModuleNotFoundError without scikit-learn."""
    cfg = {**(QUICK if quick else DEFAULT), **_check(seed, steps, overrides)}
    images, labels = load_digits()
    if cfg["n_heldout"] > len(images) - cfg["n_heldout"]:
        raise ValueError(f"demo gan: n_heldout must be at most half the {len(images)} digits, got {cfg['n_heldout']}")
    seeds = [seed + i for i in range(cfg["seeds"])]
    result = {
        "mmd": {v: {s: [] for s in SPACES} for v in VARIANTS},
        "floor": {s: [] for s in SPACES},
        "ceiling": {s: [] for s in SPACES},
        "curves": {v: {"steps": [], "pixels": []} for v in VARIANTS},
        "losses": {v: {"D": [], "G": []} for v in TRAINED},
        "checksums": {v: [] for v in VARIANTS},
        "accuracy": [],
    }
    grids = {}  # panel title -> the first seed's images (held-out digits, each variant's samples of the fixed z)
    bar = progress_bar(len(seeds) * len(TRAINED) * cfg["steps"], "demo gan", progress)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        for s in seeds:
            _run_seed(cfg, s, images, labels, result, grids if s == seed else None, bar)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    result.update(seeds=seeds, steps=cfg["steps"], seconds=seconds, config=cfg, out=out)
    if out is not None:
        _plot(out, result, grids)
    return result


def _views(variant: str, ema: EMA | None):
    """``(name, context)``: the trained G as it is and, for the run with an EMA, G under its averaged weights."""
    views = [(variant, contextlib.nullcontext())]
    if ema is not None:
        views.append(("+SELF-MOD+CR+EMA", ema.applied()))
    return views


def _run_seed(cfg, seed, images, labels, result, grids, bar) -> None:
    """One seed: the split, the classifier and the rulers, the three trainings; appends to ``result``
    and, when ``grids`` is a dict, puts the images of the figure in it."""
    n = cfg["n_heldout"]
    rng = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=rng)
    heldout, train, train_labels = images[order[:n]], images[order[n:]], labels[order[n:]]
    z_eval = torch.randn(n, cfg["z_dim"], generator=rng)
    real = train[torch.randperm(len(train), generator=rng)[:n]]
    noise = torch.rand(n, 1, 8, 8, generator=rng) * 2 - 1
    init_seed, stream_seed, classifier_seed = torch.randint(2**62, (3,), generator=rng).tolist()
    torch.manual_seed(classifier_seed)
    classifier = train_classifier(train, train_labels, cfg["classifier_steps"], rng)
    with torch.no_grad():
        result["accuracy"].append((classifier(heldout).argmax(1) == labels[order[:n]]).double().mean().item())
    ruler = _Ruler(heldout, classifier)
    for key, reference in (("floor", real), ("ceiling", noise)):
        for space, value in ruler(reference).items():
            result[key][space].append(value)
    curves = {v: [] for v in VARIANTS}
    first = grids is not None

    def record(variant, step, G, ema):
        for name, context in _views(variant, ema):
            with context:
                curves[name].append(ruler(_samples(G, z_eval), ("pixels",))["pixels"])
            if first:
                result["curves"][name]["steps"].append(step)

    for variant in TRAINED:
        G, ema, losses = _train(cfg, variant, train, init_seed, stream_seed, bar, record)
        for key in ("D", "G"):
            result["losses"][variant][key].append(losses[key])
        for name, context in _views(variant, ema):
            with context:
                samples = _samples(G, z_eval)
                result["checksums"][name].append(checksum(G))
            for space, value in ruler(samples).items():
                result["mmd"][name][space].append(value)
            if first:
                grids[name] = samples[:64]
    for variant in VARIANTS:
        result["curves"][variant]["pixels"].append(curves[variant])
    if first:
        grids["held-out digits"] = heldout[:64]


def spread(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value) of ``values``."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)


def _tile(images: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """``(n, 1, 8, 8)`` images as one ``rows·9 − 1 × columns·9 − 1`` grid, one pixel of −1 between them."""
    n = len(images)
    rows = math.ceil(n / columns)
    padded = torch.full((rows * columns, 9, 9), -1.0)
    padded[:n, :8, :8] = images[:, 0]
    return padded.view(rows, columns, 9, 9).permute(0, 2, 1, 3).reshape(rows * 9, columns * 9)[:-1, :-1]


@torch.no_grad()
def _plot(path, result, grids) -> None:
    cfg, seeds = result["config"], result["seeds"]
    colors = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    fig, axes = figure(2, 5, figsize=(20, 8.6), gridspec_kw={"height_ratios": [1, 0.9]})
    for ax, title in zip(axes[0], ("held-out digits", *VARIANTS)):
        ax.imshow(_tile(grids[title]).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if title in VARIANTS:
            mean, std = spread(result["mmd"][title]["pixels"])
            title = f"{title}: MMD² {mean:.4f} ± {std:.4f}\n(samples of seed {seeds[0]}, fixed z)"
        ax.set_title(title, fontsize=9)

    for ax, key in zip(axes[1, :2], ("D", "G")):
        for variant in TRAINED:
            per_seed = torch.tensor(result["losses"][variant][key])  # (seeds, steps)
            window = max(1, cfg["steps"] // 50)
            smooth = F.avg_pool1d(per_seed.mean(0)[None, None], window, stride=1).flatten()
            ax.plot(torch.arange(len(smooth)) + window // 2, smooth, color=colors[variant], label=variant)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{key} loss (hinge, mean over seeds)")
        ax.set_title(f"{key}'s loss (running mean over {window} steps)", fontsize=9)
        ax.legend(fontsize=8)

    ax = axes[1, 2]
    for variant in VARIANTS:
        curve = torch.tensor(result["curves"][variant]["pixels"]).mean(0)
        ax.plot(result["curves"][variant]["steps"], curve.clamp_min(1e-4), color=colors[variant], label=variant)
    ax.axhline(spread(result["ceiling"]["pixels"])[0], color="black", linestyle=":", label="ceiling: uniform noise")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("MMD² in pixel space (mean over seeds, floored at 1e-4)")
    ax.set_title(f"MMD² to the held-out digits, every {cfg['eval_every']} steps", fontsize=9)
    ax.legend(fontsize=8)

    for ax, space in zip(axes[1, 3:], SPACES):
        stats = [spread(result["mmd"][v][space]) for v in VARIANTS]
        ax.bar(range(len(VARIANTS)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4,
               color=[colors[v] for v in VARIANTS], label=f"mean ± std over {len(seeds)} seeds")  # fmt: skip
        for i, variant in enumerate(VARIANTS):
            ax.scatter([i] * len(seeds), result["mmd"][variant][space], color="black", s=10, zorder=3,
                       label="each seed" if i == 0 else None)  # fmt: skip
        ax.axhline(spread(result["floor"][space])[0], color="black", linestyle="--", label="floor: real vs real")
        ax.set_xticks(range(len(VARIANTS)), [v.replace("+", "\n+").lstrip("\n") for v in VARIANTS], fontsize=7)
        ax.set_xlabel("variant")
        ax.set_ylabel(f"final MMD² ({space})")
        where = "pixel space" if space == "pixels" else "classifier features"
        ax.set_title(f"final MMD², {where} (noise: {spread(result['ceiling'][space])[0]:.2f})", fontsize=9)
        ax.legend(fontsize=7)

    save_figure(
        fig,
        path,
        f"kexue-fast demo gan: DCGAN on the 8×8 digits, {result['steps']} steps × {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}), batch {cfg['batch']}, hinge + R1 ({cfg['r1']}), SN on every D layer; "
        f"EMA decay {cfg['ema_decay']}",
    )


def summary(result: dict) -> str:
    """The lines ``kexue-fast demo gan`` prints after the run: the ablation table and its floor and ceiling."""
    lines = [f"wrote {result['out']}"] if result["out"] is not None else []
    seeds, n = result["seeds"], result["config"]["n_heldout"]
    lines += [
        f"trained {len(TRAINED)} variants × {len(seeds)} seeds ({', '.join(map(str, seeds))}) × {result['steps']} "
        f"steps in {result['seconds']:.1f} s; digit classifier held-out accuracy "
        + ", ".join(f"{a:.3f}" for a in result["accuracy"]),
        f"MMD² (unbiased, Gaussian kernel, median-heuristic bandwidth) to {n} held-out digits; mean ± std over seeds "
        "[each seed]:",
    ]
    rows = [(v, result["mmd"][v]) for v in VARIANTS]
    rows += [("floor: real vs real", result["floor"]), ("ceiling: uniform noise", result["ceiling"])]
    width = max(len(name) for name, _ in rows) + 2
    lines.append(f"  {'variant':<{width}}{'pixels':<44}classifier features")
    for name, values in rows:
        cells = []
        for space in SPACES:
            mean, std = spread(values[space])
            cells.append(f"{mean:.4f} ± {std:.4f} [{', '.join(f'{x:.4f}' for x in values[space])}]")
        lines.append(f"  {name:<{width}}{cells[0]:<44}{cells[1]}")
    lines.append("  (+EMA: the +SELF-MOD+CR runs evaluated with the EMA of G's weights; no training of its own)")
    lines.append("G checksums (seed " + str(seeds[0]) + "): "
                 + ", ".join(f"{v} {result['checksums'][v][0]}" for v in VARIANTS))  # fmt: skip
    return "\n".join(lines)
