"""Spectral normalisation on top of the batched ops (SPEC §2; TECHNIQUES §1, §3).

``spectral_norm(module)`` is a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``:
the same parametrization structure and state-dict keys (``parametrizations.weight.original``,
``parametrizations.weight.0._u`` / ``._v``), the same 15 warm-up rounds at creation, the same
update order, the same outputs in train and eval mode — with the power iteration and σ done by
``kexue::spectral_norm_power_iter_`` / ``kexue::spectral_sigma``. ``coeff=c`` gives the i-ResNet
"soft" rule ``W / max(1, σ/c)`` (only shrinks). Vectors are float32 for float16/bfloat16
weights (torch keeps them in the weight's dtype). Complex weights take the plain-PyTorch path
of ``kexue_fast.reference`` (the kernels are real-only).

``SpectralNormGroup(model)`` takes over the power iteration of every such layer of a model:
``group.refresh()`` (once per training step, before the forward) updates all u, v with one op
call, and the layers then only compute their σ — so a layer called twice in a step (D(real),
D(fake)) iterates once, not twice as torch's would.

``conv_spectral_norm`` estimates the norm of the convolution *operator* (what i-ResNet's 3×3
convolutions need) by power iteration with ``conv2d`` / ``conv_transpose2d`` on the real input
shape.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from kexue_fast import reference
from kexue_fast.ops.spectral_norm import spectral_norm_power_iter_, spectral_sigma


class SpectralNorm(nn.Module):
    """The parametrization ``W ↦ W / σ(W)`` (or ``W / max(1, σ/coeff)``)."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12, coeff: float | None = None):
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError(f"spectral_norm: dim must be in [-{ndim}, {ndim - 1}], got {dim}")
        if n_power_iterations <= 0:
            raise ValueError(f"spectral_norm: n_power_iterations must be positive, got {n_power_iterations}")
        if coeff is not None and not coeff > 0:
            raise ValueError(f"spectral_norm: coeff must be positive, got {coeff}")
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps, self.coeff = eps, coeff
        self.managed = False  # True while a SpectralNormGroup runs the power iteration
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            weight_mat = self.matrix(weight)
            h, w = weight_mat.shape
            vec = weight.dtype if weight.dtype in (torch.float64, torch.complex64, torch.complex128) else torch.float32
            u = weight_mat.new_empty(h, dtype=vec).normal_(0, 1)
            v = weight_mat.new_empty(w, dtype=vec).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
            self.power_method(weight_mat, 15)

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The 2-D view whose spectral norm is taken: ``dim`` first, the rest flattened."""
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.dim()) if d != self.dim))
        return weight.flatten(1)

    @torch.no_grad()
    def power_method(self, weight_mat: torch.Tensor, n_power_iterations: int) -> None:
        iterate = reference.spectral_norm_power_iter_ if weight_mat.is_complex() else spectral_norm_power_iter_
        iterate([weight_mat.detach()], [self._u], [self._v], n_power_iterations, self.eps)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        weight_mat = self.matrix(weight)
        if self.training and not self.managed:
            self.power_method(weight_mat, self.n_power_iterations)
        # Clones: u and v change in place at the next step, but this graph needs them as they are.
        sigma_of = reference.spectral_sigma if weight.is_complex() else spectral_sigma
        sigma = sigma_of([weight_mat], [self._u.clone()], [self._v.clone()])[0]
        if self.coeff is None:
            return weight / sigma
        return weight / torch.clamp(sigma / self.coeff, min=1.0)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None, coeff: float | None = None) -> nn.Module:
    """Drop-in for ``torch.nn.utils.parametrizations.spectral_norm`` (plus ``coeff``)."""
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"spectral_norm: module {module} has no parameter or buffer named {name!r}")
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps, coeff))
    return module


class SpectralNormGroup:
    """Runs the power iteration of every ``kexue_fast.nn.spectral_norm`` layer of ``model`` with
    one op call per ``refresh()`` (one per distinct (n_power_iterations, eps, float64) setting)."""

    def __init__(self, model: nn.Module):
        self.layers: list[tuple[nn.Module, str, SpectralNorm]] = []
        for module in model.modules():
            if not parametrize.is_parametrized(module):
                continue
            for name, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, SpectralNorm) and hasattr(p, "_u"):
                        p.managed = True
                        self.layers.append((module, name, p))

    @torch.no_grad()
    def refresh(self) -> torch.Tensor:
        """One power-iteration step for every layer; returns their σ (detached, layer order)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, _, sn) in enumerate(self.layers):
            groups[(sn.n_power_iterations, sn.eps, sn._u.dtype)].append(i)
        sigmas = torch.empty(len(self.layers), dtype=torch.float64)
        for (n_iters, eps, _), indices in groups.items():
            weights = [self._weight_matrix(i) for i in indices]
            us = [self.layers[i][2]._u for i in indices]
            vs = [self.layers[i][2]._v for i in indices]
            sigmas[indices] = spectral_norm_power_iter_(weights, us, vs, n_iters, eps).cpu().double()
        return sigmas

    def _weight_matrix(self, i: int) -> torch.Tensor:
        module, name, sn = self.layers[i]
        return sn.matrix(module.parametrizations[name].original.detach())

    def release(self) -> None:
        """Hands the power iteration back to the layers."""
        for _, _, sn in self.layers:
            sn.managed = False


@torch.no_grad()
def conv_spectral_norm(weight: torch.Tensor, input_shape, stride=1, padding=0, dilation=1, groups: int = 1,
                       n_power_iterations: int = 20, eps: float = 1e-12, x: torch.Tensor | None = None):
    """Norm of the operator ``x ↦ conv2d(x, weight, …)`` on inputs of shape ``input_shape``
    (C, H, W), by power iteration with its adjoint ``conv_transpose2d``. Returns ``(σ, x)``; pass
    ``x`` back in to continue the iteration (i-ResNet keeps it between steps)."""
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if x is None:
        x = F.normalize(torch.randn(1, *input_shape, device=weight.device, dtype=weight.dtype).flatten(), dim=0, eps=eps)
        x = x.view(1, *input_shape)
    out = F.conv2d(x, weight, **conv)

    def adjoint(y):
        # output_padding makes conv_transpose2d return exactly the input shape
        expected = [
            (y.shape[2 + k] - 1) * _pair(stride)[k] - 2 * _pair(padding)[k] + _pair(dilation)[k] * (weight.shape[2 + k] - 1) + 1
            for k in range(2)
        ]
        output_padding = tuple(input_shape[1 + k] - expected[k] for k in range(2))
        return F.conv_transpose2d(y, weight, output_padding=output_padding, **conv)

    for _ in range(n_power_iterations):
        y = out / max(out.norm().item(), eps)
        x = adjoint(y)
        x = x / max(x.norm().item(), eps)
        out = F.conv2d(x, weight, **conv)
    return out.norm(), x


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)
