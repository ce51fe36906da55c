"""ema_update_ kernels (native and, in the TRITON_INTERPRET=1 process, Triton) against the
reference on every target (targets.py): every dtype pair, sizes across chunk boundaries, many tensors in one call, empty
lists, non-contiguous params; bad input raises and leaves every shadow untouched."""

import pytest
import torch

from kernel_params import kernels, providers
from kexue_fast.ops.ema_update import DTYPE_PAIRS
from kexue_fast.reference import ema_update_ as reference
from kexue_fast.testing import check_update_against_reference
from targets import DEVICES

SIZES = [0, 1, 3, 1000, 4097, 70000]


def check(op, shadow, params, decay):
    check_update_against_reference(op, reference, [shadow, params, decay])


@pytest.mark.parametrize("op,target", kernels("ema_update_"))
@pytest.mark.parametrize("pair", sorted(DTYPE_PAIRS, key=str), ids=lambda p: f"{p[0]}<-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.999, 1.0])
def test_matches_reference(op, target, pair, decay):
    shadow = [torch.randn(n, dtype=pair[0], device=target.device) for n in SIZES]
    params = [torch.randn(n, dtype=pair[1], device=target.device) for n in SIZES]
    check(op, shadow, params, decay)


@pytest.mark.parametrize("op,target", kernels("ema_update_"))
def test_many_tensors_of_mixed_shapes_and_dtypes_in_one_call(op, target):
    pairs = sorted(DTYPE_PAIRS, key=str)
    shapes = [(7,), (3, 5), (2, 3, 4), (64, 65), (1,), (0, 4), (300,)]
    shadow, params = [], []
    for i in range(40):
        s_dtype, p_dtype = pairs[i % len(pairs)]
        shape = shapes[i % len(shapes)]
        shadow.append(torch.randn(shape, dtype=s_dtype, device=target.device))
        params.append(torch.randn(shape, dtype=p_dtype, device=target.device))
    check(op, shadow, params, 0.9)


@pytest.mark.parametrize("op,target", kernels("ema_update_"))
def test_non_contiguous_params_and_empty_lists(op, target):
    shadow = [torch.randn(6, 5, device=target.device)]
    params = [torch.randn(5, 6, device=target.device).t()]
    check(op, shadow, params, 0.7)
    op([], [], 0.5)  # a no-op


@pytest.mark.parametrize("op,target", kernels("ema_update_"))
def test_bfloat16_params_move_a_float32_shadow(op, target):
    # At decay 0.9999 each step moves the average by ~1e-4 of the gap: below bfloat16's
    # resolution at 1.0 (2^-7), so a bfloat16 shadow stays put while a float32 one moves.
    goal = torch.full((1000,), 2.0, dtype=torch.bfloat16, device=target.device)
    shadow32 = torch.ones(1000, device=target.device)
    shadow16 = torch.ones(1000, dtype=torch.bfloat16, device=target.device)
    for _ in range(100):
        op([shadow32, shadow16], [goal, goal], 0.9999)
    assert torch.equal(shadow16, torch.ones_like(shadow16))
    expected = 2.0 - 0.9999**100  # the exact average after 100 steps from 1 towards 2
    assert torch.allclose(shadow32, torch.full_like(shadow32, expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize("op,target", kernels("ema_update_"))
def test_bfloat16_results_are_rounded_as_torch_rounds_them_subnormals_included(op, target):
    # Each shadow and its param lie in one binade and decay is 0.5, so every average is exact in
    # float32 and the kernel's result differs from torch's only where its rounding to bfloat16
    # does: ties, the largest finite values, subnormals (which the AVX512_BF16 instruction would
    # flush to zero) and infinities, each in a vector of its own and mixed among normal values.
    generator = torch.Generator().manual_seed(0)
    mantissa_sign = torch.randint(0, 1 << 16, (6, 2, 4099), generator=generator, dtype=torch.int32) & 0x807F
    exponents = torch.tensor([0, 0, 1, 127, 254, 255], dtype=torch.int32)  # two rows of subnormals
    bits = mantissa_sign | (exponents << 7)[:, None, None]
    bits[1, :, ::5] = (bits[1, :, ::5] & 0x807F) | (120 << 7)  # subnormals among normal values
    bits[5] = bits[5, :1] & 0xFF80  # infinities of one sign (NaN has no one rounding in torch)
    values = bits.to(torch.int16).view(torch.bfloat16).to(target.device)
    shadow, params = list(values[:, 0].clone()), list(values[:, 1])
    expected = [s.clone() for s in shadow]
    reference(expected, params, 0.5)
    op(shadow, params, 0.5)
    for i, (actual, want) in enumerate(zip(shadow, expected)):
        assert torch.equal(actual.view(torch.int16), want.view(torch.int16)), f"binade {i}"


def _pair(shadow_dtype=torch.float32, param_dtype=torch.float32, second=(4,), param_second=None, device="cpu"):
    """Two (shadow, param) pairs whose first is valid, the second as given."""
    shadow = [torch.zeros(3), torch.zeros(second, dtype=shadow_dtype)]
    params = [torch.ones(3), torch.ones(param_second or second, dtype=param_dtype, device=device)]
    return shadow, params


BAD = [
    # (shadow, params, decay, error, words)
    ([torch.zeros(3), torch.zeros(4)], [torch.ones(3)], 0.5, ValueError, "shadow has 2 tensors but params has 1"),
    (*_pair(param_second=(5,)), 0.5, ValueError, r"shadow\[1\] has shape"),
    (*_pair(shadow_dtype=torch.float16), 0.5, TypeError, r"shadow\[1\] is torch.float16"),
    (*_pair(param_dtype=torch.float64), 0.5, TypeError, r"params\[1\] is torch.float64"),
    ([torch.zeros(3)], [torch.ones(3)], -0.1, ValueError, "decay must be in"),
    ([torch.zeros(3)], [torch.ones(3)], 1.5, ValueError, "decay must be in"),
    ([torch.zeros(3)], [torch.ones(3)], float("nan"), ValueError, "decay must be in"),
    (
        [torch.zeros(3), torch.zeros(4, 2).t()], [torch.ones(3), torch.ones(2, 4)], 0.5, ValueError,
        r"shadow\[1\] must be contiguous",
    ),
    (*_pair(device="meta"), 0.5, ValueError, r"params\[1\] are on"),
]  # fmt: skip


@pytest.mark.parametrize("op", providers("ema_update_"))
@pytest.mark.parametrize("shadow,params,decay,error,words", BAD)
def test_bad_input_raises_and_writes_nothing(op, shadow, params, decay, error, words):
    before = [s.clone() for s in shadow]
    with pytest.raises(error, match=words):
        op(shadow, params, decay)
    for s, b in zip(shadow, before):
        assert torch.equal(s, b)  # the first, valid pair was not updated either


@pytest.mark.parametrize("op,target", kernels("ema_update_", DEVICES))
def test_compile_fullgraph_updates_in_place(op, target):
    # (That the compiled graph keeps the op as one node is checked for every op in test_contract.py.)
    shadow = [torch.zeros(8, device=target.device), torch.zeros(3, dtype=torch.float64, device=target.device)]
    params = [torch.ones(8, device=target.device), torch.ones(3, dtype=torch.float64, device=target.device)]
    torch._dynamo.reset()
    torch.compile(lambda s, p: op(s, p, 0.75), fullgraph=True)(shadow, params)
    assert all(torch.equal(s, torch.full_like(s, 0.25)) for s in shadow)
