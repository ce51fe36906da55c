"""Benchmark cases of ``kexue::ema_update_``: a model-sized list of 161 tensors (~21M elements),
float32 shadows over bfloat16 params (the mixed-precision case) and over float32 params; and
2,000 small tensors (64–4096 elements), where the per-tensor cost of a call shows.

Extras: ``torch._foreach_lerp_`` (with a float cast of bfloat16 params, as a user would write it),
``EMA.update()`` (kexue_fast.EMA over the params, on its cached table) with ``_C launch`` (the bare
launcher on that same table: ``EMA.update()/_C launch`` is the Python cost of an update), and the
peers ``torch-ema`` and ``ema-pytorch`` where installed (``pip install torch-ema ema-pytorch``);
the peers keep their own shadows, which, like ours, are updated in place."""

import importlib.util

import torch

from kexue_fast import EMA
from kexue_fast._library import REGISTERED
from kexue_fast.benchmarks import BARE, CALL, Case, OpBench, module_and_bare, verify_update
from kexue_fast.reference import ema_update_ as reference

DECAY = 0.999
#: 80 square matrices of 512² and 81 vectors of 512: 161 tensors, 21.0M elements.
SHAPES = [(512, 512)] * 80 + [(512,)] * 81


def _inputs(param_dtype):
    def make(device):
        shadows = [torch.randn(s, device=device) for s in SHAPES]
        params = [torch.randn(s, device=device).to(param_dtype) for s in SHAPES]
        return [shadows, params, DECAY]

    return make


def _small_inputs(device):
    """2,000 float32 tensors of 64 to 4096 elements (sizes drawn once, seeded)."""
    sizes = torch.randint(64, 4097, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    return [[torch.randn(n, device=device) for n in sizes], [torch.randn(n, device=device) for n in sizes], DECAY]


def _model_ema(inputs) -> EMA:
    """kexue_fast.EMA over the params of ``inputs`` (as nn.Parameters of one module), updated
    once, so that its table is built."""
    model = torch.nn.ParameterList([torch.nn.Parameter(p) for p in inputs[1]])
    ema = EMA(model, decay=DECAY)
    ema.update()
    return ema


def _bare_update(ema: EMA) -> None:
    plan = ema._plan.value
    plan.launch(plan.table, DECAY)


_ema_module, _ema_bare = module_and_bare(_model_ema, EMA.update, _bare_update)


def _foreach_lerp(inputs):
    def run(shadows, params, decay):
        torch._foreach_lerp_(shadows, [p.float() for p in params], 1.0 - decay)

    return run


def _peer(module: str, build):
    """A provider from a peer library: it wraps the params as nn.Parameters of a module and
    calls the peer's update(); None where the peer is not installed."""

    def factory(inputs):
        if importlib.util.find_spec(module) is None:
            return None
        if inputs is None:
            return True
        model = torch.nn.ParameterList([torch.nn.Parameter(p, requires_grad=True) for p in inputs[1]])
        return build(model)

    return factory


def _torch_ema(model):
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(model.parameters(), decay=DECAY)
    return lambda *_: ema.update(model.parameters())  # torch-ema keeps only weak references


def _ema_pytorch(model):
    from ema_pytorch import EMA

    ema = EMA(model, beta=DECAY, update_after_step=0, update_every=1, allow_different_devices=True)
    return lambda *_: ema.update()


def _triton(shadows, params, decay):
    torch.ops.kexue.ema_update_triton_(shadows, params, decay)


BENCH = OpBench(
    name="ema_update",
    reference=reference,
    native=lambda shadows, params, decay: torch.ops.kexue.ema_update_(shadows, params, decay),
    triton=_triton if "ema_update_triton_" in REGISTERED else None,
    ops=("ema_update_", "ema_update_triton_"),
    cases=[
        Case("161 tensors 21.0M bf16->fp32", _inputs(torch.bfloat16), (CALL,), quick=True),
        Case("161 tensors 21.0M fp32->fp32", _inputs(torch.float32), (CALL,)),
        Case("2000 tensors 64-4096 fp32->fp32", _small_inputs, (CALL,), compiled=False),
    ],
    floor=None,
    extra={
        "foreach_lerp": _foreach_lerp,
        "EMA.update()": _ema_module,
        BARE: _ema_bare,
        "torch-ema": _peer("torch_ema", _torch_ema),
        "ema-pytorch": _peer("ema_pytorch", _ema_pytorch),
    },
    verify=verify_update,
)
