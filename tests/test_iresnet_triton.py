"""kexue::iresnet_inverse_triton beyond the shared cases of test_iresnet.py: layers wider than a
product chunk, batches of several tiles with a ragged last one, deep branches (the hidden layers'
ping-pong buffers), and tiles whose rows stop at different times -- each both with the launch sizes
the launcher picks here and with the GPU's sizes (small tiles, chunks of 32 by 16 in float32, 16 by
8 in float64), which the interpreter would otherwise never run (triton_kernels/iresnet.py)."""

import pytest
import torch

from kernel_params import triton_marks, triton_targets
from kexue_fast._library import TRITON_AVAILABLE
from targets import TARGETS
from test_iresnet import branch, check_inverse

SIZES = ["as-launched", "gpu-sizes"]
DEVICES = [pytest.param(t, id=t.id, marks=triton_marks(t.device)) for t in triton_targets(TARGETS)]
pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs triton")


@pytest.fixture
def sizes(request, monkeypatch):
    """``gpu-sizes``: the launcher's sizes are those it picks on a GPU, also under the interpreter."""
    if request.param == "gpu-sizes":
        from kexue_fast._library import triton_kernels

        kernels = triton_kernels("iresnet")
        choose = kernels._config
        monkeypatch.setattr(kernels, "_config", lambda dtype, B, widest, _interpreted: choose(dtype, B, widest, False))
    return request.param


def op(*args):
    return torch.ops.kexue.iresnet_inverse_triton(*args)


@pytest.mark.parametrize("sizes", SIZES, indirect=True)
@pytest.mark.parametrize("target", DEVICES)
def test_layers_wider_than_a_chunk_and_a_ragged_last_tile(target, sizes):
    # 70 > 64 (the widest chunk) and 33 = 32 + 1; 300 rows = 256 + 44 (interpreter tiles), 70
    # rows = 32 + 32 + 6 (GPU tiles).
    weights, biases = branch([5, 70, 33, 5], torch.float32, c=0.9, seed=11, device=target.device)
    y = 2 * torch.randn(300 if sizes == "as-launched" else 70, 5, device=target.device)
    check_inverse(op, y, weights, biases, "elu", 100, 1e-6, 1e-6)


@pytest.mark.parametrize("sizes", SIZES, indirect=True)
@pytest.mark.parametrize("target", DEVICES)
def test_float64_chunks(target, sizes):
    # float64 takes the broadcast product; with the GPU sizes 37 and 20 are cut into chunks of 16
    # outputs by 8 inputs, and 21 rows into tiles of 16 and 5.
    weights, biases = branch([20, 37, 20], torch.float64, c=0.9, seed=12, device=target.device)
    y = torch.randn(21, 20, dtype=torch.float64, device=target.device)
    check_inverse(op, y, weights, biases, "tanh", 200, 1e-12, 1e-12)


@pytest.mark.parametrize("activation", ["elu", "softplus"])
@pytest.mark.parametrize("target", DEVICES)
def test_deep_branches(target, activation):
    # L = 5: the hidden layers alternate between the two scratch buffers more than once; the
    # last layer reads buffer 2 (L - 1 even) here and buffer 1 for L = 4 (test_iresnet.py).
    weights, biases = branch([4, 9, 6, 11, 7, 4], torch.float64, c=0.95, seed=13, device=target.device)
    y = torch.randn(9, 4, dtype=torch.float64, device=target.device)
    check_inverse(op, y, weights, biases, activation, 300, 1e-12, 1e-12)


@pytest.mark.parametrize("sizes", SIZES, indirect=True)
@pytest.mark.parametrize("target", DEVICES)
def test_rows_that_stop_early_are_frozen_in_their_tile(target, sizes):
    # g(x) = −1.5·relu(x) + 0.5·relu(−x) (test_iresnet.py): rows with y > 0 diverge and run to
    # max_iter, rows with y < 0 converge to 2y at different speeds, NaN/inf rows stop at once; all
    # in one tile, each row's result is the one it gets alone.
    device = target.device
    weights = [torch.tensor([[1.0], [-1.0]], device=device), torch.tensor([[-1.5, 0.5]], device=device)]
    biases = [torch.zeros(2, device=device), torch.zeros(1, device=device)]
    y = torch.tensor([[-1.0], [2.0], [float("nan")], [-1e-3], [float("inf")], [-30.0], [0.5]], device=device)
    x, n_iter = op(y, weights, biases, "relu", 30, 1e-6, 1e-6)
    assert n_iter[[1, 2, 4, 6]].tolist() == [30] * 4
    assert (n_iter[[0, 3, 5]] < 30).all() and (n_iter[[0, 3, 5]] > 1).all()
    torch.testing.assert_close(x[[0, 3, 5]], 2 * y[[0, 3, 5]], rtol=1e-5, atol=1e-5)
    assert not torch.isfinite(x[[2, 4]]).all(1).any()
    for i in range(y.shape[0]):
        x_alone, n_alone = op(y[i : i + 1], weights, biases, "relu", 30, 1e-6, 1e-6)
        assert torch.equal(n_alone, n_iter[i : i + 1]), i
        assert torch.equal(x_alone, x[i : i + 1]) or (torch.isnan(x_alone).all() and torch.isnan(x[i]).all()), i
