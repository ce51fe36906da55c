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


@pytest.mark.parametrize("op", providers("philox_normal", "cuda"))
@pytest.mark.parametrize("numel, seed, offset", [(1, 0, 0), (4099, 2**63 - 1, 7), (128 * 3 * 32 * 32, -1, 2**40), (2**24 + 3, 5, 6)])
def test_cuda_noise_equals_the_cpu_noise(op, numel, seed, offset):
    import philox_model

    cuda = op([numel], seed, offset, None, torch.device("cuda")).cpu()
    cpu = torch.ops.kexue.philox_normal([numel], seed, offset, None, torch.device("cpu"))
    assert ((cuda.double() - cpu.double()).abs() <= 2e-5 * (1 + cpu.double().abs())).all()  # both within 1e-5 of ξ
    head = min(numel, 70001)
    assert philox_model.within_spec_tolerance(cuda[:head].numpy(), philox_model.philox_normal(head, seed % 2**64, offset % 2**64))
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert torch.equal(op([numel], seed, offset, dtype, torch.device("cuda")), cuda.cuda().to(dtype))


@pytest.mark.parametrize("op", providers("langevin_step_", "cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 4099, 128 * 3 * 32 * 32])
def test_cuda_langevin_matches_reference_and_cpu(op, dtype, n):
    from kexue_fast import reference as ref

    x = torch.rand(n, device="cuda").to(dtype)
    grad = (0.02 * torch.randn(n, device="cuda")).to(dtype)
    args = (10.0, 0.005, 3, 4, 0.01, 0.0, 1.0)
    out = op(x.clone(), grad, *args)
    truth = ref.langevin_step_(x.double(), grad.double(), *args)
    same = ref.langevin_step_(x.clone(), grad, *args)
    assert (out.double() - truth).abs().max() <= 2 * (same.double() - truth).abs().max() + 1e-5
    cpu = torch.ops.kexue.langevin_step_(x.cpu(), grad.cpu(), *args)
    torch.testing.assert_close(out.cpu().float(), cpu.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)
    odd = x.clone()[1:]  # a view at an odd offset: the scalar path
    op(odd, grad[1:], *args)
    torch.testing.assert_close(odd.float(), ref.langevin_step_(x[1:].clone(), grad[1:], *args).float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_cuda_langevin_in_a_cuda_graph():
    x, grad = torch.rand(1000, device="cuda"), torch.randn(1000, device="cuda")
    expected = torch.ops.kexue.langevin_step_(x.clone(), grad, 0.1, 0.2, 1, 2)
    static = x.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.ops.kexue.langevin_step_(static, grad, 0.1, 0.2, 1, 2)  # warm-up
        static.copy_(x)
        with torch.cuda.graph(graph, stream=stream):
            torch.ops.kexue.langevin_step_(static, grad, 0.1, 0.2, 1, 2)
    static.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, expected)
