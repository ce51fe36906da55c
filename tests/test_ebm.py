"""kexue_fast.ebm: the Langevin sampler (IGEBM and textbook orders against hand-written loops,
bit-for-bit reproducibility and resumption from (seed, offset)), the replay buffer and the
contrastive-divergence loss."""

import io

import pytest
import torch

import kexue_fast.ebm
from kexue_fast import reference
from kexue_fast.ebm import (
    LangevinSampler,
    ReplayBuffer,
    contrastive_divergence_loss,
    energy_gradient,
)
from kexue_fast.ops.langevin import langevin_step_


def quadratic_energy(center: torch.Tensor, scale: float = 0.1):
    """U(x) = |x − center|² / (2·scale²) per sample; ∇U = (x − center) / scale²."""
    return lambda x: (x - center).square().flatten(1).sum(1) / (2 * scale**2)


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x.flatten(1)).squeeze(1)


def test_energy_gradient_is_the_input_gradient_and_leaves_parameters_alone():
    net = SmallNet()
    x = torch.rand(5, 2, 3)
    with torch.no_grad():
        grad = energy_gradient(net, x)
    point = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(net(point).sum(), point)
    torch.testing.assert_close(grad, expected)
    assert all(p.grad is None for p in net.parameters())


def _hand_written_chain(energy, x, steps, step_size, noise_std, clip, bounds, seed, offset, noise_first):
    """The sampler written out with the reference update (float64) and the reference noise."""
    x = x.double().clone()
    for t in range(steps):
        if noise_first:
            x += noise_std * reference.philox_normal(x.shape, seed, offset + t, torch.float64)
            grad = energy_gradient(energy, x)
            x = (x - step_size * grad.clamp(-clip, clip)).clamp(*bounds)
        else:
            grad = energy_gradient(energy, x)
            reference.langevin_step_(x, grad, step_size, noise_std, seed, offset + t, clip, *bounds)
    return x


@pytest.mark.parametrize("noise_first", [True, False])
def test_sampler_matches_the_hand_written_loop(noise_first):
    center = torch.full((2, 3), 0.7)
    energy = quadratic_energy(center)
    x0 = torch.rand(8, 2, 3)
    start = x0.clone()
    sampler = LangevinSampler(
        energy, n_steps=12, step_size=0.002, noise_std=0.01, grad_clip=5.0, bounds=(0.0, 1.0), seed=3, offset=10,
        noise_first=noise_first,
    )  # fmt: skip
    samples = sampler(x0)
    expected = _hand_written_chain(energy, x0, 12, 0.002, 0.01, 5.0, (0.0, 1.0), 3, 10, noise_first)
    torch.testing.assert_close(samples.double(), expected, rtol=1e-5, atol=1e-5)
    assert sampler.offset == 22  # one per step
    assert torch.equal(x0, start) and samples.data_ptr() != x0.data_ptr()  # __call__ leaves x alone


def test_sampler_reproduces_and_resumes_bit_for_bit():
    net = SmallNet()
    x0 = torch.rand(16, 2, 3)

    def make(offset=0):
        return LangevinSampler(net, n_steps=10, step_size=1.0, seed=7, offset=offset)

    full = make()(x0)
    assert torch.equal(make()(x0), full)
    first = make()
    middle = first(x0, n_steps=4)
    resumed = make(offset=first.offset)(middle, n_steps=6)
    assert torch.equal(resumed, full)
    assert not torch.equal(LangevinSampler(net, n_steps=10, step_size=1.0, seed=8)(x0), full)


def test_sampler_concentrates_near_a_quadratic_minimum():
    center = torch.tensor([0.25, 0.75])
    energy = quadratic_energy(center, 0.2)
    scales = dict(step_size=0.004, noise_std=0.02, grad_clip=None)
    sampler = LangevinSampler(energy, n_steps=200, **scales, bounds=None, noise_first=False)
    samples = sampler(torch.rand(2000, 2))
    # The stationary law of x ← x − ε∇U + σξ with U = |x − c|²/(2s²) is N(c, σ²/(2ε/s² − ε²/s⁴)).
    assert (samples.mean(0) - center).abs().max() < 0.01
    rate = 0.004 / 0.2**2
    expected_std = 0.02 / (2 * rate - rate**2) ** 0.5
    assert samples.std(0).sub(expected_std).abs().max() < 0.1 * expected_std


def test_sampler_keeps_chains_in_bounds_and_validates():
    sampler = LangevinSampler(quadratic_energy(torch.tensor([5.0, -5.0])), n_steps=5, bounds=(0.0, 1.0))
    samples = sampler(torch.rand(50, 2))
    assert samples.min() >= 0 and samples.max() <= 1
    with pytest.raises(ValueError, match="n_steps"):
        LangevinSampler(sampler.energy, n_steps=-1)
    with pytest.raises(ValueError, match="bounds"):
        LangevinSampler(sampler.energy, bounds=(1.0, 0.0))


def test_replay_buffer_starts_fresh_then_reuses_its_chains():
    buffer = ReplayBuffer((3,), capacity=100, reinit_prob=0.05, bounds=(-1.0, 2.0), seed=5)
    fresh = buffer.sample(40)
    assert fresh.shape == (40, 3) and fresh.dtype == torch.float32
    assert fresh.min() >= -1 and fresh.max() <= 2 and fresh.std() > 0.5  # uniform on (-1, 2)
    chains = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3) + 10  # recognisable rows
    buffer.push(chains)
    assert len(buffer) == 40
    assert not (buffer.sample(41)[:, None, :] == chains[None]).all(-1).any()  # fewer chains than asked: all fresh
    drawn = torch.cat([buffer.sample(40) for _ in range(50)])
    from_buffer = (drawn[:, None, :] == chains[None]).all(-1).any(-1)
    assert abs(from_buffer.float().mean().item() - 0.95) < 0.03
    assert ((drawn[~from_buffer] >= -1) & (drawn[~from_buffer] <= 2)).all()
    picked = (drawn[from_buffer][:, None, :] == chains[None]).all(-1).float().argmax(1)
    assert picked.unique().numel() == 40  # uniform with replacement reaches every chain


def test_replay_buffer_is_a_ring_and_reproducible():
    buffer = ReplayBuffer((2,), capacity=5, reinit_prob=0.0, seed=9)
    buffer.push(torch.zeros(4, 2))
    buffer.push(torch.ones(3, 2))
    assert len(buffer) == 5
    assert buffer.storage[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]  # slots 0, 1 overwritten
    twin = ReplayBuffer((2,), capacity=5, reinit_prob=0.0, seed=9)
    twin.push(torch.zeros(4, 2))
    twin.push(torch.ones(3, 2))
    assert torch.equal(buffer.sample(4), twin.sample(4))
    assert buffer.offset == 1
    with pytest.raises(ValueError, match="chains must have shape"):
        buffer.push(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="reinit_prob"):
        ReplayBuffer((2,), reinit_prob=1.5)


def test_contrastive_divergence_loss_has_igebm_signs():
    e_pos = torch.tensor([1.0, 3.0], requires_grad=True)
    e_neg = torch.tensor([-2.0, 0.0, 2.0, 4.0], requires_grad=True)
    loss = contrastive_divergence_loss(e_pos, e_neg, alpha=0.5)
    assert loss.item() == pytest.approx(2.0 - 1.0 + 0.5 * (5.0 + 6.0))
    loss.backward()
    torch.testing.assert_close(e_pos.grad, 0.5 + 0.5 * 2 * e_pos.detach() / 2)  # both squares added
    torch.testing.assert_close(e_neg.grad, -0.25 + 0.5 * 2 * e_neg.detach() / 4)


@pytest.mark.parametrize("name", ["step_size", "noise_std", "grad_clip"])
@pytest.mark.parametrize(
    ("value", "error"), [(float("nan"), ValueError), (-0.5, ValueError), (float("inf"), ValueError), ("1.0", TypeError)]
)
def test_sampler_rejects_bad_scales_at_construction(name, value, error):
    with pytest.raises(error, match=name):
        LangevinSampler(quadratic_energy(torch.zeros(2)), **{name: value})


def test_sampler_accepts_zero_scales_and_no_clip():
    LangevinSampler(quadratic_energy(torch.zeros(2)), step_size=0.0, noise_std=0.0, grad_clip=None)
    LangevinSampler(quadratic_energy(torch.zeros(2)), grad_clip=0)


def failing_energy(x):
    raise RuntimeError("energy failed")


@pytest.mark.parametrize("noise_first", [True, False])
def test_a_step_that_raises_leaves_the_chains_and_the_offset_alone(monkeypatch, noise_first):
    x = torch.rand(4, 3)
    before = x.clone()
    sampler = LangevinSampler(failing_energy, noise_first=noise_first, offset=5)
    with pytest.raises(RuntimeError, match="energy failed"):
        sampler.step_(x)
    assert torch.equal(x, before) and sampler.offset == 5
    # The last op call fails (as an interrupt or a rejected argument would): nothing written before it.
    calls = []

    def failing_last_call(*args, **kwargs):
        calls.append(args)
        if len(calls) == (2 if noise_first else 1):
            raise KeyboardInterrupt
        return langevin_step_(*args, **kwargs)

    monkeypatch.setattr(kexue_fast.ebm, "langevin_step_", failing_last_call)
    sampler.energy = quadratic_energy(torch.zeros(3))
    with pytest.raises(KeyboardInterrupt):
        sampler.step_(x)
    assert torch.equal(x, before) and sampler.offset == 5


ALLOWED = (torch.Tensor, int, float, str)


def only_plain_types(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and only_plain_types(v) for k, v in value.items())
    if isinstance(value, list):
        return all(only_plain_types(v) for v in value)
    return isinstance(value, ALLOWED)


def weights_only_round_trip(state):
    file = io.BytesIO()
    torch.save(state, file)
    file.seek(0)
    return torch.load(file, weights_only=True)


@pytest.mark.parametrize("pushed", [5, 21])  # partly filled, and wrapped round the ring
def test_replay_buffer_state_survives_weights_only_load_and_resumes_the_draws(pushed):
    buffer = ReplayBuffer((2, 3), capacity=8, reinit_prob=0.3, bounds=(-1.0, 1.0), seed=2**64 - 5, offset=3)
    torch.manual_seed(0)
    for k in range(0, pushed, 7):
        buffer.push(torch.randn(min(7, pushed - k), 2, 3))
        buffer.sample(4)
    state = buffer.state_dict()
    assert only_plain_types(state)
    resumed = ReplayBuffer((2, 3), capacity=100, reinit_prob=0.9, seed=0)
    resumed.load_state_dict(weights_only_round_trip(state))
    assert len(resumed) == len(buffer) == min(pushed, 8)
    assert (resumed.capacity, resumed.reinit_prob, resumed.bounds) == (8, 0.3, (-1.0, 1.0))
    assert (resumed.seed, resumed.offset, resumed.next_slot) == (buffer.seed, buffer.offset, buffer.next_slot)
    for _ in range(4):
        drawn = buffer.sample(4)
        assert torch.equal(resumed.sample(4), drawn)
        assert (drawn[:, None] == buffer.storage[None, : len(buffer)]).flatten(2).all(-1).any()  # reuses chains
        chains = torch.randn(3, 2, 3)
        buffer.push(chains), resumed.push(chains)
    assert torch.equal(resumed.storage[: len(resumed)], buffer.storage[: len(buffer)])


def test_replay_buffer_rejects_a_bad_state_and_changes_nothing():
    source = ReplayBuffer((2,), capacity=4, seed=3)
    source.push(torch.rand(3, 2))
    good = source.state_dict()
    buffer = ReplayBuffer((2,), capacity=6, reinit_prob=0.5, seed=8, offset=2)
    buffer.push(torch.rand(6, 2))
    buffer.sample(2)
    before = (buffer.storage.clone(), buffer.state_dict())
    bad = [
        ({"shape": [3]}, ValueError, r"shape.*\[3\].*\(2,\)"),
        ({"chains": torch.zeros(3, 3)}, ValueError, r"chains.*\(3, 3\).*\(3, 2\)"),
        ({"chains": torch.zeros(3, 2, dtype=torch.int64)}, TypeError, "chains"),
        ({"size": 5}, ValueError, "size"),
        ({"next_slot": 1}, ValueError, "next_slot"),
        ({"capacity": 0}, ValueError, "capacity"),
        ({"reinit_prob": 1.5}, ValueError, "reinit_prob"),
        ({"bounds": [1.0, 0.0]}, ValueError, "bounds"),
        ({"seed": 0.5}, TypeError, "seed"),
        ({"offset": 2**64}, ValueError, "offset"),
    ]
    for change, error, message in bad:
        with pytest.raises(error, match=message):
            buffer.load_state_dict({**good, **change})
        assert torch.equal(buffer.storage, before[0]) and str(buffer.state_dict()) == str(before[1]), change
    with pytest.raises(KeyError, match="offset"):
        buffer.load_state_dict({k: v for k, v in good.items() if k != "offset"})
    assert torch.equal(buffer.storage, before[0]) and str(buffer.state_dict()) == str(before[1])
