"""modulated_batch_norm (the composite op of SPEC §6 and the three ops it is made of) against the
pure-PyTorch reference on every target (targets.py) and against torch's own BatchNorm: forward
and every gradient, training and eval, shared and per-sample affine, dtypes, odd and empty sizes,
non-contiguous inputs, gradcheck, running statistics, determinism, torch.compile/export."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from kernel_params import kernels
from kexue_fast import testing
from kexue_fast.reference import modulated_batch_norm as reference
from kexue_fast.reference.batch_norm import accumulation_dtype, update_running_stats
from targets import CPU_TARGETS, DEVICES, TARGETS, target_params

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["none", "shared", "per_sample", "chunk_view", "mixed", "weight_only", "bias_only"]


def make_params(layout, N, C, dtype, device="cpu"):
    """(weight, bias) in the given layout (views are of tensors that require no grad)."""
    make = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    if layout == "none":
        return None, None
    if layout == "shared":
        return make(C), make(C)
    if layout == "per_sample":
        return make(N, C), make(N, C)
    if layout == "chunk_view":  # gamma, beta = linear(z).chunk(2, dim=1)
        both = make(N, 2 * C)
        return both[:, :C], both[:, C:]
    if layout == "mixed":
        return make(N, C), make(C)
    if layout == "weight_only":
        return make(N, C), None
    if layout == "bias_only":
        return None, make(C)
    raise AssertionError(layout)


def running_stats(C, device="cpu", dtype=torch.float32):
    return torch.randn(C, device=device, dtype=dtype), torch.rand(C, device=device, dtype=dtype) + 0.5


def check_against_reference(op, x, weight, bias, training, eps=1e-5, momentum=0.1):
    """Output and gradients against the float64 reference, and (training) the running statistics."""
    rm, rv = running_stats(x.shape[1], x.device, accumulation_dtype(x.dtype))
    calls = []

    def kernel(x, w, b):
        mean, var = rm.clone(), rv.clone()
        calls.append((mean, var))
        return op(x, w, b, mean, var, training, momentum, eps)

    truth = lambda x, w, b: reference(x, w, b, rm.clone(), rv.clone(), training, momentum, eps)  # noqa: E731
    y = kernel(x, weight, bias)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    testing.check_against_reference(kernel, truth, [x, weight, bias], names=["grad_x", "grad_weight", "grad_bias"])
    if training and x.numel():
        mean64, var64 = rm.double(), rv.double()
        reference(x.double(), None, None, mean64, var64, True, momentum, eps)
        tol = dict(rtol=1e-10, atol=1e-10) if x.dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(calls[0][0].double(), mean64, **tol)
        torch.testing.assert_close(calls[0][1].double(), var64, **tol)


@pytest.mark.parametrize("op,target", kernels("modulated_batch_norm"))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(op, target, layout, dtype, training):
    x = (torch.randn(3, 5, 4, 7, device=target.device) * 2 + 0.5).to(dtype)
    check_against_reference(op, x, *make_params(layout, 3, 5, dtype, target.device), training)


@pytest.mark.parametrize("op,target", kernels("modulated_batch_norm"))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape",
    # Rows of at most 128 values take the CPU's per-position statistics ((40, 70, 3, 3): several
    # channel blocks, full and partial vectors; (1030, 3, 8, 8): many samples), longer rows
    # ((2, 3, 1000), (3, 2, 17, 19)) the per-row ones.
    [
        (2, 1),
        (7, 3),
        (1, 3, 5),
        (5, 3, 1, 1),
        (2, 3, 1000),
        (3, 2, 17, 19),
        (2, 4, 3, 2, 5),
        (1, 1, 4097),
        (40, 70, 3, 3),
        (1030, 3, 8, 8),
    ],
    ids=str,
)
def test_odd_sizes(op, target, shape, training):
    x = torch.randn(shape, device=target.device) * 3 - 1
    check_against_reference(
        op, x, *make_params("per_sample", shape[0], shape[1], torch.float32, target.device), training
    )


@pytest.mark.parametrize("op,target", kernels("modulated_batch_norm"))
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 3)], ids=str)
def test_empty_inputs(op, target, shape):
    """Empty outputs and zero gradients of the right shapes; an empty batch leaves the running
    statistics as they were (there is nothing to average in)."""
    x = torch.randn(shape, device=target.device, requires_grad=True)
    w = torch.randn(shape[0], shape[1], device=target.device, requires_grad=True)
    b = torch.randn(shape[1], device=target.device, requires_grad=True)
    rm, rv = running_stats(shape[1], target.device)
    before = rm.clone(), rv.clone()
    for training in (True, False):
        y = op(x, w, b, rm, rv, training, 0.1, 1e-5)
        assert y.shape == x.shape
        grads = torch.autograd.grad(y.sum(), (x, w, b))
        assert [g.shape for g in grads] == [x.shape, w.shape, b.shape]
        assert all(not g.any() for g in grads)
    torch.testing.assert_close((rm, rv), before, rtol=0, atol=0)


@pytest.mark.parametrize("op,target", kernels("modulated_batch_norm"))
@pytest.mark.parametrize("shape", [(4, 3, 33, 9), (64, 3, 4, 4)], ids=["long-rows", "short-rows"])
def test_large_mean_small_spread(op, target, shape):
    # Values around 1000 with a spread of 1e-2 (float32 spacing there: 6e-5): E[x²] − E[x]² would
    # lose every digit; the chunked two-pass statistics keep them. Rounding μ to float32 still costs
    # what it costs torch's own float32 batch norm, whose error is the yardstick here.
    x = 1000 + 1e-2 * torch.randn(shape, device=target.device)
    truth = F.batch_norm(x.double(), None, None, None, None, True, 0.1, 1e-8)
    torch_error = testing.max_error(F.batch_norm(x, None, None, None, None, True, 0.1, 1e-8), truth)
    our_error = testing.max_error(op(x, None, None, None, None, True, 0.1, 1e-8), truth)
    assert our_error <= 2 * torch_error + 1e-6


@pytest.mark.parametrize("op,target", kernels("modulated_batch_norm"))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_contiguous_inputs(op, target, training):
    base = torch.randn(4, 6, 5, 8, device=target.device)
    x = base.to(memory_format=torch.channels_last)
    w = torch.randn(6, 4, device=target.device).t()  # (N, C) with strides (1, 4)
    b = torch.randn(12, device=target.device)[::2]
    check_against_reference(op, x, w, b, training)
    check_against_reference(op, base.transpose(2, 3), w, b, training)


@pytest.mark.parametrize("op,target", kernels("modulated_batch_norm"))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["per_sample", "shared", "mixed"])
def test_gradcheck(op, target, layout, training):
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, device=target.device, requires_grad=True)
    w, b = (p.requires_grad_() for p in make_params(layout, 3, 4, torch.float64, target.device))
    rm, rv = running_stats(4, target.device, torch.float64)
    fn = lambda x, w, b: op(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("op,target", kernels("modulated_batch_norm"))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_equals_torch_batch_norm_plus_affine(op, target, dtype, training):
    """Shared γ, β: exactly F.batch_norm's arguments; per-sample: F.batch_norm without affine,
    then the broadcast affine. Outputs, gradients and the running statistics."""
    x = torch.randn(6, 5, 4, 3, dtype=dtype, device=target.device) * 2 + 1
    for layout in ("shared", "per_sample", "none"):
        w, b = make_params(layout, 6, 5, dtype, target.device)
        rm, rv = running_stats(5, target.device, dtype)
        ours = (rm.clone(), rv.clone())
        theirs = (rm.clone(), rv.clone())
        got = op(x, w, b, *ours, training, 0.2, 1e-4)
        if layout == "per_sample":
            want = F.batch_norm(x, *theirs, None, None, training, 0.2, 1e-4) * w[..., None, None] + b[..., None, None]
        else:
            want = F.batch_norm(x, *theirs, w, b, training, 0.2, 1e-4)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("op,target", kernels("modulated_batch_norm", CPU_TARGETS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_deterministic_across_thread_counts(op, target, training):
    x = torch.randn(8, 6, 33, 17, requires_grad=True)
    w = torch.randn(8, 6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    g = torch.randn(8, 6, 33, 17)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            rm, rv = torch.zeros(6), torch.ones(6)
            y = op(x, w, b, rm, rv, training, 0.1, 1e-5)
            results.append((y, rm, rv, *torch.autograd.grad(y, (x, w, b), g)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


@pytest.mark.parametrize("target", target_params(DEVICES))
def test_running_statistics_follow_torch_after_ten_steps(target):
    """Ten training steps of nn.BatchNorm2d and of the op with its buffers: equal buffers, and
    equal outputs in eval after them (momentum 0.1, and None: the cumulative average)."""
    for momentum in (0.1, None):
        bn = torch.nn.BatchNorm2d(7, momentum=momentum).to(target.device)
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        for step in range(10):
            x = torch.randn(5, 7, 6, 4, device=target.device) * (step + 1) + step
            bn(x)
            factor = 1 / (step + 1) if momentum is None else momentum
            torch.ops.kexue.modulated_batch_norm(x, bn.weight, bn.bias, rm, rv, True, factor, bn.eps)
        torch.testing.assert_close((rm, rv), (bn.running_mean, bn.running_var))
        bn.eval()
        x = torch.randn(5, 7, 6, 4, device=target.device)
        torch.testing.assert_close(torch.ops.kexue.modulated_batch_norm(x, bn.weight, bn.bias, rm, rv, False), bn(x))


@pytest.mark.parametrize("target", target_params(TARGETS))
@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("running_dtype", DTYPES, ids=str)
def test_running_update_is_bitwise_the_references(target, running_dtype, stats_dtype):
    """batch_norm_update_stats_ rounds as the reference's tensor ops (every product and sum on
    its own, no fused multiply-add): bitwise equal, for every running dtype, strided running
    statistics and statistics, several counts and momenta."""
    C, device = 1001, target.device
    for count, momentum in ((2, 1 / 3), (37, 0.1), (4096, 0.01), (10**9 + 7, 0.999)):
        rm = torch.randn(2 * C, device=device).to(running_dtype)[::2]
        rv = (torch.rand(C, device=device) * 3 + 0.01).to(running_dtype)
        mean = torch.randn(C, 3, device=device, dtype=stats_dtype)[:, 1]
        var = torch.rand(C, device=device, dtype=stats_dtype)
        expected_mean, expected_var = rm.clone(), rv.clone()
        update_running_stats(expected_mean, expected_var, mean, var, count, momentum)
        torch.ops.kexue.batch_norm_update_stats_(rm, rv, mean, var, count, momentum)
        assert torch.equal(rm, expected_mean) and torch.equal(rv, expected_var), (count, momentum)


def test_running_statistics_bump_their_version_counters():
    x, (rm, rv) = torch.randn(4, 3, 5), running_stats(3)
    versions = rm._version, rv._version
    torch.ops.kexue.modulated_batch_norm(x, None, None, rm, rv, True)
    assert rm._version > versions[0] and rv._version > versions[1]
    saved = rm * 1
    torch.ops.kexue.modulated_batch_norm(x, None, None, rm, rv, False)  # eval reads, writes nothing
    assert torch.equal(saved, rm)


def test_a_running_mean_saved_for_backward_then_updated_raises():
    x, (rm, rv) = torch.randn(4, 3, 5), running_stats(3)
    w = torch.randn(3, requires_grad=True)
    y = (w * rm).sum()  # saves rm for the gradient of w
    torch.ops.kexue.modulated_batch_norm(x, None, None, rm, rv, True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("target", target_params(DEVICES))
def test_compile_and_export_keep_the_fused_ops(target):
    """torch.compile runs the composite as the forward and the running update (gradients and
    running statistics as in eager); torch.export keeps it as one node."""
    x = torch.randn(4, 3, 5, 2, device=target.device, requires_grad=True)
    w = torch.randn(4, 3, device=target.device, requires_grad=True)
    b = torch.randn(3, device=target.device, requires_grad=True)

    def f(x, w, b, rm, rv):
        return (torch.ops.kexue.modulated_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5).relu() * 3).sum()

    eager_stats, compiled_stats = running_stats(3, target.device), None
    compiled_stats = tuple(t.clone() for t in eager_stats)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_grads = torch.autograd.grad(f(x, w, b, *eager_stats), (x, w, b))
    compiled_grads = torch.autograd.grad(compiled(x, w, b, *compiled_stats), (x, w, b))
    torch.testing.assert_close(eager_grads, compiled_grads)
    torch.testing.assert_close(eager_stats, compiled_stats)

    class BN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("rm", torch.zeros(3, device=target.device))
            self.register_buffer("rv", torch.ones(3, device=target.device))

        def forward(self, x, w, b):
            return torch.ops.kexue.modulated_batch_norm(x, w, b, self.rm, self.rv, True, 0.1, 1e-5)

    exported = torch.export.export(BN(), (x.detach(), w.detach(), b.detach()))
    calls = [n for n in exported.graph.nodes if n.op == "call_function"]
    targets = {n.target for n in calls} | {n.args[0] for n in calls if n.args}
    assert torch.ops.kexue.modulated_batch_norm.default in targets
    module, eager = exported.module(), BN()
    torch.testing.assert_close(module(x.detach(), w.detach(), b.detach()), eager(x.detach(), w.detach(), b.detach()))
    torch.testing.assert_close((module.rm, module.rv), (eager.rm, eager.rv))


@pytest.mark.parametrize("target", target_params(DEVICES))
def test_opcheck_of_the_composite(target):
    x = torch.randn(3, 4, 5, device=target.device, requires_grad=True)
    w = torch.randn(3, 4, device=target.device, requires_grad=True)
    for training in (True, False):
        args = (x, w, None, *running_stats(4, target.device), training, 0.1, 1e-5)
        results = opcheck(torch.ops.kexue.modulated_batch_norm.default, args, raise_exception=False)
        assert all(r == "SUCCESS" for r in results.values()), results


# --- the contract tests' checks of the three registered ops (tests/test_contract.py) ------------


def check_forward(op, x, weight, bias, running_mean, running_var, training, eps=1e-5):
    """The forward op on one sample: y, and the statistics it returns, against the reference."""
    y, mean, var = op(x, weight, bias, running_mean, running_var, training, eps)
    acc = accumulation_dtype(x.dtype)
    assert y.shape == x.shape and y.dtype == x.dtype and mean.dtype == var.dtype == acc
    as64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    truth = reference(as64(x), as64(weight), as64(bias), as64(running_mean), as64(running_var), training, 0.0, eps)
    testing.assert_matches(y, truth, reference(x.detach(), weight, bias, running_mean, running_var, training, 0.0, eps))
    if x.numel():
        dims = [0, *range(2, x.dim())]
        want_mean = x.double().mean(dims) if training else running_mean.double()
        want_var = x.double().var(dims, correction=0) if training else running_var.double()
        torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-6)


def check_backward(op, grad_out, x, weight, bias, mean, var, training, eps, output_mask):
    """The backward op on one sample against autograd through the float64 reference, which
    normalises with the same statistics (passed as running statistics in eval; in training the
    reference recomputes them from x)."""
    grads = op(grad_out, x, weight, bias, mean, var, training, eps, output_mask)
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = reference(*leaves, None if training else mean.double(), None if training else var.double(), training, 0.0, eps)
    wanted = [t for t, m in zip(leaves, output_mask) if t is not None and m]
    truth = iter(torch.autograd.grad(y, wanted, grad_out.double())) if wanted and x.numel() else iter(())
    for got, leaf, m in zip(grads, leaves, output_mask):
        if leaf is None or not m:
            assert got.numel() == 0
            continue
        want = next(truth, torch.zeros_like(leaf))
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)


def check_update(op, running_mean, running_var, mean, var, count, momentum):
    """The running update against F.batch_norm's formula, written out."""
    want_mean = running_mean.double().clone()
    want_var = running_var.double().clone()
    if count:
        want_mean = (1 - momentum) * want_mean + momentum * mean.double()
        want_var = (1 - momentum) * want_var + momentum * var.double() * count / (count - 1)
    op(running_mean, running_var, mean, var, count, momentum)
    tol = dict(rtol=1e-2, atol=1e-2) if running_mean.dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(running_mean.double(), want_mean, **tol)
    torch.testing.assert_close(running_var.double(), want_var, **tol)
