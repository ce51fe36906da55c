"""``kexue_fast.gan.dirac``: the claims of the GAN-dynamics post as numbers (issue 15, item 2).

Expected values come from the math written out here — the players' losses (differentiated by
autograd), Jacobians and update matrices by hand (their eigenvalues by numpy), closed-form
solutions, conserved quantities — never from the module alone. The math is in the module's
docstrings; comments here say which part of it a test checks.
"""

import math

import numpy as np
import pytest
import torch

from kexue_fast.gan import dirac

X0 = torch.tensor(dirac.INITIAL_STATE, dtype=torch.float64)
L0 = 0.2 * 0.2 - 0.1 * 0.1  # θ₁φ₂ − θ₂φ₁ at (φ, θ) = ((0.1, 0.2), (0.2, 0.1))

# The linearised vanilla system at 0 (φ̇ = −θ/2, θ̇ = φ/2), state (φ₁, φ₂, θ₁, θ₂), by hand.
A_VANILLA = np.array([[0, 0, -0.5, 0], [0, 0, 0, -0.5], [0.5, 0, 0, 0], [0, 0.5, 0, 0]])


def linear_field(matrix):
    a = torch.tensor(matrix, dtype=torch.float64)
    return lambda x: x @ a.T


def damped_matrix(damping):
    """φ̇ = −θ − damping·φ, θ̇ = φ (WGAN-GP c = 0 with damping 2λ; GAN-QP + L2 linearised, damping l2)."""
    return np.array([[-damping, 0, -1, 0], [0, -damping, 0, -1], [1, 0, 0, 0], [0, 1, 0, 0]])


def rotation(t):
    """The closed-form solution of the linearised vanilla system from X0: each pair (φ_i, θ_i)
    turns at angular speed 1/2."""
    t = torch.as_tensor(t, dtype=torch.float64)[:, None]
    phi0, theta0 = X0[:2], X0[2:]
    c, s = torch.cos(t / 2), torch.sin(t / 2)
    return torch.cat([phi0 * c - theta0 * s, theta0 * c + phi0 * s], dim=1)


@pytest.fixture(scope="module")
def runs():
    """Every system by RK45 on its default horizon (computed once)."""
    return {name: dirac.simulate(name) for name in dirac.SYSTEMS}


# ---------------------------------------------------------------- the fields are gradient play


def _losses(name, params):
    """D's objective (maximised) and G's loss (minimised) of each system, from the post."""
    dot = lambda phi, theta: (phi * theta).sum()  # noqa: E731
    if name == "vanilla":
        return (
            lambda phi, theta: torch.log1p(-torch.sigmoid(dot(phi, theta))),
            lambda phi, theta: -torch.log(torch.sigmoid(dot(phi, theta))),
        )
    if name == "wgan":
        critic = lambda phi, theta: dot(phi, theta) / phi.norm()  # noqa: E731
        return (lambda phi, theta: -critic(phi, theta), lambda phi, theta: -critic(phi, theta))
    if name.startswith("wgan-gp"):
        lam, c = params["lam"], params["c"]
        return (
            lambda phi, theta: -dot(phi, theta) - lam * (phi.norm() - c) ** 2,
            lambda phi, theta: -dot(phi, theta),
        )
    lam, l2 = params["lam"], params["l2"]
    return (
        lambda phi, theta: (
            -dot(phi, theta) - dot(phi, theta) ** 2 / (2 * lam * theta.norm()) - l2 / 2 * phi.norm() ** 2
        ),
        lambda phi, theta: -dot(phi, theta),
    )


@pytest.mark.parametrize("name", list(dirac.SYSTEMS))
def test_field_is_gradient_ascent_for_d_and_descent_for_g(name):
    system = dirac.SYSTEMS[name]
    d_objective, g_loss = _losses(name, system.params)
    states = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for x in [X0, *states]:
        phi, theta = x[:2].clone().requires_grad_(), x[2:].clone().requires_grad_()
        (grad_phi,) = torch.autograd.grad(d_objective(phi, theta), phi)
        (grad_theta,) = torch.autograd.grad(g_loss(phi, theta), theta)
        torch.testing.assert_close(system(x), torch.cat([grad_phi, -grad_theta]), rtol=1e-12, atol=1e-12)


def test_fields_take_batches_of_states():
    states = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for system in dirac.SYSTEMS.values():
        batched = system(states)
        assert batched.shape == states.shape
        torch.testing.assert_close(batched[1, 2], system(states[1, 2]), rtol=1e-15, atol=0)


def test_fields_where_a_norm_vanishes():
    # c·φ/‖φ‖ and θ/‖θ‖ are taken as 0 at φ = 0 and θ = 0 (WGAN-GP c = 1, GAN-QP): finite values.
    at_zero_phi = torch.tensor([0.0, 0.0, 0.3, -0.4], dtype=torch.float64)
    at_zero_theta = torch.tensor([0.3, -0.4, 0.0, 0.0], dtype=torch.float64)
    gp1, qp = dirac.SYSTEMS["wgan-gp-1"], dirac.SYSTEMS["gan-qp"]
    torch.testing.assert_close(gp1(at_zero_phi), torch.tensor([-0.3, 0.4, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(qp(at_zero_theta), torch.tensor([0.0, 0.0, 0.3, -0.4], dtype=torch.float64))
    for system in dirac.SYSTEMS.values():  # the equilibrium is a rest point (WGAN's field is singular there)
        if system.name != "wgan":
            assert torch.equal(system(torch.zeros(4, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64))


def test_vanilla_linearisation_is_a_rotation_with_eigenvalues_pm_i_over_2():
    jacobian = torch.autograd.functional.jacobian(dirac.SYSTEMS["vanilla"], torch.zeros(4, dtype=torch.float64))
    np.testing.assert_allclose(jacobian.numpy(), A_VANILLA, atol=1e-15)
    eigenvalues = np.linalg.eigvals(A_VANILLA)
    np.testing.assert_allclose(np.sort_complex(eigenvalues), [-0.5j, -0.5j, 0.5j, 0.5j], atol=1e-12)


@pytest.mark.parametrize(("name", "damping"), [("wgan-gp-0", 0.2), ("gan-qp-l2", 0.1)])
def test_penalised_linearisations_spiral_in(name, damping):
    # θ̈ + damping·θ̇ + θ = 0: eigenvalues −damping/2 ± i√(1 − damping²/4).
    jacobian = torch.autograd.functional.jacobian(dirac.SYSTEMS[name], torch.tensor([1e-9, 0, 1e-9, 0]).double())
    np.testing.assert_allclose(jacobian.numpy(), damped_matrix(damping), atol=1e-8)
    eigenvalues = np.linalg.eigvals(damped_matrix(damping))
    np.testing.assert_allclose(eigenvalues.real, -damping / 2, atol=1e-12)
    np.testing.assert_allclose(np.abs(eigenvalues.imag), math.sqrt(1 - damping**2 / 4), atol=1e-12)


# ---------------------------------------------------------------- the integrators


def test_rk45_and_rk4_against_the_rotation_in_closed_form():
    t = dirac.time_grid(100.0, 0.1)
    exact = rotation(t)
    field = linear_field(A_VANILLA)
    assert (dirac.rk45(field, X0, t) - exact).abs().max() < 1e-7
    tight = dirac.rk45(field, X0, t, rtol=1e-10, atol=1e-13)  # a tighter tolerance, a smaller error
    assert (tight - exact).abs().max() < 1e-9
    # RK4's global error: h⁴·T·|x⁽⁵⁾|/120-ish = 1e-4·100·0.22/32/120 ≈ 6e-7 here.
    assert (dirac.rk4(field, X0, t) - exact).abs().max() < 1e-6


def test_rk45_adapts_like_a_fifth_order_method():
    # One output interval [0, 100]: the step size is the controller's alone. The error per step
    # of a 5th-order method goes as h⁵, so 10⁴× tighter tolerances need about 10^(4/5) = 6.3×
    # the steps, and the final error follows the tolerance.
    t = torch.tensor([0.0, 100.0], dtype=torch.float64)
    exact = rotation(t)[-1]
    calls, errors = [], []
    for rtol in (1e-5, 1e-9):
        count = [0]
        field = linear_field(A_VANILLA)

        def counted(x, field=field, count=count):
            count[0] += 1
            return field(x)

        errors.append((dirac.rk45(counted, X0, t, rtol=rtol, atol=rtol * 1e-3)[-1] - exact).abs().max().item())
        calls.append(count[0])
    assert 4.5 < calls[1] / calls[0] < 8
    assert errors[0] < 1e-4 and errors[1] < 1e-8 and errors[0] / errors[1] > 1e3


def test_rk4_is_fourth_order():
    t = dirac.time_grid(20.0, 0.4)
    field, exact = linear_field(A_VANILLA), rotation(t)
    coarse = (dirac.rk4(field, X0, t) - exact).abs().max().item()
    fine = (dirac.rk4(field, X0, t, substeps=2) - exact).abs().max().item()
    assert 14 < coarse / fine < 18  # 2⁴ = 16


def test_rk45_against_the_matrix_exponential_of_the_damped_system():
    matrix = damped_matrix(0.2)  # WGAN-GP c = 0 is exactly linear
    t = dirac.time_grid(40.0, 0.1)
    exact = torch.stack([torch.linalg.matrix_exp(torch.tensor(matrix) * s) @ X0 for s in t])
    torch.testing.assert_close(dirac.rk45(dirac.SYSTEMS["wgan-gp-0"], X0, t), exact, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", list(dirac.SYSTEMS))
def test_rk4_agrees_with_rk45(runs, name):
    rk45 = runs[name]
    rk4 = dirac.simulate(name, method="rk4")
    assert torch.equal(rk4.t, rk45.t)
    # RK4's own error dominates: about N·(ωh)⁵/120·R, worst for WGAN-GP c = 1 (N = 1000 steps of
    # h = 0.1 round the circle R = 1 at ω = 1: 8e-5).
    assert (rk4.x - rk45.x).abs().max() < 2e-4
    assert rk4.outcome.kind == rk45.outcome.kind


def test_integrators_take_batches_of_states():
    starts = torch.stack([X0, 2 * X0, -X0])
    t = dirac.time_grid(5.0, 0.1)
    system = dirac.SYSTEMS["vanilla"]
    batched = dirac.rk4(system, starts, t)
    assert batched.shape == (len(t), 3, 4)
    torch.testing.assert_close(batched[:, 1], dirac.rk4(system, starts[1], t), rtol=1e-14, atol=0)
    adaptive = dirac.rk45(system, starts, t)
    assert (adaptive[:, 2] - dirac.rk45(system, starts[2], t)).abs().max() < 1e-7


def test_rk45_stops_with_an_error_on_a_blow_up():
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)  # ẋ = x², x(0) = 1: x = 1/(1 − t), infinite at t = 1
    with pytest.raises(RuntimeError, match=r"dirac\.rk45"):
        dirac.rk45(lambda x: x * x, torch.ones(1, dtype=torch.float64), t)
    with pytest.raises(RuntimeError, match="more than 10 steps"):
        dirac.rk45(linear_field(A_VANILLA), X0, torch.tensor([0.0, 100.0], dtype=torch.float64), max_steps=10)


def test_time_grid():
    t = dirac.time_grid(100.0, 0.1)
    assert len(t) == 1001 and t[0] == 0 and t[-1] == 100.0 and t.dtype == torch.float64
    torch.testing.assert_close(t[1:] - t[:-1], torch.full((1000,), 0.1, dtype=torch.float64))


# ---------------------------------------------------------------- the post's claims


def test_vanilla_keeps_its_distance(runs):
    run = runs["vanilla"]
    distance = run.x.norm(dim=1)
    # L = θ × φ is conserved, so ‖x‖ ≥ √(2|L₀|) = √0.06 for ever; ‖x‖ never grows (⟨x, F⟩ ≤ 0).
    torch.testing.assert_close(dirac.angular_momentum(run.x), torch.full_like(run.t, L0), rtol=0, atol=1e-8)
    assert distance.min() >= math.sqrt(2 * L0) - 1e-8
    assert (distance[1:] - distance[:-1]).max() < 1e-9
    assert distance[-1] > 0.8 * distance[0]  # no decay to speak of over T = 100 (WGAN-GP c = 0: 0.02 by T = 40)
    assert run.outcome.kind == "oscillates" and run.outcome.low > 0.1


def test_vanilla_energy_identity():
    # d(‖x‖²/2)/dt = ⟨x, F(x)⟩ = −(2σ(u) − 1)·u with u = θ·φ (≤ 0).
    states = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u = (states[:, :2] * states[:, 2:]).sum(1)
    power = (states * dirac.SYSTEMS["vanilla"](states)).sum(1)
    torch.testing.assert_close(power, -(2 / (1 + torch.exp(-u)) - 1) * u, rtol=1e-12, atol=1e-15)


def test_hard_wgan_keeps_oscillating(runs):
    run = runs["wgan"]
    system = dirac.SYSTEMS["wgan"]
    # ‖φ‖ is conserved and θ moves at unit speed: no resting point.
    torch.testing.assert_close(run.phi.norm(dim=1), torch.full_like(run.t, math.sqrt(0.05)), rtol=0, atol=1e-7)
    torch.testing.assert_close(system(run.x)[:, 2:].norm(dim=1), torch.ones_like(run.t), rtol=0, atol=1e-12)
    assert run.outcome.kind == "oscillates" and run.outcome.high - run.outcome.low > 0.2


@pytest.mark.parametrize(("name", "rate"), [("wgan-gp-0", 0.1), ("gan-qp-l2", 0.05)])
def test_zero_centred_penalty_and_l2_on_d_converge(runs, name, rate):
    run = runs[name]
    assert run.outcome.kind == "converges"
    # The envelope of a damped oscillator: ‖x(t)‖ ≈ e^{−rate·t}·‖x₀‖ (up to the eigenvectors' skew).
    predicted = math.exp(-rate * run.t[-1].item()) * X0.norm().item()
    assert 0.3 * predicted < run.x[-1].norm() < 2 * predicted


def test_one_centred_penalty_converges_to_the_circle_of_radius_c():
    c = dirac.SYSTEMS["wgan-gp-1"].params["c"]
    run = dirac.simulate("wgan-gp-1", T=150.0)
    tail = run.x[-100:]
    # With ‖φ‖ ≡ c the motion must keep φ ⟂ θ and ‖θ‖ = ‖φ‖: θ on the circle of radius c.
    assert (tail[:, 2:].norm(dim=1) - c).abs().max() < 1e-3
    assert (tail[:, :2].norm(dim=1) - c).abs().max() < 1e-3
    assert (tail[:, :2] * tail[:, 2:]).sum(1).abs().max() < 1e-3
    assert run.outcome.kind == "circle" and abs(run.outcome.high - c) < 1e-3


def test_gan_qp_keeps_orbiting_on_the_circle_of_radius_sqrt_l(runs):
    run = runs["gan-qp"]
    # L is conserved; on the final circle ‖θ‖ = ‖φ‖ = R with φ ⟂ θ, so R² = |L₀|.
    torch.testing.assert_close(dirac.angular_momentum(run.x), torch.full_like(run.t, L0), rtol=0, atol=1e-7)
    assert run.x.norm(dim=1).min() >= math.sqrt(2 * L0) - 1e-7
    assert run.outcome.kind == "circle"
    assert abs(run.outcome.low - math.sqrt(L0)) < 5e-4 and abs(run.outcome.high - math.sqrt(L0)) < 5e-4


def test_ema_of_the_vanilla_trajectory_finds_the_centre(runs):
    run = runs["vanilla"]
    decay, h, omega = dirac.EMA_DECAY, dirac.SYSTEMS["vanilla"].h, 0.5
    # Su's EMA of a rotation θ_k ∝ e^{iωkh}: the start keeps weight α^N, the rest is damped by
    # (1 − α)/|1 − α e^{iωh}| (a geometric sum), applied to the orbit's largest ‖θ‖.
    damping = (1 - decay) / abs(1 - decay * complex(math.cos(omega * h), math.sin(omega * h)))
    n = len(run.t) - 1
    bound = damping * run.theta.norm(dim=1).max().item() + decay**n * X0[2:].norm().item()
    assert run.ema[-1].norm() < 1.2 * bound
    assert run.ema[-1].norm() < 0.2 * run.outcome.low  # much closer than the trajectory ever comes


# ---------------------------------------------------------------- the EMA is kexue_fast.EMA's


def test_ema_trajectory_follows_the_ema_recurrences():
    theta = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alpha = 0.9
    su = [theta[0]]  # Θ₀ = θ₀, Θ_k = αΘ_{k−1} + (1 − α)θ_k
    for sample in theta[1:]:
        su.append(alpha * su[-1] + (1 - alpha) * sample)
    torch.testing.assert_close(dirac.ema_trajectory(theta, alpha), torch.stack(su), rtol=1e-12, atol=1e-14)
    k = torch.arange(50, dtype=torch.float64)  # zero start, divided by 1 − α^{k+1}: a weighted mean of θ_0..θ_k
    weights = torch.tril(alpha ** (k[:, None] - k[None, :])) * (1 - alpha) / (1 - alpha ** (k[:, None] + 1))
    torch.testing.assert_close(
        dirac.ema_trajectory(theta, alpha, bias_correction=True), weights @ theta, rtol=1e-12, atol=1e-14
    )
    warm = [theta[0]]  # α_t = min(decay, (1 + t)/(W + t)), t = 1, 2, … with W = 10
    for t, sample in enumerate(theta[1:], start=1):
        a = min(alpha, (1 + t) / (10 + t))
        warm.append(a * warm[-1] + (1 - a) * sample)
    torch.testing.assert_close(dirac.ema_trajectory(theta, alpha, warmup=10), torch.stack(warm), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- discrete play on the rotation


def test_simultaneous_steps_spiral_out():
    lr, n = 0.1, 500
    step = np.eye(4) + lr * A_VANILLA
    modulus = np.abs(np.linalg.eigvals(step))
    np.testing.assert_allclose(modulus, math.sqrt(1 + lr**2 / 4), rtol=1e-12)  # |1 ± i·lr/2| > 1
    x = dirac.simultaneous_steps(linear_field(A_VANILLA), X0, lr, n)
    assert x.shape == (n + 1, 4)
    # I + lr·A is a rotation scaled by √(1 + lr²/4) (A is antisymmetric, AᵀA = I/4): the norm grows exactly so.
    expected = X0.norm() * (1 + lr**2 / 4) ** (torch.arange(n + 1, dtype=torch.float64) / 2)
    torch.testing.assert_close(x.norm(dim=1), expected, rtol=1e-12, atol=0)
    assert x[-1].norm() > 1.8 * X0.norm()


def test_alternating_steps_stay_bounded():
    lr, n = 0.1, 2000
    # D first: φ' = φ − lr·θ/2, then θ' = θ + lr·φ'/2; per pair [[1, −lr/2], [lr/2, 1 − lr²/4]], determinant 1.
    step = np.array(
        [[1, 0, -lr / 2, 0], [0, 1, 0, -lr / 2], [lr / 2, 0, 1 - lr**2 / 4, 0], [0, lr / 2, 0, 1 - lr**2 / 4]]
    )
    eigenvalues, vectors = np.linalg.eig(step)
    np.testing.assert_allclose(np.abs(eigenvalues), 1.0, rtol=1e-12)
    x = dirac.alternating_steps(linear_field(A_VANILLA), X0, lr, n)
    np.testing.assert_allclose(x[-1].numpy(), np.linalg.matrix_power(step, n) @ X0.numpy(), rtol=0, atol=1e-12)
    assert x.norm(dim=1).max() <= np.linalg.cond(vectors) * X0.norm() + 1e-12  # ‖Vᵏ…‖ ≤ κ(V)‖x₀‖
    assert x.norm(dim=1)[-n // 2 :].min() > 0.9 * X0.norm() / np.linalg.cond(vectors)  # and never spirals in


def test_steps_with_zero_count_return_the_start():
    for steps in (dirac.simultaneous_steps, dirac.alternating_steps):
        assert torch.equal(steps(dirac.SYSTEMS["vanilla"], X0, 0.1, 0), X0[None])


# ---------------------------------------------------------------- outcome, simulate, plot, errors


def test_outcome_of_known_curves():
    t = torch.linspace(0, 100, 1001, dtype=torch.float64)
    circle = torch.stack([-torch.sin(t), torch.cos(t), torch.cos(t), torch.sin(t)], 1) * 0.5
    spiral = circle * torch.exp(-0.1 * t)[:, None]
    ellipse = torch.stack([-torch.sin(t), torch.cos(t), torch.cos(t), 0.3 * torch.sin(t)], 1)
    assert dirac.outcome(circle) == ("circle", pytest.approx(0.5), pytest.approx(0.5))
    assert dirac.outcome(spiral).kind == "converges"
    kind, low, high = dirac.outcome(ellipse)
    assert kind == "oscillates" and low == pytest.approx(0.3, abs=1e-3) and high == pytest.approx(1.0, abs=1e-3)
    assert str(dirac.outcome(circle)) == "circle, ‖θ‖ → 0.500"
    assert str(dirac.outcome(ellipse)) == "oscillates, ‖θ‖ in [0.30, 1.00]"


def test_simulate_defaults_and_options(runs):
    run = runs["vanilla"]
    assert run.system is dirac.SYSTEMS["vanilla"] and run.x.dtype == torch.float64
    assert run.x.shape == (1001, 4) and run.ema.shape == (1001, 2)
    assert torch.equal(run.x[0], X0) and torch.equal(run.phi, run.x[:, :2]) and torch.equal(run.theta, run.x[:, 2:])
    short = dirac.simulate(dirac.SYSTEMS["vanilla"], T=1.0, h=0.5, x0=[1.0, 0.0, 0.0, 0.0], ema_decay=0.5)
    assert short.t.tolist() == [0.0, 0.5, 1.0] and short.x[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(short.ema[1], 0.5 * short.theta[0] + 0.5 * short.theta[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown system 'nope'"):
        dirac.simulate("nope")
    with pytest.raises(ValueError, match="method"):
        dirac.simulate("vanilla", method="euler")
    with pytest.raises(ValueError, match="x0"):
        dirac.simulate("vanilla", x0=[0.1, 0.2])
    with pytest.raises(ValueError, match="T and h"):
        dirac.time_grid(0.0, 0.1)
    with pytest.raises(ValueError, match="T and h"):
        dirac.time_grid(1.0, float("nan"))
    with pytest.raises(ValueError, match="strictly increasing"):
        dirac.rk4(dirac.SYSTEMS["vanilla"], X0, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="substeps"):
        dirac.rk4(dirac.SYSTEMS["vanilla"], X0, torch.tensor([0.0, 1.0]), substeps=0)
    with pytest.raises(ValueError, match="rtol and atol"):
        dirac.rk45(dirac.SYSTEMS["vanilla"], X0, torch.tensor([0.0, 1.0]), rtol=0.0)
    with pytest.raises(ValueError, match="lr"):
        dirac.simultaneous_steps(dirac.SYSTEMS["vanilla"], X0, -0.1, 3)
    with pytest.raises(ValueError, match="n must be"):
        dirac.alternating_steps(dirac.SYSTEMS["vanilla"], X0, 0.1, -1)
    with pytest.raises(ValueError, match="theta"):
        dirac.ema_trajectory(torch.zeros(3))
    with pytest.raises(ValueError, match="decay"):  # the EMA's own check
        dirac.ema_trajectory(torch.zeros(3, 2), decay=1.5)


def test_plot_writes_portraits_titled_with_name_and_outcome(runs, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: (saved.append(fig), original(fig, path, **kw)))
    path = tmp_path / "dirac.png"
    trajectories = list(runs.values())
    dirac.plot(trajectories, str(path), title="Dirac GAN")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = saved
    axes = fig.axes
    assert len(axes) == len(trajectories)
    for ax, run in zip(axes, trajectories):
        assert ax.get_title() == f"{run.system.label}\n{run.outcome}"
        assert ax.get_xlabel() == "θ₁" and ax.get_ylabel() == "θ₂"
        assert ax.get_legend() is None
    (legend,) = fig.legends  # one for all panels
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == ["trajectory θ(t)", "EMA of θ", "start", "equilibrium θ = 0"]


def test_single_portrait_has_its_own_legend(runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    dirac.plot_phase_portrait(ax, runs["gan-qp"])
    assert [text.get_text() for text in ax.get_legend().get_texts()][-1] == "equilibrium θ = 0"
    assert ax.get_title() == "GAN-QP\ncircle, ‖θ‖ → 0.173"
    plt.close(fig)
