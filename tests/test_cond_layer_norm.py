"""cond_layer_norm kernels (native and, in the TRITON_INTERPRET=1 process, Triton) against the
pure-PyTorch reference on every target (targets.py): forward and every gradient, dtypes,
layouts, odd sizes, 0-size, non-contiguous inputs, gradcheck, determinism."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_params import kernels
from kexue_fast import _C, testing
from kexue_fast.reference import cond_layer_norm as reference
from targets import CPU_TARGETS, DEVICES, target_params

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["none", "shared", "per_sample", "chunk_view", "strided_cols", "full", "mixed", "weight_only", "bias_only"]


def make_params(layout, x_shape, dtype, device="cpu"):
    """(weight, bias) in the given layout; views are taken of leaves that require grad."""
    B, D = x_shape[0], x_shape[-1]
    make = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    if layout == "none":
        return None, None
    if layout == "shared":
        return make(D), make(D)
    if layout == "per_sample":
        return make(B, D), make(B, D)
    if layout == "chunk_view":  # the DiT pattern: shift, scale = linear(c).chunk(2, dim=1)
        both = make(B, 2 * D)
        return both[:, :D], both[:, D:]
    if layout == "strided_cols":
        return make(B, 2 * D)[:, ::2], make(B, D)
    if layout == "full":
        return make(*x_shape), make(*x_shape)
    if layout == "mixed":
        return make(B, D), make(D)
    if layout == "weight_only":
        return make(B, D), None
    if layout == "bias_only":
        return None, make(D)
    raise AssertionError(layout)


def check_against_reference(op, x, weight, bias, eps=1e-5, rms=False):
    kernel = lambda x, w, b: op(x, w, b, eps, rms)  # noqa: E731
    truth = lambda x, w, b: reference(x, w, b, eps, rms)  # noqa: E731
    y = kernel(x, weight, bias)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    testing.check_against_reference(kernel, truth, [x, weight, bias], names=["grad_x", "grad_weight", "grad_bias"])


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm"))
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(op, target, layout, dtype, rms):
    x = torch.randn(3, 5, 37, dtype=dtype, device=target.device) * 2 + 0.5
    check_against_reference(op, x, *make_params(layout, x.shape, dtype, target.device), rms=rms)


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm"))
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spread,eps", [(3e-3, 1e-5), (1.0, 0.5), (0.1, 1.0)], ids=str)
def test_eps_is_added_inside_the_square_root(op, target, spread, eps, dtype, rms):
    # Rows whose variance (spread²) is comparable to eps: 1/sqrt(var + eps) differs from
    # 1/(sqrt(var) + eps) or 1/sqrt(var) + eps by 10–100 %, where the usual rows (var ≈ 4,
    # eps = 1e-5) show a relative difference of ~1e-6, below the float32 tolerance.
    x = (torch.randn(3, 5, 37, dtype=torch.float64, device=target.device) * spread).to(dtype)
    check_against_reference(op, x, *make_params("per_sample", x.shape, dtype, target.device), eps=eps, rms=rms)


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm"))
@pytest.mark.parametrize("layout", ["shared", "per_sample", "full"])
@pytest.mark.parametrize("shape", [(2, 1), (3, 3), (2, 3, 37), (2, 3, 1, 1000), (2, 1, 2, 4097), (1, 4097)], ids=str)
def test_odd_sizes(op, target, shape, layout):
    x = torch.randn(shape, device=target.device)
    check_against_reference(op, x, *make_params(layout, shape, torch.float32, target.device))


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm", DEVICES))
@pytest.mark.parametrize("shape", [(0, 4, 8), (3, 0, 8), (2, 3, 0), (0, 5)], ids=str)
@pytest.mark.parametrize("layout", ["shared", "per_sample", "full"])
def test_zero_size(op, target, shape, layout):
    x = torch.randn(shape, device=target.device, requires_grad=True)
    w, b = (p.requires_grad_() for p in make_params(layout, shape, torch.float32, target.device))
    y = op(x, w, b, 1e-5, False)
    assert y.shape == x.shape
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
    assert not gw.any() and not gb.any()  # an empty sum is zero


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm"))
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_non_contiguous_inputs(op, target, rms):
    x = torch.randn(4, 37, 6, device=target.device).transpose(1, 2)  # (4, 6, 37), last dim strided
    assert not x.is_contiguous()
    weight = torch.randn(37, 4, device=target.device).t()  # (4, 37) with column stride 4
    bias = torch.randn(4, 6, 37, device=target.device)[:, ::2]  # x.shape-like slice of a bigger tensor: (4, 3, 37)
    check_against_reference(op, x, weight, None, rms=rms)
    x3 = x[:, ::2]
    check_against_reference(op, x3, weight, bias, rms=rms)


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm"))
def test_large_offset_rows_are_stable(op, target):
    # E[x²] − μ² in float32 cancels catastrophically here (errors of order 1); a two-pass
    # variance leaves only the float32 rounding of the mean (~1e4 · 2⁻²⁴ · a few).
    x = 1e4 + torch.randn(4, 256, dtype=torch.float32, device=target.device)
    y = op(x, None, None, 1e-5, False)
    assert (y.double() - reference(x.double(), None, None)).abs().max() < 1e-2


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm", DEVICES))
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("layout", ["shared", "per_sample", "chunk_view", "full", "mixed"])
def test_gradcheck_float64(op, target, layout, rms):
    x = torch.randn(2, 2, 5, dtype=torch.float64, device=target.device, requires_grad=True)
    w, b = (p.detach().requires_grad_() for p in make_params(layout, x.shape, torch.float64, target.device))
    assert torch.autograd.gradcheck(lambda x, w, b: op(x, w, b, 1e-5, rms), (x, w, b))


class BackwardMasks(TorchDispatchMode):
    """Records the ``output_mask`` of every cond_layer_norm backward op called under it."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("kexue::cond_layer_norm_backward"):
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm", DEVICES))
@pytest.mark.parametrize("wanted", [(1, 0, 1), (0, 1, 0), (1, 1, 1), (0, 0, 1)], ids=str)
def test_gradient_only_where_required(op, target, wanted):
    # The backward op is asked only for the gradients of the inputs that require grad (no
    # wasted reduction), and those it returns are right.
    x, w, b = (torch.randn(*shape, device=target.device) for shape in ((2, 3, 8), (2, 8), (8,)))
    leaves = [t.requires_grad_(bool(need)) for t, need in zip((x, w, b), wanted)]
    inputs = [t for t in leaves if t.requires_grad]
    g = torch.randn(2, 3, 8, device=target.device)
    with BackwardMasks() as calls:
        grads = torch.autograd.grad(op(x, w, b, 1e-5, False), inputs, g)
    assert calls.masks == [[bool(need) for need in wanted]]
    as64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    inputs64 = [t for t in as64 if t.requires_grad]
    for got, truth in zip(grads, torch.autograd.grad(reference(*as64, 1e-5, False), inputs64, g.double())):
        testing.assert_matches(got, truth)


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm", CPU_TARGETS))
def test_backward_is_deterministic_across_thread_counts(op, target):
    # Enough rows for the native kernel to go parallel; fewer for the (slow) Triton interpreter.
    x = torch.randn(8, 20 if "triton" in str(op) else 300, 96, requires_grad=True)
    w, b = torch.randn(96, requires_grad=True), torch.randn(8, 96, requires_grad=True)
    g = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(torch.autograd.grad(op(x, w, b, 1e-5, False), (x, w, b), g))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def test_native_threads_follow_torch():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _C.max_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("target", target_params(CPU_TARGETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_outputs_streamed_past_the_cache(target, dtype):
    # Outputs of 8 MiB or more leave the native kernel through non-temporal stores; an odd D
    # makes the rows start at every alignment.
    x = torch.randn(2, 2100 if dtype == torch.float32 else 4200, 1001, dtype=dtype)
    check_against_reference(torch.ops.kexue.cond_layer_norm, x, *make_params("per_sample", x.shape, dtype))
