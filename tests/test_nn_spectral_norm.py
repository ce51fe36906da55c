"""kexue_fast.nn.spectral_norm is a drop-in for torch's parametrization (same state dict, same
outputs over GAN training steps); SpectralNormGroup; the i-ResNet soft rule; the convolution
operator norm."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from kexue_fast.nn import SpectralNormGroup, conv_spectral_norm, spectral_norm


def discriminator(sn):
    torch.manual_seed(0)
    return nn.Sequential(
        sn(nn.Conv2d(3, 8, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
        sn(nn.Conv2d(8, 16, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
        nn.Flatten(), sn(nn.Linear(16 * 4 * 4, 1)),
    )  # fmt: skip


def train_steps(model, steps=4, group=None):
    """A few hinge-loss discriminator steps; returns the outputs of each step."""
    torch.manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    outputs = []
    for _ in range(steps):
        real, fake = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
        if group is not None:
            group.refresh()
        d_real = model(real)
        loss = torch.relu(1 - d_real).mean() + torch.relu(1 + model(fake)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        outputs.append(d_real.detach())
    return outputs


def test_same_state_dict_keys_and_outputs_as_torch_over_training():
    ours, theirs = discriminator(spectral_norm), discriminator(nn.utils.parametrizations.spectral_norm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(train_steps(ours), train_steps(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_state_dicts_load_both_ways():
    ours, theirs = discriminator(spectral_norm), discriminator(nn.utils.parametrizations.spectral_norm)
    train_steps(theirs, steps=2)
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x))
    theirs.load_state_dict(ours.state_dict())


def test_group_iterates_once_per_step_like_torch_iterating_in_the_first_forward_only():
    ours, theirs = discriminator(spectral_norm), discriminator(nn.utils.parametrizations.spectral_norm)
    group = SpectralNormGroup(ours)
    assert len(group.layers) == 3

    # Torch's layers iterate at every forward (twice per step here); the group once per step.
    # Compare against torch running its iteration only in the first forward of each step.
    def torch_once(model, steps=3):
        torch.manual_seed(1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        outs = []
        for _ in range(steps):
            real, fake = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
            d_real = model(real)
            model.eval()
            d_fake = model(fake)
            model.train()
            loss = torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            outs.append(d_real.detach())
        return outs

    expected = torch_once(theirs)
    group_out = train_steps(ours, steps=3, group=group)
    for a, b in zip(group_out, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_soft_rule_only_shrinks():
    torch.manual_seed(0)
    big, small = nn.Linear(8, 8), nn.Linear(8, 8)
    with torch.no_grad():
        big.weight.mul_(10)
        small.weight.mul_(0.01)
    sigma_small = torch.linalg.matrix_norm(small.weight, 2)
    spectral_norm(big, coeff=0.9, n_power_iterations=50)
    spectral_norm(small, coeff=0.9, n_power_iterations=50)
    big(torch.randn(1, 8)), small(torch.randn(1, 8))
    assert torch.linalg.matrix_norm(big.weight, 2).item() == pytest.approx(0.9, rel=1e-3)
    assert torch.linalg.matrix_norm(small.weight, 2).item() == pytest.approx(sigma_small.item(), rel=1e-5)


def test_conv_operator_norm_matches_the_explicit_matrix():
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    shape = (3, 6, 6)
    n_in = 3 * 6 * 6
    basis = torch.eye(n_in, dtype=torch.float64)
    columns = [torch.nn.functional.conv2d(e.view(1, *shape), weight, padding=1, stride=2).flatten() for e in basis]
    operator = torch.stack(columns, dim=1)
    sigma, x = conv_spectral_norm(weight, shape, stride=2, padding=1, n_power_iterations=300)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(operator, 2), rtol=1e-6, atol=1e-9)
    assert x.shape == (1, *shape)


def test_complex_weights_take_the_plain_pytorch_path():
    torch.manual_seed(3)
    ours = spectral_norm(nn.Linear(6, 4, dtype=torch.complex64))
    torch.manual_seed(3)
    theirs = nn.utils.parametrizations.spectral_norm(nn.Linear(6, 4, dtype=torch.complex64))
    x = torch.randn(2, 6, dtype=torch.complex64)
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x))
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_power_iterations"):
        spectral_norm(nn.Linear(2, 2), n_power_iterations=0)
    with pytest.raises(ValueError, match="no parameter or buffer"):
        spectral_norm(nn.Linear(2, 2), name="nope")
    with pytest.raises(ValueError, match="coeff"):
        spectral_norm(nn.Linear(2, 2), coeff=0.0)


def test_deepcopy_and_eval_mode_do_not_iterate():
    layer = spectral_norm(nn.Linear(5, 4))
    layer.eval()
    u = layer.parametrizations.weight[0]._u.clone()
    layer(torch.randn(2, 5))
    assert torch.equal(u, layer.parametrizations.weight[0]._u)
    copy.deepcopy(layer)(torch.randn(1, 5))


@pytest.mark.parametrize(
    ("conv", "spatial"), [(nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3)]
)
def test_conv_transpose_normalises_along_its_output_channels_like_torch(conv, spatial):
    # ConvTranspose weights are (in, out, k...): torch uses dim=1, so u has out_channels entries.
    torch.manual_seed(0)
    ours = spectral_norm(conv(3, 5, 2))
    torch.manual_seed(0)
    theirs = nn.utils.parametrizations.spectral_norm(conv(3, 5, 2))
    assert ours.parametrizations.weight[0].dim == 1
    assert ours.parametrizations.weight[0]._u.shape == theirs.parametrizations.weight[0]._u.shape == (5,)
    x = torch.randn(2, 3, *[4] * spatial)
    for _ in range(3):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    matrix = ours.weight.detach().transpose(0, 1).flatten(1)
    assert torch.linalg.matrix_norm(matrix, 2).item() == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_zero_and_tiny_weights_follow_torch_through_eps(scale):
    # normalize(a) = a / max(‖a‖, eps): with ‖W v‖ below eps the vectors shrink instead of
    # becoming unit (or NaN for a zero weight).
    torch.manual_seed(0)
    ours = spectral_norm(nn.Linear(4, 3))
    torch.manual_seed(0)
    theirs = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3))
    with torch.no_grad():
        for model in (ours, theirs):
            model.parametrizations.weight.original.mul_(scale)
    x = torch.randn(2, 4)
    torch.testing.assert_close(ours(x), theirs(x), equal_nan=True)
    for name in ("_u", "_v"):
        a, b = getattr(ours.parametrizations.weight[0], name), getattr(theirs.parametrizations.weight[0], name)
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-35)
        assert a.norm() < 1e-6


def test_one_step_from_unconverged_vectors_matches_torch():
    # u ← normalize(W v) first, then v ← normalize(Wᵀ u): visible only away from convergence.
    torch.manual_seed(0)
    ours = spectral_norm(nn.Linear(7, 5))
    torch.manual_seed(0)
    theirs = nn.utils.parametrizations.spectral_norm(nn.Linear(7, 5))
    torch.manual_seed(1)
    u, v = nn.functional.normalize(torch.randn(5), dim=0), nn.functional.normalize(torch.randn(7), dim=0)
    for model in (ours, theirs):
        sn = model.parametrizations.weight[0]
        sn._u.copy_(u), sn._v.copy_(v)
    x = torch.randn(3, 7)
    torch.testing.assert_close(ours(x), theirs(x))
    for name in ("_u", "_v"):
        a, b = getattr(ours.parametrizations.weight[0], name), getattr(theirs.parametrizations.weight[0], name)
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, u if name == "_u" else v, atol=1e-2)  # the step did move them


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [("eps", -1.0, ValueError), ("eps", float("nan"), ValueError), ("n_power_iterations", 1.5, TypeError),
     ("coeff", float("nan"), ValueError), ("coeff", float("inf"), ValueError), ("dim", 2, IndexError)],
)  # fmt: skip
def test_rejected_arguments_leave_the_module_alone(argument, value, error):
    layer = nn.Linear(3, 2)
    state = {k: t.clone() for k, t in layer.state_dict().items()}
    with pytest.raises(error, match=argument):
        spectral_norm(layer, **{argument: value})
    assert not parametrize.is_parametrized(layer)
    assert all(torch.equal(t, state[k]) for k, t in layer.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_layer_sigma_and_its_gradient_equal_the_spectral_sigma_op(dtype):
    # A layer computes its σ with two plain ops, not the batched op (docs/spectral_norm.md): same
    # value, same gradient, and σ in the vectors' dtype (float32 for a bfloat16 weight).
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(9, 6).to(dtype)).eval()
    sn = layer.parametrizations.weight[0]
    original = layer.parametrizations.weight.original
    weight = original.detach().clone().requires_grad_()
    sigma = torch.ops.kexue.spectral_sigma([weight], [sn._u], [sn._v])[0]
    assert sigma.dtype == sn._u.dtype
    expected = weight / sigma
    got = layer.weight
    torch.testing.assert_close(got, expected)
    cotangent = torch.randn(6, 9, dtype=dtype)
    (expected_grad,) = torch.autograd.grad(expected, weight, cotangent)
    (got_grad,) = torch.autograd.grad(got, original, cotangent)
    torch.testing.assert_close(got_grad, expected_grad)
