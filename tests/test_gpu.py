"""CUDA paths at real sizes (run on the lent GPU machine; skipped elsewhere with the reason)."""

import pytest
import torch

from kexue_fast import _native
from kexue_fast.reference import cond_layer_norm as reference
from kexue_fast.testing import check_against_reference
from kernel_params import providers

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda_kernels(request):
    if "native" in request.node.name and "cuda" not in _native.BACKENDS:
        pytest.fail("a CUDA device is present but kexue_fast was built without CUDA kernels")


@pytest.mark.parametrize("op", providers("cond_layer_norm", "cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,layout", [((32, 512, 1024), "per_sample"), ((8, 77, 4097), "shared"), ((3, 5, 37), "full"), ((4096, 768), "shared")], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_cuda_matches_reference(op, shape, layout, dtype, rms):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    wshape = {"per_sample": (shape[0], shape[-1]), "shared": (shape[-1],), "full": shape}[layout]
    w, b = (torch.randn(wshape, device="cuda", dtype=dtype) for _ in range(2))
    check_against_reference(
        lambda x, w, b: op(x, w, b, 1e-5, rms), lambda x, w, b: reference(x, w, b, 1e-5, rms),
        [x, w, b], names=["grad_x", "grad_weight", "grad_bias"],
    )


@pytest.mark.parametrize("op", providers("cond_layer_norm", "cuda"))
def test_cuda_agrees_with_cpu_and_is_deterministic(op):
    x, w, b = torch.randn(4, 300, 256), torch.randn(4, 256), torch.randn(256)
    g = torch.randn_like(x)

    def run(device):
        leaves = [t.to(device).requires_grad_() for t in (x, w, b)]
        y = op(*leaves, 1e-5, False)
        return [y, *torch.autograd.grad(y, leaves, g.to(device))]

    first, second, cpu = run("cuda"), run("cuda"), run("cpu")
    for a, c, ref in zip(first, second, cpu):
        assert torch.equal(a, c)
        torch.testing.assert_close(a.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", providers("cond_layer_norm", "cuda"))
def test_runs_on_the_current_stream_and_in_cuda_graphs(op):
    x, w, b = (torch.randn(s, device="cuda") for s in ((8, 64, 512), (8, 512), (8, 512)))
    expected = op(x, w, b, 1e-5, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = op(x, w, b, 1e-5, False)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(on_stream, expected)
    graph = torch.cuda.CUDAGraph()
    op(x, w, b, 1e-5, False)  # warm-up outside the graph
    with torch.cuda.graph(graph):
        captured = op(x, w, b, 1e-5, False)
    x.add_(1.0)
    graph.replay()
    torch.testing.assert_close(captured, op(x, w, b, 1e-5, False))


@pytest.mark.parametrize("op", providers("ema_update_", "cuda"))
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_ema_matches_reference_at_model_size(op, param_dtype):
    from kexue_fast.reference import ema_update_ as ema_reference
    from kexue_fast.testing import check_update_against_reference

    shapes = [(512, 512)] * 80 + [(512,)] * 81 + [(1,), (4097,), (3, 333)]
    shadows = [torch.randn(s, device="cuda") for s in shapes]
    params = [torch.randn(s, device="cuda").to(param_dtype) for s in shapes]
    check_update_against_reference(op, ema_reference, [shadows, params, 0.999])


def test_cuda_ema_on_a_side_stream_and_in_a_cuda_graph():
    # Native kernel only: the Triton variant copies its pointer table from pageable host memory
    # on every call, which a CUDA graph cannot capture.
    op = torch.ops.kexue.ema_update_
    shadows = [torch.zeros(1000, device="cuda"), torch.zeros(3, 7, device="cuda")]
    params = [torch.ones(1000, device="cuda"), torch.ones(3, 7, device="cuda")]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(shadows, params, 0.5)
    torch.cuda.current_stream().wait_stream(stream)
    assert all(torch.allclose(s, torch.full_like(s, 0.5)) for s in shadows)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(shadows, params, 0.5)
    for s in shadows:
        s.zero_()
    graph.replay()
    assert all(torch.allclose(s, torch.full_like(s, 0.5)) for s in shadows)
