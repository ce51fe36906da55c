"""kexue::iresnet_inverse and its backward against the reference (kexue_fast/reference/iresnet.py)
on every target, gradcheck in float64, and the edges of SPEC §3: divergent branches, the float32
rounding floor, NaN/inf rows, max_iter = 0, B = 0, D = 1, odd widths, layouts."""

import itertools
import warnings

import pytest
import torch

from kernel_params import kernels
from kexue_fast import reference
from kexue_fast.ops import iresnet as iresnet_ops
from targets import TARGETS

ACTIVATIONS = ["elu", "relu", "tanh", "softplus", "lipswish"]


def _float64(tensors):
    return [t.detach().double() for t in tensors]


def _tolerances(dtype, atol, rtol, scale):
    """Per row: the rounding budget of ``dtype`` and the gap allowed between two rows that stopped
    one iteration apart (each step then moved by at most the stopping tolerance)."""
    rounding = (2e-5 if dtype == torch.float32 else 1e-10) * scale
    return rounding, 2 * (atol + rtol * scale)


def assert_rows_match(got, got_n, truth, truth_n, atol, rtol, what):
    """Rows agree with the float64 reference: the same iteration count up to one (the stopping
    boundary under other rounding), the same values within rounding (plus one step where the
    counts differ); rows the reference ends non-finite end non-finite here, at the same count."""
    assert got_n.dtype == torch.int32 and got_n.shape == truth_n.shape
    dtype = got.dtype
    finite = torch.isfinite(truth).all(1)
    assert (~torch.isfinite(got[~finite]).all(1)).all(), f"{what}: a non-finite row came out finite"
    assert (got_n[~finite] == truth_n[~finite]).all()
    got, truth, got_n, truth_n = got[finite].double(), truth[finite], got_n[finite], truth_n[finite]
    assert ((got_n - truth_n).abs() <= 1).all(), f"{what}: n_iter {got_n.tolist()} vs reference {truth_n.tolist()}"
    scale = 1 + truth.abs().amax(1)
    rounding, step = _tolerances(dtype, atol, rtol, scale)
    allowed = rounding + torch.where(got_n == truth_n, 0, step)
    err = (got - truth).abs().amax(1)
    assert (err <= allowed).all(), f"{what}: row errors {err.tolist()} > {allowed.tolist()}"


def assert_close_gradient(got, truth, dtype, atol, rtol, what):
    scale = 1 + (truth.abs().max().item() if truth.numel() else 0.0)
    budget = (2e-4 if dtype == torch.float32 else 1e-8) * scale + 50 * (atol + rtol) * scale
    err = (got.double() - truth).abs().max().item() if got.numel() else 0.0
    assert err <= budget, f"{what}: error {err:.3g} > {budget:.3g}"


def check_inverse(op, y, weights, biases, activation, max_iter, atol, rtol):
    """The op (or its Triton variant) on one sample against the reference, forward and, where
    something requires grad, backward (the contract tests use it on every sample)."""
    x, n_iter = op(y, weights, biases, activation, max_iter, atol, rtol)
    assert x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
    y64, w64, b64 = y.detach().double(), _float64(weights), _float64(biases)
    truth, truth_n = reference.iresnet_inverse(y64, w64, b64, activation, max_iter, atol, rtol)
    assert_rows_match(x.cpu(), n_iter.cpu(), truth.cpu(), truth_n.cpu(), atol, rtol, "x")
    inputs = [t for t in (y, *weights, *biases) if t.requires_grad]
    if not inputs or not y.shape[0]:
        return
    grad_x = torch.randn_like(x)
    grads = torch.autograd.grad(x, inputs, grad_x)
    ref = reference.iresnet_inverse_backward(grad_x.double(), truth, w64, b64, activation, max_iter, atol, rtol)
    ref_by_input = dict(zip((y, *weights, *biases), (ref[0], *ref[1], *ref[2])))
    for i, (got, t) in enumerate(zip(grads, inputs)):
        assert_close_gradient(got, ref_by_input[t], y.dtype, atol, rtol, f"grad of input {i}")


def check_backward(op, grad_x, x, weights, biases, activation, max_iter, atol, rtol):
    grad_y, grad_w, grad_b = op(grad_x, x, weights, biases, activation, max_iter, atol, rtol)
    ref = reference.iresnet_inverse_backward(
        grad_x.double(), x.double(), _float64(weights), _float64(biases), activation, max_iter, atol, rtol
    )
    for name, got, truth in [("grad_y", grad_y, ref[0])] + [
        (f"grad_{kind}[{k}]", g, t) for kind, gs, ts in (("w", grad_w, ref[1]), ("b", grad_b, ref[2]))
        for k, (g, t) in enumerate(zip(gs, ts))
    ]:  # fmt: skip
        assert got.shape == truth.shape and got.dtype == x.dtype
        assert_close_gradient(got, truth, x.dtype, atol, rtol, name)


def branch(dims, dtype=torch.float64, c=0.9, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for n_in, n_out in itertools.pairwise(dims):
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        weights.append((w * (c / torch.linalg.matrix_norm(w, 2))).to(dtype).to(device))
        biases.append((0.2 * torch.randn(n_out, generator=gen, dtype=torch.float64)).to(dtype).to(device))
    return weights, biases


# --- against the reference -------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op,target", kernels("iresnet_inverse", TARGETS))
def test_matches_reference(op, target, dtype, activation):
    # Widths that are no multiple of any vector width; enough rows for several blocks and tiles.
    weights, biases = branch([7, 37, 19, 7], dtype, seed=1, device=target.device)
    y = torch.randn(103, 7, dtype=dtype, device=target.device, requires_grad=True)
    weights, biases = [w.requires_grad_() for w in weights], [b.requires_grad_() for b in biases]
    check_inverse(op, y, weights, biases, activation, 100, 1e-6, 1e-6)


@pytest.mark.parametrize("dims", [[1, 1], [1, 5, 1], [2, 64, 64, 2], [3, 17, 2, 33, 3], [20, 70, 20]])
@pytest.mark.parametrize("op,target", kernels("iresnet_inverse", TARGETS))
def test_depths_and_widths(op, target, dims):
    weights, biases = branch(dims, torch.float32, c=0.95, seed=len(dims), device=target.device)
    y = (3 * torch.randn(29, dims[0], device=target.device)).requires_grad_()
    weights, biases = [w.requires_grad_() for w in weights], [b.requires_grad_() for b in biases]
    check_inverse(op, y, weights, biases, "elu", 200, 1e-6, 1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("op,target", kernels("iresnet_inverse", TARGETS))
def test_gradients_match_the_reference(op, target, activation):
    weights, biases = branch([4, 9, 4], torch.float64, seed=2, device=target.device)
    weights = [w.requires_grad_() for w in weights]
    biases = [b.requires_grad_() for b in biases]
    y = torch.randn(11, 4, dtype=torch.float64, device=target.device, requires_grad=True)
    check_inverse(op, y, weights, biases, activation, 300, 1e-12, 1e-12)


@pytest.mark.parametrize("op,target", kernels("iresnet_inverse_backward", TARGETS))
def test_backward_op_matches_the_reference(op, target):
    weights, biases = branch([6, 21, 13, 6], torch.float32, seed=3, device=target.device)
    x = torch.randn(50, 6, device=target.device)
    check_backward(op, torch.randn_like(x), x, weights, biases, "tanh", 100, 1e-6, 1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(activation):
    weights, biases = branch([3, 6, 5, 3], torch.float64, c=0.8, seed=4)
    params = [t.requires_grad_() for t in (*weights, *biases)]
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def solve(y, *params):
        return torch.ops.kexue.iresnet_inverse(y, list(params[:3]), list(params[3:]), activation, 500, 1e-13, 1e-13)[0]

    assert torch.autograd.gradcheck(solve, (y, *params))


def test_gradients_equal_autograd_through_a_converged_unrolled_solve():
    weights, biases = branch([5, 16, 5], torch.float64, c=0.9, seed=5)
    params = [t.requires_grad_() for t in (*weights, *biases)]
    y = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    x, _ = torch.ops.kexue.iresnet_inverse(y, weights, biases, "elu", 500, 1e-14, 1e-14)
    grad_x = torch.randn_like(x)
    implicit = torch.autograd.grad(x, [y, *params], grad_x)
    unrolled = y
    for _ in range(400):
        unrolled = y - reference.mlp_residual(unrolled, weights, biases, "elu")
    for a, b in zip(implicit, torch.autograd.grad(unrolled, [y, *params], grad_x)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# --- edges -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,target", kernels("iresnet_inverse", TARGETS))
def test_divergent_rows_end_at_max_iter_and_leave_the_others_alone(op, target):
    # g(x) = −1.5·relu(x) + 0.5·relu(−x): x ← y + 1.5x grows without bound from y > 0; from y < 0
    # x ← y + 0.5x contracts to x = 2y.
    weights = [torch.tensor([[1.0], [-1.0]], device=target.device), torch.tensor([[-1.5, 0.5]], device=target.device)]
    biases = [torch.zeros(2, device=target.device), torch.zeros(1, device=target.device)]
    y = torch.tensor([[-1.0], [2.0], [-3.0]], device=target.device)
    x, n_iter = op(y, weights, biases, "relu", 40, 1e-6, 1e-6)
    assert n_iter[1] == 40
    assert (n_iter[[0, 2]] < 40).all()
    torch.testing.assert_close(x[[0, 2]], 2 * y[[0, 2]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,target", kernels("iresnet_inverse", TARGETS))
def test_nan_and_inf_rows_stop_at_once_without_touching_the_others(op, target):
    weights, biases = branch([3, 8, 3], torch.float32, seed=6, device=target.device)
    y = torch.randn(5, 3, device=target.device)
    y[1, 0], y[3, 2] = float("nan"), float("inf")
    x, n_iter = op(y, weights, biases, "elu", 1000, 1e-6, 1e-6)
    assert n_iter[1] == n_iter[3] == 1000
    assert not torch.isfinite(x[1]).all() and not torch.isfinite(x[3]).all()
    clean = [0, 2, 4]
    x_clean, n_clean = op(y[clean], weights, biases, "elu", 1000, 1e-6, 1e-6)
    assert torch.equal(x[clean], x_clean) and torch.equal(n_iter[clean], n_clean)


@pytest.mark.parametrize("op,target", kernels("iresnet_inverse", TARGETS))
def test_float32_tolerance_below_the_rounding_floor_runs_to_max_iter(op, target):
    # rtol = 0 and atol far below 2^-23·‖x‖∞ ≈ 1.2e-5 (‖x‖∞ ≈ 100): a row stops only if its
    # iterate lands exactly on a float32 fixed point; the others cycle by ulps to max_iter.
    weights, biases = branch([4, 32, 4], torch.float32, c=0.95, seed=7, device=target.device)
    y = 100 * torch.randn(200, 4, generator=torch.Generator().manual_seed(7)).to(target.device)
    x, n_iter = op(y, weights, biases, "elu", 300, 1e-9, 0.0)
    cycling = n_iter == 300
    assert 0 < int(cycling.sum()) < 200
    residual = x + reference.mlp_residual(x, weights, biases, "elu") - y
    assert residual.abs().max() < 1e-3  # converged as far as float32 goes, just not to 1e-9
    x_next = y - reference.mlp_residual(x, weights, biases, "elu")
    assert (x_next - x)[~cycling].abs().max() < 1e-3


def test_warning_names_the_causes_once():
    weights, biases = branch([4, 32, 4], torch.float32, c=0.95, seed=7)
    y = 100 * torch.randn(6, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        iresnet_ops.iresnet_inverse(y, weights, biases, "elu", 3, 1e-9, 0.0)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert (
        "6 of 6 rows did not converge in max_iter=3" in message
        and "rounding floor" in message
        and "Lip(g) >= 1" in message
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iresnet_ops.iresnet_inverse(y, weights, biases, "elu", 0)  # max_iter = 0: nothing asked, no warning
        iresnet_ops.iresnet_inverse(y, weights, biases, "elu", 300, 1e-6, 1e-6)


@pytest.mark.parametrize("op,target", kernels("iresnet_inverse", TARGETS))
def test_max_iter_zero_returns_y(op, target):
    weights, biases = branch([3, 5, 3], torch.float32, device=target.device)
    y = torch.randn(4, 3, device=target.device)
    x, n_iter = op(y, weights, biases, "elu", 0, 1e-6, 1e-6)
    assert torch.equal(x, y) and x.data_ptr() != y.data_ptr() and (n_iter == 0).all()


@pytest.mark.parametrize("op,target", kernels("iresnet_inverse", TARGETS))
def test_empty_batch(op, target):
    weights, biases = branch([3, 5, 3], torch.float32, device=target.device)
    y = torch.empty(0, 3, device=target.device, requires_grad=True)
    x, n_iter = op(y, [w.requires_grad_() for w in weights], biases, "elu", 10, 1e-6, 1e-6)
    assert x.shape == (0, 3) and n_iter.shape == (0,)
    grads = torch.autograd.grad(x.sum(), [y, *weights])
    assert grads[0].shape == (0, 3) and all((g == 0).all() for g in grads[1:])


@pytest.mark.parametrize("op,target", kernels("iresnet_inverse", TARGETS))
def test_strided_y_and_transposed_weights(op, target):
    weights, biases = branch([5, 12, 5], torch.float32, seed=8, device=target.device)
    y = torch.randn(10, 14, device=target.device)[::2, 3:8]  # rows strided, columns offset
    transposed = [w.t().contiguous().t() for w in weights]
    assert not y.is_contiguous() and not transposed[0].is_contiguous()
    x, n = op(y, transposed, biases, "elu", 100, 1e-6, 1e-6)
    x_contig, n_contig = op(y.contiguous(), weights, biases, "elu", 100, 1e-6, 1e-6)
    assert torch.equal(x, x_contig) and torch.equal(n, n_contig)


@pytest.mark.parametrize("op,target", kernels("iresnet_inverse", TARGETS))
def test_rows_do_not_depend_on_their_neighbours(op, target):
    # Per-row results are the same whatever block, tile or thread a row lands in: bitwise for the
    # native kernels and Triton on a GPU. Under the Triton interpreter tl.dot is numpy's matmul,
    # whose rounding of a row depends on where the row falls in BLAS's micro-kernel (seen: a
    # one-ulp difference on an AVX2 machine), so there rows agree to rounding and their iteration
    # counts to one step.
    weights, biases = branch([6, 40, 6], torch.float32, seed=9, device=target.device)
    generator = torch.Generator().manual_seed(9)
    y = torch.randn(200, 6, generator=generator).to(target.device)
    order = torch.randperm(200, generator=generator).to(target.device)
    x, n = op(y, weights, biases, "softplus", 100, 1e-6, 1e-6)
    x_perm, n_perm = op(y[order], weights, biases, "softplus", 100, 1e-6, 1e-6)
    x_few, n_few = op(y[7:10], weights, biases, "softplus", 100, 1e-6, 1e-6)
    interpreted = "triton" in str(op) and target.device == "cpu"
    for (got_x, got_n), (want_x, want_n) in (
        ((x_perm, n_perm), (x[order], n[order])),
        ((x_few, n_few), (x[7:10], n[7:10])),
    ):
        if interpreted:
            torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)
            assert (got_n - want_n).abs().max() <= 1
        else:
            assert torch.equal(got_x, want_x) and torch.equal(got_n, want_n)


def test_compile_with_inductor_keeps_forward_and_backward():
    # The user's wrapper (with its warning) under torch.compile(fullgraph=True) and inductor: the
    # same x and gradients as eager.
    weights, biases = branch([4, 12, 4], torch.float32, seed=10)
    params = [t.requires_grad_() for t in (*weights, *biases)]
    y = torch.randn(9, 4, requires_grad=True)

    def loss(y, *params):
        x, n_iter = iresnet_ops.iresnet_inverse(y, list(params[:2]), list(params[2:]), "elu", 100, 1e-6, 1e-6)
        return (x * x).sum() + n_iter.sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    eager = torch.autograd.grad(loss(y, *params), [y, *params])
    got = torch.autograd.grad(compiled(y, *params), [y, *params])
    for a, b in zip(eager, got):
        torch.testing.assert_close(a, b)
