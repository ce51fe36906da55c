"""Hypothesis-generated shapes, layouts and values against the reference, on every target (targets.py)."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kexue_fast
from kernel_params import kernels
from kexue_fast.reference import cond_layer_norm as reference
from kexue_fast.reference.iresnet import mlp_residual
from kexue_fast.reference.layer_norm import broadcast_affine
from targets import CPU_TARGETS, target_params


@st.composite
def cond_ln_cases(draw):
    B, M, D = draw(st.integers(0, 4)), draw(st.integers(0, 3)), draw(st.integers(1, 70))
    shape = (B, M, D) if draw(st.booleans()) else (B, D)
    rows = math.prod(shape[:-1])
    # Each row its own spread and offset, so rows whose float32 mean cancels badly (|offset| ≫
    # spread) sit next to rows that must be accurate to a few float32 roundings.
    spread = st.sampled_from([1e-3, 1.0, 1e3])
    offset = st.sampled_from([0.0, 5.0, -100.0])
    kinds = draw(st.lists(st.tuples(spread, offset), min_size=rows, max_size=rows))
    spreads = torch.tensor([s for s, _ in kinds], dtype=torch.float64)
    offsets = torch.tensor([o for _, o in kinds], dtype=torch.float64)
    x = torch.randn(rows, D, dtype=torch.float64) * spreads[:, None] + offsets[:, None]
    layouts = {"none": None, "shared": (D,), "per_sample": (B, D), "full": shape}
    make = lambda name: None if layouts[name] is None else torch.randn(layouts[name], dtype=torch.float64)  # noqa: E731
    weight = make(draw(st.sampled_from(list(layouts))))
    bias = make(draw(st.sampled_from(list(layouts))))
    return x.reshape(shape), weight, bias, draw(st.sampled_from([0.0, 1e-12, 1e-5, 0.1])), draw(st.booleans())


def float32_error_bound(x, weight, bias, eps, rms):
    """Per element: 16 float32 roundings (u = 2⁻²⁴) of the magnitudes a float32 kernel adds up,
    |w|·(|x̂| + max|x|·rstd) + |b|, the middle term (LayerNorm only) being the row's float32 mean
    error (~u·max|x|) over its spread. Tight (~1e-6 relative) for ordinary rows, ~u·|offset|/spread
    where the float32 mean cancels; measured errors stay below a quarter of it."""
    centred = x if rms else x - x.mean(-1, keepdim=True)
    rstd = (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
    mean_error = 0.0 if rms else x.abs().amax(-1, keepdim=True) * rstd
    w = 1.0 if weight is None else broadcast_affine(weight, x).abs()
    b = 0.0 if bias is None else broadcast_affine(bias, x).abs()
    return 16 * 2.0**-24 * (w * ((centred * rstd).abs() + mean_error) + b)


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm"))
@settings(max_examples=60, deadline=None)
@given(case=cond_ln_cases())
def test_float32_kernel_matches_float64_reference(op, target, case):
    x, weight, bias, eps, rms = case
    if eps == 0.0 and x.shape[-1] == 1 and not rms:
        eps = 1e-5  # a single-element row has zero variance: 1/sqrt(0) is inf by definition
    x, weight, bias = (None if t is None else t.float() for t in (x, weight, bias))
    y = op(*(None if t is None else t.to(target.device) for t in (x, weight, bias)), eps, rms).cpu()
    # The reference on the float32 inputs, in float64.
    x, weight, bias = (None if t is None else t.double() for t in (x, weight, bias))
    truth = reference(x, weight, bias, eps, rms)
    err, bound = (y.double() - truth).abs(), float32_error_bound(x, weight, bias, eps, rms)
    assert (err <= bound).all(), f"error {err.max():.3g} where the bound is {bound.flatten()[err.argmax()]:.3g}"


@pytest.mark.parametrize("target", target_params(CPU_TARGETS))
@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    seed=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
)
def test_philox_noise_matches_the_numpy_model_for_any_shape_and_stream(target, shape, seed, offset):
    import philox_model

    noise = kexue_fast.philox_normal(shape, seed, offset)
    assert noise.shape == tuple(shape)
    expected = philox_model.philox_normal(noise.numel(), seed, offset)
    assert philox_model.within_spec_tolerance(noise.reshape(-1).numpy(), expected)


@pytest.mark.parametrize("target", target_params(CPU_TARGETS))
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 600),
    step_size=st.sampled_from([0.0, 1e-3, 0.5, 10.0, -1.0]),
    noise_std=st.sampled_from([0.0, 0.005, 1.0]),
    grad_clip=st.sampled_from([None, 0.0, 0.01, 2.0]),
    bounds=st.sampled_from([(None, None), (0.0, 1.0), (-0.5, None), (None, 0.3), (0.2, 0.2)]),
    seed=st.integers(-(2**63), 2**64 - 1),
)
def test_langevin_step_matches_the_reference(target, n, step_size, noise_std, grad_clip, bounds, seed):
    x, grad = torch.rand(n), torch.randn(n)
    args = (step_size, noise_std, seed, 3, grad_clip, *bounds)
    actual = kexue_fast.langevin_step_(x.clone(), grad, *args)
    truth = kexue_fast.reference.langevin_step_(x.double(), grad.double(), *args)
    torch.testing.assert_close(actual.double(), truth, rtol=1e-6, atol=1e-5)


@st.composite
def iresnet_cases(draw):
    """An MLP branch of depth 1-3 and widths 1-40 with every layer's spectral norm 0.9 (so
    ``Lip(g) <= 0.9``: every activation is 1-Lipschitz), a float64 batch of 0-12 rows of mixed
    scales, a tolerance."""
    D = draw(st.integers(1, 40))
    dims = [D, *draw(st.lists(st.integers(1, 40), min_size=0, max_size=2)), D]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    weights, biases = [], []
    for n_in, n_out in itertools.pairwise(dims):
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        weights.append(w * 0.9 / torch.linalg.matrix_norm(w, 2))
        biases.append(torch.randn(n_out, generator=gen, dtype=torch.float64))
    B = draw(st.integers(0, 12))
    scales = torch.tensor(draw(st.lists(st.sampled_from([1e-3, 1.0, 30.0]), min_size=B, max_size=B)))
    y = torch.randn(B, D, generator=gen, dtype=torch.float64) * scales.reshape(B, 1).double()
    activation = draw(st.sampled_from(["elu", "relu", "tanh", "softplus", "lipswish"]))
    return y, weights, biases, activation, draw(st.sampled_from([(1e-6, 1e-6), (1e-10, 1e-9), (1e-12, 0.0)]))


@pytest.mark.parametrize("op,target", kernels("iresnet_inverse"))
@settings(max_examples=15, deadline=None)
@given(case=iresnet_cases(), data=st.data())
def test_iresnet_inverse_solves_each_row_on_its_own(op, target, case, data):
    y, weights, biases, activation, (atol, rtol) = case
    to_device = lambda tensors: [t.to(target.device) for t in tensors]  # noqa: E731
    y, weights, biases = y.to(target.device), to_device(weights), to_device(biases)
    x, n_iter = op(y, weights, biases, activation, 300, atol, rtol)
    # A converged row stopped with ‖x_{k+1} − x_k‖∞ <= tol, so its residual g(x_{k+1}) − g(x_k)
    # is at most Lip(g)·√D·tol in ∞-norm, plus float64 rounding.
    converged = n_iter < 300
    residual = (x + mlp_residual(x, weights, biases, activation) - y).abs().amax(1)
    bound = 0.9 * math.sqrt(y.shape[1]) * (atol + rtol * x.abs().amax(1)) + 1e-12 * (1 + y.abs().amax(1))
    assert (residual[converged] <= bound[converged]).all(), (residual[converged] - bound[converged]).max()
    assert int(converged.sum()) == y.shape[0]  # a contraction of 0.9 converges well within 300 steps
    # Rows are independent: any subset, in any order, gives the same rows bitwise.
    subset = data.draw(st.lists(st.integers(0, max(y.shape[0] - 1, 0)), max_size=y.shape[0]), label="subset")
    subset = torch.tensor(subset, dtype=torch.long, device=y.device)
    x_sub, n_sub = op(y[subset], weights, biases, activation, 300, atol, rtol)
    assert torch.equal(x_sub, x[subset]) and torch.equal(n_sub, n_iter[subset])
