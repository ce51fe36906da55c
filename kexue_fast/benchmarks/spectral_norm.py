"""Benchmark cases of ``kexue::spectral_norm_power_iter_``: one power-iteration round over a
model's worth of matrices — 200 of 64×64 and 50 of 512×512, float32.

``eager`` is the per-matrix loop a user writes (mv + normalize, mv + normalize, dot); the extra
``torch-parametrization`` runs, for every layer, what
``torch.nn.utils.parametrizations.spectral_norm`` does in a training forward (power iteration,
σ and W/σ) — one small launch per matrix per step. ``SpectralNormGroup.refresh()`` is the same
round through kexue_fast's module API (layers of ``kexue_fast.nn.spectral_norm``, on the group's
cached table) and ``_C launch`` the bare launcher on that same table:
``SpectralNormGroup.refresh()/_C launch`` is the Python cost of a refresh."""

import torch

from kexue_fast._library import REGISTERED
from kexue_fast.benchmarks import BARE, CALL, Case, Check, OpBench, compare, module_and_bare, worst
from kexue_fast.nn import SpectralNormGroup, spectral_norm
from kexue_fast.reference import spectral_norm_power_iter_ as reference


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


def _group(inputs) -> SpectralNormGroup:
    """A SpectralNormGroup over one kexue_fast spectral-norm Linear per weight of ``inputs``,
    refreshed once, so that its table is built."""
    layers = []
    for w in inputs[0]:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
        with torch.no_grad():
            layer.weight.copy_(w)
        layers.append(spectral_norm(layer))
    group = SpectralNormGroup(torch.nn.Sequential(*layers))
    group.refresh()
    return group


def _bare_refresh(group: SpectralNormGroup) -> None:
    (planned,) = group._plan.value
    planned.launch(planned.vec_code, planned.table, planned.n_iters, planned.eps, planned.sigmas.data_ptr())


_group_refresh, _group_bare = module_and_bare(_group, SpectralNormGroup.refresh, _bare_refresh)


def _verify(kernel, reference_fn, inputs) -> list[Check]:
    """σ of every matrix and the updated u, v against the reference in float64."""
    weights, us, vs, n_iters, eps = inputs
    u_k, v_k = [u.clone() for u in us], [v.clone() for v in vs]
    u_r, v_r = [u.double() for u in us], [v.double() for v in vs]
    sigma_k = kernel(weights, u_k, v_k, n_iters, eps)
    sigma_r = reference_fn([w.double() for w in weights], u_r, v_r, n_iters, eps)
    vectors = [compare(f"vector[{i}]", a, b) for i, (a, b) in enumerate(zip(u_k + v_k, u_r + v_r))]
    return [compare("sigmas", sigma_k, sigma_r), worst("u and v", vectors)]


BENCH = OpBench(
    name="spectral_norm_power_iter",
    reference=reference,
    native=lambda *args: torch.ops.kexue.spectral_norm_power_iter_(*args),
    triton=(lambda *args: torch.ops.kexue.spectral_norm_power_iter_triton_(*args))
    if "spectral_norm_power_iter_triton_" in REGISTERED
    else None,
    ops=("spectral_norm_power_iter_", "spectral_norm_power_iter_triton_", "spectral_sigma"),
    cases=[
        Case("200 x 64x64 fp32, 1 round", _inputs(200, 64), (CALL,), quick=True),
        Case("50 x 512x512 fp32, 1 round", _inputs(50, 512), (CALL,)),
    ],
    floor=None,
    extra={
        "torch-parametrization": _torch_parametrization,
        "SpectralNormGroup.refresh()": _group_refresh,
        BARE: _group_bare,
    },
    verify=_verify,
)
