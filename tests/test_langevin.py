"""philox_normal and langevin_step_ (native and, in the TRITON_INTERPRET=1 process, Triton) on
every target (targets.py): the Random123 known answers, agreement with an independent NumPy
model of docs/langevin.md and with the reference, shape and thread-count independence, the
moments of the normal, the update against the float64 reference in every dtype and layout, and
bad input that changes nothing."""

import numpy as np
import pytest
import torch

import philox_model
from kernel_params import kernels, providers
from kexue_fast import _C, reference
from kexue_fast.ops.langevin import langevin_step_, philox_normal
from targets import CPU_TARGETS, DEVICES, target_params

#: (counter, key, expected words): Random123's known-answer vectors for Philox4x32-10
#: (kat_vectors: zeros, all ones, and the digits of pi).
KNOWN_ANSWERS = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]
#: Seeds and offsets around every 32-bit boundary of the counter and key words.
STREAMS = [(0, 0), (1, 1), (42, 7), (2**32 - 1, 2**32), (2**32, 2**32 - 1), (2**63 + 5, 2**40), (2**64 - 1, 2**64 - 1)]
SIZES = [1, 3, 4, 5, 257, 4099, 70001]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    assert _C.philox4x32_10(counter, key) == expected
    words = philox_model.philox4x32_10(np.array([counter], np.uint64), tuple(key))[0]
    assert [int(w) for w in words] == expected
    reference_words = reference.langevin.philox4x32_10([torch.tensor([c]) for c in counter], tuple(key))
    assert [int(w) for w in reference_words] == expected


def _noise(op, size, seed, offset, dtype=None, device="cpu"):
    """Calls the op with the seed/offset as int64 (values >= 2**63 wrap, as docs/langevin.md
    says); the noise comes back on the CPU."""
    wrap = lambda v: v - 2**64 if v >= 2**63 else v  # noqa: E731
    return op(list(size), wrap(seed), wrap(offset), dtype, torch.device(device)).cpu()


@pytest.mark.parametrize("op,target", kernels("philox_normal"))
@pytest.mark.parametrize("seed, offset", STREAMS)
def test_noise_matches_the_numpy_model(op, target, seed, offset):
    for n in SIZES:
        noise = _noise(op, (n,), seed, offset, device=target.device)
        assert noise.dtype == torch.float32 and noise.shape == (n,)
        assert philox_model.within_spec_tolerance(noise.numpy(), philox_model.philox_normal(n, seed, offset))


@pytest.mark.parametrize("target", target_params(CPU_TARGETS))
def test_large_noise_written_around_the_cache_matches_the_numpy_model(target):
    """From 16 MB of float32 on, the CPU kernel writes with non-temporal stores (and the last,
    partial block the ordinary way): the same numbers."""
    n = 2**22 + 5
    noise = philox_normal(n, seed=3, offset=4)
    assert philox_model.within_spec_tolerance(noise.numpy(), philox_model.philox_normal(n, 3, 4))
    assert torch.equal(noise[:1000], philox_normal(1000, seed=3, offset=4))


def test_reference_noise_matches_the_numpy_model():
    for seed, offset in STREAMS:
        noise = reference.philox_normal((4099,), seed, offset)
        assert philox_model.within_spec_tolerance(noise.numpy(), philox_model.philox_normal(4099, seed, offset))


@pytest.mark.parametrize("op,target", kernels("philox_normal"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_noise_in_other_dtypes_is_the_float32_noise_rounded(op, target, dtype):
    noise32 = _noise(op, (1001,), 5, 6, device=target.device)
    noise = _noise(op, (1001,), 5, 6, dtype, target.device)
    assert noise.dtype == dtype
    torch.testing.assert_close(noise, noise32.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("op,target", kernels("philox_normal"))
def test_noise_depends_only_on_the_flat_index(op, target):
    noise = lambda size: _noise(op, size, 9, 2, device=target.device)  # noqa: E731
    flat = noise((3 * 5 * 7 * 11,))
    assert torch.equal(noise((3, 5, 7, 11)).reshape(-1), flat)
    assert torch.equal(noise((11, 105)).reshape(-1), flat)
    for n in (1, 2, 3, 6, 1000):
        assert torch.equal(noise((n,)), flat[:n])
    assert noise((0, 4)).shape == (0, 4)
    assert noise(()).shape == ()


@pytest.mark.parametrize("op,target", kernels("philox_normal", DEVICES))
def test_streams_differ_by_seed_and_offset(op, target):
    base = _noise(op, (1000,), 1, 1, device=target.device)
    for seed, offset in [(2, 1), (1, 2), (1 + 2**32, 1), (1, 1 + 2**32)]:
        other = _noise(op, (1000,), seed, offset, device=target.device)
        assert (other == base).float().mean() < 0.01


@pytest.mark.parametrize("target", target_params(CPU_TARGETS))
def test_noise_is_deterministic_across_thread_counts(target):
    threads = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outputs.append(philox_normal(3 * 2**18 + 5, seed=11, offset=3))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(noise, outputs[0]) for noise in outputs[1:])


@pytest.mark.parametrize("target", target_params(CPU_TARGETS))
def test_langevin_is_deterministic_across_thread_counts(target):
    x0 = torch.rand(3 * 2**18 + 5)
    grad = torch.randn_like(x0)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(langevin_step_(x0.clone(), grad, 0.5, 0.1, 11, 3, 0.2, 0.0, 1.0))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_noise_has_the_moments_of_a_standard_normal():
    n = 2**22
    noise = philox_normal(n, seed=1234, offset=0).double()
    se = n**-0.5
    assert abs(noise.mean().item()) < 5 * se
    assert abs(noise.var().item() - 1) < 5 * 2**0.5 * se  # var of the sample variance: 2/n
    assert abs((noise**3).mean().item()) < 5 * 15**0.5 * se  # third moment 0, its variance 15/n
    assert abs((noise**4).mean().item() - 3) < 5 * 96**0.5 * se  # fourth moment 3, variance 96/n
    within_one = (noise.abs() < 1).double().mean().item()
    assert abs(within_one - 0.682689492) < 5 * (0.6827 * 0.3173 / n) ** 0.5
    lanes = noise.reshape(-1, 4)
    correlation = torch.corrcoef(lanes.T)
    assert (correlation - torch.eye(4, dtype=torch.float64)).abs().max() < 5 * se  # lanes independent
    assert lanes.std(dim=0).sub(1).abs().max() < 10 * se


# --- the Langevin update ------------------------------------------------------------------------

CASES = [  # step_size, noise_std, grad_clip, min, max
    (10.0, 0.005, 0.01, 0.0, 1.0),  # IGEBM
    (0.5, 0.1, None, None, None),
    (1.0, 0.3, 0.5, None, 0.8),
    (0.1, 0.0, None, -0.5, None),  # no noise
    (0.0, 0.2, None, 0.0, 1.0),  # noise only
]


def _check_step(op, x, grad, args, seed=3, offset=4):
    expected64 = reference.langevin_step_(x.double(), grad.double(), *args[:2], seed, offset, *args[2:])
    actual = op(x.clone(), grad, *args[:2], seed, offset, *args[2:])
    assert actual.dtype == x.dtype and actual.shape == x.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected64, rtol=1e-6, atol=1e-6)
    else:  # docs/conventions.md: at most twice the error of the reference run in the same dtype, plus slack
        same_dtype = reference.langevin_step_(x.clone(), grad, *args[:2], seed, offset, *args[2:])
        budget = 2 * (same_dtype.double() - expected64).abs().max().item() + 1e-3
        assert (actual.double() - expected64).abs().max().item() <= budget
    return actual


@pytest.mark.parametrize("op,target", kernels("langevin_step_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("args", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_step_matches_reference(op, target, dtype, args):
    for n in [1, 3, 257, 4099, 70001]:
        x = torch.rand(n, device=target.device).to(dtype)
        grad = (torch.randn(n, device=target.device) * 0.05).to(dtype)
        _check_step(op, x, grad, args)


@pytest.mark.parametrize("op,target", kernels("langevin_step_"))
def test_step_is_the_formula_with_philox_noise(op, target):
    x, grad = torch.rand(3, 1000, device=target.device), torch.randn(3, 1000, device=target.device)
    actual = op(x.clone(), grad, 0.25, 0.5, 8, 9, 0.7, -0.2, 1.2)
    noise = philox_normal((3, 1000), 8, 9, device=target.device)
    expected = (x - 0.25 * grad.clamp(-0.7, 0.7) + 0.5 * noise).clamp(-0.2, 1.2)
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("op,target", kernels("langevin_step_"))
def test_step_on_non_contiguous_tensors_follows_the_logical_index(op, target):
    storage = torch.rand(6, 10, device=target.device)
    x = storage[:, ::2]  # 6 x 5 view, strided
    grad = torch.randn(5, 6, device=target.device).t()
    expected = reference.langevin_step_(x.double(), grad.double(), 0.3, 0.2, 1, 2, None, 0.0, 1.0)
    untouched = storage[:, 1::2].clone()
    out = op(x, grad, 0.3, 0.2, 1, 2, None, 0.0, 1.0)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(storage[:, 1::2], untouched)


@pytest.mark.parametrize("op", providers("langevin_step_"))
def test_step_returns_x_and_handles_empty_and_aliasing(op):
    empty = torch.empty(0, 3)
    assert op(empty, empty, 1.0, 1.0, 0, 0).shape == (0, 3)
    x = torch.rand(1000)
    noise_only = op(x.clone(), x, 0.0, 0.3, 5, 6)  # grad aliases x and is not read
    torch.testing.assert_close(noise_only, x + 0.3 * philox_normal(1000, 5, 6), rtol=0, atol=1e-6)
    y = x.clone()
    assert op(y, y, 0.1, 0.0, 0, 0) is y  # the update reads each element before writing it
    torch.testing.assert_close(y, x - 0.1 * x, rtol=0, atol=1e-7)


@pytest.mark.parametrize("op,target", kernels("langevin_step_"))
def test_step_keeps_nan_and_clamps_infinities(op, target):
    x = torch.tensor([0.5, float("nan"), 0.5, 0.5], device=target.device)
    grad = torch.tensor([float("inf"), 0.0, float("-inf"), float("nan")], device=target.device)
    out = op(x.clone(), grad, 1.0, 0.0, 0, 0, 0.1, 0.0, 1.0)
    assert out[0].item() == pytest.approx(0.4) and out[2].item() == pytest.approx(0.6)
    assert out[1].isnan() and out[3].isnan()  # like torch.clamp: NaN stays NaN


BAD_STEPS = [  # (argument overrides, expected exception, words in the message)
    ({"grad": torch.rand(3, 4)}, ValueError, "grad has shape"),
    ({"grad": torch.rand(4, 3, dtype=torch.float64)}, TypeError, "grad must have x's dtype"),
    (
        {"x": torch.rand(4, 3, dtype=torch.float64), "grad": torch.rand(4, 3, dtype=torch.float64)},
        TypeError,
        "x must be",
    ),
    ({"step_size": float("nan")}, ValueError, "step_size"),
    ({"noise_std": -1.0}, ValueError, "noise_std"),
    ({"noise_std": float("inf")}, ValueError, "noise_std"),
    ({"grad_clip": -0.1}, ValueError, "grad_clip"),
    ({"min": 1.0, "max": 0.0}, ValueError, "min must be <= max"),
    ({"min": float("nan")}, ValueError, "min"),
    ({"x": torch.rand(1, 3).expand(4, 3), "grad": torch.rand(4, 3)}, ValueError, "overlap"),
    ({"x": torch.rand(4, 3, requires_grad=True)}, RuntimeError, "requires grad"),
]


@pytest.mark.parametrize("op", providers("langevin_step_"))
@pytest.mark.parametrize("overrides, error, words", BAD_STEPS, ids=[b[2] for b in BAD_STEPS])
def test_bad_step_input_raises_and_changes_nothing(op, overrides, error, words):
    args = {"x": torch.rand(4, 3), "grad": torch.rand(4, 3), "step_size": 1.0, "noise_std": 0.1,
            "seed": 0, "offset": 0, "grad_clip": None, "min": None, "max": None}  # fmt: skip
    args.update(overrides)
    before = args["x"].detach().clone()
    with pytest.raises(error, match=words):
        op(*args.values())
    assert torch.equal(args["x"].detach(), before)


@pytest.mark.parametrize("op", providers("philox_normal"))
def test_bad_noise_input_raises(op):
    with pytest.raises(ValueError, match="size must be non-negative"):
        op([3, -1], 0, 0)
    with pytest.raises(TypeError, match="dtype must be"):
        op([3], 0, 0, torch.int32)


def test_python_wrappers_take_unsigned_seeds_and_reject_others():
    assert torch.equal(philox_normal(10, seed=2**64 - 1, offset=2**63), philox_normal(10, seed=-1, offset=-(2**63)))
    with pytest.raises(ValueError, match="seed must be in"):
        philox_normal(3, seed=2**64)
    with pytest.raises(TypeError, match="offset must be an int"):
        philox_normal(3, seed=0, offset=1.5)
