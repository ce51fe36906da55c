"""What only a GPU has: CUDA kernels at model sizes and in their batching limits, agreement with
the CPU kernels, the current stream, CUDA graphs (run on the lent GPU machine; skipped elsewhere
with the reason). The other kernel tests run on CUDA as the cuda target of their files
(targets.py), marked ``gpu`` too."""

import pytest
import torch

from kernel_params import kernels
from kexue_fast.reference import cond_layer_norm as reference
from kexue_fast.testing import assert_matches, check_against_reference
from targets import CUDA
from test_spectral_norm import ALL_DTYPES, check, make

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm", [CUDA]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape,layout",
    [((32, 512, 1024), "per_sample"), ((8, 77, 4097), "shared"), ((4, 77, 1000), "full"), ((4096, 768), "shared")],
    ids=str,
)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_cuda_matches_reference_at_model_sizes(op, target, shape, layout, dtype, rms):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    wshape = {"per_sample": (shape[0], shape[-1]), "shared": (shape[-1],), "full": shape}[layout]
    w, b = (torch.randn(wshape, device="cuda", dtype=dtype) for _ in range(2))
    check_against_reference(
        lambda x, w, b: op(x, w, b, 1e-5, rms),
        lambda x, w, b: reference(x, w, b, 1e-5, rms),
        [x, w, b],
        names=["grad_x", "grad_weight", "grad_bias"],
    )


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm", [CUDA]))
def test_cuda_agrees_with_cpu_and_is_deterministic(op, target):
    x, w, b = torch.randn(4, 300, 256), torch.randn(4, 256), torch.randn(256)
    g = torch.randn_like(x)

    def run(fn, device):
        leaves = [t.to(device).requires_grad_() for t in (x, w, b)]
        y = fn(*leaves, 1e-5, False)
        return [y, *torch.autograd.grad(y, leaves, g.to(device))]

    # The CPU side is the native kernel (a Triton op runs on CPU tensors only under the interpreter).
    first, second, cpu = run(op, "cuda"), run(op, "cuda"), run(torch.ops.kexue.cond_layer_norm, "cpu")
    for a, c, ref in zip(first, second, cpu):
        assert torch.equal(a, c)
        torch.testing.assert_close(a.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm", [CUDA]))
def test_runs_on_the_current_stream_and_in_cuda_graphs(op, target):
    x, w, b, fresh = (torch.randn(s, device="cuda") for s in ((8, 64, 512), (8, 512), (8, 512), (8, 64, 512)))
    # x gets new values on a side stream after a ~50 ms sleep: a call on that stream must see
    # them (one launched on another stream would read the old x).
    expected = op(fresh, w, b, 1e-5, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)
        x.copy_(fresh)
        on_stream = op(x, w, b, 1e-5, False)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(on_stream, expected)
    graph = torch.cuda.CUDAGraph()
    op(x, w, b, 1e-5, False)  # warm-up outside the graph
    with torch.cuda.graph(graph):
        captured = op(x, w, b, 1e-5, False)
    x.copy_(torch.randn_like(x))  # not x + 1: a layer norm of x + 1 is that of x
    graph.replay()
    torch.testing.assert_close(captured, op(x, w, b, 1e-5, False))


def on_cuda(tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_", [CUDA]))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n_iters", [0, 1, 3])
@pytest.mark.parametrize("eps", [1e-12, 4.0])
def test_cuda_spectral_norm_matches_reference(op, target, dtype, n_iters, eps):
    # Model-sized, odd and empty matrices, more small ones than one CUDA launch batch holds (70),
    # and a weight at an odd address (the element-by-element load path); eps = 4 clamps some steps.
    shapes = [(512, 512, 3, 3), (1000, 1), (1, 1000), (257, 129), (64, 3, 7, 7), (0, 4), (4, 0)] + [(5, 3)] * 75
    weights, us, vs = (on_cuda(ts) for ts in make(shapes, dtype))
    weights.append(torch.randn(64 * 64 + 1, device="cuda").to(dtype)[1:].view(64, 64))
    us.append(torch.randn(64, device="cuda", dtype=us[0].dtype))
    vs.append(torch.randn(64, device="cuda", dtype=us[0].dtype))
    check(op, weights, us, vs, n_iters, eps)


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_", [CUDA]))
def test_cuda_spectral_norm_is_deterministic_and_agrees_with_cpu(op, target):
    weights, us, vs = make([(512, 4608), (100, 37), (3, 3)])

    def run(fn, device):
        u, v = [t.to(device, copy=True) for t in us], [t.to(device, copy=True) for t in vs]
        return [fn([w.to(device) for w in weights], u, v, 2, 1e-12), *u, *v]

    first, second = run(op, "cuda"), run(op, "cuda")
    cpu = run(torch.ops.kexue.spectral_norm_power_iter_, "cpu")
    for a, b, c in zip(first, second, cpu):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op,target", kernels("spectral_norm_power_iter_", [CUDA]))
def test_cuda_spectral_norm_runs_on_the_current_stream(op, target):
    # The new weights are written on a side stream after a ~50 ms sleep; a call on that stream
    # must see them (one launched on another stream would read the old weights).
    old = on_cuda(make([(256, 256), (64, 9)])[0])
    weights, us, vs = (on_cuda(ts) for ts in make([(256, 256), (64, 9)]))
    u_ref, v_ref = [u.clone() for u in us], [v.clone() for v in vs]
    expected = op(weights, u_ref, v_ref, 3, 1e-12)
    new = [w.clone() for w in weights]
    for w, o in zip(weights, old):
        w.copy_(o)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)
        for w, n in zip(weights, new):
            w.copy_(n)
        got = op(weights, us, vs, 3, 1e-12)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(us + vs, u_ref + v_ref))


@pytest.mark.parametrize("op,target", kernels("ema_update_", [CUDA]))
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_ema_matches_reference_at_model_size(op, target, param_dtype):
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
    params = [torch.zeros(1000, device="cuda"), torch.zeros(3, 7, device="cuda")]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # an update launched on another stream would see params = 0
        for p in params:
            p.fill_(1.0)
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


@pytest.mark.parametrize("op,target", kernels("philox_normal", [CUDA]))
@pytest.mark.parametrize(
    "numel, seed, offset", [(1, 0, 0), (4099, 2**63 - 1, 7), (128 * 3 * 32 * 32, -1, 2**40), (2**24 + 3, 5, 6)]
)
def test_cuda_noise_equals_the_cpu_noise(op, target, numel, seed, offset):
    import philox_model

    cuda = op([numel], seed, offset, None, torch.device("cuda")).cpu()
    cpu = torch.ops.kexue.philox_normal([numel], seed, offset, None, torch.device("cpu"))
    assert ((cuda.double() - cpu.double()).abs() <= 2e-5 * (1 + cpu.double().abs())).all()  # both within 1e-5 of ξ
    head = min(numel, 70001)
    expected = philox_model.philox_normal(head, seed % 2**64, offset % 2**64)
    assert philox_model.within_spec_tolerance(cuda[:head].numpy(), expected)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert torch.equal(op([numel], seed, offset, dtype, torch.device("cuda")), cuda.cuda().to(dtype))


@pytest.mark.parametrize("op,target", kernels("langevin_step_", [CUDA]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 4099, 128 * 3 * 32 * 32])
def test_cuda_langevin_matches_reference_and_cpu(op, target, dtype, n):
    from kexue_fast import reference as ref

    x = torch.rand(n, device="cuda").to(dtype)
    grad = (0.02 * torch.randn(n, device="cuda")).to(dtype)
    args = (10.0, 0.005, 3, 4, 0.01, 0.0, 1.0)

    def matches_reference(out, x, grad):
        truth = ref.langevin_step_(x.double(), grad.double(), *args)
        assert_matches(out, truth, ref.langevin_step_(x.clone(), grad, *args))

    out = op(x.clone(), grad, *args)
    matches_reference(out, x, grad)
    cpu = torch.ops.kexue.langevin_step_(x.cpu(), grad.cpu(), *args)
    torch.testing.assert_close(out.cpu().float(), cpu.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)
    odd = x.clone()[1:]  # a view at an odd offset: the scalar path
    op(odd, grad[1:], *args)
    matches_reference(odd, x[1:], grad[1:])


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
