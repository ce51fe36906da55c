"""The user-facing modules: bert4keras ConditionalLayerNorm and DiT AdaLayerNorm / modulate."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kexue_fast.nn import AdaLayerNorm, ConditionalLayerNorm, modulate


def test_fresh_conditional_layer_norm_is_the_pretrained_layer_norm():
    ln = nn.LayerNorm(32, eps=1e-12)
    nn.init.normal_(ln.weight), nn.init.normal_(ln.bias)
    cln = ConditionalLayerNorm(32, cond_dim=6, hidden_dim=4, hidden_act="swish")
    cln.load_state_dict(ln.state_dict())  # strict: an nn.LayerNorm state dict loads as is
    x, c = torch.randn(3, 5, 32), torch.randn(3, 6)
    torch.testing.assert_close(cln(x, c), ln(x))


def bert4keras_formula(cln, x, c, act):
    """ConditionalLayerNorm written out: LN(x)·(γ + act(c W_h) W_γ) + (β + act(c W_h) W_β)."""
    hidden = c if cln.hidden is None else act(c @ cln.hidden.weight.t())
    gamma = cln.weight + hidden @ cln.gamma_dense.weight.t()
    beta = cln.bias + hidden @ cln.beta_dense.weight.t()
    return F.layer_norm(x, x.shape[-1:], eps=cln.eps) * gamma[:, None] + beta[:, None]


def check_output_and_every_gradient(cln, x, c, act):
    g = torch.randn_like(x)
    wrt = [x, c, *cln.parameters()]
    y = cln(x, c)
    expected = bert4keras_formula(cln, x, c, act)
    torch.testing.assert_close(y, expected)
    for got, want in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(expected, wrt, g)):
        torch.testing.assert_close(got, want)


def test_conditional_layer_norm_matches_the_formula():
    cln = ConditionalLayerNorm(16, cond_dim=5, hidden_dim=3, hidden_act="tanh", eps=1e-6)
    for p in cln.parameters():
        nn.init.normal_(p)
    x, c = torch.randn(4, 7, 16, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    check_output_and_every_gradient(cln, x, c, torch.tanh)


def test_conditional_projections_learn_from_zero_init():
    # Zero-initialised W_γ, W_β get their gradients (those of W_h and c are 0 until W_γ, W_β move).
    cln = ConditionalLayerNorm(8, cond_dim=3, hidden_dim=4, hidden_act="swish")
    x, c = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    check_output_and_every_gradient(cln, x, c, F.silu)
    (cln(x, c) * torch.randn(2, 4, 8)).sum().backward()
    assert cln.gamma_dense.weight.grad.abs().sum() > 0
    assert cln.beta_dense.weight.grad.abs().sum() > 0


def test_rms_variant():
    cln = ConditionalLayerNorm(8, cond_dim=3, rms=True, eps=1e-6)
    x, c = torch.randn(2, 4, 8), torch.randn(2, 3)
    torch.testing.assert_close(cln(x, c), F.rms_norm(x, (8,), eps=1e-6))


def test_state_dict_round_trip():
    a = ConditionalLayerNorm(8, cond_dim=3, hidden_dim=2)
    for p in a.parameters():
        nn.init.normal_(p)
    b = ConditionalLayerNorm(8, cond_dim=3, hidden_dim=2)
    b.load_state_dict(a.state_dict())
    x, c = torch.randn(2, 4, 8), torch.randn(2, 3)
    torch.testing.assert_close(a(x, c), b(x, c))


def test_modulate_is_dit_modulation_of_a_plain_layer_norm():
    x, shift, scale = torch.randn(3, 10, 24), torch.randn(3, 24), torch.randn(3, 24)
    expected = F.layer_norm(x, (24,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(modulate(x, shift, scale), expected)


def test_ada_layer_norm_zero_init_and_gate():
    ada = AdaLayerNorm(24, cond_dim=5, gate=True)
    x, c = torch.randn(3, 10, 24), torch.randn(3, 5)
    y, gate = ada(x, c)
    torch.testing.assert_close(y, F.layer_norm(x, (24,), eps=1e-6))
    assert gate.shape == (3, 24) and not gate.any()
    nn.init.normal_(ada.linear.weight)
    shift, scale, gate = ada.linear(F.silu(c)).chunk(3, dim=-1)
    y, g = ada(x, c)
    torch.testing.assert_close(y, F.layer_norm(x, (24,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(g, gate)


def test_modules_work_under_torch_compile():
    cln = ConditionalLayerNorm(8, cond_dim=3, hidden_dim=4, hidden_act="gelu")
    for p in cln.parameters():
        nn.init.normal_(p)
    x, c = torch.randn(2, 4, 8), torch.randn(2, 3)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(cln, fullgraph=True)(x, c), cln(x, c))


def test_unknown_hidden_act_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="hidden_act must be a callable or one of"):
        ConditionalLayerNorm(8, cond_dim=3, hidden_dim=4, hidden_act="swishh")
