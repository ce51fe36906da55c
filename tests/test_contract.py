"""The op matrix: every registered op × each of its samples (``RegisteredOp.samples``) × where
it runs (targets.py). On every target — each CPU ISA level, CUDA — the op matches its reference
on the sample; on every device it passes torch.library.opcheck (schema, autograd registration,
fake tensor, AOT dispatch), and ``torch.compile(fullgraph=True)`` and ``torch.export`` keep it as
one node and compute what eager does. The ops are listed from the registry, so a new op joins
every check (and fails here until it has a reference check)."""

import numpy as np
import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch.library import opcheck
from torch.utils._pytree import tree_flatten, tree_unflatten

import philox_model
from kernel_params import kernels, triton_marks, triton_targets
from kexue_fast import reference, testing
from kexue_fast._library import REGISTERED, TRITON_AVAILABLE
from targets import CPU, DEVICES, TARGETS
from test_cascading_rejection import check_backward as check_cascading_rejection_backward
from test_cascading_rejection import check_forward as check_cascading_rejection
from test_iresnet import check_backward as check_iresnet_backward
from test_iresnet import check_inverse as check_iresnet_inverse
from test_iresnet_mlp_logdet import check_mlp_logdet, check_mlp_logdet_backward
from test_modulated_batch_norm import check_backward as check_modulated_batch_norm_backward
from test_modulated_batch_norm import check_forward as check_modulated_batch_norm_forward
from test_modulated_batch_norm import check_update as check_batch_norm_update
from test_spectral_norm import check as check_power_iteration

#: Every op the project defines (the list `kexue-fast info` prints), written out so that an op
#: that stops being registered fails here instead of silently dropping out of the checks below.
NATIVE_OPS = [
    "batch_norm_update_stats_", "cascading_rejection", "cascading_rejection_backward",
    "cond_layer_norm", "cond_layer_norm_backward", "ema_update_", "iresnet_inverse",
    "iresnet_inverse_backward", "iresnet_mlp_logdet", "iresnet_mlp_logdet_backward", "langevin_step_",
    "modulated_batch_norm_backward", "modulated_batch_norm_forward", "philox_normal", "roulette_uniform",
    "self_orthogonality_backward", "self_orthogonality_forward", "spectral_norm_power_iter_", "spectral_sigma",
]  # fmt: skip
TRITON_OPS = [
    "cond_layer_norm_triton", "cond_layer_norm_backward_triton", "ema_update_triton_", "iresnet_inverse_triton",
    "langevin_step_triton_",
    "philox_normal_triton", "spectral_norm_power_iter_triton_",
]  # fmt: skip
OPS = NATIVE_OPS + TRITON_OPS if TRITON_AVAILABLE else NATIVE_OPS


def native_name(name: str) -> str:
    """The native op a Triton variant implements (``ema_update_triton_`` -> ``ema_update_``)."""
    return name.replace("_triton", "")


def samples(name: str, target) -> list[tuple]:
    return REGISTERED[name].samples(torch.device(target.device))


def matrix(targets) -> list:
    """``(name, sample index, target)`` for every registered op: a native op on each of
    ``targets``, a Triton variant on each of their devices (marked ``triton``)."""
    return [
        pytest.param(name, index, target, id=f"{name}-{index}-{target.id}",
                     marks=triton_marks(target.device) if reg.triton else [])
        for name, reg in sorted(REGISTERED.items())
        for target in (triton_targets(targets) if reg.triton else targets)
        for index in range(len(samples(name, CPU)))
    ]  # fmt: skip


# --- the reference of each op, on one sample ------------------------------------------------------


def _check_cond_layer_norm(op, x, weight, bias, eps, rms):
    testing.check_against_reference(
        lambda x, w, b: op(x, w, b, eps, rms),
        lambda x, w, b: reference.cond_layer_norm(x, w, b, eps, rms),
        [x, weight, bias],
        names=["grad_x", "grad_weight", "grad_bias"],
    )


def _reference_gradients(reference_fn, inputs, wanted, grad_out, dtype=None):
    """Gradients of ``reference_fn(*inputs)`` (inputs cast to ``dtype`` if given) for the
    inputs where ``wanted``; None elsewhere."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(w) for t, w in zip(inputs, wanted)]
    y = reference_fn(*leaves)
    needed = [t for t, want in zip(leaves, wanted) if want]
    grads = iter(torch.autograd.grad(y, needed, grad_out.to(y.dtype)) if needed else [])
    return [next(grads) if want else None for want in wanted]


def _check_cond_layer_norm_backward(op, grad_out, x, weight, bias, eps, rms, output_mask):
    grads = op(grad_out, x, weight, bias, eps, rms, output_mask)
    inputs = [x, weight, bias]
    wanted = [bool(m) and t is not None for m, t in zip(output_mask, inputs)]
    layer_norm = lambda x, w, b: reference.cond_layer_norm(x, w, b, eps, rms)  # noqa: E731
    truth = _reference_gradients(layer_norm, inputs, wanted, grad_out, torch.float64)
    same_dtype = _reference_gradients(layer_norm, inputs, wanted, grad_out)
    for name, got, t, s, want in zip(["grad_x", "grad_weight", "grad_bias"], grads, truth, same_dtype, wanted):
        if want:
            testing.assert_matches(got, t, s, what=name)


def _check_ema_update(op, shadow, params, decay):
    testing.check_update_against_reference(op, reference.ema_update_, [shadow, params, decay])


def _check_spectral_sigma(op, weights, us, vs):
    sigmas = op(weights, us, vs)

    def sigma_of(vector_dtype):
        """The reference σ as a function of the weights, with the vectors in ``vector_dtype``
        (None: their own)."""
        cast = lambda ts: [t.detach().to(vector_dtype or t.dtype) for t in ts]  # noqa: E731
        return lambda *ws: reference.spectral_sigma(list(ws), cast(us), cast(vs))

    truth = sigma_of(torch.float64)(*(w.detach().double() for w in weights))
    testing.assert_matches(sigmas, truth, what="sigmas")
    wanted = [w.requires_grad for w in weights]
    if not any(wanted):
        return
    grad_out = torch.randn_like(sigmas)
    grads = iter(torch.autograd.grad(sigmas, [w for w in weights if w.requires_grad], grad_out))
    truth = _reference_gradients(sigma_of(torch.float64), weights, wanted, grad_out, torch.float64)
    same_dtype = _reference_gradients(sigma_of(None), weights, wanted, grad_out)
    for i, (t, s) in enumerate(zip(truth, same_dtype)):
        if t is not None:
            testing.assert_matches(next(grads), t, s, what=f"grad_weights[{i}]")


def _check_philox_normal(op, size, seed, offset, dtype, device):
    noise = op(size, seed, offset, dtype, device)
    assert noise.shape == tuple(size) and noise.dtype == (dtype or torch.float32)
    assert noise.device.type == device.type  # (torch.device("cuda") != cuda:0, the device of the noise)
    truth = reference.philox_normal(size, seed, offset, None, device).double()  # the float32 definition
    # Both within 1e-5·(1 + |ξ|) of the definition (docs/langevin.md), then rounded to dtype.
    budget = 2e-5 * (1 + truth.abs()) + 2 * testing.half_ulp(truth, noise.dtype)
    assert ((noise.double() - truth).abs() <= budget).all()


def _check_roulette_uniform(op, seed, offset, device):
    # The first word of Philox group 2⁶⁴ − 1 at (seed, offset), by the independent NumPy model.
    seed, offset = seed % 2**64, offset % 2**64
    counter = np.array([[2**32 - 1, 2**32 - 1, offset % 2**32, offset >> 32]], dtype=np.uint64)
    word = int(philox_model.philox4x32_10(counter, (seed % 2**32, seed >> 32))[0, 0])
    uniform = op(seed - 2**64 if seed >= 2**63 else seed, offset - 2**64 if offset >= 2**63 else offset, device)
    assert uniform.shape == () and uniform.dtype == torch.float64 and uniform.device.type == device.type
    assert uniform.item() == (word + 0.5) * 2.0**-32


def _check_langevin_step(op, x, grad, *args):
    truth = reference.langevin_step_(x.double(), grad.double(), *args)
    same_dtype = reference.langevin_step_(x.clone(), grad, *args)
    assert op(x, grad, *args) is x
    testing.assert_matches(x, truth, same_dtype)


def _check_self_orthogonality(op, y, *arguments):
    """The penalty and its gradient against the direct formula; the T the forward keeps is tanh(γy)."""
    testing.check_against_reference(
        lambda y: op(y, *arguments)[0], lambda y: reference.self_orthogonality(y, *arguments), [y], names=["grad_y"]
    )
    _, t, _ = op(y.detach(), *arguments)
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    torch.testing.assert_close(t, torch.tanh(y.detach().to(compute) * arguments[0]))


def _check_self_orthogonality_backward(op, grad, y, t, gram, *arguments):
    penalty = lambda y: reference.self_orthogonality(y, *arguments)  # noqa: E731
    (truth,) = _reference_gradients(penalty, [y], [True], grad, torch.float64)
    (same_dtype,) = _reference_gradients(penalty, [y], [True], grad)
    testing.assert_matches(op(grad, y, t, gram, *arguments), truth, same_dtype, what="grad_y")


#: How each native op (and so its Triton variant) is checked against its reference on a sample.
REFERENCE_CHECKS = {
    "batch_norm_update_stats_": check_batch_norm_update,
    "cascading_rejection": check_cascading_rejection,
    "cascading_rejection_backward": check_cascading_rejection_backward,
    "cond_layer_norm": _check_cond_layer_norm,
    "cond_layer_norm_backward": _check_cond_layer_norm_backward,
    "ema_update_": _check_ema_update,
    "iresnet_inverse": check_iresnet_inverse,
    "iresnet_inverse_backward": check_iresnet_backward,
    "iresnet_mlp_logdet": check_mlp_logdet,
    "iresnet_mlp_logdet_backward": check_mlp_logdet_backward,
    "langevin_step_": _check_langevin_step,
    "modulated_batch_norm_backward": check_modulated_batch_norm_backward,
    "modulated_batch_norm_forward": check_modulated_batch_norm_forward,
    "philox_normal": _check_philox_normal,
    "roulette_uniform": _check_roulette_uniform,
    "self_orthogonality_forward": _check_self_orthogonality,
    "self_orthogonality_backward": _check_self_orthogonality_backward,
    "spectral_norm_power_iter_": check_power_iteration,
    "spectral_sigma": _check_spectral_sigma,
}


def test_registry_holds_every_op():
    # The registry is what the checks iterate over and what `kexue-fast info` prints.
    assert sorted(REGISTERED) == sorted(OPS)
    for name in OPS:
        reg = REGISTERED[name]
        assert reg.op is getattr(torch.ops.kexue, name).default
        assert reg.triton == (name in TRITON_OPS)
        assert len(reg.samples(torch.device("cpu"))) >= 2, f"{name}: too few samples"
        assert native_name(name) in REFERENCE_CHECKS, f"{name}: no reference check"


@pytest.mark.parametrize("name,index,target", matrix(TARGETS))
def test_sample_matches_reference(name, index, target):
    REFERENCE_CHECKS[native_name(name)](REGISTERED[name].op, *samples(name, target)[index])


@pytest.mark.parametrize("name,index,target", matrix(DEVICES))
def test_opcheck(name, index, target):
    reg = REGISTERED[name]
    results = opcheck(reg.op, samples(name, target)[index], raise_exception=False)
    failures = {test: result for test, result in results.items() if result != "SUCCESS"}
    assert not failures, failures


# --- torch.compile and torch.export ---------------------------------------------------------------


def _twin_samples(name, index, target):
    """The same sample twice (equal values and layouts, separate storage)."""
    twins = []
    for _ in range(2):
        torch.manual_seed(index)
        twins.append(samples(name, target)[index])
    return twins


def _assert_same_results(got, expected):
    """Outputs and arguments (written by in-place ops) equal, tensor by tensor."""
    got_leaves, expected_leaves = tree_flatten(got)[0], tree_flatten(expected)[0]
    assert len(got_leaves) == len(expected_leaves)
    for g, e in zip(got_leaves, expected_leaves):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(g, e)
        else:
            assert g == e


@pytest.mark.parametrize("name,index,target", matrix(DEVICES))
def test_compile_fullgraph_keeps_the_op_and_computes_what_eager_does(name, index, target):
    op = REGISTERED[name].op
    eager_args, compiled_args = _twin_samples(name, index, target)
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)  # AOT autograd and functionalization, then eager kernels

    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: op(*args), backend=recording_aot_eager, fullgraph=True)
    got = compiled(*compiled_args)
    assert op in [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    _assert_same_results((got, compiled_args), (op(*eager_args), eager_args))


def _exported_targets(exported) -> list:
    """The ops the exported graph calls; an in-place op appears inside auto_functionalized."""
    calls = [node for node in exported.graph.nodes if node.op == "call_function"]
    return [node.target for node in calls] + [node.args[0] for node in calls if node.args]


@pytest.mark.parametrize("name,index,target", matrix(DEVICES))
def test_export_keeps_the_op_and_computes_what_eager_does(name, index, target):
    op = REGISTERED[name].op
    eager_args, exported_args = _twin_samples(name, index, target)
    leaves, spec = tree_flatten(exported_args)
    tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    class Call(torch.nn.Module):
        """The op on the sample, its tensors as the inputs (the other arguments are constants)."""

        def forward(self, *tensors):
            filled = list(leaves)
            for i, t in zip(tensor_at, tensors):
                filled[i] = t
            return op(*tree_unflatten(filled, spec))

    tensors = tuple(leaves[i] for i in tensor_at)
    exported = torch.export.export(Call(), tensors)
    assert op in _exported_targets(exported)
    got = exported.module()(*tensors)
    _assert_same_results((got, exported_args), (op(*eager_args), eager_args))


@pytest.mark.parametrize("op,target", kernels("cond_layer_norm", DEVICES))
def test_compile_with_inductor_matches_eager_forward_and_backward(op, target):
    make = lambda *shape: torch.randn(*shape, device=target.device, requires_grad=True)  # noqa: E731
    x, w, b = make(2, 3, 16), make(2, 16), make(16)

    def f(x, w, b):
        return (op(x, w, b, 1e-5, False).relu() * 3).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_grads = torch.autograd.grad(f(x, w, b), (x, w, b))
    compiled_grads = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    for a, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, c)
