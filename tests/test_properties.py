"""Hypothesis-generated shapes, layouts and values against the reference."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kexue_fast
from kexue_fast.reference import cond_layer_norm as reference


@st.composite
def cond_ln_cases(draw):
    B, M, D = draw(st.integers(0, 4)), draw(st.integers(0, 3)), draw(st.integers(1, 70))
    shape = (B, M, D) if draw(st.booleans()) else (B, D)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 5.0, -100.0]))
    x = torch.randn(shape, dtype=torch.float64) * scale + offset
    layouts = {"none": None, "shared": (D,), "per_sample": (B, D), "full": shape}
    make = lambda name: None if layouts[name] is None else torch.randn(layouts[name], dtype=torch.float64)  # noqa: E731
    weight = make(draw(st.sampled_from(list(layouts))))
    bias = make(draw(st.sampled_from(list(layouts))))
    return x, weight, bias, draw(st.sampled_from([0.0, 1e-12, 1e-5, 0.1])), draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(cond_ln_cases())
def test_float32_kernel_matches_float64_reference(case):
    x, weight, bias, eps, rms = case
    if eps == 0.0 and x.shape[-1] == 1 and not rms:
        eps = 1e-5  # a single-element row has zero variance: 1/sqrt(0) is inf by definition
    as32 = lambda t: None if t is None else t.float()  # noqa: E731
    y = kexue_fast.cond_layer_norm(as32(x), as32(weight), as32(bias), eps, rms)
    # The reference on the float32-rounded inputs, in float64.
    as64 = lambda t: None if t is None else t.float().double()  # noqa: E731
    truth = reference(as64(x), as64(weight), as64(bias), eps, rms)
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    # Catastrophic cancellation in the float32 mean at |offset| ≫ scale is inherent to float32
    # inputs: allow float32 rounding of the offset relative to the row's spread.
    spread = x.float().double().std(-1, unbiased=False).clamp_min(1e-30) if x.numel() else None
    rel = 1e-4 if spread is None else (1e-4 + 1e-6 * (x.abs().amax(-1) / spread).max().item())
    torch.testing.assert_close(y.double(), truth, rtol=rel, atol=rel * scale)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    seed=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
)
def test_philox_noise_matches_the_numpy_model_for_any_shape_and_stream(shape, seed, offset):
    import philox_model

    noise = kexue_fast.philox_normal(shape, seed, offset)
    assert noise.shape == tuple(shape)
    expected = philox_model.philox_normal(noise.numel(), seed, offset)
    assert philox_model.within_spec_tolerance(noise.reshape(-1).numpy(), expected)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 600),
    step_size=st.sampled_from([0.0, 1e-3, 0.5, 10.0, -1.0]),
    noise_std=st.sampled_from([0.0, 0.005, 1.0]),
    grad_clip=st.sampled_from([None, 0.0, 0.01, 2.0]),
    bounds=st.sampled_from([(None, None), (0.0, 1.0), (-0.5, None), (None, 0.3), (0.2, 0.2)]),
    seed=st.integers(-(2**63), 2**64 - 1),
)
def test_langevin_step_matches_the_reference(n, step_size, noise_std, grad_clip, bounds, seed):
    x, grad = torch.rand(n), torch.randn(n)
    args = (step_size, noise_std, seed, 3, grad_clip, *bounds)
    actual = kexue_fast.langevin_step_(x.clone(), grad, *args)
    truth = kexue_fast.reference.langevin_step_(x.double(), grad.double(), *args)
    torch.testing.assert_close(actual.double(), truth, rtol=1e-6, atol=1e-5)
