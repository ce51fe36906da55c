"""kexue_fast.EMA: Su's and bert4keras's semantics, warm-up, buffers, applied(), state dicts,
compiled models, mixed precision; spectral-norm vectors of every kind, interrupts, rejected loads."""

import contextlib
import io
import math
import signal

import pytest
import torch
from torch import nn

import kexue_fast.ema
import kexue_fast.nn
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
        expected = weighted / (1 - 0.8 ** len(history))
        torch.testing.assert_close(ema.averaged_value(name).double(), expected, rtol=1e-6, atol=1e-6)


def test_buffers_float_averaged_integers_and_spectral_vectors_copied():
    model = small_model()
    ema = EMA(model, decay=0.5)
    assert "1.running_mean" in ema.averaged and "1.running_var" in ema.averaged
    copied = {"1.num_batches_tracked", "3.parametrizations.weight.0._u", "3.parametrizations.weight.0._v"}
    assert copied <= set(ema.copied)
    train(model, ema, steps=3)
    u = model[3].parametrizations.weight[0]._u
    assert torch.equal(ema.shadow["3.parametrizations.weight.0._u"], u)
    assert ema.shadow["1.num_batches_tracked"].item() == 3
    assert not torch.equal(ema.shadow["1.running_mean"], model[1].running_mean)  # averaged, lags behind


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
    with pytest.raises(RuntimeError, match="boom"), ema.applied():
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


# --- warm-up ---------------------------------------------------------------------------------


def warmup_decay(decay, warmup, t):
    """torch-ema's ``use_num_updates`` rule generalised to W: the t-th update (t = 1, 2, …)."""
    return min(decay, (1 + t) / (warmup + t))


def test_warmup_schedule_is_torch_emas_use_num_updates():
    ema = EMA(nn.Linear(2, 2), decay=0.35, warmup=10)
    decays = []
    for _ in range(5):
        decays.append(ema.current_decay())
        ema.update()
    assert decays[:3] == pytest.approx([2 / 11, 3 / 12, 4 / 13])  # torch-ema's first three decays
    assert decays == pytest.approx([warmup_decay(0.35, 10, t) for t in range(1, 6)])
    assert decays[3:] == [0.35, 0.35]  # capped by decay from t = 4 on (5/14 > 0.35)
    assert ema.decay_product == pytest.approx(math.prod(decays))


@pytest.mark.parametrize("bias_correction", [False, True])
def test_warmup_shadows_follow_the_ramp(bias_correction):
    model = small_model()
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.9, warmup=4, bias_correction=bias_correction)
    history = train(model, ema, steps=6)
    decays = [warmup_decay(0.9, 4, t) for t in range(1, 7)]
    for name, first in start.items():
        expected = torch.zeros_like(first) if bias_correction else first
        for alpha, weights in zip(decays, history):
            expected = alpha * expected + (1 - alpha) * weights[name].double()
        torch.testing.assert_close(ema.shadow[name].double(), expected, rtol=1e-6, atol=1e-7)
        if bias_correction:
            expected = expected / (1 - math.prod(decays))
        torch.testing.assert_close(ema.averaged_value(name).double(), expected, rtol=1e-6, atol=1e-7)


# --- applied() -------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_correction", [False, True])
def test_applied_puts_the_formula_weights_into_the_model(bias_correction):
    model = small_model()
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.7, bias_correction=bias_correction)
    history = train(model, ema, steps=4)
    with ema.applied():
        assert torch.is_grad_enabled()  # the body runs in the caller's grad mode
        for name, p in model.named_parameters():
            weighted = sum(0.3 * 0.7 ** (3 - k) * w[name].double() for k, w in enumerate(history))
            expected = weighted / (1 - 0.7**4) if bias_correction else weighted + 0.7**4 * start[name]
            torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        assert torch.equal(p, history[-1][name])


# --- spectral-norm vectors -------------------------------------------------------------------


SPECTRAL_NORMS = {
    "torch parametrization": nn.utils.parametrizations.spectral_norm,
    "torch hook": nn.utils.spectral_norm,
    "kexue_fast": kexue_fast.nn.spectral_norm,
    "kexue_fast coeff": lambda m: kexue_fast.nn.spectral_norm(m, coeff=0.5),
}


@pytest.mark.parametrize("kind", list(SPECTRAL_NORMS))
def test_spectral_norm_vectors_are_copied_never_averaged(kind):
    sn = SPECTRAL_NORMS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(sn(nn.Linear(4, 8)), nn.ReLU(), sn(nn.Linear(8, 3)))
    vectors = [name for name, _ in model.named_buffers() if name.endswith(("_u", "_v"))]
    assert len(vectors) == 4
    ema = EMA(model, decay=0.5)
    assert set(vectors) <= set(ema.copied) and not set(vectors) & set(ema.averaged)
    train(model, ema, steps=4)
    live = dict(model.named_buffers())
    for name in vectors:
        assert torch.equal(ema.shadow[name], live[name]), name
    trained = {name: t.clone() for name, t in live.items()}
    model.eval()
    with ema.applied():
        for name, t in model.named_buffers():
            if name in vectors:
                assert torch.equal(t, trained[name]), name
                assert t.norm().item() == pytest.approx(1.0, abs=1e-6)


# --- interrupts --------------------------------------------------------------------------------


class Trap:
    """Springs at the k-th call of any of the patched functions: ``raise`` raises a
    KeyboardInterrupt instead of running the call; ``signal`` runs the call and sends the
    process a SIGINT (a real Ctrl-C arriving during the call)."""

    def __init__(self, monkeypatch, k, mode, targets):
        self.k, self.mode, self.calls, self.armed = k, mode, 0, False
        for owner, name in targets:
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))

    def wrap(self, fn):
        def trapped(*args, **kwargs):
            if self.armed:
                self.calls += 1
                if self.calls == self.k:
                    if self.mode == "raise":
                        raise KeyboardInterrupt
                    result = fn(*args, **kwargs)
                    signal.raise_signal(signal.SIGINT)
                    return result
            return fn(*args, **kwargs)

        return trapped

    @contextlib.contextmanager
    def armed_for(self):
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


def snapshot(ema):
    return {"step": ema.step, "decay_product": ema.decay_product, **{n: t.clone() for n, t in ema.shadow.items()}}


def same(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(x, b[k]) if isinstance(x, torch.Tensor) else x == b[k] for k, x in a.items()
    )


# The op path of update() copies and clones; the cached path copies with one _foreach_copy_.
UPDATE_TARGETS = [
    (kexue_fast.ema, "ema_update_"), (torch.Tensor, "copy_"), (torch.Tensor, "clone"), (torch, "_foreach_copy_")
]  # fmt: skip


@pytest.mark.parametrize("mode", ["raise", "signal"])
@pytest.mark.parametrize("k", range(1, 9))
def test_interrupted_update_is_all_or_nothing(monkeypatch, k, mode):
    model = small_model()
    ema, twin = EMA(model, decay=0.9, warmup=3), EMA(model, decay=0.9, warmup=3)
    train(model, ema, steps=2)
    twin.load_state_dict(ema.state_dict())
    before = snapshot(ema)
    twin.update()
    after = snapshot(twin)
    trap = Trap(monkeypatch, k, mode, UPDATE_TARGETS)
    try:
        with trap.armed_for():
            ema.update()
    except KeyboardInterrupt:
        pass
    state = snapshot(ema)
    assert same(state, before) or same(state, after), f"update left half done (call {k} of {trap.calls})"


@pytest.mark.parametrize("mode", ["raise", "signal"])
@pytest.mark.parametrize("k", range(1, 26))
def test_interrupted_applied_always_restores_the_training_weights(monkeypatch, k, mode):
    model = small_model()
    ema = EMA(model, decay=0.5)
    train(model, ema, steps=3)
    trained = {n: t.clone() for n, t in model.state_dict().items()}
    trap = Trap(monkeypatch, k, mode, [(torch.Tensor, "copy_")])
    with pytest.raises(KeyboardInterrupt), trap.armed_for():
        with ema.applied():
            pass
        raise KeyboardInterrupt  # the trap did not spring (k beyond the last copy)
    for name, t in model.state_dict().items():
        assert torch.equal(t, trained[name]), f"{name} not restored (interrupted at copy {k} of {trap.calls})"


# --- state dicts -----------------------------------------------------------------------------


def test_bias_corrected_state_round_trips_through_weights_only_load():
    model = small_model()
    ema = EMA(model, decay=0.8, warmup=3, bias_correction=True)
    train(model, ema, steps=3)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    other = EMA(model, decay=0.1)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert (other.step, other.decay, other.warmup, other.bias_correction) == (3, 0.8, 3, True)
    assert other.decay_product == ema.decay_product
    for name in ema.shadow:
        assert torch.equal(other.averaged_value(name), ema.averaged_value(name)), name
    ema.update(), other.update()
    for name in ema.shadow:
        assert torch.equal(other.averaged_value(name), ema.averaged_value(name)), name


def bad_states(good):
    """(what is wrong, state, error type, message pattern) for a state dict of small_model's EMA."""

    def edit(**changes):
        state = {**good, "shadow": dict(good["shadow"])}
        shadow = changes.pop("shadow", {})
        state.update(changes)
        state["shadow"].update(shadow)
        return state

    dropped = {k: v for k, v in good.items() if k != "decay_product"}
    return [
        ("broadcastable shape", edit(shadow={"0.bias": torch.zeros(1)}), ValueError, r"0\.bias.*\(1,\).*\(8,\)"),
        ("transposed", edit(shadow={"0.weight": torch.zeros(4, 8)}), ValueError, r"0\.weight.*\(4, 8\).*\(8, 4\)"),
        ("last key wrong", edit(shadow={"3.parametrizations.weight.original": torch.zeros(1)}), ValueError,
         r"3\.parametrizations\.weight\.original"),
        ("float into int", edit(shadow={"1.num_batches_tracked": torch.tensor(1.5)}), TypeError, "num_batches_tracked"),
        ("not a tensor", edit(shadow={"0.bias": [0.0] * 8}), TypeError, r"0\.bias"),
        ("missing product", dropped, KeyError, "decay_product"),
        ("bad decay", edit(decay=1.5), ValueError, "decay"),
        ("bad warmup", edit(warmup=0), ValueError, "warmup"),
        ("bad step", edit(step=-1), ValueError, "step"),
        ("bad product", edit(decay_product=float("nan")), ValueError, "decay_product"),
        ("bad flag", edit(bias_correction="yes"), TypeError, "bias_correction"),
    ]  # fmt: skip


def test_rejected_load_names_the_problem_and_changes_nothing():
    model = small_model()
    source = EMA(model, decay=0.9)
    train(model, source, steps=2)
    ema = EMA(model, decay=0.5, warmup=7, bias_correction=True)
    train(model, ema, steps=1)
    before = {**snapshot(ema), "settings": (ema.decay, ema.warmup, ema.bias_correction)}
    for what, state, error, message in bad_states(source.state_dict()):
        with pytest.raises(error, match=message):
            ema.load_state_dict(state)
        assert same({**snapshot(ema), "settings": (ema.decay, ema.warmup, ema.bias_correction)}, before), what
