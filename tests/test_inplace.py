"""In-place ops bump the autograd version counter of every tensor they write, as PyTorch's own
in-place ops do: a tensor saved for backward and then overwritten by one of our ops makes
backward raise PyTorch's usual error instead of silently using the new values
(docs/conventions.md, "In-place ops"). Native and Triton variants of all three in-place ops."""

import pytest
import torch

from kernel_params import providers

MODIFIED = "modified by an inplace operation"


def ema_call(op, written):
    op([written], [torch.randn(5)], 0.9)


def power_iter_call_u(op, written):
    op([torch.randn(5, 3)], [written], [torch.randn(3)], 1, 1e-12)


def power_iter_call_v(op, written):
    op([torch.randn(3, 5)], [torch.randn(3)], [written], 1, 1e-12)


def langevin_call(op, written):
    op(written, torch.randn(5), 0.1, 0.1, 0, 0)


CASES = [
    pytest.param("ema_update_", ema_call, id="ema_update_-shadow"),
    pytest.param("spectral_norm_power_iter_", power_iter_call_u, id="power_iter-u"),
    pytest.param("spectral_norm_power_iter_", power_iter_call_v, id="power_iter-v"),
    pytest.param("langevin_step_", langevin_call, id="langevin_step_-x"),
]


def _with_providers(cases):
    return [
        pytest.param(provider.values[0], *case.values[1:], id=f"{case.id}-{provider.id}", marks=provider.marks)
        for case in cases
        for provider in providers(case.values[0])
    ]


@pytest.mark.parametrize("op,call", _with_providers(CASES))
def test_overwriting_a_saved_tensor_makes_backward_raise(op, call):
    a = torch.randn(5, requires_grad=True)
    written = torch.rand(5)
    out = (a * written).sum()  # mul saves `written` for the gradient of `a`
    call(op, written)
    with pytest.raises(RuntimeError, match=MODIFIED):
        out.backward()


@pytest.mark.parametrize("op,call", _with_providers(CASES))
def test_each_call_bumps_the_version_even_under_no_grad(op, call):
    written = torch.rand(5)
    before = written._version
    with torch.no_grad():
        call(op, written)
    assert written._version > before
    again = written._version
    call(op, written)
    assert written._version > again


@pytest.mark.parametrize("op", providers("spectral_norm_power_iter_"))
def test_power_iteration_bumps_every_vector_of_the_list(op):
    weights = [torch.randn(4, 3), torch.randn(2, 6), torch.randn(5, 5)]
    us, vs = [torch.randn(w.shape[0]) for w in weights], [torch.randn(w.shape[1]) for w in weights]
    versions = [t._version for t in us + vs]
    op(weights, us, vs, 2, 1e-12)
    assert all(t._version > v for t, v in zip(us + vs, versions))


@pytest.mark.parametrize("op", providers("ema_update_"))
def test_ema_bumps_shadows_and_not_params(op):
    shadow, params = [torch.randn(3), torch.randn(4, 2)], [torch.randn(3), torch.randn(4, 2)]
    shadow_versions, param_versions = [s._version for s in shadow], [p._version for p in params]
    op(shadow, params, 0.5)
    assert all(s._version > v for s, v in zip(shadow, shadow_versions))
    assert [p._version for p in params] == param_versions


@pytest.mark.parametrize("op", providers("langevin_step_"))
def test_langevin_on_a_non_contiguous_view_bumps_its_base(op):
    """The update goes through a contiguous copy and is copied back: the view and its base see
    the write (the copy back is a PyTorch in-place op on the view)."""
    base = torch.rand(4, 6)
    view = base.t()
    saved = base._version
    op(view, torch.rand(6, 4), 0.1, 0.1, 0, 0)
    assert base._version > saved and view._version > saved


def test_functional_ops_bump_nothing():
    x, w, b = torch.randn(2, 3, 8), torch.randn(8), torch.randn(8)
    versions = [t._version for t in (x, w, b)]
    torch.ops.kexue.cond_layer_norm(x, w, b, 1e-5, False)
    weight, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    torch.ops.kexue.spectral_sigma([weight], [u], [v])
    assert [t._version for t in (x, w, b)] == versions and (u._version, v._version) == (0, 0)
