"""Every registered op passes torch.library.opcheck on its sample inputs (schema, autograd
registration, fake tensor, AOT dispatch), and torch.compile / torch.export keep it as one node."""

import pytest
import torch
from torch.library import opcheck

from kernel_params import providers, triton_marks
from kexue_fast._library import REGISTERED, TRITON_AVAILABLE

CPU = torch.device("cpu")

#: Every op the project defines (the list `kexue-fast info` prints), written out so that an op
#: that stops being registered fails here instead of silently dropping out of the checks below.
NATIVE_OPS = [
    "cond_layer_norm", "cond_layer_norm_backward", "ema_update_", "langevin_step_", "philox_normal",
    "spectral_norm_power_iter_", "spectral_sigma",
]  # fmt: skip
TRITON_OPS = [
    "cond_layer_norm_triton", "cond_layer_norm_backward_triton", "ema_update_triton_", "langevin_step_triton_",
    "philox_normal_triton", "spectral_norm_power_iter_triton_",
]  # fmt: skip
OPS = NATIVE_OPS + TRITON_OPS if TRITON_AVAILABLE else NATIVE_OPS


def cases():
    for name in OPS:
        marks = triton_marks() if name in TRITON_OPS else []
        count = len(REGISTERED[name].samples(CPU)) if name in REGISTERED else 1  # a missing op fails below
        for i in range(count):
            yield pytest.param(name, i, id=f"{name}-{i}", marks=marks)


def every_op():
    return [pytest.param(name, id=name, marks=triton_marks() if name in TRITON_OPS else []) for name in OPS]


@pytest.mark.parametrize("name,index", list(cases()))
def test_opcheck(name, index):
    assert name in REGISTERED, f"kexue::{name} is not registered"
    reg = REGISTERED[name]
    args = reg.samples(CPU)[index]
    results = opcheck(reg.op, args, raise_exception=False)
    failures = {test: result for test, result in results.items() if result != "SUCCESS"}
    assert not failures, failures


def test_registry_holds_every_op():
    # The registry is what the contract tests iterate over and what `kexue-fast info` prints.
    assert sorted(REGISTERED) == sorted(OPS)
    for name in OPS:
        reg = REGISTERED[name]
        assert reg.op is getattr(torch.ops.kexue, name).default
        assert reg.triton == (name in TRITON_OPS)
        assert len(reg.samples(CPU)) >= 2, f"{name}: too few opcheck samples"


def _graph_targets(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("name", every_op())
def test_compile_fullgraph_keeps_the_op(name):
    reg = REGISTERED[name]
    assert reg.op in _graph_targets(lambda *args: reg.op(*args), *reg.samples(CPU)[0])


@pytest.mark.parametrize("op", providers("cond_layer_norm"))
def test_compile_with_inductor_matches_eager_forward_and_backward(op):
    x = torch.randn(2, 3, 16, requires_grad=True)
    w, b = torch.randn(2, 16, requires_grad=True), torch.randn(16, requires_grad=True)

    def f(x, w, b):
        return (op(x, w, b, 1e-5, False).relu() * 3).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager_grads = torch.autograd.grad(f(x, w, b), (x, w, b))
    compiled_grads = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    for a, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("op", providers("cond_layer_norm"))
def test_export_keeps_the_op(op):
    class Block(torch.nn.Module):
        def forward(self, x, w, b):
            return op(x, w, b, 1e-6, True) + 1

    args = (torch.randn(2, 3, 16), torch.randn(2, 16), torch.randn(2, 16))
    exported = torch.export.export(Block(), args)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert op.default in targets
    torch.testing.assert_close(exported.module()(*args), Block()(*args))
