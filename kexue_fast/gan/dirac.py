r"""The 2-D Dirac GAN of the GAN-dynamics post (kexue.fm/archives/6583; docs/gan.md, "Dirac-GAN
dynamics"): the systems of the post's script ``bojone/gan/gan_numeric.py`` as vector fields,
integrated in continuous time, stepped in discrete time, averaged by the EMA, and plotted.

The toy: real data are a point mass at 0, the generator's only sample is θ ∈ R², the critic is
linear, ``D(x) = ⟨φ, x⟩`` (normalised for WGAN). Gradient play is the ODE

    φ̇ = ∇_φ (D's objective),    θ̇ = −∇_θ (G's loss)

over the state ``x = (φ₁, φ₂, θ₁, θ₂)`` (that order, as in the script), from the script's
``INITIAL_STATE = (0.1, 0.2, 0.2, 0.1)``. The equilibrium is θ = 0 (and φ = 0). Each field's
formula is in its own docstring: :func:`vanilla`, :func:`wgan`, :func:`wgan_gp`, :func:`gan_qp`.
:data:`SYSTEMS` binds them to the post's constants, horizon ``T`` and output spacing ``h``.

Two quantities explain most of what the trajectories do (the tests check them):

* the distance ``‖x‖`` to the equilibrium, with ``d(‖x‖²/2)/dt = ⟨x, F(x)⟩``;
* the "angular momentum" ``L = θ₁φ₂ − θ₂φ₁`` (the 2-D cross product ``θ × φ``). Since
  ``‖θ‖² + ‖φ‖² ≥ 2‖θ‖‖φ‖ ≥ 2|L|``, a conserved ``L ≠ 0`` keeps the state at distance
  ``≥ √(2|L|)`` from the equilibrium forever.

Integration: :func:`rk45`, an adaptive Dormand–Prince 5(4) written here (scipy, the script's
``solve_ivp``, is not a dependency), and :func:`rk4`, the classic fixed-step Runge–Kutta, both
in torch on float64 states of shape ``(..., 4)``. Discrete play: :func:`simultaneous_steps`
and :func:`alternating_steps`. :func:`ema_trajectory` averages the generator's trajectory with
:class:`kexue_fast.EMA` itself (so with its formula, warm-up and bias correction);
:func:`simulate` does all of it for one system and :func:`plot` draws the phase portraits.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from kexue_fast.ema import EMA

Field = Callable[[torch.Tensor], torch.Tensor]

#: The script's initial state (φ₁, φ₂, θ₁, θ₂).
INITIAL_STATE = (0.1, 0.2, 0.2, 0.1)
#: The EMA decay per output sample used by :func:`simulate` (see :func:`ema_trajectory`).
EMA_DECAY = 0.995


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :2], x[..., 2:]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1, keepdim=True)


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def _unit(v: torch.Tensor) -> torch.Tensor:
    """``v/‖v‖``, and 0 where ``v = 0`` (0 divided by the smallest normal number)."""
    return v / _norm(v).clamp_min(torch.finfo(v.dtype).tiny)


def vanilla(x: torch.Tensor) -> torch.Tensor:
    """The non-saturating GAN: D minimises ``−log(1 − σ(θ·φ))`` (and ``−log σ(D(0))``, a
    constant), G minimises ``−log σ(θ·φ)``:

        φ̇ = −σ(θ·φ) θ,    θ̇ = (1 − σ(θ·φ)) φ

    Near 0, ``φ̇ ≈ −θ/2, θ̇ ≈ φ/2``: a rotation with eigenvalues ``±i/2`` (period 4π). ``L`` is
    conserved exactly (``θ × φ̇ + θ̇ × φ = 0``), so the state never comes closer than ``√(2|L₀|)``;
    ``d(‖x‖²/2)/dt = −(2σ(u) − 1) u ≤ 0`` with ``u = θ·φ``, a loss of order ``‖x‖⁴`` that lets it
    creep inwards towards that bound, never to the equilibrium."""
    phi, theta = _split(x)
    p = torch.sigmoid(_dot(phi, theta))
    return torch.cat([-p * theta, (1 - p) * phi], dim=-1)


def wgan(x: torch.Tensor) -> torch.Tensor:
    """WGAN with a hard Lipschitz constraint (weight/spectral normalisation), ``D(x) = ⟨φ, x⟩/‖φ‖``;
    D maximises ``D(0) − D(θ)``, G minimises ``−D(θ)``:

        φ̇ = −θ/‖φ‖ + (θ·φ) φ/‖φ‖³,    θ̇ = φ/‖φ‖

    ``‖φ‖`` is conserved (``φ·φ̇ = 0``) and θ moves at unit speed, ``‖θ̇‖ = 1``, for ever: there is
    no equilibrium to settle in. The field is singular at ``φ = 0``."""
    phi, theta = _split(x)
    norm = _norm(phi)
    return torch.cat([-theta / norm + _dot(theta, phi) * phi / norm**3, phi / norm], dim=-1)


def wgan_gp(x: torch.Tensor, lam: float = 0.1, c: float = 0.0) -> torch.Tensor:
    """WGAN-GP at states ``x`` (..., 4), with ``lam`` = λ: D maximises ``D(0) − D(θ) − λ(‖∇_x D‖ − c)²``
    with ``∇_x D = φ`` wherever the penalty is sampled; G minimises ``−D(θ)``:

        φ̇ = −θ − 2λ(1 − c/‖φ‖) φ,    θ̇ = φ

    (``c φ/‖φ‖`` taken as 0 at ``φ = 0``). ``c = 0`` (zero-centred, WGAN-div/R1) is linear,
    ``θ̈ + 2λθ̇ + θ = 0``: a spiral into the equilibrium at rate ``e^{−λt}``. ``c = 1`` pulls
    ``‖φ‖`` to ``c``; with ``‖φ‖ ≡ c`` the system must keep ``φ ⟂ θ`` and ``‖θ‖ = ‖φ‖``, so it
    ends on the circle ``‖θ‖ = c`` (a limit cycle), not at 0."""
    phi, theta = _split(x)
    return torch.cat([-theta - 2 * lam * (phi - c * _unit(phi)), phi], dim=-1)


def gan_qp(x: torch.Tensor, lam: float = 1.0, l2: float = 0.0) -> torch.Tensor:
    """GAN-QP at states ``x`` (..., 4), with ``lam`` = λ: D maximises
    ``D(0) − D(θ) − (D(0) − D(θ))²/(2λ‖0 − θ‖) − (l2/2)‖φ‖²`` (the last term: an L2 penalty on
    D's weights, 0 by default); G minimises ``−D(θ)``:

        φ̇ = −θ − (θ·φ) θ/(λ‖θ‖) − l2·φ,    θ̇ = φ

    (the middle term 0 at ``θ = 0``). Without L2, ``L`` is conserved (the middle term is along θ),
    and the trajectory settles on the circle ``‖θ‖ = ‖φ‖ = √|L₀|``: it orbits for ever. With
    ``l2 > 0`` the linearisation is ``θ̈ + l2·θ̇ + θ = 0``: a spiral in at rate ``e^{−l2·t/2}``.

    The quadratic term's denominator is ``‖x_real − x_fake‖ = ‖θ‖``, as GAN-QP defines it; the
    script divides by ``‖φ‖`` instead (its variable ``norm``). Both give the same conservation of
    ``L`` and the same circle."""
    phi, theta = _split(x)
    return torch.cat([-theta - _dot(theta, phi) * _unit(theta) / lam - l2 * phi, phi], dim=-1)


@dataclasses.dataclass(frozen=True)
class System:
    """One Dirac-GAN system: ``fn(x, **params)`` is its field; ``T`` the horizon and ``h`` the
    output spacing of :func:`simulate`; ``label`` the name in titles."""

    name: str
    label: str
    fn: Callable[..., torch.Tensor]
    params: Mapping[str, float]
    T: float
    h: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, **self.params)


#: name → system, with the script's constants. Horizons: the script's (vanilla 100, WGAN 10 with
#: h = 0.01, WGAN-GP c = 0 40), except 100 for WGAN-GP c = 1 and GAN-QP (the script's 40 ends
#: before they settle on their circles: ‖θ‖ still varies by 5%) and for GAN-QP + L2 (not in the
#: script; the post's figure shows it converging; L2 weight 0.1, as TECHNIQUES.md §5.2).
SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("vanilla", "vanilla GAN (non-saturating)", vanilla, {}, 100.0, 0.1),
        System("wgan", "WGAN, hard-normalised critic", wgan, {}, 10.0, 0.01),
        System("wgan-gp-0", "WGAN-GP, c = 0", wgan_gp, {"lam": 0.1, "c": 0.0}, 40.0, 0.1),
        System("wgan-gp-1", "WGAN-GP, c = 1", wgan_gp, {"lam": 0.1, "c": 1.0}, 100.0, 0.1),
        System("gan-qp", "GAN-QP", gan_qp, {"lam": 1.0, "l2": 0.0}, 100.0, 0.1),
        System("gan-qp-l2", "GAN-QP + L2 on D", gan_qp, {"lam": 1.0, "l2": 0.1}, 100.0, 0.1),
    )
}


def angular_momentum(x: torch.Tensor) -> torch.Tensor:
    """``L = θ₁φ₂ − θ₂φ₁`` of states ``x`` of shape ``(..., 4)``, shape ``(...)`` (see the module docstring)."""
    return x[..., 2] * x[..., 1] - x[..., 3] * x[..., 0]


def time_grid(T: float, h: float) -> torch.Tensor:
    """``0, h, 2h, …, T`` (float64; ``round(T/h) + 1`` points, the last exactly ``T``)."""
    if not (math.isfinite(T) and math.isfinite(h) and T > 0 and h > 0):
        raise ValueError(f"dirac: T and h must be finite and > 0, got T={T!r}, h={h!r}")
    n = max(1, round(T / h))
    return torch.linspace(0.0, T, n + 1, dtype=torch.float64)


def _check_grid(t: torch.Tensor) -> list[float]:
    if t.dim() != 1 or t.numel() < 1 or not bool(torch.isfinite(t).all()):
        raise ValueError("dirac: t must be a 1-D tensor of finite times")
    times = t.tolist()
    if any(b <= a for a, b in itertools.pairwise(times)):
        raise ValueError("dirac: t must be strictly increasing")
    return times


def rk4(field: Field, x0: torch.Tensor, t: torch.Tensor, substeps: int = 1) -> torch.Tensor:
    """Integrates ``ẋ = field(x)`` from ``x0`` by the classic 4th-order Runge–Kutta method with
    fixed steps: ``substeps`` equal steps per interval of the grid ``t``. Returns the states at
    the times ``t``, shape ``(len(t), *x0.shape)``."""
    times = _check_grid(t)
    if substeps < 1:
        raise ValueError(f"dirac.rk4: substeps must be >= 1, got {substeps}")
    x, out = x0, [x0]
    for a, b in itertools.pairwise(times):
        h = (b - a) / substeps
        for _ in range(substeps):
            k1 = field(x)
            k2 = field(x + (h / 2) * k1)
            k3 = field(x + (h / 2) * k2)
            k4 = field(x + h * k3)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(x)
    return torch.stack(out)


# Dormand–Prince 5(4): nodes, stage coefficients, 5th-order weights (also the last stage: FSAL)
# and the difference 5th − 4th order weights (the error estimate, over the seven stages).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip((*_DP_B, 0.0), _DP_B4))


def _combine(x: torch.Tensor, h: float, weights: Sequence[float], ks: Sequence[torch.Tensor]) -> torch.Tensor:
    return x + h * sum(w * k for w, k in zip(weights, ks) if w != 0.0)


def rk45(
    field: Field, x0: torch.Tensor, t: torch.Tensor, rtol: float = 1e-6, atol: float = 1e-9, max_steps: int = 10**6
) -> torch.Tensor:
    """Integrates ``ẋ = field(x)`` from ``x0`` by the adaptive Dormand–Prince 5(4) (the method of
    scipy's ``solve_ivp(method="RK45")``), local
    extrapolation (the 5th-order solution is kept) and FSAL. A step is accepted when the RMS over
    all components of ``error/(atol + rtol·max(|x|, |x_new|))`` is at most 1; the next step is
    the last times ``0.9·err^(−1/5)``, clamped to [0.2, 10]. Steps are shortened to land exactly on
    every time of ``t`` (no interpolation), so they never exceed the grid's spacing.

    Returns the states at the times ``t``, shape ``(len(t), *x0.shape)``. Raises RuntimeError if
    the step size underflows or ``max_steps`` steps (accepted or not) are spent."""
    times = _check_grid(t)
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"dirac.rk45: rtol and atol must be > 0, got {rtol!r}, {atol!r}")
    x, f = x0, field(x0)
    out, now = [x0], times[0]
    h = 0.01 * (times[-1] - times[0])  # a cautious first step; the controller grows it
    steps = 0
    for target in times[1:]:
        while now < target:
            steps += 1
            if steps > max_steps:
                raise RuntimeError(f"dirac.rk45: more than {max_steps} steps before t = {target}")
            remaining = target - now
            last = h >= remaining
            step = remaining if last else h
            ks = [f]
            for a in _DP_A[1:]:
                ks.append(field(_combine(x, step, a, ks)))
            x_new = _combine(x, step, _DP_B, ks)
            f_new = field(x_new)
            error = step * sum(e * k for e, k in zip(_DP_E, [*ks, f_new]) if e != 0.0)
            scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
            err = (error / scale).pow(2).mean().sqrt().item()
            if not math.isfinite(err) or not bool(torch.isfinite(x_new).all()):
                err = math.inf
            factor = 10.0 if err == 0 else min(10.0, max(0.2, 0.9 * err**-0.2))
            if err <= 1:
                x, f = x_new, f_new
                now = target if last else now + step
                h = max(h, step * factor) if last else step * factor
            else:
                h = step * factor
                if h <= 1e-14 * max(1.0, abs(now)):
                    raise RuntimeError(f"dirac.rk45: step size underflow at t = {now}")
        out.append(x)
    return torch.stack(out)


def simultaneous_steps(field: Field, x0: torch.Tensor, lr: float, n: int) -> torch.Tensor:
    """``n`` simultaneous gradient steps from ``x0`` (explicit Euler on ``F = field``): ``x ← x + lr·F(x)``.
    Returns the ``n + 1`` states, shape ``(n + 1, *x0.shape)``."""
    _check_steps(lr, n)
    out = [x0]
    for _ in range(n):
        out.append(out[-1] + lr * field(out[-1]))
    return torch.stack(out)


def alternating_steps(field: Field, x0: torch.Tensor, lr: float, n: int) -> torch.Tensor:
    """``n`` alternating gradient steps on ``F = field`` from ``x0``, D first:
    ``φ ← φ + lr·F_φ(φ, θ)``, then ``θ ← θ + lr·F_θ(φ_new, θ)``. Returns the ``n + 1`` states,
    shape ``(n + 1, *x0.shape)``."""
    _check_steps(lr, n)
    out = [x0]
    for _ in range(n):
        x = out[-1]
        x = torch.cat([x[..., :2] + lr * field(x)[..., :2], x[..., 2:]], dim=-1)
        x = torch.cat([x[..., :2], x[..., 2:] + lr * field(x)[..., 2:]], dim=-1)
        out.append(x)
    return torch.stack(out)


def _check_steps(lr: float, n: int) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"dirac: lr must be a finite number > 0, got {lr!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"dirac: n must be an int >= 0, got {n!r}")


@torch.no_grad()
def ema_trajectory(
    theta: torch.Tensor, decay: float = EMA_DECAY, bias_correction: bool = False, warmup: int | None = None
) -> torch.Tensor:
    """The EMA of the generator along a trajectory, ``theta`` of shape ``(N, 2)``: the samples are
    fed one by one into :class:`kexue_fast.EMA` (with ``decay``, ``warmup`` and ``bias_correction``
    passed on) over a module holding θ (``update()`` after each, ``averaged_value`` read), so the
    average is the EMA's by construction (docs/ema.md).

    Row ``k`` of the result is the average once ``θ_0 … θ_k`` have been seen: Su's semantics
    (``bias_correction=False``) start the shadow at ``θ_0`` and update with ``θ_1 … θ_k``; the
    bias-corrected EMA starts at zero and updates with ``θ_0 … θ_k``. Either way row 0 is ``θ_0``.

    Here one update is one output sample, ``h`` of time apart: a decay ``α`` averages over about
    ``h/(1 − α)`` time (``EMA_DECAY`` 0.995 at h = 0.1: 20, about 1.6 turns of the vanilla orbit)."""
    if theta.dim() != 2 or theta.shape[0] < 1:
        raise ValueError(f"dirac.ema_trajectory: theta must have shape (N >= 1, d), got {tuple(theta.shape)}")
    holder = nn.Module()
    holder.theta = nn.Parameter(theta[0].clone(), requires_grad=False)
    ema = EMA(holder, decay=decay, warmup=warmup, bias_correction=bias_correction)
    out = [] if bias_correction else [theta[0].clone()]
    for sample in theta[0 if bias_correction else 1 :]:
        holder.theta.copy_(sample)
        ema.update()
        out.append(ema.averaged_value("theta").clone())
    return torch.stack(out)


class Outcome(NamedTuple):
    """How a trajectory ends, judged on its last tenth: ``kind`` is ``"converges"`` (‖x‖ stays
    below ``CONVERGED`` times its start), ``"circle"`` (‖θ‖ varies by at most ``CIRCLE`` of its
    largest value) or ``"oscillates"``; ``low``/``high`` bound ‖θ‖ there."""

    kind: str
    low: float
    high: float

    def __str__(self) -> str:
        if self.kind == "converges":
            return f"converges (‖θ‖ ≤ {self.high:.2g})"
        if self.kind == "circle":
            return f"circle, ‖θ‖ → {(self.low + self.high) / 2:.3f}"
        return f"oscillates, ‖θ‖ in [{self.low:.2f}, {self.high:.2f}]"


#: Thresholds of :class:`Outcome`.
CONVERGED, CIRCLE = 0.05, 0.01


def outcome(x: torch.Tensor) -> Outcome:
    """The :class:`Outcome` of a trajectory ``x`` of shape ``(N, 4)``."""
    tail = x[-max(1, x.shape[0] // 10) :]
    radius = tail[:, 2:].norm(dim=-1)
    low, high = radius.min().item(), radius.max().item()
    if tail.norm(dim=-1).max().item() <= CONVERGED * x[0].norm().item():
        return Outcome("converges", low, high)
    if high - low <= CIRCLE * high:
        return Outcome("circle", low, high)
    return Outcome("oscillates", low, high)


@dataclasses.dataclass
class Trajectory:
    """A simulated ``system``: times ``t`` (N,), states ``x`` (N, 4), the EMA ``ema`` (N, 2) of θ
    and the :class:`Outcome` ``outcome``."""

    system: System
    t: torch.Tensor
    x: torch.Tensor
    ema: torch.Tensor
    outcome: Outcome

    @property
    def phi(self) -> torch.Tensor:
        return self.x[:, :2]

    @property
    def theta(self) -> torch.Tensor:
        return self.x[:, 2:]


def simulate(
    system: str | System,
    method: str = "rk45",
    T: float | None = None,
    h: float | None = None,
    x0: Sequence[float] | torch.Tensor = INITIAL_STATE,
    ema_decay: float = EMA_DECAY,
    bias_correction: bool = False,
) -> Trajectory:
    """Integrates ``system`` (a name of :data:`SYSTEMS` or a :class:`System`) from ``x0`` to time
    ``T`` (default: the system's), output every ``h`` (default: the system's), by the ``method``
    ``"rk45"`` (:func:`rk45`, default tolerances) or ``"rk4"`` (:func:`rk4`, one step per output
    interval), and averages θ with :func:`ema_trajectory` (``ema_decay``, ``bias_correction``).
    Float64 throughout. Returns a :class:`Trajectory`."""
    if isinstance(system, str):
        if system not in SYSTEMS:
            raise ValueError(f"dirac: unknown system {system!r}; known: {', '.join(SYSTEMS)}")
        system = SYSTEMS[system]
    integrators = {"rk45": rk45, "rk4": rk4}
    if method not in integrators:
        raise ValueError(f"dirac: method must be 'rk45' or 'rk4', got {method!r}")
    start = torch.as_tensor(x0, dtype=torch.float64)
    if start.shape != (4,):
        raise ValueError(f"dirac: x0 must be 4 numbers (φ₁, φ₂, θ₁, θ₂), got shape {tuple(start.shape)}")
    t = time_grid(system.T if T is None else T, system.h if h is None else h)
    x = integrators[method](system, start, t)
    ema = ema_trajectory(x[:, 2:], ema_decay, bias_correction)
    return Trajectory(system, t, x, ema, outcome(x))


def plot_phase_portrait(ax, trajectory: Trajectory, legend: bool = True) -> None:
    """Draws the ``trajectory``'s θ (θ₁ against θ₂), its EMA, the start and the equilibrium
    θ = 0 on the matplotlib axes ``ax``, titled with the system's label and outcome (and, with
    ``legend``, a legend)."""
    theta, ema = trajectory.theta.numpy(), trajectory.ema.numpy()
    ax.plot(theta[:, 0], theta[:, 1], color="tab:blue", linewidth=0.8, label="trajectory θ(t)")
    ax.plot(ema[:, 0], ema[:, 1], color="tab:orange", linewidth=1.2, label="EMA of θ")
    ax.scatter(theta[:1, 0], theta[:1, 1], s=20, color="tab:blue", marker="o", label="start", zorder=3)
    ax.scatter([0.0], [0.0], s=40, color="red", marker="*", label="equilibrium θ = 0", zorder=3)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("θ₁", fontsize=8)
    ax.set_ylabel("θ₂", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"{trajectory.system.label}\n{trajectory.outcome}", fontsize=9)
    if legend:
        ax.legend(loc="upper right", fontsize=6)


def plot(trajectories: Sequence[Trajectory], path: str, title: str | None = None, columns: int = 3) -> None:
    """Writes the phase portraits of ``trajectories`` side by side (``columns`` per row), with one
    legend for all and the figure's ``title`` (if any), to ``path`` (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(trajectories) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.2 * rows), squeeze=False)
    for ax, trajectory in zip(axes.flat, trajectories):
        plot_phase_portrait(ax, trajectory, legend=False)
    for ax in list(axes.flat)[len(trajectories) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncols=4, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
