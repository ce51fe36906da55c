"""kexue_fast.EMA: Su's and bert4keras's semantics, warm-up, buffers, applied(), state dicts,
compiled models, mixed precision."""

import pytest
import torch
from torch import nn

from kexue_fast import EMA


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.utils.parametrizations.spectral_norm(nn.Linear(8, 3))
    )


def train(model, ema, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for _ in range(steps):
        model(torch.randn(16, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return history


def test_su_semantics_start_at_the_weights_no_correction():
    model = small_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.8)
    history = train(model, ema)
    for name in start:
        expected = start[name].double()
        for weights in history:
            expected = 0.8 * expected + 0.2 * weights[name].double()
        torch.testing.assert_close(ema.averaged_value(name).double(), expected, rtol=1e-6, atol=1e-6)


def test_bert4keras_semantics_zero_start_with_bias_correction():
    model = small_model()
    ema = EMA(model, decay=0.8, bias_correction=True)
    history = train(model, ema)
    for name in dict(model.named_parameters()):
        weighted = sum(0.2 * 0.8 ** (len(history) - 1 - k) * w[name].double() for k, w in enumerate(history))
        torch.testing.assert_close(ema.averaged_value(name).double(), weighted / (1 - 0.8 ** len(history)), rtol=1e-6, atol=1e-6)


def test_warmup_ramps_the_decay():
    ema = EMA(small_model(), decay=0.999, warmup=10)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert ema.decay_product == pytest.approx((1 / 10) * (2 / 11) * (3 / 12))


def test_buffers_float_averaged_integers_and_spectral_vectors_copied():
    model = small_model()
    ema = EMA(model, decay=0.5)
    assert "1.running_mean" in ema.averaged and "1.running_var" in ema.averaged
    assert {"1.num_batches_tracked", "3.parametrizations.weight.0._u", "3.parametrizations.weight.0._v"} <= set(ema.copied)
    train(model, ema, steps=3)
    u = model[3].parametrizations.weight[0]._u
    assert torch.equal(ema.shadow["3.parametrizations.weight.0._u"], u)
    assert ema.shadow["1.num_batches_tracked"].item() == 3
    assert not torch.equal(ema.shadow["1.running_mean"], model[1].running_mean)  # averaged, lags behind


def test_old_style_spectral_norm_vectors_are_copied():
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 4)))
    ema = EMA(model)
    assert {"0.weight_u", "0.weight_v"} <= set(ema.copied)


def test_applied_swaps_in_and_always_restores():
    model = small_model()
    ema = EMA(model, decay=0.5)
    train(model, ema, steps=3)
    model.eval()
    x = torch.randn(5, 4)
    trained = {n: t.clone() for n, t in model.state_dict().items()}
    with ema.applied():
        for name, p in model.named_parameters():
            assert torch.equal(p, ema.averaged_value(name).to(p.dtype))
        averaged_out = model(x)
    for name, t in model.state_dict().items():
        assert torch.equal(t, trained[name])
    with pytest.raises(RuntimeError, match="boom"):
        with ema.applied():
            raise RuntimeError("boom")
    for name, t in model.state_dict().items():
        assert torch.equal(t, trained[name])
    with ema.applied():
        assert torch.equal(model(x), averaged_out)


def test_state_dict_round_trip_and_compiled_model_names():
    model = small_model()
    ema = EMA(model, decay=0.9, warmup=5)
    train(model, ema, steps=2)
    compiled = torch.compile(model)
    other = EMA(compiled, decay=0.1)
    assert set(other.shadow) == set(ema.shadow)  # `_orig_mod.` is not part of the names
    other.load_state_dict(ema.state_dict())
    assert other.step == 2 and other.decay == 0.9 and other.warmup == 5
    for name in ema.shadow:
        assert torch.equal(other.shadow[name], ema.shadow[name])
    with pytest.raises(KeyError, match="missing"):
        EMA(nn.Linear(2, 2)).load_state_dict(ema.state_dict())


def test_bfloat16_model_gets_float32_shadows_that_move():
    model = nn.Linear(64, 64).to(torch.bfloat16)
    ema = EMA(model, decay=0.9999)
    assert ema.shadow["weight"].dtype == torch.float32
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(10):
        ema.update()
    moved = (ema.shadow["weight"] - start).mean().item()
    assert moved == pytest.approx(1 - 0.9999**10, rel=1e-3)


def test_rejects_bad_decay_and_warmup():
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(2, 2), decay=1.5)
    with pytest.raises(ValueError, match="warmup"):
        EMA(nn.Linear(2, 2), warmup=0)
