"""Benchmark cases of :func:`kexue_fast.gan.orthogonal_regularizer` (BigGAN's ``"biggan"`` kind)
over the 40 weights of a BigGAN-style generator, against the per-layer loop of
:func:`kexue_fast.reference.orthogonal_regularizer` (``eager``; ``compiled``: under
``torch.compile``), float32, forward and forward+backward.

The generator (:func:`generator_shapes`): a linear from z (128) to the 4 × 4 seed, five residual
blocks of channels ``top → top → top/2 → top/2 → top/4 → top/4``, each with two 3 × 3 convs, a
1 × 1 shortcut and the four linears (148 → C) of its two conditional BatchNorms, and one
self-attention block (four 1 × 1 convs) at ``top/2`` channels: 40 weights of 16 distinct shapes
(so 16 groups), most of the flops in the 3 × 3 convs. ``top = 1024`` is the BigGAN-sized case (256–1024
channels); ``--quick`` runs ``top = 256``.
"""

from itertools import pairwise

import torch

from kexue_fast.benchmarks import Case, Check, OpBench, verify_autograd, worst
from kexue_fast.gan import orthogonal_regularizer
from kexue_fast.reference import orthogonal_regularizer as loop

Z, CBN_IN = 128, 148  # z, and the CBN linears' input (z chunk + shared class embedding)


def generator_shapes(top: int) -> list[tuple[int, ...]]:
    """The weight shapes of the generator of the module docstring."""
    channels = [top, top, top // 2, top // 2, top // 4, top // 4]
    shapes = [(16 * top // 4, Z)]
    for c_in, c_out in pairwise(channels):
        shapes += [(c_out, c_in, 3, 3), (c_out, c_out, 3, 3), (c_out, c_in, 1, 1)]
        shapes += [(c_in, CBN_IN), (c_in, CBN_IN), (c_out, CBN_IN), (c_out, CBN_IN)]
    c = top // 2
    shapes += [(c // 8, c, 1, 1), (c // 8, c, 1, 1), (c // 2, c, 1, 1), (c, c // 2, 1, 1)]
    return shapes


def _inputs(top):
    def make(device):
        return [torch.randn(s, device=device) * 0.02 for s in generator_shapes(top)]

    return make


MODES = ("forward", "forward+backward")


def _verify(kernel, reference, inputs) -> list[Check]:
    """The value and the gradients (the worst of the 40) against the loop in float64."""
    output, *grads = verify_autograd(kernel, reference, inputs)
    return [output, worst("gradients", grads)]


BENCH = OpBench(
    name="orthogonal_regularizer",
    reference=lambda *weights: loop(weights),
    native=lambda *weights: orthogonal_regularizer(weights),
    triton=None,
    cases=[
        Case("40 weights, 64-256 channels", _inputs(256), MODES, quick=True),
        Case("40 weights, 256-1024 channels", _inputs(1024), MODES),
    ],
    floor=None,
    verify=_verify,
)
