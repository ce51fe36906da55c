"""The cached tables of ``EMA.update()`` and ``SpectralNormGroup.refresh()`` (kexue_fast/_tables.py):
after every kind of change to the model, the tensors or the settings, the next call computes what
the reference computes on the tensors as they are then, or refuses them as the op does. Each
``follows``/``refuses`` test fails (or crashes) when the cache's re-check is taken out, checked by
hand: the stale table is launched. The ``loaded in place`` ones need no rebuild (the pointers
stay): they check that the table reads the live memory, not a copy."""

import copy

import pytest
import torch
from torch import nn

from kexue_fast import EMA, _tables, reference
from kexue_fast.nn import SpectralNormGroup, spectral_norm

DECAY = 0.75


# --- SpectralNormGroup ------------------------------------------------------------------------


def sn_model():
    torch.manual_seed(0)
    return nn.Sequential(spectral_norm(nn.Linear(6, 5)), nn.ReLU(), spectral_norm(nn.Linear(5, 4)))


def layer_tensors(model):
    """(weight matrices, us, vs) of the model's spectral-norm layers, as they are now."""
    norms = [m.parametrizations.weight for m in model if hasattr(m, "parametrizations")]
    return [p.original for p in norms], [p[0]._u for p in norms], [p[0]._v for p in norms]


def expected_refresh(model, n_iters=1):
    """The reference's σ and vectors after one refresh() of the model's current tensors (float64)."""
    weights, us, vs = layer_tensors(model)
    us, vs = [u.detach().double() for u in us], [v.detach().double() for v in vs]
    sigmas = reference.spectral_norm_power_iter_([w.detach().double() for w in weights], us, vs, n_iters, 1e-12)
    return sigmas, us, vs


def assert_refresh_matches(model, group, n_iters=1):
    sigmas, us, vs = expected_refresh(model, n_iters)
    torch.testing.assert_close(group.refresh(), sigmas, rtol=1e-5, atol=1e-6)
    _, got_us, got_vs = layer_tensors(model)
    for got, want in zip(got_us + got_vs, us + vs):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def started_group():
    model = sn_model()
    group = SpectralNormGroup(model)
    assert_refresh_matches(model, group)  # the table is built and cached
    return model, group


def test_group_follows_a_dtype_change_of_the_model():
    model, group = started_group()
    model.double()
    assert_refresh_matches(model, group)
    assert group.refresh().dtype == torch.float64


def test_group_refuses_what_the_op_refuses_after_a_conversion():
    model, group = started_group()
    model.half()  # the vectors become float16 too; the op wants float32 vectors for float16 weights
    with pytest.raises(TypeError, match=r"us\[0\] must be torch.float32"):
        group.refresh()


def test_group_reads_weights_loaded_in_place():
    model, group = started_group()
    model.load_state_dict({name: torch.randn_like(t) * 2 for name, t in model.state_dict().items()})
    assert_refresh_matches(model, group)


def test_group_follows_tensors_loaded_by_assignment():
    model, group = started_group()
    other = sn_model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(3.0)
    model.load_state_dict(other.state_dict(), assign=True)
    assert_refresh_matches(model, group)


def test_group_follows_a_replaced_parameter():
    model, group = started_group()
    model[0].parametrizations.weight.original = nn.Parameter(torch.randn(5, 6) * 4)
    assert_refresh_matches(model, group)


def test_group_follows_a_weight_assigned_through_the_parametrization():
    model, group = started_group()
    model[2].weight = torch.randn(4, 5) * 2  # parametrize: original.set_(value), a new pointer
    assert_refresh_matches(model, group)


def test_group_follows_replaced_vectors():
    model, group = started_group()
    sn = model[2].parametrizations.weight[0]
    sn._u = torch.nn.functional.normalize(torch.randn(4), dim=0)
    sn._v = torch.nn.functional.normalize(torch.randn(5), dim=0)
    assert_refresh_matches(model, group)


def test_group_follows_changed_settings():
    model, group = started_group()
    for m in (model[0], model[2]):
        m.parametrizations.weight[0].n_power_iterations = 3
    assert_refresh_matches(model, group, n_iters=3)


def test_group_refuses_a_weight_of_another_shape():
    model, group = started_group()
    model[2].parametrizations.weight.original = nn.Parameter(torch.randn(8, 5))  # u has 4 elements
    with pytest.raises(ValueError, match=r"us\[1\] must be 1-D with 8 elements"):
        group.refresh()


def test_group_refuses_a_view_of_the_same_memory_with_another_shape():
    model, group = started_group()
    original = model[0].parametrizations.weight.original
    original.data = original.data.view(10, 3)  # same pointer, 10 rows: u has 5 elements
    with pytest.raises(ValueError, match=r"us\[0\] must be 1-D with 10 elements"):
        group.refresh()


def test_group_under_torch_compile_calls_the_op(monkeypatch):
    model = sn_model()
    group = SpectralNormGroup(model)
    by_ops = []
    real = SpectralNormGroup._refresh_by_ops
    monkeypatch.setattr(SpectralNormGroup, "_refresh_by_ops", lambda self: by_ops.append(1) or real(self))
    sigmas, us, vs = expected_refresh(model)
    torch.testing.assert_close(torch.compile(group.refresh)(), sigmas, rtol=1e-5, atol=1e-6)
    assert by_ops  # traced through torch.ops.kexue.spectral_norm_power_iter_, not the _C launcher
    _, got_us, got_vs = layer_tensors(model)
    for got, want in zip(got_us + got_vs, us + vs):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# --- EMA ----------------------------------------------------------------------------------------


def ema_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def expected_update(ema, model):
    """Every shadow after one update() with the model's current parameters (float64)."""
    return {
        name: DECAY * ema.shadow[name].double() + (1 - DECAY) * p.detach().double()
        for name, p in model.named_parameters()
    }


def assert_update_matches(ema, model):
    expected = expected_update(ema, model)
    ema.update()
    for name, want in expected.items():
        torch.testing.assert_close(ema.shadow[name].double(), want, rtol=1e-6, atol=1e-6)


def started_ema():
    model = ema_model()
    ema = EMA(model, decay=DECAY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert_update_matches(ema, model)  # the table is built and cached
    return model, ema


def test_ema_follows_a_dtype_change_of_the_model():
    model, ema = started_ema()
    model.bfloat16()  # float32 shadows of bfloat16 parameters: a supported pair
    assert_update_matches(ema, model)


def test_ema_refuses_what_the_op_refuses_after_a_conversion():
    model, ema = started_ema()
    model.double()  # float32 shadows of float64 parameters
    with pytest.raises(TypeError, match=r"shadow\[0\] is torch.float32 and params\[0\] is torch.float64"):
        ema.update()


def test_ema_reads_parameters_loaded_in_place():
    model, ema = started_ema()
    model.load_state_dict({name: torch.randn_like(p) for name, p in model.state_dict().items()})
    assert_update_matches(ema, model)


def test_ema_follows_parameters_loaded_by_assignment():
    model, ema = started_ema()
    model.load_state_dict({name: torch.randn_like(p) * 3 for name, p in model.state_dict().items()}, assign=True)
    assert_update_matches(ema, model)


def test_ema_follows_a_replaced_parameter():
    model, ema = started_ema()
    model[2].weight = nn.Parameter(torch.randn(3, 5) * 5)
    assert_update_matches(ema, model)
    with ema.applied():  # the averaged weights go into the parameter the model holds now
        torch.testing.assert_close(model[2].weight, ema.shadow["2.weight"])


def test_ema_follows_a_replaced_shadow():
    model, ema = started_ema()
    ema.shadow["0.weight"] = torch.zeros(5, 6)
    assert_update_matches(ema, model)


def test_ema_refuses_a_parameter_of_another_shape():
    model, ema = started_ema()
    model[0].bias = nn.Parameter(torch.randn(7))
    with pytest.raises(ValueError, match=r"shadow\[1\] has shape \(5,\) but params\[1\] has \(7,\)"):
        ema.update()


def test_ema_refuses_a_view_of_the_same_memory_with_another_shape():
    model, ema = started_ema()
    model[0].weight.data = model[0].weight.data.view(3, 10)
    with pytest.raises(ValueError, match=r"shadow\[0\] has shape \(5, 6\) but params\[0\] has \(3, 10\)"):
        ema.update()


def test_ema_names_a_tensor_the_model_no_longer_holds():
    model, ema = started_ema()
    model[2].bias = None
    with pytest.raises(ValueError, match=r"no longer hold a tensor under the names \['2.bias'\]"):
        ema.update()
    del ema.shadow["0.weight"]
    model[2].bias = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"names \['0.weight'\]"):
        ema.update()


def test_ema_copies_follow_replaced_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=DECAY)
    model(torch.randn(8, 3))
    ema.update()
    model[1].num_batches_tracked = torch.tensor(41)
    ema.update()
    assert ema.shadow["1.num_batches_tracked"].item() == 41


def test_ema_under_torch_compile_calls_the_op(monkeypatch):
    model = ema_model()
    ema = EMA(model, decay=DECAY)
    by_op = []
    real = EMA._update_by_op
    monkeypatch.setattr(EMA, "_update_by_op", lambda self, decay: by_op.append(1) or real(self, decay))
    expected = expected_update(ema, model)
    torch.compile(ema.update)()
    assert by_op  # traced through torch.ops.kexue.ema_update_, not the _C launcher
    for name, want in expected.items():
        torch.testing.assert_close(ema.shadow[name].double(), want, rtol=1e-6, atol=1e-6)


def test_cached_calls_bump_the_versions_of_what_they_write():
    model, group = started_group()
    vectors = [t for ts in layer_tensors(model)[1:] for t in ts]
    before = [t._version for t in vectors]
    group.refresh()
    assert all(t._version > v for t, v in zip(vectors, before))
    model, ema = started_ema()
    shadows = list(ema.shadow.values())
    before = [t._version for t in shadows]
    ema.update()
    assert all(t._version > v for t, v in zip(shadows, before))


def test_deep_copies_build_their_own_tables():
    model, ema = started_ema()
    model_copy, ema_copy = copy.deepcopy((model, ema))
    with torch.no_grad():
        for p in model_copy.parameters():
            p.mul_(-2.0)
    assert_update_matches(ema_copy, model_copy)  # the copy's tensors, not the original's
    assert_update_matches(ema, model)
    model, group = started_group()
    model_copy, group_copy = copy.deepcopy((model, group))
    assert_refresh_matches(model_copy, group_copy)
    assert_refresh_matches(model, group)


# --- the cache itself ---------------------------------------------------------------------------


def test_cache_rebuilds_exactly_when_the_fingerprint_changes():
    builds = []
    cache = _tables.Cache(lambda ts: builds.append(len(ts)) or len(builds))
    a, b = torch.zeros(3), torch.zeros(4)
    key = lambda ts: _tables.fingerprint(ts, _tables.DTYPE, _tables.SHAPE)  # noqa: E731
    assert cache.get(key([a, b]), [a, b]) == 1
    assert cache.get(key([a, b]), [a, b]) == 1
    assert cache.get(key([b, a]), [b, a]) == 2  # same tensors, other order
    b.data = b.data.view(2, 2)
    assert cache.get(key([b, a]), [b, a]) == 3  # same pointers, other shape
    assert len(builds) == 3


def test_a_failed_build_is_retried_at_the_next_call():
    calls = []

    def build(ts):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("bad input")
        return "table"

    cache = _tables.Cache(build)
    t = torch.zeros(2)
    with pytest.raises(ValueError):
        cache.get(_tables.fingerprint([t]), [t])
    assert cache.get(_tables.fingerprint([t]), [t]) == "table"
