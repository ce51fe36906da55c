"""Benchmark cases of ``kexue::spectral_norm_power_iter_``: one power-iteration round over a
model's worth of matrices — 200 of 64×64 and 50 of 512×512, float32.

``eager`` is the per-matrix loop a user writes (mv + normalize, mv + normalize, dot); the extra
``torch-parametrization`` runs, for every layer, what
``torch.nn.utils.parametrizations.spectral_norm`` does in a training forward (power iteration,
σ and W/σ) — one small launch per matrix per step."""

import torch

from kexue_fast._library import REGISTERED
from kexue_fast.benchmarks import Case, OpBench
from kexue_fast.reference import spectral_norm_power_iter_ as reference
from kexue_fast.testing import assert_matches


def _inputs(count, size):
    def make(device):
        weights = [torch.randn(size, size, device=device) for _ in range(count)]
        us = [torch.nn.functional.normalize(torch.randn(size, device=device), dim=0) for _ in range(count)]
        vs = [torch.nn.functional.normalize(torch.randn(size, device=device), dim=0) for _ in range(count)]
        return [weights, us, vs, 1, 1e-12]

    return make


def _torch_parametrization(inputs):
    if inputs is None:
        return True
    layers = []
    for w in inputs[0]:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
        with torch.no_grad():
            layer.weight.copy_(w)
        layers.append(torch.nn.utils.parametrizations.spectral_norm(layer))

    def run(*_):
        for layer in layers:
            layer.parametrizations.weight[0](layer.parametrizations.weight.original)

    return run


def _verify(kernel, reference_fn, inputs):
    weights, us, vs, n_iters, eps = inputs
    u_k, v_k = [u.clone() for u in us], [v.clone() for v in vs]
    u_r, v_r = [u.double() for u in us], [v.double() for v in vs]
    sigma_k = kernel(weights, u_k, v_k, n_iters, eps)
    sigma_r = reference_fn([w.double() for w in weights], u_r, v_r, n_iters, eps)
    assert_matches(sigma_k, sigma_r, what="sigmas")
    for a, b in zip(u_k + v_k, u_r + v_r):
        assert_matches(a, b, what="vectors")
    return {"sigmas": (sigma_k.double() - sigma_r).abs().max().item()}


BENCH = OpBench(
    name="spectral_norm_power_iter",
    reference=reference,
    native=lambda *args: torch.ops.kexue.spectral_norm_power_iter_(*args),
    triton=(lambda *args: torch.ops.kexue.spectral_norm_power_iter_triton_(*args))
    if "spectral_norm_power_iter_triton_" in REGISTERED
    else None,
    cases=[
        Case("200 x 64x64 fp32, 1 round", _inputs(200, 64), ("forward",), quick=True),
        Case("50 x 512x512 fp32, 1 round", _inputs(50, 512), ("forward",)),
    ],
    floor=None,
    extra={"torch-parametrization": _torch_parametrization},
    verify=_verify,
)
