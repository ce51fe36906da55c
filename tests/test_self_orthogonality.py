"""kexue::self_orthogonality against the direct formula (kexue_fast.reference.orthogonality) on
every device: both Gram branches (k ≤ b: the k × k Gram, k > b: the b × b one), both reductions,
float64 gradcheck, 16-bit, strided and empty inputs; and values known without the code: exactly
orthogonal columns give 0, duplicated columns the all-ones ϑ, a dead column adds nothing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kexue_fast import testing
from kexue_fast.ops.self_orthogonality import _tanh_and_column_squares, self_orthogonality
from kexue_fast.reference import self_orthogonality as reference
from targets import CPU_TARGETS, DEVICES, TARGETS, target_params

#: (b, k): k < b and k > b (the two Gram branches), k = b, a single column, odd sizes (one row:
#: test_one_row_gives_signs).
SHAPES = [(9, 4), (3, 7), (5, 5), (2, 6), (6, 1), (37, 130), (130, 37)]
ARGUMENTS = [(10.0, 100.0, 1.0, "sum", 1e-12), (2.0, 3.0, 0.5, "mean", 1e-12), (0.5, 1.0, 2.0, "sum", 1e-6)]


def _y(shape, dtype=torch.float64, device="cpu", scale=0.3):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _check(y, arguments):
    return testing.check_against_reference(
        lambda y: self_orthogonality(y, *arguments), lambda y: reference(y, *arguments), [y], names=["grad_y"]
    )


@pytest.mark.parametrize("target", target_params(TARGETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("arguments", ARGUMENTS, ids=lambda a: f"{a[3]}-gamma{a[0]}")
def test_matches_the_direct_formula(target, dtype, shape, arguments):
    _check(_y(shape, dtype, target.device), arguments)


@pytest.mark.parametrize("target", target_params(TARGETS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(9, 4), (3, 7), (64, 48)], ids=str)
def test_16_bit_is_computed_in_float32(target, dtype, shape):
    y = _y(shape, dtype, target.device)
    _check(y, ARGUMENTS[1])
    assert self_orthogonality(y).dtype == dtype


@pytest.mark.parametrize("target", target_params(CPU_TARGETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (3, 7), (17, 515), (40, 1030)], ids=str)
def test_native_tanh_and_column_squares(target, dtype, shape):
    # The CPU pass of T = tanh(γy) and Σ_r T², against torch's float64 tanh: every row chunk (16)
    # and column block (512) with its tail; a transposed (strided) y; the backward's call on the
    # given T gives the forward's sums bitwise, and so does one thread.
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    y = _y(shape[::-1], dtype, scale=0.5).T  # strided
    t, squares = _tanh_and_column_squares(y, 3.0)
    want = torch.tanh(3.0 * y.double())
    assert t.dtype == squares.dtype == compute and t.shape == shape and squares.shape == shape[1:]
    ulp = torch.finfo(compute).eps
    torch.testing.assert_close(t.double(), want, rtol=4 * ulp, atol=4 * ulp * 1e-3)
    torch.testing.assert_close(squares.double(), t.double().square().sum(0), rtol=shape[0] * ulp, atol=0.0)
    _, again = _tanh_and_column_squares(y, 3.0, t)
    assert torch.equal(again, squares)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        t_one, squares_one = _tanh_and_column_squares(y, 3.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(t_one, t) and torch.equal(squares_one, squares)


@pytest.mark.parametrize("shape", [(9, 4), (3, 7), (4, 4)], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradcheck_float64(shape, reduction):
    y = _y(shape).requires_grad_()
    assert torch.autograd.gradcheck(lambda y: self_orthogonality(y, 2.0, 3.0, 0.7, reduction), (y,))


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@pytest.mark.parametrize("target", target_params(DEVICES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_orthogonal_columns_give_zero(target, dtype, reduction):
    # Columns of a Hadamard matrix are ±c sign patterns: tanh(γ·±c) = ±tanh(γc), the same
    # orthogonal patterns, whatever γ. So ϑ = I and both sums vanish.
    y = (0.37 * _hadamard(16)[:, :8]).to(dtype=dtype, device=target.device)
    value = self_orthogonality(y, 10.0, 100.0, 1.0, reduction)
    assert value.abs().item() <= (1e-12 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("target", target_params(DEVICES))
@pytest.mark.parametrize("shape", [(9, 4), (3, 7)], ids=str)  # both Gram branches
def test_duplicated_columns_give_the_all_ones_value(target, shape):
    b, k = shape
    y = _y((b, 1), device=target.device).expand(b, k)
    lam1, lam2 = 100.0, 1.0
    pairs = k * (k - 1)  # every off-diagonal ϑ is 1
    torch.testing.assert_close(self_orthogonality(y, 10.0, lam1, lam2).item(), lam1 * pairs**2 + lam2 * pairs)
    torch.testing.assert_close(self_orthogonality(y, 10.0, lam1, lam2, "mean").item(), lam1 + lam2)


@pytest.mark.parametrize("target", target_params(DEVICES))
@pytest.mark.parametrize("shape", [(9, 5), (3, 7)], ids=str)
@pytest.mark.parametrize("eps", [1e-12, 1e-3])
def test_a_dead_column_adds_nothing_and_stays_finite(target, shape, eps):
    y = _y(shape, device=target.device).requires_grad_()
    dead = y.detach().clone()
    dead[:, 2] = 0
    dead.requires_grad_()
    value = self_orthogonality(dead, eps=eps)
    (grad,) = torch.autograd.grad(value, dead)
    assert value.isfinite() and grad.isfinite().all()
    alive = torch.cat([dead[:, :2], dead[:, 3:]], 1)  # the same penalty without the dead column
    torch.testing.assert_close(value, self_orthogonality(alive, eps=eps))
    (grad_alive,) = torch.autograd.grad(self_orthogonality(alive, eps=eps), dead)
    torch.testing.assert_close(
        torch.cat([grad[:, :2], grad[:, 3:]], 1), torch.cat([grad_alive[:, :2], grad_alive[:, 3:]], 1)
    )
    _check(dead.detach(), (10.0, 100.0, 1.0, "sum", eps))  # and its gradient is the clamp's, as in the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_one_row_gives_signs(dtype):
    # b = 1: every t̂_i is sgn(y_i), so every ϑ_ij = ±1; R is constant around y, its gradient 0
    # (in float32 the gradient is the rounding of terms of size λ₁·S₁ that cancel exactly).
    y = torch.tensor([[0.3, -0.2, 0.5, 0.1, -0.7, 0.05]], dtype=dtype, requires_grad=True)
    k, s = 6, 4 - 2  # four positive entries, two negative
    value = self_orthogonality(y, 10.0, 100.0, 1.0)
    torch.testing.assert_close(value.item(), 100.0 * (s * s - k) ** 2 + 1.0 * k * (k - 1))
    if dtype == torch.float64:
        (grad,) = torch.autograd.grad(value, y)
        assert grad.abs().max() < 1e-9


def test_mean_is_sum_with_rescaled_weights():
    y = _y((7, 5))
    pairs = 5 * 4
    torch.testing.assert_close(
        self_orthogonality(y, 3.0, 2.0, 0.5, "mean"), self_orthogonality(y, 3.0, 2.0 / pairs**2, 0.5 / pairs)
    )


@pytest.mark.parametrize("target", target_params(DEVICES))
def test_strided_input(target):
    base = _y((12, 20), torch.float32, target.device)
    for y in (base[::2, 1::3], base.t(), base[:, :7].t()):
        assert not y.is_contiguous()
        _check(y, ARGUMENTS[0])
        torch.testing.assert_close(self_orthogonality(y), self_orthogonality(y.contiguous()))


@pytest.mark.parametrize("target", target_params(DEVICES))
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)], ids=str)
def test_empty_input_gives_zero(target, shape):
    y = torch.zeros(shape, device=target.device, requires_grad=True)
    value = self_orthogonality(y)
    assert value.shape == () and value.item() == 0
    (grad,) = torch.autograd.grad(value, y)
    assert grad.shape == shape


def test_compiled_with_inductor_matches_eager():
    y = _y((16, 24), torch.float32).requires_grad_()

    def loss(y):
        return self_orthogonality(y * 2, 10.0, 100.0, 1.0, "mean") + y.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(y), y), torch.autograd.grad(loss(y), y))


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(2, 40),  # (one row: test_one_row_gives_signs)
    k=st.integers(1, 60),
    scale=st.sampled_from([1e-3, 0.3, 3.0]),
    reduction=st.sampled_from(["sum", "mean"]),
    seed=st.integers(0, 2**16),
)
def test_property_float64_matches_and_is_invariant_to_permutations(b, k, scale, reduction, seed):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(b, k, dtype=torch.float64, generator=generator) * scale
    arguments = (10.0, 100.0, 1.0, reduction, 1e-12)
    _check(y, arguments)
    value = self_orthogonality(y, *arguments)
    assert value >= 0
    rows, columns = torch.randperm(b, generator=generator), torch.randperm(k, generator=generator)
    torch.testing.assert_close(self_orthogonality(y[rows][:, columns], *arguments), value, rtol=1e-12, atol=1e-12)
