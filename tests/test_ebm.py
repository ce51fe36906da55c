"""kexue_fast.ebm: the Langevin sampler (IGEBM and textbook orders against hand-written loops,
bit-for-bit reproducibility and resumption from (seed, offset)), the replay buffer and the
contrastive-divergence loss."""

import pytest
import torch

from kexue_fast import reference
from kexue_fast.ebm import (
    LangevinSampler,
    ReplayBuffer,
    contrastive_divergence_loss,
    energy_gradient,
)


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
            reference.langevin_step_(x, energy_gradient(energy, x), step_size, noise_std, seed, offset + t, clip, *bounds)
    return x


@pytest.mark.parametrize("noise_first", [True, False])
def test_sampler_matches_the_hand_written_loop(noise_first):
    center = torch.full((2, 3), 0.7)
    energy = quadratic_energy(center)
    x0 = torch.rand(8, 2, 3)
    sampler = LangevinSampler(energy, n_steps=12, step_size=0.002, noise_std=0.01, grad_clip=5.0, bounds=(0.0, 1.0), seed=3, offset=10, noise_first=noise_first)
    samples = sampler(x0)
    expected = _hand_written_chain(energy, x0, 12, 0.002, 0.01, 5.0, (0.0, 1.0), 3, 10, noise_first)
    torch.testing.assert_close(samples.double(), expected, rtol=1e-5, atol=1e-5)
    assert sampler.offset == 22  # one per step
    assert torch.equal(x0, x0.clone()) and samples.data_ptr() != x0.data_ptr()


def test_sampler_reproduces_and_resumes_bit_for_bit():
    net = SmallNet()
    x0 = torch.rand(16, 2, 3)
    make = lambda offset=0: LangevinSampler(net, n_steps=10, step_size=1.0, seed=7, offset=offset)
    full = make()(x0)
    assert torch.equal(make()(x0), full)
    first = make()
    middle = first(x0, n_steps=4)
    resumed = make(offset=first.offset)(middle, n_steps=6)
    assert torch.equal(resumed, full)
    assert not torch.equal(LangevinSampler(net, n_steps=10, step_size=1.0, seed=8)(x0), full)


def test_sampler_concentrates_near_a_quadratic_minimum():
    center = torch.tensor([0.25, 0.75])
    sampler = LangevinSampler(quadratic_energy(center, 0.2), n_steps=200, step_size=0.004, noise_std=0.02, grad_clip=None, bounds=None, noise_first=False)
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
