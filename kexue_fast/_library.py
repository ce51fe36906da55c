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
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

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
#: The composite ops (:func:`define_composite`), by name.
COMPOSITES: dict[str, torch._ops.OpOverload] = {}


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
    metadata, ``samples`` gives opcheck inputs, ``backward``/``setup_context`` are passed to
    ``torch.library.register_autograd``. ``triton`` marks a Triton variant: the one place that
    decides where Triton kernels run (:func:`_on_triton_devices`); its kernels are registered like
    any other op's and load their module with :func:`triton_kernels`.
    """
    lib.define(name + schema, tags=tuple(tags))
    qualname = f"kexue::{name}"
    parsed = getattr(torch.ops.kexue, name).default._schema
    for kernel, key in ((cpu, "CPU"), (cuda, "CUDA"), (any_device, "CompositeExplicitAutograd")):
        if kernel is not None:
            if triton:
                kernel = _on_triton_devices(name, parsed, kernel)
            lib.impl(name, _bumping_versions(kernel, parsed), key)
    torch.library.register_fake(qualname, fake, lib=lib)
    op = getattr(torch.ops.kexue, name).default
    if backward is not None:
        lib.impl(name, _autograd_kernel(op, backward, setup_context), "Autograd", with_keyset=True)
    _explain_argument_errors(name, op)
    REGISTERED[name] = RegisteredOp(op, samples, triton)
    return op


def define_composite(name: str, schema: str, kernel: Callable) -> torch._ops.OpOverload:
    """Defines ``kexue::<name><schema>`` as a ``CompositeImplicitAutograd`` op: ``kernel`` calls
    other ``kexue`` ops, whose registrations give it autograd, fake tensors and ``torch.compile``
    (an op that writes its inputs cannot get autograd otherwise). Not in :data:`REGISTERED`:
    the contract tests check the ops it is made of."""
    lib.define(name + schema)
    lib.impl(name, kernel, "CompositeImplicitAutograd")
    op = getattr(torch.ops.kexue, name).default
    _explain_argument_errors(name, op)
    COMPOSITES[name] = op
    return op


def _autograd_kernel(op: torch._ops.OpOverload, backward: Callable, setup_context: Callable) -> Callable:
    """The ``Autograd`` kernel of an op: what ``torch.library.register_autograd`` registers, without
    its per-call cost (it rebuilds the schema's argument list to put back the defaults the
    dispatcher drops, ~16 µs a call, and flattens ``Tensor[]`` arguments with pytree; here the
    defaults and which arguments are lists are read once). ``setup_context(ctx, inputs, output)``
    sees every argument and ``backward(ctx, *grads)`` returns one gradient (or None) per argument
    the op was called with — a list of them (or None) for a ``Tensor[]`` — as there, and
    ``ctx.needs_input_grad`` has the same structure. The ``autograd.Function`` gets each
    ``Tensor[]`` element by element (autograd tracks tensors only, not lists of them). ``backward``
    gets zeros for an unused floating-point output, None for one that ``setup_context`` marked
    non-differentiable or that is not floating-point."""
    if any("List" in str(ret.type) for ret in op._schema.returns):
        raise TypeError(f"{op}: an op with autograd must return Tensors, not lists of them")
    defaults = tuple(arg.default_value for arg in op._schema.arguments)
    is_list = tuple(str(arg.type) == "List[Tensor]" for arg in op._schema.arguments)
    below_autograd = torch._C._after_autograd_keyset

    def redispatch(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below_autograd, *args)

    def flatten(args):
        """``(flat, lengths)``: the arguments with each list's elements in its place, and per
        argument its list's length (None for an argument that is not a list)."""
        flat, lengths = [], []
        for value, listed in zip(args, is_list):
            if listed:
                flat.extend(value)
                lengths.append(len(value))
            else:
                flat.append(value)
                lengths.append(None)
        return flat, tuple(lengths)

    def unflatten(flat, lengths) -> list:
        args, at = [], 0
        for n in lengths:
            args.append(flat[at] if n is None else list(flat[at : at + n]))
            at += 1 if n is None else n
        return args

    class Differentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, lengths, keyset, *flat):
            args = unflatten(flat, lengths)
            output = redispatch(keyset, args)
            ctx.kexue_lengths = lengths
            setup_context(ctx, (*args, *defaults[len(args) :]), output)
            # Unused outputs get zero gradients, as autograd would make them — except those marked
            # non-differentiable and the integer ones, which get None (autograd would fill zeros of
            # their size on every backward: 4 MB for the log-det's kept results at B = 4096).
            skipped = {id(t) for t in getattr(ctx, "non_differentiable", None) or ()}
            outputs = output if isinstance(output, tuple) else (output,)
            ctx.kexue_zeros = [
                (t.shape, t.dtype, t.device) if t.is_floating_point() and id(t) not in skipped else None
                for t in outputs
            ]
            ctx.set_materialize_grads(False)
            return output

        @staticmethod
        def backward(ctx, *grads):
            grads = [
                torch.zeros(zeros[0], dtype=zeros[1], device=zeros[2]) if grad is None and zeros else grad
                for grad, zeros in zip(grads, ctx.kexue_zeros)
            ]
            needs_input_grad, lengths = ctx.needs_input_grad, ctx.kexue_lengths
            ctx.needs_input_grad = tuple(unflatten(needs_input_grad[2:], lengths))  # not lengths, keyset
            try:
                per_argument = backward(ctx, *grads)
            finally:
                ctx.needs_input_grad = needs_input_grad
            flat = []
            for grad, n in zip(per_argument, lengths):
                if n is None:
                    flat.append(grad)
                else:
                    flat.extend([None] * n if grad is None else grad)
            return None, None, *flat

    def autograd(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            flat, lengths = flatten(args)
            return Differentiable.apply(lengths, keyset, *flat)
        return redispatch(keyset, args)

    Differentiable.__name__ = Differentiable.__qualname__ = f"Differentiable_{op._opname}"
    return autograd


def _on_triton_devices(name: str, schema, kernel: Callable) -> Callable:
    """``kernel`` behind the check of where Triton kernels run: on CUDA tensors, and on CPU
    tensors only under the interpreter (``TRITON_INTERPRET=1`` set before import); "meta" runs
    nothing. The device is that of the first tensor (or first tensor of a list) among the
    arguments, or of a factory's ``Device?`` argument (None: torch's default device). Elsewhere
    the call raises a ``RuntimeError`` naming the op, that argument and its device, before
    anything runs (a device without a registered kernel would get the dispatcher's "Could not
    run ... with arguments from the 'CPU' backend" instead, which names neither)."""
    arguments = [(arg.name, str(arg.type) in ("Device", "Optional[Device]")) for arg in schema.arguments]

    def device_of(args, kwargs) -> tuple[torch.device | None, str]:
        values = (*args, *(kwargs.get(arg) for arg, _ in arguments[len(args) :]))
        for (arg, is_device), value in zip(arguments, values):
            if is_device:
                device = torch.get_default_device() if value is None else torch.device(value)
                return device, f"{arg} is {device}"
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
                arg, value = f"{arg}[0]", value[0]
            if isinstance(value, torch.Tensor):
                return value.device, f"{arg} is on {value.device}"
        return None, ""  # e.g. empty lists: nothing runs

    def triton_kernel(*args, **kwargs):
        device, where = device_of(args, kwargs)
        if device is not None and device.type not in ("cuda", "meta") and not TRITON_INTERPRET:
            raise RuntimeError(
                f"kexue::{name}: Triton kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 "
                f"is set before kexue_fast is imported; {where}"
            )
        return kernel(*args, **kwargs)

    return triton_kernel


def _bumping_versions(kernel: Callable, schema) -> Callable:
    """``kernel``, followed by a bump of the autograd version counter of every tensor the op
    writes (``Tensor(a!)`` arguments), as PyTorch's own in-place ops do — so a tensor saved for
    backward and overwritten later makes backward raise instead of silently using the new
    values. (``Library.impl`` ops get no ``ADInplaceOrView`` kernel that would do it.) The bump
    comes after the kernel, so an op that raises changes nothing."""
    written = [
        (i, arg.name)
        for i, arg in enumerate(schema.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write
    ]
    if not written:
        return kernel

    def kernel_then_bump(*args, **kwargs):
        result = kernel(*args, **kwargs)
        for i, name in written:
            torch.autograd.graph.increment_version(args[i] if i < len(args) else kwargs[name])
        return result

    return kernel_then_bump


def _explain_argument_errors(name: str, op: torch._ops.OpOverload) -> None:
    """Wraps the op's entry points (overload and packet) so that torch's argument-parser errors
    come out as a ``TypeError`` naming the argument and what it must be. One case gets its own
    advice: seeds and offsets are unsigned 64-bit but ``int`` arguments are int64, so a value
    ≥ 2⁶³ given to the raw op is a ``ValueError`` saying to pass its two's-complement value (the
    Python wrappers such as ``kexue_fast.philox_normal`` convert such values themselves)."""
    packet = getattr(torch.ops.kexue, name)

    def explained(call):
        def call_op(*args, **kwargs):
            try:
                return call(*args, **kwargs)
            except (RuntimeError, NotImplementedError) as error:
                raise _argument_error(name, op._schema, error) from None

        return call_op

    op._op = explained(op._op)
    packet._op = explained(packet._op)


def _argument_error(name: str, schema, error: Exception) -> Exception:
    message = str(error)
    if "There were no tensor arguments to this function" in message:
        required = [arg.name for arg in schema.arguments if str(arg.type) == "Tensor"]
        return TypeError(
            f"kexue::{name}: {required[0] if required else 'a tensor argument'} must be a Tensor, got None"
        )
    parsed = re.search(r"Expected a value of type '(.+?)' for argument '(\w+)' but instead found type '(.+?)'", message)
    if parsed is None:
        return error
    expected, arg, found = parsed.groups()
    value = re.search(r"\nValue: (-?\d+)\n", message)
    if expected == "int" and found == "int" and value is not None:
        value = int(value.group(1))
        if 2**63 <= value < 2**64:
            return ValueError(
                f"kexue::{name}: {arg}={value} does not fit the op's int64; pass its two's-complement value "
                f"{arg}={value - 2**64} (the same 64 bits), or call the Python wrapper, which converts it"
            )
        return ValueError(f"kexue::{name}: {arg} must be an int in [-2**63, 2**63), got {value}")
    return TypeError(f"kexue::{name}: {arg} must be {expected}, got {found}")


def triton_kernels(module: str):
    """The Triton kernel module ``kexue_fast.triton_kernels.<module>``, imported on first use (so
    that ``import kexue_fast`` compiles no Triton code). Only Triton variants call it: their
    kernels have passed the device check of :func:`_on_triton_devices`."""
    return importlib.import_module(f"kexue_fast.triton_kernels.{module}")
