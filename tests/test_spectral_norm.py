"""spectral_norm_power_iter_ / spectral_sigma against the reference and against torch's own
spectral-norm parametrization; gradients; bad input leaves every vector untouched."""

import math

import pytest
import torch

from kexue_fast.reference import spectral_norm_power_iter_ as reference
from kexue_fast.testing import assert_matches
from kernel_params import providers

SHAPES = [(1, 1), (3, 5), (64, 64), (100, 37), (8, 3, 3, 3), (0, 4), (4, 0)]


def make(shapes, dtype=torch.float32):
    vec = torch.float64 if dtype == torch.float64 else torch.float32
    weights = [torch.randn(s, dtype=dtype) for s in shapes]
    us = [torch.randn(s[0], dtype=vec) for s in shapes]
    vs = [torch.randn(math.prod(s[1:]), dtype=vec) for s in shapes]
    return weights, us, vs


def check(op, weights, us, vs, n_iters, eps=1e-12):
    truth_u, truth_v = [u.double().clone() for u in us], [v.double().clone() for v in vs]
    truth = reference([w.double() for w in weights], truth_u, truth_v, n_iters, eps)
    sigmas = op(weights, us, vs, n_iters, eps)
    assert sigmas.dtype == us[0].dtype and sigmas.shape == (len(weights),)
    assert_matches(sigmas, truth, what="sigmas")
    for i in range(len(weights)):
        assert_matches(us[i], truth_u[i], what=f"us[{i}]")
        assert_matches(vs[i], truth_v[i], what=f"vs[{i}]")


@pytest.mark.parametrize("op", providers("spectral_norm_power_iter_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n_iters", [0, 1, 3])
def test_matches_reference(op, dtype, n_iters):
    check(op, *make(SHAPES, dtype), n_iters)


@pytest.mark.parametrize("op", providers("spectral_norm_power_iter_"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_weights_use_float32_vectors(op, dtype):
    # The kernel widens the 16-bit weights exactly, so the float64 reference on the same
    # (rounded) weights is the truth.
    check(op, *make([(3, 5), (64, 64), (16, 2, 3)], dtype), 2)


@pytest.mark.parametrize("op", providers("spectral_norm_power_iter_"))
def test_converges_to_the_largest_singular_value(op):
    weights, us, vs = make([(30, 20), (5, 40)])
    sigmas = op(weights, us, vs, 200, 1e-12)
    expected = torch.stack([torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2) for w in weights])
    torch.testing.assert_close(sigmas, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", providers("spectral_norm_power_iter_"))
def test_same_steps_as_torch_parametrization(op):
    torch.manual_seed(1)
    layer = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(12, 7), n_power_iterations=2)
    sn = layer.parametrizations.weight[0]
    u, v = sn._u.clone(), sn._v.clone()
    for _ in range(3):
        layer(torch.randn(2, 12))  # training mode: torch runs its power iteration
        sigma = op([layer.parametrizations.weight.original.detach()], [u], [v], 2, 1e-12)
        torch.testing.assert_close(u, sn._u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, sn._v, rtol=1e-5, atol=1e-6)
        expected = torch.vdot(sn._u, torch.mv(layer.parametrizations.weight.original, sn._v))
        torch.testing.assert_close(sigma[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", providers("spectral_norm_power_iter_"))
def test_empty_list(op):
    assert op([], [], [], 1, 1e-12).shape == (0,)


def test_sigma_gradient_is_u_v_transpose_and_gradcheck():
    weights, us, vs = make([(4, 3), (2, 3, 2)], torch.float64)
    weights = [w.requires_grad_() for w in weights]
    sigmas = torch.ops.kexue.spectral_sigma(weights, us, vs)
    grads = torch.autograd.grad(sigmas, weights, torch.tensor([2.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(grads[0], 2.0 * torch.outer(us[0], vs[0]))
    torch.testing.assert_close(grads[1], -torch.outer(us[1], vs[1]).reshape(2, 3, 2))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.kexue.spectral_sigma([a, b], us, vs), tuple(weights))


def test_sigma_matches_reference_for_16_bit_weights():
    from kexue_fast.reference import spectral_sigma as sigma_reference

    weights, us, vs = make([(5, 6), (9, 2, 2)], torch.bfloat16)
    expected = sigma_reference([w.double() for w in weights], [u.double() for u in us], [v.double() for v in vs])
    assert_matches(torch.ops.kexue.spectral_sigma(weights, us, vs), expected)


def _bad_cases():
    def fresh():
        return make([(3, 4), (5, 2)])

    w, u, v = fresh()
    yield (w, u, v[:1], 1, 1e-12, ValueError, "have 2, 2, 1 entries")
    w, u, v = fresh()
    yield (w, u, [v[0], torch.zeros(3)], 1, 1e-12, ValueError, r"vs\[1\] must be 1-D with 2 elements")
    w, u, v = fresh()
    yield (w, [u[0], u[1].double()], v, 1, 1e-12, TypeError, r"us\[1\] must be torch.float32")
    w, u, v = fresh()
    yield ([w[0], w[1].double()], u, v, 1, 1e-12, TypeError, "float64 weights cannot be mixed")
    w, u, v = fresh()
    yield (w, u, v, -1, 1e-12, ValueError, "n_iters must be >= 0")
    w, u, v = fresh()
    yield (w, u, v, 1, float("nan"), ValueError, "eps must be finite")
    w, u, v = fresh()
    yield (w, [u[0], torch.zeros(10)[::2]], v, 1, 1e-12, ValueError, r"us\[1\] must be contiguous")
    w, u, v = fresh()
    yield ([w[0], w[1].to("meta")], u, v, 1, 1e-12, ValueError, r"weights\[1\]")


@pytest.mark.parametrize("op", providers("spectral_norm_power_iter_"))
@pytest.mark.parametrize("weights,us,vs,n_iters,eps,error,words", list(_bad_cases()))
def test_bad_input_raises_and_writes_nothing(op, weights, us, vs, n_iters, eps, error, words):
    before = [t.clone() for t in us + vs if t.device.type != "meta"]
    with pytest.raises(error, match=words):
        op(weights, us, vs, n_iters, eps)
    after = [t for t in us + vs if t.device.type != "meta"]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("op", providers("spectral_norm_power_iter_"))
def test_compile_fullgraph(op):
    weights, us, vs = make([(6, 4), (3, 3)])
    u_ref, v_ref = [u.clone() for u in us], [v.clone() for v in vs]
    expected = op(weights, u_ref, v_ref, 2, 1e-12)
    torch._dynamo.reset()
    got = torch.compile(lambda w, u, v: op(w, u, v, 2, 1e-12) * 1.0, fullgraph=True)(weights, us, vs)
    torch.testing.assert_close(got, expected)
    for a, b in zip(us + vs, u_ref + v_ref):
        torch.testing.assert_close(a, b)
