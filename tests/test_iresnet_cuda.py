"""What only the CUDA kernel of kexue::iresnet_inverse has (csrc/cuda/iresnet.cu): its two paths —
the one-launch solve with the weights in shared memory and the fallback for larger branches that
reads them from global memory — each against the reference, forward and adjoint; branches deeper
than the layer descriptors the kernel parameters carry; CUDA-graph capture and replay; no host
synchronisation. Run on the lent GPU machine (marked ``gpu``, skipped elsewhere with the reason);
the CUDA target of test_iresnet.py and test_contract.py covers the rest."""

import pytest
import torch

from kexue_fast import _C
from kexue_fast.ops import iresnet as iresnet_ops
from test_iresnet import ACTIVATIONS, branch, check_backward, check_inverse

pytestmark = pytest.mark.gpu

# Branches on either side of the switch between the paths: a toy branch fits shared memory; a
# hidden width of 2048 gives 2·2048·16 weights plus per-warp buffers of 2·2048 elements per row
# slot, past any GPU's shared memory per block.
SHARED = [16, 64, 64, 16]
FALLBACK = [16, 2048, 16]
PATHS = {"shared": SHARED, "fallback": FALLBACK}


def scratch_elems(weights, biases, B):
    table, _ = iresnet_ops.layer_table(weights, biases, "test")
    return _C.iresnet_scratch_elems_cuda(table, B)


@pytest.mark.parametrize("path", PATHS)
def test_each_path_is_the_one_intended(path):
    # The fallback keeps its per-row buffers in the scratch; the shared path needs none.
    weights, biases = branch(PATHS[path], torch.float32, device="cuda")
    elems = scratch_elems(weights, biases, 300)
    assert (elems == 0) if path == "shared" else (elems >= 300 * 2 * 2048)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_paths_match_the_reference(path, dtype, activation):
    weights, biases = branch(PATHS[path], dtype, c=0.9, seed=11, device="cuda")
    y = 2 * torch.randn(301, PATHS[path][0], dtype=dtype, device="cuda")  # not a multiple of a warp's rows
    check_inverse(torch.ops.kexue.iresnet_inverse, y, weights, biases, activation, 200, 1e-6, 1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_paths_gradients_match_the_reference(path):
    weights, biases = branch(PATHS[path], torch.float64, c=0.8, seed=12, device="cuda")
    weights = [w.requires_grad_() for w in weights]
    biases = [b.requires_grad_() for b in biases]
    y = torch.randn(37, PATHS[path][0], dtype=torch.float64, device="cuda", requires_grad=True)
    check_inverse(torch.ops.kexue.iresnet_inverse, y, weights, biases, "tanh", 300, 1e-11, 1e-11)


@pytest.mark.parametrize("path", PATHS)
def test_paths_adjoint_matches_the_reference(path):
    weights, biases = branch([*PATHS[path][:-1], 64, PATHS[path][-1]], torch.float32, seed=13, device="cuda")
    x = torch.randn(70, PATHS[path][0], device="cuda")
    check_backward(torch.ops.kexue.iresnet_inverse_backward, torch.randn_like(x), x, weights, biases, "elu", 100,
                   1e-6, 1e-6)  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
def test_rows_do_not_depend_on_the_batch_on_either_path(path):
    # The grid grows with B (its warps take rows in turn, fewer per CTA for few rows): a row's result must not.
    weights, biases = branch(PATHS[path], torch.float32, seed=14, device="cuda")
    y = torch.randn(1000, PATHS[path][0], device="cuda")
    x, n = torch.ops.kexue.iresnet_inverse(y, weights, biases, "elu", 100, 1e-6, 1e-6)
    again, n_again = torch.ops.kexue.iresnet_inverse(y, weights, biases, "elu", 100, 1e-6, 1e-6)
    assert torch.equal(x, again) and torch.equal(n, n_again)
    few, n_few = torch.ops.kexue.iresnet_inverse(y[500:503], weights, biases, "elu", 100, 1e-6, 1e-6)
    assert torch.equal(few, x[500:503]) and torch.equal(n_few, n[500:503])


@pytest.mark.parametrize("depth", [47, 48, 49, 100])
def test_branches_deeper_than_the_parameter_descriptors(depth):
    # Up to 48 layers travel in the kernel parameters, deeper branches through the scratch.
    dims = [3] + [5] * (depth - 1) + [3]
    weights, biases = branch(dims, torch.float32, c=0.95, seed=depth, device="cuda")
    y = torch.randn(9, 3, device="cuda")
    check_inverse(torch.ops.kexue.iresnet_inverse, y, weights, biases, "tanh", 100, 1e-6, 1e-6)
    x = torch.randn(9, 3, device="cuda")
    check_backward(torch.ops.kexue.iresnet_inverse_backward, torch.randn_like(x), x, weights, biases, "tanh", 100,
                   1e-6, 1e-6)  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
def test_cuda_graph_capture_and_replay_give_the_eager_result(path):
    weights, biases = branch(PATHS[path], torch.float32, seed=15, device="cuda")
    y = torch.randn(257, PATHS[path][0], device="cuda")
    iresnet_ops.iresnet_inverse(y, weights, biases, warn=False)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x, n_iter = iresnet_ops.iresnet_inverse(y, weights, biases, warn=False)
    fresh = 3 * torch.randn_like(y)
    y.copy_(fresh)
    graph.replay()
    eager, eager_n = iresnet_ops.iresnet_inverse(fresh, weights, biases, warn=False)
    assert torch.equal(x, eager) and torch.equal(n_iter, eager_n)
    assert (n_iter > 1).all() and not torch.equal(x, fresh)  # the replay solved the new y


@pytest.mark.parametrize("path", PATHS)
def test_no_host_synchronisation(path):
    weights, biases = branch(PATHS[path], torch.float32, seed=16, device="cuda")
    y = torch.randn(100, PATHS[path][0], device="cuda")
    iresnet_ops.iresnet_inverse(y, weights, biases, warn=False)  # warm-up: first calls may load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, _ = iresnet_ops.iresnet_inverse(y, weights, biases, warn=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(x, iresnet_ops.iresnet_inverse(y, weights, biases, warn=False)[0])


def test_adjoint_has_no_host_synchronisation():
    weights, biases = branch(SHARED, torch.float32, seed=17, device="cuda")
    x, grad_x = torch.randn(100, SHARED[0], device="cuda"), torch.randn(100, SHARED[0], device="cuda")
    args = (grad_x, x, weights, biases, "elu", 100, 1e-6, 1e-6)
    expected = torch.ops.kexue.iresnet_inverse_backward(*args)[0]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grad_y = torch.ops.kexue.iresnet_inverse_backward(*args)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(grad_y, expected)


def test_a_short_scratch_is_refused_before_launching():
    weights, biases = branch(FALLBACK, torch.float32, device="cuda")
    y = torch.randn(10, FALLBACK[0], device="cuda")
    x, n_iter = torch.full_like(y, 7.0), torch.full((10,), 7, dtype=torch.int32, device="cuda")
    table, _alive = iresnet_ops.layer_table(weights, biases, "test")
    elems = _C.iresnet_scratch_elems_cuda(table, 10)
    scratch = torch.empty(elems, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="scratch"):
        _C.iresnet_inverse_cuda(0, table, 0, y.data_ptr(), 10, 100, 1e-6, 1e-6, x.data_ptr(), n_iter.data_ptr(),
                                scratch.data_ptr(), elems - 1, stream)  # fmt: skip
    torch.cuda.synchronize()
    assert (x == 7).all() and (n_iter == 7).all()
