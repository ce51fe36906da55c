"""cascading_rejection (the closed form) against the naive cascade of the reference: N = 1..16,
near-parallel weight vectors, odd and 0-size shapes, dtypes, strides, gradcheck, the backward's
output mask; the loss on hand-computed values; the head, with and without spectral norm."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_params import kernels
from kexue_fast import testing
from kexue_fast.gan import CascadingRejectionHead, cascading_rejection, cascading_rejection_loss
from kexue_fast.nn import spectral_norm
from kexue_fast.reference import cascading_rejection as reference
from targets import DEVICES

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def check_forward(op, v, w, eps):
    """The scores and both gradients against the reference (the rule of kexue_fast.testing);
    used by test_contract.py on the op's samples."""
    s = op(v, w, eps)
    assert s.dtype == v.dtype and s.shape == (v.shape[0], w.shape[0]) and s.is_contiguous()
    testing.check_against_reference(
        lambda v, w: op(v, w, eps), lambda v, w: reference(v, w, eps), [v, w], names=["grad_v", "grad_w"]
    )


def check_backward(op, grad_scores, v, w, eps, output_mask):
    """The backward op's gradients against autograd through the reference, in float64 and in the
    inputs' dtype; the gradients not asked for are empty."""
    grads = op(grad_scores, v, w, eps, output_mask)

    def reference_grads(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (v, w)]
        return torch.autograd.grad(reference(*leaves, eps), leaves, grad_scores.to(dtype))

    truth, same_dtype = reference_grads(torch.float64), reference_grads(v.dtype)
    for name, got, t, s, want in zip(["grad_v", "grad_w"], grads, truth, same_dtype, output_mask):
        if want:
            testing.assert_matches(got, t, s, what=name)
        else:
            assert got.numel() == 0, f"{name} was not asked for"


def near_parallel(n, d, scale=1e-4, dtype=torch.float64, device="cpu"):
    """``n`` weight vectors, each the first plus ``scale``·noise."""
    first = torch.randn(d, dtype=dtype, device=device)
    return first + scale * torch.randn(n, d, dtype=dtype, device=device)


@pytest.mark.parametrize("op,target", kernels("cascading_rejection", DEVICES))
@pytest.mark.parametrize("n", range(1, 17))
def test_closed_form_equals_the_naive_cascade(op, target, n):
    d = int(torch.randint(1, 70, ()).item())
    for B in (0, 1, 7):
        v = torch.randn(B, d, dtype=torch.float64, device=target.device) * 3
        w = torch.randn(n, d, dtype=torch.float64, device=target.device)
        check_forward(op, v, w, 1e-12)


@pytest.mark.parametrize("op,target", kernels("cascading_rejection", DEVICES))
@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_near_parallel_weights(op, target, n):
    # Every later stage scores a difference of nearly equal numbers: the closed form must agree
    # with the naive cascade to float64 rounding of the largest score, and stay close relative to
    # the (tiny) later scores themselves.
    v = torch.randn(9, 31, dtype=torch.float64, device=target.device)
    w = near_parallel(n, 31, device=target.device)
    check_forward(op, v, w, 1e-12)
    got, truth = op(v, w, 1e-12), reference(v, w, 1e-12)
    assert truth[:, 1:].abs().max() < 1e-2 * truth[:, 0].abs().max()  # the later scores are small
    torch.testing.assert_close(got[:, 1:], truth[:, 1:], rtol=1e-6, atol=1e-12 * truth.abs().max().item())


@pytest.mark.parametrize("op,target", kernels("cascading_rejection", DEVICES))
def test_properties_of_the_cascade(op, target):
    # Stage 1 is the plain score; orthogonal w's make every stage a plain score; a repeated w
    # scores 0 the second time (its direction was removed).
    v = torch.randn(5, 12, dtype=torch.float64, device=target.device)
    q, _ = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64, device=target.device))
    w = q.mT * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64, device=target.device)[:, None]
    torch.testing.assert_close(op(v, w, 1e-12), v @ w.mT, rtol=1e-12, atol=1e-12)
    repeated = torch.stack([w[0], w[0], w[1]])
    s = op(v, repeated, 1e-12)
    torch.testing.assert_close(s[:, 0], v @ w[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s[:, 1], torch.zeros_like(s[:, 1]), rtol=0, atol=1e-12)
    torch.testing.assert_close(s[:, 2], v @ w[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op,target", kernels("cascading_rejection", DEVICES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 5, 33), (64, 8, 130), (1, 1, 1), (0, 3, 4), (3, 0, 4), (4, 3, 0)], ids=str)
def test_matches_reference_in_every_dtype(op, target, dtype, shape):
    B, N, d = shape
    v = torch.randn(B, d, device=target.device).to(dtype)
    w = torch.randn(N, d, device=target.device).to(dtype)
    check_forward(op, v, w, 1e-6)


@pytest.mark.parametrize("op,target", kernels("cascading_rejection", DEVICES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(op, target, dtype):
    v = torch.randn(40, 9, device=target.device).to(dtype).mT  # (9, 40), column-major
    w = torch.randn(6, 80, device=target.device).to(dtype)[:, ::2]  # every other column
    assert not v.is_contiguous() and not w.is_contiguous()
    check_forward(op, v, w, 1e-12)
    torch.testing.assert_close(op(v, w, 1e-12), op(v.contiguous(), w.contiguous(), 1e-12))


@pytest.mark.parametrize("op,target", kernels("cascading_rejection", DEVICES))
def test_zero_weight_row_is_clamped(op, target):
    # A zero w_i scores 0 and removes nothing (s_i / eps · 0); with eps = 0 the stages after it
    # are NaN (0/0), as in the reference and as documented.
    v = torch.randn(4, 6, dtype=torch.float64, device=target.device)
    w = torch.randn(3, 6, dtype=torch.float64, device=target.device)
    w[1] = 0
    s = op(v, w, 1e-12)
    torch.testing.assert_close(s[:, 1], torch.zeros_like(s[:, 1]), rtol=0, atol=0)
    torch.testing.assert_close(s[:, [0, 2]], op(v, w[[0, 2]], 1e-12))
    check_forward(op, v, w, 1e-12)
    unclamped, naive = op(v, w, 0.0), reference(v, w, 0.0)
    assert (unclamped[:, 1] == 0).all() and unclamped[:, 2].isnan().all() and naive[:, 2].isnan().all()


@pytest.mark.parametrize("op,target", kernels("cascading_rejection", DEVICES))
@pytest.mark.parametrize("shape", [(3, 1, 4), (4, 3, 5), (2, 6, 3)], ids=str)
def test_gradcheck_float64(op, target, shape):
    B, N, d = shape
    v = torch.randn(B, d, dtype=torch.float64, device=target.device, requires_grad=True)
    w = torch.randn(N, d, dtype=torch.float64, device=target.device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: op(v, w, 1e-12), (v, w))
    w_close = near_parallel(N, d, 1e-2, device=target.device).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, w: op(v, w, 1e-12), (v, w_close))


@pytest.mark.parametrize("op,target", kernels("cascading_rejection", DEVICES))
def test_gradgradcheck_float64(op, target):
    v = torch.randn(4, 5, dtype=torch.float64, device=target.device, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, device=target.device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v, w: op(v, w, 1e-12), (v, w))


@pytest.mark.parametrize("op,target", kernels("cascading_rejection", DEVICES))
def test_gradient_penalty_through_the_scores(op, target):
    # R1 on a small D = scores(tanh(x A)): the penalty's gradients with respect to A and w, through
    # the op's double backward, equal those through the naive cascade.
    x = torch.randn(6, 4, dtype=torch.float64, device=target.device, requires_grad=True)
    A = torch.randn(4, 7, dtype=torch.float64, device=target.device, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, device=target.device, requires_grad=True)

    def penalty_grads(scores):
        (grad_x,) = torch.autograd.grad(scores(torch.tanh(x @ A), w, 1e-12).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), (A, w))

    for got, truth in zip(penalty_grads(op), penalty_grads(reference)):
        testing.assert_matches(got, truth)


class BackwardMasks(TorchDispatchMode):
    """Records the ``output_mask`` of every cascading_rejection backward op called under it."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() == "kexue::cascading_rejection_backward":
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op,target", kernels("cascading_rejection", DEVICES))
@pytest.mark.parametrize("wanted", [(1, 0), (0, 1), (1, 1)], ids=str)
def test_gradient_only_where_required(op, target, wanted):
    v = torch.randn(5, 7, device=target.device, requires_grad=bool(wanted[0]))
    w = torch.randn(4, 7, device=target.device, requires_grad=bool(wanted[1]))
    inputs = [t for t in (v, w) if t.requires_grad]
    g = torch.randn(5, 4, device=target.device)
    with BackwardMasks() as calls:
        grads = torch.autograd.grad(op(v, w, 1e-12), inputs, g)
    assert calls.masks == [[bool(need) for need in wanted]]
    as64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (v, w)]
    truths = torch.autograd.grad(reference(*as64, 1e-12), [t for t in as64 if t.requires_grad], g.double())
    for got, truth in zip(grads, truths):
        testing.assert_matches(got, truth)


def test_function_is_the_op():
    v, w = torch.randn(3, 5), torch.randn(2, 5)
    assert torch.equal(cascading_rejection(v, w), torch.ops.kexue.cascading_rejection(v, w, 1e-12))


# --- the loss ---------------------------------------------------------------------------------------

SCORES = [[2.0, -0.5], [-1.0, 0.25]]  # two samples, two stages


@pytest.mark.parametrize(
    "whose,loss,per_stage",
    [
        # hinge: real relu(1 − s), fake relu(1 + s), generator −s; batch means per stage by hand
        ("real", "hinge", [(0.0 + 2.0) / 2, (1.5 + 0.75) / 2]),
        ("fake", "hinge", [(3.0 + 0.0) / 2, (0.5 + 1.25) / 2]),
        ("generator", "hinge", [-(2.0 - 1.0) / 2, -(-0.5 + 0.25) / 2]),
        # bce: real and generator log(1 + e^{−s}), fake log(1 + e^{s})
        ("real", "bce", [(math.log1p(math.exp(-2.0)) + math.log1p(math.e)) / 2,
                         (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-0.25))) / 2]),
        ("fake", "bce", [(math.log1p(math.exp(2.0)) + math.log1p(math.exp(-1.0))) / 2,
                         (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.25))) / 2]),
        ("generator", "bce", [(math.log1p(math.exp(-2.0)) + math.log1p(math.e)) / 2,
                              (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-0.25))) / 2]),
    ],
)  # fmt: skip
def test_loss_by_hand(whose, loss, per_stage):
    # (the parameter is not called "target": conftest.py reads that name as a device target)
    scores = torch.tensor(SCORES, dtype=torch.float64)
    got = cascading_rejection_loss(scores, whose, loss)
    assert got.shape == () and got.dtype == torch.float64
    assert got.item() == pytest.approx((per_stage[0] + per_stage[1]) / 2, rel=1e-14)
    weighted = cascading_rejection_loss(scores, whose, loss, weights=[1.0, 3.0])
    assert weighted.item() == pytest.approx((per_stage[0] + 3 * per_stage[1]) / 4, rel=1e-14)
    only_first = cascading_rejection_loss(scores, whose, loss, weights=torch.tensor([2.0, 0.0]))
    assert only_first.item() == pytest.approx(per_stage[0], rel=1e-14)


def test_loss_gradient_and_16_bit_scores():
    # hinge, real: d/ds of mean relu(1 − s) over 2 samples, averaged over 2 stages = −1/4 where s < 1
    scores = torch.tensor(SCORES, requires_grad=True)
    cascading_rejection_loss(scores, "real").backward()
    torch.testing.assert_close(scores.grad, torch.tensor([[0.0, -0.25], [-0.25, -0.25]]))
    half = cascading_rejection_loss(torch.tensor(SCORES, dtype=torch.bfloat16), "fake", "bce")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, cascading_rejection_loss(torch.tensor(SCORES), "fake", "bce"))


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"scores": None}, TypeError, "scores must be a Tensor"),
        ({"scores": torch.ones(2, 2, dtype=torch.int64)}, TypeError, "scores must have a floating-point dtype"),
        ({"scores": torch.ones(4)}, ValueError, "scores must be 2-D"),
        ({"scores": torch.ones(3, 0)}, ValueError, "at least one stage"),
        ({"target": "true"}, ValueError, "target must be one of"),
        ({"loss": "wgan"}, ValueError, "loss must be one of"),
        ({"weights": [1.0]}, ValueError, "one number per stage"),
        ({"weights": [1.0, -1.0]}, ValueError, "weights\\[1\\] must be a finite number >= 0"),
        ({"weights": [1.0, float("nan")]}, ValueError, "weights\\[1\\] must be a finite number"),
        ({"weights": [0.0, 0.0]}, ValueError, "positive sum"),
        ({"weights": "11"}, TypeError, "weights must be None or a sequence"),
        ({"weights": 2.0}, TypeError, "weights must be None or a sequence"),
    ],
)
def test_loss_rejects(kwargs, error, words):
    args = {"scores": torch.tensor(SCORES), "target": "real", "loss": "hinge", **kwargs}
    with pytest.raises(error, match=words):
        cascading_rejection_loss(**args)


def test_loss_of_an_empty_batch_is_nan():
    assert cascading_rejection_loss(torch.empty(0, 3), "real").isnan()


# --- the head ------------------------------------------------------------------------------------


def test_head_scores_and_gradients():
    head = CascadingRejectionHead(10, 4)
    assert head.weight.shape == (4, 10) and head.weight.abs().max() <= 1 / math.sqrt(10)
    features = torch.randn(6, 10, requires_grad=True)
    scores = head(features)
    torch.testing.assert_close(scores, reference(features, head.weight, 1e-12))
    cascading_rejection_loss(scores, "real").backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert features.grad is not None and features.grad.abs().sum() > 0


@pytest.mark.parametrize("wrap", ["kexue_fast", "torch"])
def test_head_with_spectral_norm(wrap):
    head = CascadingRejectionHead(12, 3)
    sn = spectral_norm if wrap == "kexue_fast" else torch.nn.utils.parametrizations.spectral_norm
    head = sn(head)
    original = head.parametrizations.weight.original
    features = torch.randn(5, 12)
    head(features).sum().backward()  # training mode: a power-iteration round, then the scores
    original.grad = None
    head.eval()  # the vectors stay as they are: the weight the scores see is head.weight
    scores = head(features)
    normalised = head.weight
    assert torch.linalg.matrix_norm(normalised.detach(), ord=2) == pytest.approx(1.0, rel=1e-2)
    torch.testing.assert_close(scores, reference(features, normalised.detach(), 1e-12))
    cascading_rejection_loss(scores, "fake", "bce").backward()
    assert original.grad is not None and original.grad.abs().sum() > 0


def test_head_takes_16_bit_features_with_a_float32_weight():
    # The autocast case: bfloat16 features, a float32 weight — scores in float32, gradients to both.
    head = CascadingRejectionHead(16, 3)
    features = torch.randn(5, 16).bfloat16().requires_grad_()
    scores = head(features)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, reference(features.detach().float(), head.weight.detach(), 1e-12))
    scores.sum().backward()
    assert features.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.float32


def test_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_stages must be an int >= 1"):
        CascadingRejectionHead(4, 0)
    with pytest.raises(ValueError, match="d must be an int >= 0"):
        CascadingRejectionHead(-1, 2)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        CascadingRejectionHead(4, 2, eps=-1.0)
    head = CascadingRejectionHead(4, 2)
    with pytest.raises(ValueError, match="w has d = 4 columns but v has d = 5"):
        head(torch.randn(3, 5))
