"""The GAN regularisers of kexue_fast.gan: the batched orthogonal regulariser against the per-layer
loop (kexue_fast.reference.orthogonality) and hand values, the Self-Orthogonality hooks against
the op applied by hand to the pre-bias outputs, and the D penalties on tiny discriminators whose
input gradient is known in closed form."""

import pytest
import torch
import torch.nn.functional as F

from kexue_fast.gan import (
    SelfOrthogonality,
    orthogonal_regularizer,
    self_orthogonality,
    weight_l2,
    zero_centered_gradient_penalty,
)
from kexue_fast.reference import orthogonal_regularizer as loop_reference

#: Wide and tall matrices (out <= n: the out × out Gram; out > n: the n × n one), conv weights
#: among them, and repeated shapes so that groups have several members.
SHAPES = [(8, 4, 3, 3), (8, 4, 3, 3), (8, 4, 3, 3), (64, 2, 1, 1), (64, 2, 1, 1), (5, 20), (50, 6), (3, 3), (7, 1)]


def _weights(dtype=torch.float64, shapes=SHAPES):
    return [(torch.randn(s, dtype=torch.float64) * 0.3).to(dtype).requires_grad_() for s in shapes]


# --- orthogonal_regularizer -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["biggan", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_regularizer_matches_the_per_layer_loop(kind, dtype):
    weights = _weights(dtype)
    value = orthogonal_regularizer(weights, kind, strength=0.7)
    grads = torch.autograd.grad(value, weights)
    as64 = [w.detach().double().requires_grad_() for w in weights]
    truth = loop_reference(as64, kind, strength=0.7)
    truth_grads = torch.autograd.grad(truth, as64)
    assert value.dtype == dtype
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(value.double(), truth, rtol=rtol, atol=0)
    for g, t in zip(grads, truth_grads):
        assert g.dtype == dtype and g.shape == t.shape
        torch.testing.assert_close(g.double(), t, rtol=rtol, atol=rtol * t.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_regularizer_of_16_bit_weights_is_computed_in_float32(dtype):
    weights = _weights(dtype)
    value = orthogonal_regularizer(weights, "biggan")
    assert value.dtype == torch.float32
    truth = loop_reference([w.detach().double() for w in weights], "biggan")
    torch.testing.assert_close(value.double(), truth, rtol=1e-5, atol=0)  # the weights are exact in float64
    assert all(g.dtype == dtype for g in torch.autograd.grad(value, weights))


def test_regularizer_hand_values():
    orthogonal = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2
    ones_wide, ones_tall = torch.ones(3, 5), torch.ones(6, 2)  # W Wᵀ = n·11ᵀ
    assert orthogonal_regularizer([orthogonal, orthogonal[:2]], "biggan").abs() < 1e-6
    assert orthogonal_regularizer([orthogonal, orthogonal[:2]], "full").abs() < 1e-6
    for w in (ones_wide, ones_tall):
        m, n = w.shape
        torch.testing.assert_close(orthogonal_regularizer([w], "biggan").item(), m * (m - 1) * n**2.0)
        torch.testing.assert_close(
            orthogonal_regularizer([w], "full").item(), m * (m - 1) * n**2.0 + m * (n - 1) ** 2.0
        )
        torch.testing.assert_close(orthogonal_regularizer([w, w], "full", 0.5), orthogonal_regularizer([w], "full"))
    # The gradient of the biggan penalty is 4·((W Wᵀ) ⊙ (1 − I))·W.
    w = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(orthogonal_regularizer([w.reshape(4, 1, 3, 3)]), w)
    torch.testing.assert_close(grad, 4 * ((w @ w.T) * (1 - torch.eye(4, dtype=torch.float64))) @ w.detach())


def test_regularizer_runs_one_batched_gemm_per_shape():
    calls = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    weights = _weights(torch.float32, [(16, 8, 3, 3)] * 10 + [(32, 4)] * 5 + [(6, 6)])
    with Record():
        orthogonal_regularizer(weights)
    products = [name for name in calls if name in ("bmm", "mm", "matmul", "__matmul__", "einsum")]
    assert products == ["bmm"] * 3, products


def test_regularizer_of_nothing_is_zero():
    assert orthogonal_regularizer([]).item() == 0


@pytest.mark.parametrize(
    "weights,kind,strength,error,words",
    [
        ([torch.randn(4)], "biggan", 1.0, ValueError, r"weights\[0\] must have at least 2 dims"),
        (
            [torch.ones(2, 2), torch.ones(2, 2, dtype=torch.int64)],
            "biggan",
            1.0,
            TypeError,
            r"weights\[1\] must have a floating",
        ),
        ([torch.ones(2, 2), None], "biggan", 1.0, TypeError, r"weights\[1\] must be a Tensor"),
        (torch.ones(2, 2), "biggan", 1.0, TypeError, "wrap it"),
        ([torch.ones(2, 2), torch.ones(2, 2, device="meta")], "biggan", 1.0, ValueError, r"weights\[1\] is on meta"),
        ([torch.ones(2, 2)], "srip", 1.0, ValueError, 'kind must be "biggan" or "full"'),
        ([torch.ones(2, 2)], "full", float("nan"), ValueError, "strength must be a finite number"),
    ],
)
def test_regularizer_rejects(weights, kind, strength, error, words):
    with pytest.raises(error, match=words):
        orthogonal_regularizer(weights, kind, strength)


# --- SelfOrthogonality --------------------------------------------------------------------------------

ARGUMENTS = {"gamma": 3.0, "lam1": 2.0, "lam2": 0.5, "reduction": "mean", "eps": 1e-9}
BY_HAND = (3.0, 2.0, 0.5, "mean", 1e-9)


def test_hooks_add_the_pre_bias_penalty_of_linear_and_conv_layers():
    linear = torch.nn.Linear(6, 5).double()
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    conv1d = torch.nn.Conv1d(2, 3, 1, bias=False).double()
    x, images, sequence = (torch.randn(s, dtype=torch.float64) for s in [(7, 2, 6), (2, 3, 5, 4), (3, 2, 8)])
    with SelfOrthogonality(linear, conv, conv1d, **ARGUMENTS) as ortho:
        linear(x), conv(images), conv1d(sequence)
        penalty = ortho.pop()
    by_hand = (
        self_orthogonality((x @ linear.weight.T).reshape(14, 5), *BY_HAND)
        + self_orthogonality(F.conv2d(images, conv.weight, padding=1).permute(0, 2, 3, 1).reshape(40, 4), *BY_HAND)
        + self_orthogonality(F.conv1d(sequence, conv1d.weight).permute(0, 2, 1).reshape(24, 3), *BY_HAND)
    )
    torch.testing.assert_close(penalty, by_hand)
    *grads, grad_bias, grad_conv_bias = torch.autograd.grad(
        penalty, [linear.weight, conv.weight, conv1d.weight, linear.bias, conv.bias]
    )
    truth = torch.autograd.grad(by_hand, [linear.weight, conv.weight, conv1d.weight])
    for g, t in zip(grads, truth):
        torch.testing.assert_close(g, t)
    assert grad_bias.abs().max() < 1e-12 and grad_conv_bias.abs().max() < 1e-12  # the bias is taken out
    linear(x)
    assert ortho.penalty.item() == 0  # the context removed the hooks


def test_penalty_accumulates_until_cleared_and_hooks_come_off():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(10, 4)
    ortho = SelfOrthogonality(model)  # every Linear inside
    assert ortho.layers == [model[0], model[2]]
    assert ortho.penalty.item() == 0
    model(x)
    once = ortho.penalty
    hidden = F.linear(x, model[0].weight, model[0].bias)  # (calling the layer would add again)
    expected = self_orthogonality(x @ model[0].weight.T) + self_orthogonality(F.relu(hidden) @ model[2].weight.T)
    torch.testing.assert_close(once, expected)
    model(x)
    torch.testing.assert_close(ortho.penalty, 2 * once)
    ortho.clear()
    assert ortho.penalty.item() == 0
    ortho.remove()
    model(x)
    assert ortho.pop().item() == 0


def test_self_orthogonality_rejects():
    with pytest.raises(TypeError, match=r"modules\[0\] must be an nn.Module"):
        SelfOrthogonality(torch.randn(3))
    with pytest.raises(ValueError, match=r"modules\[1\] \(ReLU\) holds no Linear"):
        SelfOrthogonality(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with pytest.raises(ValueError, match="at least one module"):
        SelfOrthogonality()
    with pytest.raises(ValueError, match='reduction must be "sum" or "mean"'):
        SelfOrthogonality(torch.nn.Linear(2, 2), reduction="none")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        SelfOrthogonality(torch.nn.Linear(2, 2), eps=-1.0)


# --- zero_centered_gradient_penalty and weight_l2 ----------------------------------------------------


@pytest.mark.parametrize("outputs", [1, 3])
def test_linear_critic_penalty_is_the_norm_of_its_weights(outputs):
    # D(x) = W x + b: ∇_x of the summed scores is Σ_n w_n for every sample, so R1 = ‖Σ_n w_n‖².
    D = torch.nn.Linear(5, outputs).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    w = D.weight.sum(0)
    penalty, scores = zero_centered_gradient_penalty(D, x, return_scores=True)
    torch.testing.assert_close(penalty, w.square().sum())
    torch.testing.assert_close(scores, D(x))
    (grad,) = torch.autograd.grad(penalty, D.weight)  # double backprop reaches D's weights: 2·Σ_n w_n
    torch.testing.assert_close(grad, 2 * w.detach().expand(outputs, 5))
    torch.testing.assert_close(zero_centered_gradient_penalty(D, x, power=6), w.norm() ** 6)


def test_penalty_of_a_nonlinear_critic_on_images():
    # D(x) = Σ x² per sample: ∇_x = 2x, so the penalty is mean_b ‖2 x_b‖^p.
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    norms = 2 * x.flatten(1).norm(dim=1)
    D = lambda x: x.square().sum((1, 2, 3))  # noqa: E731  (scores of shape (B,))
    torch.testing.assert_close(zero_centered_gradient_penalty(D, x), norms.square().mean())
    torch.testing.assert_close(zero_centered_gradient_penalty(D, x, power=3.0), norms.pow(3).mean())


def test_penalty_does_not_reach_what_made_x():
    G = torch.nn.Linear(3, 5)
    x = G(torch.randn(6, 3))
    penalty = zero_centered_gradient_penalty(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh()), x)
    penalty.backward()
    assert G.weight.grad is None


def test_penalty_of_an_empty_batch_is_zero():
    assert zero_centered_gradient_penalty(torch.nn.Linear(3, 1), torch.zeros(0, 3)).item() == 0


def test_penalty_rejects():
    D, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    with pytest.raises(TypeError, match="g must be callable"):
        zero_centered_gradient_penalty(None, x)
    with pytest.raises(TypeError, match="x must be a Tensor"):
        zero_centered_gradient_penalty(D, None)
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        zero_centered_gradient_penalty(D, x.long())
    with pytest.raises(ValueError, match="power must be >= 1"):
        zero_centered_gradient_penalty(D, x, power=0.5)
    with pytest.raises(ValueError, match="power must be a finite number"):
        zero_centered_gradient_penalty(D, x, power=float("inf"))
    with pytest.raises(ValueError, match=r"D\(x\) must have shape \(B,\) or \(B, N\) with B = 4"):
        zero_centered_gradient_penalty(lambda x: x.sum(), x)
    with pytest.raises(ValueError, match=r"D\(x\) must have shape"):
        zero_centered_gradient_penalty(lambda x: x.unsqueeze(1), x)


def test_weight_l2_sums_every_trainable_parameter():
    D = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1, bias=False))
    D[0].bias.requires_grad_(False)  # frozen: not counted
    counted = [D[0].weight, D[1].weight, D[1].bias, D[2].weight]
    value = weight_l2(D)
    torch.testing.assert_close(value, sum(p.detach().square().sum() for p in counted))
    grads = torch.autograd.grad(value, counted)
    for g, p in zip(grads, counted):
        torch.testing.assert_close(g, 2 * p.detach())
    torch.testing.assert_close(weight_l2(counted[:2]), weight_l2([counted[0]]) + weight_l2([counted[1]]))
    assert weight_l2([]).item() == 0
    assert weight_l2([torch.ones(3, dtype=torch.bfloat16, requires_grad=True)]).dtype == torch.float32


def test_weight_l2_rejects():
    with pytest.raises(TypeError, match=r"D must be an nn\.Module or an iterable of Tensors, got int"):
        weight_l2(3)
    with pytest.raises(TypeError, match="wrap it"):
        weight_l2(torch.ones(2))
    with pytest.raises(TypeError, match=r"parameters\[1\] must be a Tensor"):
        weight_l2([torch.ones(2), "w"])
