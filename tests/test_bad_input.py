"""Every documented error: a clear exception naming the argument, raised before anything is
written; inputs are left exactly as they were."""

import pytest
import torch

from kernel_params import providers

x0, w0, b0 = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(8)

BAD_FORWARD = [
    # (x, weight, bias, eps, exception, words the message must contain)
    (torch.randn(8), None, None, 1e-5, ValueError, "x must be at least 2-D"),
    (torch.randn(2, 8).int(), None, None, 1e-5, TypeError, "x must be float32"),
    (x0, torch.randn(3, 8), b0, 1e-5, ValueError, "weight must have shape"),
    (x0, w0, torch.randn(7), 1e-5, ValueError, "bias must have shape"),
    (x0, torch.randn(2, 3, 8, 1), b0, 1e-5, ValueError, "weight must have shape"),
    (x0, w0.double(), b0, 1e-5, TypeError, "weight must have x's dtype"),
    (x0, w0, b0.half(), 1e-5, TypeError, "bias must have x's dtype"),
    (x0, w0, b0, -1e-5, ValueError, "eps must be finite and >= 0"),
    (x0, w0, b0, float("nan"), ValueError, "eps must be finite"),
    (x0, w0, b0, float("inf"), ValueError, "eps must be finite"),
    (x0, w0, torch.randn(8, device="meta"), 1e-5, (ValueError, RuntimeError), "bias"),
]


@pytest.mark.parametrize("op", providers("cond_layer_norm"))
@pytest.mark.parametrize("x,weight,bias,eps,error,words", BAD_FORWARD)
def test_forward_rejects_bad_input_and_changes_nothing(op, x, weight, bias, eps, error, words):
    before = [t.clone() if t is not None and t.device.type != "meta" else t for t in (x, weight, bias)]
    with pytest.raises(error, match=words):
        op(x, weight, bias, eps, False)
    for t, saved in zip((x, weight, bias), before):
        if t is not None and t.device.type != "meta":
            assert torch.equal(t, saved)


@pytest.mark.parametrize("op", providers("cond_layer_norm_backward"))
def test_backward_rejects_mismatched_grad(op):
    with pytest.raises(ValueError, match="grad_out has shape"):
        op(torch.randn(2, 3, 7), x0, w0, b0, 1e-5, False, [True, True, True])


def test_module_rejects_wrong_condition_width():
    from kexue_fast.nn import ConditionalLayerNorm

    m = ConditionalLayerNorm(8, cond_dim=4)
    with pytest.raises(RuntimeError):
        m(x0, torch.randn(2, 5))
