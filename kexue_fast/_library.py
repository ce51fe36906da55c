"""The one place where ``torch.ops.kexue.*`` are registered.

Every op module calls :func:`define_op` once per op: it defines the schema in the ``kexue``
namespace and registers the per-device kernels, the fake (meta) kernel used by
``torch.compile``/``torch.export``, and autograd. We use ``Library.define``/``impl`` rather than
``torch.library.custom_op``: it costs ~4 µs less dispatch per call (DESIGN.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable, Iterable, NamedTuple

import torch

lib = torch.library.Library("kexue", "DEF")

#: Triton is importable (its kernels are imported lazily, on first use).
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
#: Triton kernels run on CPU tensors through the interpreter (must be set before import).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"



class RegisteredOp(NamedTuple):
    op: torch._ops.OpOverload
    #: ``samples(device) -> list of argument tuples`` for opcheck and the contract tests.
    samples: Callable[[torch.device], list[tuple]]
    #: A Triton variant (runs on CPU only under the interpreter).
    triton: bool


#: Every op registered so far, by name (the contract tests iterate over it).
REGISTERED: dict[str, RegisteredOp] = {}


def define_op(
    name: str,
    schema: str,
    *,
    cpu: Callable | None = None,
    cuda: Callable | None = None,
    any_device: Callable | None = None,
    fake: Callable,
    samples: Callable[[torch.device], list[tuple]],
    triton: bool = False,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    tags: Iterable[torch.Tag] = (),
):
    """Defines ``kexue::<name><schema>`` and registers its kernels; returns the op overload.

    ``cpu``/``cuda`` are the device kernels (either may be missing); ``any_device`` is a
    ``CompositeExplicitAutograd`` kernel for ops the dispatcher cannot route by a tensor input
    (a factory, or a ``Tensor[]`` op called with empty lists) — it picks the device itself.
    ``fake`` computes output
    metadata, ``samples`` gives opcheck inputs, ``triton`` marks a Triton variant,
    ``backward``/``setup_context`` are passed to ``torch.library.register_autograd``.
    """
    lib.define(name + schema, tags=tuple(tags))
    qualname = f"kexue::{name}"
    if cpu is not None:
        lib.impl(name, cpu, "CPU")
    if cuda is not None:
        lib.impl(name, cuda, "CUDA")
    if any_device is not None:
        lib.impl(name, any_device, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=lib)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=lib)
    op = getattr(torch.ops.kexue, name).default
    REGISTERED[name] = RegisteredOp(op, samples, triton)
    return op


def triton_kernels(module: str, op_name: str, device: torch.device):
    """The Triton kernel module ``kexue_fast.triton_kernels.<module>`` for a call of ``op_name``
    on ``device``; a clear error where Triton cannot run there (CPU without the interpreter)."""
    if device.type != "cuda" and not TRITON_INTERPRET:
        raise RuntimeError(f"{op_name}: Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")
    return importlib.import_module(f"kexue_fast.triton_kernels.{module}")


def triton_devices() -> dict[str, bool]:
    """Where a Triton variant gets kernels: CUDA whenever Triton is installed, CPU under the
    interpreter."""
    return {"cuda": TRITON_AVAILABLE, "cpu": TRITON_AVAILABLE and TRITON_INTERPRET}
