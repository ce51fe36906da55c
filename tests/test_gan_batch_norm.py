"""SelfModulatedBatchNorm2d and ConditionalBatchNorm2d: their γ, β (compare_gan's SELF-MOD, one
(γ, β) per class), nn.BatchNorm2d's buffer rules, loading an nn.BatchNorm2d state dict."""

import pytest
import torch
import torch.nn.functional as F

from kexue_fast.gan import ConditionalBatchNorm2d, SelfModulatedBatchNorm2d
from kexue_fast.reference import modulated_batch_norm as reference

N, C, Z, K = 6, 5, 7, 3


def trained_batch_norm(momentum=0.1):
    """An nn.BatchNorm2d with non-trivial affine and buffers."""
    bn = torch.nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    for _ in range(3):
        bn(torch.randn(N, C, 4, 4) * 3 + 1)
    return bn


def make_layer(cls, **kwargs):
    return cls(C, Z if cls is SelfModulatedBatchNorm2d else K, **kwargs)


LAYERS = pytest.mark.parametrize("cls", [SelfModulatedBatchNorm2d, ConditionalBatchNorm2d], ids=lambda c: c.__name__)


def conditioning(layer):
    return torch.randn(N, Z) if isinstance(layer, SelfModulatedBatchNorm2d) else torch.randint(0, K, (N,))


def test_self_modulation_is_compare_gans():
    layer = SelfModulatedBatchNorm2d(C, Z, hidden=32)
    assert layer.hidden.weight.shape == (32, Z) and layer.gamma.weight.shape == (C, 32)
    assert torch.equal(layer.gamma.bias, torch.ones(C)) and not layer.beta.bias.any() and not layer.hidden.bias.any()
    assert 0.01 < layer.hidden.weight.std() < 0.03
    x, z = torch.randn(N, C, 4, 4), torch.randn(N, Z)
    h = torch.relu(z @ layer.hidden.weight.T + layer.hidden.bias)
    gamma, beta = h @ layer.gamma.weight.T + layer.gamma.bias, h @ layer.beta.weight.T + layer.beta.bias
    want = reference(x.double(), gamma.double(), beta.double(), None, None, True, 0.1, layer.eps)
    torch.testing.assert_close(layer(x, z).double(), want, rtol=1e-5, atol=1e-5)


def test_conditional_affine_is_picked_by_label():
    layer = ConditionalBatchNorm2d(C, K)
    assert torch.equal(layer.gamma, torch.ones(K, C)) and not layer.beta.any()
    with torch.no_grad():
        layer.gamma.normal_(), layer.beta.normal_()
    x, label = torch.randn(N, C, 4, 4), torch.randint(0, K, (N,))
    want = reference(x.double(), layer.gamma[label].double(), layer.beta[label].double(), None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(layer(x, label).double(), want, rtol=1e-5, atol=1e-5)


@LAYERS
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_loads_a_batch_norm_state_dict_and_then_matches_it(cls, momentum):
    bn = trained_batch_norm(momentum)
    layer = make_layer(cls, momentum=momentum)
    layer.load_state_dict(bn.state_dict())  # strict: every entry of the layer is filled
    cond = conditioning(layer)
    for _ in range(4):  # training steps: outputs and buffers as nn.BatchNorm2d's
        x = torch.randn(N, C, 4, 4) * 2 - 1
        torch.testing.assert_close(layer(x, cond), bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert layer.num_batches_tracked == bn.num_batches_tracked
    layer.eval(), bn.eval()
    x = torch.randn(N, C, 4, 4)
    torch.testing.assert_close(layer(x, cond), bn(x), rtol=1e-5, atol=1e-5)


@LAYERS
def test_own_state_dict_round_trips(cls):
    layer = make_layer(cls)
    layer(torch.randn(N, C, 3, 3), conditioning(layer))
    copy = make_layer(cls)
    copy.load_state_dict(layer.state_dict())
    for (name, a), (_, b) in zip(layer.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name


@LAYERS
def test_gradients_reach_every_parameter(cls):
    layer = make_layer(cls)
    x = torch.randn(N, C, 4, 4, requires_grad=True)
    out = layer(x, conditioning(layer))
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_without_running_statistics_the_batch_is_used_in_eval_too():
    layer = SelfModulatedBatchNorm2d(C, Z, track_running_stats=False).eval()
    assert layer.running_mean is None and "running_mean" not in layer.state_dict()
    x, z = torch.randn(N, C, 4, 4) + 3, torch.randn(N, Z)
    h = torch.relu(layer.hidden(z))
    want = (
        F.batch_norm(x, None, None, None, None, True) * layer.gamma(h)[..., None, None] + layer.beta(h)[..., None, None]
    )
    torch.testing.assert_close(layer(x, z), want, rtol=1e-5, atol=1e-5)


@LAYERS
def test_rejects_inputs_that_are_not_4d(cls):
    layer = make_layer(cls)
    with pytest.raises(ValueError, match="x must be 4-D"):
        layer(torch.randn(N, C, 4), conditioning(layer))
