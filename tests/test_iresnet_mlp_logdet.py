"""kexue::iresnet_mlp_logdet (the log-det's MLP fast path) against its reference, the generic
autograd path kexue_fast.reference.iresnet.mlp_logdet, on every target: g(x), the estimate and the
Neumann gradient, every activation and depth, float32 and float64, odd widths, several probes,
zero weights (terms skipped), B = 0, layouts; gradcheck of g(x) in float64; the torch path for
weights given as a tensor; the op under torch.compile with inductor."""

import itertools

import pytest
import torch

from kernel_params import kernels
from kexue_fast import reference
from kexue_fast.ops import iresnet_logdet
from targets import TARGETS

ACTIVATIONS = ["elu", "relu", "tanh", "softplus", "lipswish"]


def _float64(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def check_mlp_logdet(op, x, weights, biases, activation, probes, coefficients, keep=True):
    """The op on one sample against the float64 reference: g(x) and the estimate, and, where
    something requires grad, the gradients for random upstream gradients of both (the contract
    tests use it on every sample)."""
    gx, logdet, _ = op(x, weights, biases, activation, probes, coefficients, keep)
    assert gx.shape == x.shape and logdet.shape == x.shape[:1] and gx.dtype == logdet.dtype == x.dtype
    x64, w64, b64 = _float64([x])[0], _float64(weights), _float64(biases)
    truth_gx, truth_logdet = reference.iresnet.mlp_logdet(x64, w64, b64, activation, probes.double(), coefficients)
    tol = dict(rtol=1e-4, atol=1e-5) if x.dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx.double(), truth_gx.detach(), **tol)
    torch.testing.assert_close(logdet.double(), truth_logdet.detach(), **tol)
    inputs = [t for t in (x, *weights, *biases) if t.requires_grad]
    if not inputs or not keep or not x.shape[0]:
        return
    upstream_gx, upstream_logdet = torch.randn_like(gx), torch.randn_like(logdet)
    grads = torch.autograd.grad((gx * upstream_gx).sum() + (logdet * upstream_logdet).sum(), inputs)
    truth = torch.autograd.grad(
        (truth_gx * upstream_gx.double()).sum() + (truth_logdet * upstream_logdet.double()).sum(), [x64, *w64, *b64]
    )
    truth_by_input = dict(zip((x, *weights, *biases), truth))
    for got, t in zip(grads, inputs):
        scale = 1 + truth_by_input[t].abs().max().item()
        torch.testing.assert_close(got.double(), truth_by_input[t], rtol=0, atol=tol["rtol"] * 10 * scale)


def check_mlp_logdet_backward(op, grad_gx, grad_logdet, x, weights, biases, activation, probes, saved):
    """The backward op against autograd of its definition in float64: the branch's own backward of
    ``grad_gx`` plus that of the Neumann surrogate ``Σ_s (grad_logdet / S)·n_sᵀ J v_s``, with ``n``
    read from what the forward kept."""
    grad_x, grad_w, grad_b = op(grad_gx, grad_logdet, x, weights, biases, activation, probes, saved)
    B, D = x.shape
    S, L = probes.shape[0], len(weights)
    hidden_elems = sum(B * w.shape[0] for w in weights[:-1])
    neumann = saved[hidden_elems : hidden_elems + S * B * D].view(S, B, D).double()
    x64, w64, b64 = _float64([x])[0], _float64(weights), _float64(biases)
    gx = reference.mlp_residual(x64, w64, b64, activation)
    surrogate = 0
    for n, v in zip(neumann, probes.double()):
        (vjp,) = torch.autograd.grad(gx, x64, n, create_graph=True)
        surrogate = surrogate + ((vjp * v).sum(1) * grad_logdet.double()).sum() / S
    truth = torch.autograd.grad((gx * grad_gx.double()).sum() + surrogate, [x64, *w64, *b64], allow_unused=True)
    tol = 1e-4 if x.dtype == torch.float32 else 1e-10
    for got, t in zip([grad_x, *grad_w, *grad_b], truth):
        t = torch.zeros_like(got, dtype=torch.float64) if t is None else t
        assert got.shape == t.shape and got.dtype == x.dtype
        torch.testing.assert_close(got.double(), t, rtol=0, atol=tol * (1 + t.abs().max().item() if t.numel() else 1))
    assert L == len(grad_w) == len(grad_b)


def _branch(widths, dtype, scale=0.9, seed=0):
    """Weights with spectral norm ``scale`` each (a contraction), leaf tensors requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for n_in, n_out in itertools.pairwise(widths):
        w = torch.randn(n_out, n_in, generator=generator, dtype=torch.float64)
        weights.append((w * scale / torch.linalg.matrix_norm(w, ord=2)).to(dtype).requires_grad_())
        biases.append(torch.randn(n_out, generator=generator, dtype=torch.float64).to(dtype).requires_grad_())
    return weights, biases


def _inputs(B, D, S, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    return x, torch.randn(S, B, D, generator=generator, dtype=torch.float64).to(dtype)


OP = iresnet_logdet.iresnet_mlp_logdet_op


def weights_of(*values):
    """The terms' weights as the op takes them: a float64 tensor."""
    return torch.tensor(values, dtype=torch.float64)


def ones(n):
    return torch.ones(n, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("op,target", kernels("iresnet_mlp_logdet", TARGETS))
def test_matches_reference(op, target, dtype, activation):
    weights, biases = _branch([5, 24, 17, 5], dtype)
    x, probes = _inputs(37, 5, 2, dtype)
    x, probes = x.detach().to(target.device).requires_grad_(), probes.to(target.device)
    weights = [w.detach().to(target.device).requires_grad_() for w in weights]
    biases = [b.detach().to(target.device).requires_grad_() for b in biases]
    check_mlp_logdet(op, x, weights, biases, activation, probes, ones(5))


@pytest.mark.parametrize("op,target", kernels("iresnet_mlp_logdet_backward", TARGETS))
def test_backward_op_matches_autograd_of_its_definition(op, target):
    for sample in iresnet_logdet._backward_samples(torch.device(target.device)):
        check_mlp_logdet_backward(op, *sample)


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("op,target", kernels("iresnet_mlp_logdet_backward", TARGETS))
def test_backward_in_chunks_of_rows(op, target, chunk, monkeypatch):
    # The native backward bounds its workspace by running over chunks of rows (chunk_rows): here
    # chunks of 1 and of 7 rows (50 = 7·7 + 1: a short last chunk), against the definition.
    monkeypatch.setattr(iresnet_logdet, "chunk_rows", lambda B, *_: min(B, chunk))
    weights, biases = _branch([4, 19, 4], torch.float64)
    x, probes = _inputs(50, 4, 2, torch.float64)
    device = torch.device(target.device)
    sample = iresnet_logdet.backward_sample(x.to(device), weights, biases, "elu", probes.to(device), ones(3))
    check_mlp_logdet_backward(op, *sample)


@pytest.mark.parametrize("widths", [[3, 3], [1, 1], [2, 64, 2], [7, 33, 1, 19, 7], [16, 16, 16, 16, 16]])
@pytest.mark.parametrize("op,target", kernels("iresnet_mlp_logdet", TARGETS))
def test_depths_and_widths(op, target, widths):
    weights, biases = _branch(widths, torch.float64)
    x, probes = _inputs(50, widths[0], 1, torch.float64)
    check_mlp_logdet(op, x, weights, biases, "tanh", probes, ones(4))


@pytest.mark.parametrize("op,target", kernels("iresnet_mlp_logdet", TARGETS))
def test_roulette_weights_and_trailing_zeros(op, target):
    weights, biases = _branch([4, 12, 4], torch.float64)
    x, probes = _inputs(9, 4, 3, torch.float64)
    coefficients = weights_of(1.0, 1.0, 2.0, 4.0, 0.0, 0.0, 0.0)
    check_mlp_logdet(op, x, weights, biases, "softplus", probes, coefficients)
    # The zero tail adds nothing: the same result as without it, bit for bit.
    with_tail = op(x, weights, biases, "softplus", probes, coefficients)
    without = op(x, weights, biases, "softplus", probes, coefficients[:4])
    for a, b in zip(with_tail, without):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op,target", kernels("iresnet_mlp_logdet", TARGETS))
def test_no_terms_give_a_zero_estimate(op, target):
    weights, biases = _branch([3, 8, 3], torch.float64)
    x, probes = _inputs(6, 3, 1, torch.float64)
    gx, logdet, _ = op(x, weights, biases, "elu", probes, weights_of())
    assert torch.equal(logdet, torch.zeros_like(logdet))
    torch.testing.assert_close(gx, reference.mlp_residual(x, weights, biases, "elu"))


@pytest.mark.parametrize("op,target", kernels("iresnet_mlp_logdet", TARGETS))
def test_empty_batch(op, target):
    weights, biases = _branch([3, 8, 3], torch.float32)
    gx, logdet, saved = op(torch.zeros(0, 3), weights, biases, "elu", torch.zeros(2, 0, 3), ones(1))
    assert gx.shape == (0, 3) and logdet.shape == (0,) and saved.numel() == 0


@pytest.mark.parametrize("op,target", kernels("iresnet_mlp_logdet", TARGETS))
def test_strided_inputs_and_transposed_weights(op, target):
    weights, biases = _branch([6, 10, 6], torch.float64)
    x, probes = _inputs(20, 6, 2, torch.float64)
    strided_x = torch.randn(20, 12, dtype=torch.float64)[:, ::2].copy_(x.detach()).requires_grad_()
    strided_probes = torch.randn(2, 20, 12, dtype=torch.float64)[..., ::2].copy_(probes)
    transposed = [w.detach().t().contiguous().t().requires_grad_() for w in weights]
    assert not strided_x.is_contiguous() and not transposed[0].is_contiguous()
    check_mlp_logdet(op, strided_x, transposed, biases, "lipswish", strided_probes, ones(3))


@pytest.mark.parametrize("op,target", kernels("iresnet_mlp_logdet", TARGETS))
def test_rows_do_not_depend_on_their_neighbours(op, target):
    weights, biases = _branch([4, 50, 4], torch.float32)
    x, probes = _inputs(301, 4, 1, torch.float32)
    _, logdet, _ = op(x, weights, biases, "elu", probes, ones(5), False)
    _, alone, _ = op(x[100:101], weights, biases, "elu", probes[:, 100:101], ones(5), False)
    assert torch.equal(logdet[100:101], alone)


def test_gradcheck_of_the_branch_output_float64():
    weights, biases = _branch([3, 6, 3], torch.float64)
    x, probes = _inputs(4, 3, 1, torch.float64)

    def branch(x, *params):
        return OP(x, list(params[:2]), list(params[2:]), "softplus", probes, ones(2))[0]

    assert torch.autograd.gradcheck(branch, (x, *weights, *biases))


def test_the_wrapper_takes_a_list_of_weights_as_the_op_takes_a_tensor():
    weights, biases = _branch([5, 20, 5], torch.float64)
    x, probes = _inputs(11, 5, 2, torch.float64)
    coefficients = [1.0, 1.0, 2.0, 0.0]
    gx, logdet = iresnet_logdet.mlp_logdet(x, weights, biases, "elu", probes, coefficients)
    truth_gx, truth_logdet, _ = OP(x, weights, biases, "elu", probes, weights_of(*coefficients))
    assert torch.equal(gx, truth_gx) and torch.equal(logdet, truth_logdet)


def test_backward_without_kept_results_is_a_clear_error():
    weights, biases = _branch([3, 5, 3], torch.float64)
    x, probes = _inputs(4, 3, 1, torch.float64)
    _, logdet, _ = OP(x, weights, biases, "elu", probes, ones(1), False)
    with pytest.raises(RuntimeError, match="keep=False"):
        logdet.sum().backward()


def test_compile_with_inductor_matches_eager_forward_and_backward():
    weights, biases = _branch([2, 16, 16, 2], torch.float32)
    x, probes = _inputs(64, 2, 1, torch.float32)

    def loss(x, *params):
        gx, logdet = iresnet_logdet.mlp_logdet(x, params[:3], params[3:], "elu", probes, ones(5))
        return (0.5 * (x + gx).pow(2).sum(1) - logdet).mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    params = (x, *weights, *biases)
    eager = torch.autograd.grad(loss(*params), params)
    got = torch.autograd.grad(compiled(*params), params)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
