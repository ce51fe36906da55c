"""spectral_norm_power_iter_ / spectral_sigma against the reference on every target (targets.py)
and against torch's own spectral-norm parametrization; gradients; bad input leaves every vector
untouched."""

import math

import pytest
import torch

from kernel_params import kernels, providers
from kexue_fast.reference import spectral_norm_power_iter_ as reference
from kexue_fast.testing import assert_matches
from targets import DEVICES

SHAPES = [(1, 1), (3, 5), (64, 64), (100, 37), (8, 3, 3, 3), (0, 4), (4, 0)]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make(shapes, dtype=torch.float32, device="cpu"):
    vec = torch.float64 if dtype == torch.float64 else torch.float32
    weights = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    us = [torch.randn(s[0], dtype=vec, device=device) for s in shapes]
    vs = [torch.randn(math.prod(s[1:]), dtype=vec, device=device) for s in shapes]
    return weights, us, vs


def check(op, weights, us, vs, n_iters, eps=1e-12):
    """``op`` on the given tensors (any device) against the float64 reference on the CPU."""
    as64 = lambda t: t.to("cpu", torch.float64, copy=True)  # noqa: E731  (a copy: the reference writes u, v)
    truth_u, truth_v = [as64(u) for u in us], [as64(v) for v in vs]
    truth = reference([as64(w) for w in weights], truth_u, truth_v, n_iters, eps)
    assert all(t.isfinite().all() for t in [truth, *truth_u, *truth_v])  # so a NaN result cannot match
    sigmas = op(weights, us, vs, n_iters, eps)
    assert sigmas.shape == (len(weights),)
    assert not us or (sigmas.dtype == us[0].dtype and sigmas.device == us[0].device)
    assert_matches(sigmas.cpu(), truth, what="sigmas")
    for i in range(len(weights)):
        assert_matches(us[i].cpu(), truth_u[i], what=f"us[{i}]")
        assert_matches(vs[i].cpu(), truth_v[i], what=f"vs[{i}]")


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n_iters", [0, 1, 3])
def test_matches_reference(op, target, dtype, n_iters):
    check(op, *make(SHAPES, dtype, target.device), n_iters)


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_weights_use_float32_vectors(op, target, dtype):
    # The kernel widens the 16-bit weights exactly, so the float64 reference on the same
    # (rounded) weights is the truth.
    check(op, *make([(3, 5), (64, 64), (16, 2, 3)], dtype, target.device), 2)


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_"))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n_iters", [0, 1, 2])
@pytest.mark.parametrize("eps", [1e-12, 1e-40], ids=["eps=1e-12", "eps=1e-40"])
def test_zero_weights_and_zero_start_vectors_give_zeros_not_nan(op, target, dtype, n_iters, eps):
    # normalize(0) = 0 / max(0, eps) = 0: a kernel that divides by the bare norm gives NaN here,
    # and so does one that multiplies by 1 / max(‖a‖, eps) when that overflows (float32, eps = 1e-40).
    weights, us, vs = make([(4, 3), (5, 2), (3, 3), (2, 6)], dtype, target.device)
    weights[0].zero_()
    vs[1].zero_()  # W·0 = 0, so u and then v become 0
    us[2].zero_(), vs[2].zero_()
    us[3].zero_()  # overwritten by the first round; σ = 0 for n_iters = 0
    check(op, weights, us, vs, n_iters, eps)
    if n_iters:
        assert not any(t.any() for t in us[:3] + vs[:3])


def scaled_to_norm(shape, dtype, size):
    """A random ``dtype`` weight and float32/64 start vector ``v`` with ``‖W v‖ ≈ ‖W‖₂ ≈ size``."""
    vec = torch.float64 if dtype == torch.float64 else torch.float32
    w, v = torch.randn(shape, dtype=torch.float64), torch.randn(math.prod(shape[1:]), dtype=vec)
    matrix = w.reshape(shape[0], -1)
    largest = max(torch.linalg.matrix_norm(matrix, 2), torch.mv(matrix, v.double()).norm())
    return (w * (size / largest)).to(dtype), v


# Weights the size of the smallest normal number of the dtype and beyond (1e-30 ≫ float32's 1e-38).
TINY = {torch.float64: 1e-30, torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 1e-3}


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_"))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n_iters", [1, 2])
def test_norms_below_eps_are_clamped_to_eps(op, target, dtype, n_iters):
    # eps = 2.5·max(‖W v‖, ‖W‖₂) > every norm the iteration meets (‖u‖, ‖v‖ stay below 1/2), so every
    # step is a / eps: the results are of order 0.01–0.5, far from the unit vectors (or NaN after a
    # float32 underflow) of a kernel that ignored eps or added it to the norm.
    size = TINY[dtype]
    pairs = [scaled_to_norm(shape, dtype, size) for shape in [(3, 5), (64, 64), (300, 200), (8, 3, 3, 3), (1, 1)]]
    weights, vs = [w.to(target.device) for w, _ in pairs], [v.to(target.device) for _, v in pairs]
    us = [torch.randn(w.shape[0], dtype=vs[0].dtype, device=target.device) for w in weights]
    eps = 2.5 * size
    for w, v in zip(weights, vs):
        matrix = w.double().reshape(w.shape[0], -1)
        assert torch.mv(matrix, v.double()).norm() < eps / 2 and torch.linalg.matrix_norm(matrix, 2) < eps / 2
    check(op, weights, us, vs, n_iters, eps)


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_tiny_weights_with_the_default_eps(op, target, dtype):
    # ‖W v‖ ~ 1e-29 ≪ eps = 1e-12: u, v shrink towards 0 (and underflow in float32) instead of
    # becoming unit vectors; squares of 1e-30 underflow float32, so ‖·‖ itself computes as 0.
    weights, us, vs = make([(3, 5), (64, 64), (8, 3, 3, 3)], dtype, target.device)
    weights = [(w.double() * 1e-30).to(dtype) for w in weights]
    check(op, weights, us, vs, 2)
    assert all(t.abs().max() < 1e-6 for t in us + vs)


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_"))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("eps", [0.25, 4.0])
def test_eps_of_the_size_of_the_norms(op, target, dtype, eps):
    # Some steps are clamped and some not (‖W v‖ runs from ~0.1 for the 1×1 matrix to ~60): tells
    # max(‖a‖, eps) from ‖a‖ + eps or sqrt(max(‖a‖², eps)).
    check(op, *make(SHAPES, dtype, target.device), 3, eps)


def by_hand(W, u, v, n_iters, u_first=True):
    """The power iteration written out: u ← W v / ‖W v‖, then v ← Wᵀ u / ‖Wᵀ u‖ (or the other way
    round); σ = uᵀ W v. Norms here are far above eps."""
    for _ in range(n_iters):
        if u_first:
            u = W @ v / (W @ v).norm()
            v = W.T @ u / (W.T @ u).norm()
        else:
            v = W.T @ u / (W.T @ u).norm()
            u = W @ v / (W @ v).norm()
    return u, v, u @ W @ v


@pytest.mark.parametrize("op", [*providers("spectral_norm_power_iter_"), pytest.param(reference, id="reference")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n_iters", [1, 2])
def test_u_is_updated_before_v_from_random_start_vectors(op, dtype, n_iters):
    torch.manual_seed(3)
    shapes = [(5, 3), (3, 7), (4, 2, 3)]
    weights, us, vs = make(shapes, dtype)  # random, far from the singular vectors
    expected = []
    for w, u, v in zip(weights, us, vs):
        W = w.double().reshape(w.shape[0], -1)
        expected.append(by_hand(W, u.double(), v.double(), n_iters))
        swapped = by_hand(W, u.double(), v.double(), n_iters, u_first=False)
        assert (swapped[0] - expected[-1][0]).abs().max() > 0.05  # the order is visible in the result
    sigmas = op(weights, us, vs, n_iters, 1e-12)
    for i, (u, v, sigma) in enumerate(expected):
        assert_matches(us[i], u, what=f"us[{i}]")
        assert_matches(vs[i], v, what=f"vs[{i}]")
        assert_matches(sigmas[i], sigma, what=f"sigmas[{i}]")


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_"))
def test_converges_to_the_largest_singular_value(op, target):
    weights, us, vs = make([(30, 20), (5, 40)], device=target.device)
    sigmas = op(weights, us, vs, 200, 1e-12)
    expected = torch.stack([torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2) for w in weights])
    torch.testing.assert_close(sigmas, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", [*providers("spectral_norm_power_iter_"), pytest.param(reference, id="reference")])
def test_same_steps_as_torch_parametrization(op):
    torch.manual_seed(1)
    layer = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(12, 7), n_power_iterations=2)
    sn = layer.parametrizations.weight[0]
    # Random unit vectors instead of the ones torch converged at construction (15 rounds), so
    # that the order of the u and v updates shows.
    with torch.no_grad():
        sn._u.copy_(torch.nn.functional.normalize(torch.randn(7), dim=0))
        sn._v.copy_(torch.nn.functional.normalize(torch.randn(12), dim=0))
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
    yield (w, u, v, -1, 1e-12, ValueError, "n_iters must be (an int )?>= 0")
    w, u, v = fresh()
    yield (w, u, v, 1, float("nan"), ValueError, "eps must be (a )?finite")
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


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_", DEVICES))
def test_compile_fullgraph(op, target):
    weights, us, vs = make([(6, 4), (3, 3)], device=target.device)
    u_ref, v_ref = [u.clone() for u in us], [v.clone() for v in vs]
    expected = op(weights, u_ref, v_ref, 2, 1e-12)
    torch._dynamo.reset()
    got = torch.compile(lambda w, u, v: op(w, u, v, 2, 1e-12) * 1.0, fullgraph=True)(weights, us, vs)
    torch.testing.assert_close(got, expected)
    for a, b in zip(us + vs, u_ref + v_ref):
        torch.testing.assert_close(a, b)
