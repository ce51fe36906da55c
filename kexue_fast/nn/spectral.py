"""Spectral normalisation on top of the batched ops (SN-GAN, i-ResNet; see docs/spectral_norm.md).

``spectral_norm(module)`` is a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``:
the same parametrization structure and state-dict keys (``parametrizations.weight.original``,
``parametrizations.weight.0._u`` / ``._v``), the same 15 warm-up rounds at creation, the same
update order, the same outputs in train and eval mode — with the power iteration done by
``kexue::spectral_norm_power_iter_``. A layer's σ (the differentiable ``uᵀ W v``) is
``spectral_sigma``'s math for one matrix in two plain ops (``mv`` and ``dot``, in the vectors'
dtype): the batched op is one Python custom-op dispatch with autograd, which costs a training
step of a small GAN more than the product itself (0.2 ms a layer and forward, measured on the
2-core CPU, against 0.02 ms). ``coeff=c`` gives the i-ResNet
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

import math
import numbers
from collections import defaultdict
from collections.abc import Callable
from itertools import repeat
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from kexue_fast import _native, _tables, reference
from kexue_fast.ops import spectral_norm as spectral_ops
from kexue_fast.ops.spectral_norm import spectral_norm_power_iter_


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class SpectralNorm(nn.Module):
    """The parametrization ``W ↦ W / σ(W)`` (or, with ``coeff``, ``W / max(1, σ/coeff)``) that
    ``spectral_norm`` registers; σ is ``uᵀ W_mat v`` with the power-iteration vectors.

    Args:
        weight: the weight to normalise (any float or complex dtype). With ``ndim > 1`` it is
            viewed as the matrix ``W_mat`` (``dim`` first, the rest flattened, ``h × w``) and
            the buffers ``_u`` (h,) and ``_v`` (w,) are created — float32 for float16/bfloat16
            weights, else the weight's dtype — and warmed up by 15 power-iteration rounds. A
            1-D weight is just divided by its norm.
        n_power_iterations: rounds per training-mode forward (an int >= 1).
        dim: the dimension that becomes the matrix's rows.
        eps: the floor of the norms in ``normalize(a) = a / max(‖a‖, eps)`` (finite, >= 0).
        coeff: ``None``, or a finite ``c > 0`` for the soft rule that only shrinks.

    In training mode each forward first runs the power iteration (unless a
    ``SpectralNormGroup`` does it); in eval mode ``u``, ``v`` stay as they are.

    Raises:
        IndexError: ``dim`` outside ``[-ndim, ndim)``. TypeError: a non-int
        ``n_power_iterations``/``dim``. ValueError: ``n_power_iterations < 1``, a negative or
        NaN ``eps``, a ``coeff`` that is not a finite positive number.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 coeff: float | None = None):  # fmt: skip
        super().__init__()
        ndim = weight.ndim
        for arg, value in (("dim", dim), ("n_power_iterations", n_power_iterations)):
            if not _is_int(value):
                raise TypeError(f"spectral_norm: {arg} must be an int, got {value!r}")
        if dim >= ndim or dim < -ndim:
            raise IndexError(f"spectral_norm: dim must be in [-{ndim}, {ndim - 1}], got {dim}")
        if n_power_iterations <= 0:
            raise ValueError(f"spectral_norm: n_power_iterations must be positive, got {n_power_iterations}")
        if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"spectral_norm: eps must be a finite number >= 0, got {eps!r}")
        if coeff is not None and not (isinstance(coeff, numbers.Real) and math.isfinite(coeff) and coeff > 0):
            raise ValueError(f"spectral_norm: coeff must be a finite positive number or None, got {coeff!r}")
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

    #: Counts the assignments of ``n_power_iterations``, ``eps`` or ``dim`` on any layer: a
    #: ``SpectralNormGroup`` re-reads its layers' settings when it changed (one comparison per
    #: ``refresh()`` instead of one attribute read per layer).
    settings_version = 0

    def __setattr__(self, name: str, value) -> None:
        if name in ("n_power_iterations", "eps", "dim"):
            SpectralNorm.settings_version += 1
        super().__setattr__(name, value)

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The 2-D view of ``weight`` whose spectral norm is taken: ``dim`` first, the rest flattened."""
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.dim()) if d != self.dim))
        return weight.flatten(1)

    @torch.no_grad()
    def power_method(self, weight_mat: torch.Tensor, n_power_iterations: int) -> None:
        """``n_power_iterations`` rounds of ``u ← normalize(W v)``, ``v ← normalize(Wᵀ u)`` with
        ``W = weight_mat``, on ``_u``/``_v`` in place (one ``spectral_norm_power_iter_`` call)."""
        iterate = reference.spectral_norm_power_iter_ if weight_mat.is_complex() else spectral_norm_power_iter_
        iterate([weight_mat.detach()], [self._u], [self._v], n_power_iterations, self.eps)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The normalised weight (same shape and dtype as ``weight``), differentiable in it."""
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        weight_mat = self.matrix(weight)
        if self.training and not self.managed:
            self.power_method(weight_mat, self.n_power_iterations)
        # Clones: u and v change in place at the next step, but this graph needs them as they are.
        u, v = self._u.clone(), self._v.clone()
        if weight.is_complex():
            sigma = reference.spectral_sigma([weight_mat], [u], [v])[0]
        else:  # spectral_sigma's math for one matrix, in plain ops (module docstring)
            sigma = torch.dot(u, torch.mv(weight_mat.to(u.dtype), v))
        if self.coeff is None:
            return weight / sigma
        return weight / torch.clamp(sigma / self.coeff, min=1.0)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Assigning ``module.weight = value`` stores ``value`` itself as the unnormalised weight
        (as torch's parametrization does: the norm is not undone)."""
        return value


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    coeff: float | None = None,
) -> nn.Module:
    """Drop-in for ``torch.nn.utils.parametrizations.spectral_norm``, plus ``coeff``.

    Registers a ``SpectralNorm`` parametrization on ``module.<name>`` and returns ``module``;
    the state dict has torch's keys (``parametrizations.<name>.original``,
    ``parametrizations.<name>.0._u`` / ``._v``), so checkpoints load both ways.

    Args:
        module: the module holding the weight.
        name: the parameter (or buffer) to normalise.
        n_power_iterations, eps, coeff: see ``SpectralNorm``.
        dim: the matrix's row dimension; ``None`` means 1 for ``ConvTranspose1d/2d/3d`` (whose
            weights are ``(in, out, k…)``) and 0 otherwise, as torch's.

    Raises:
        ValueError: ``module`` has no tensor ``name``; and all ``SpectralNorm`` raises. A
        rejected call leaves ``module`` unchanged.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"spectral_norm: module {module} has no parameter or buffer named {name!r}")
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps, coeff))
    return module


class _Launch(NamedTuple):
    """One ``spectral_norm_power_iter`` launch of a ``SpectralNormGroup`` plan: the layers
    ``index`` that share (n_power_iterations, eps, vector dtype), as one table."""

    launch: Callable
    vec_code: int
    table: object  # _C.TensorTable
    n_iters: int
    eps: float
    index: torch.Tensor  # positions of these layers in SpectralNormGroup.layers
    sigmas: torch.Tensor  # the launch's output buffer (vector dtype, on the weights' device)


class SpectralNormGroup:
    """Runs the power iteration of every ``kexue_fast.nn.spectral_norm`` layer of ``model`` with
    one op call per ``refresh()`` (one per distinct (n_power_iterations, eps, vector dtype)
    setting). From construction until ``release()`` the layers no longer iterate in their own
    forward: call ``refresh()`` once per training step, before the forward passes. Layers with a
    1-D weight (no vectors) are left out; the layers must be real-valued (the ops' dtypes).

    The tables of those calls are built and validated once and kept; each ``refresh()`` fetches
    every layer's weight and vectors afresh and re-checks them in O(1) Python calls
    (``kexue_fast._tables.Cache``), rebuilding after ``.to()``, a replaced parameter or buffer, a
    weight assigned through the parametrization, or changed layer settings."""

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
        # The dicts that hold each layer's unnormalised weight and its vectors: refresh() looks
        # the tensors up in them (C-level maps), so replaced ones are seen.
        plists = [module.parametrizations[name] for module, name, _ in self.layers]
        self._weight_dicts = [pl._parameters if "original" in pl._parameters else pl._buffers for pl in plists]
        self._vector_dicts = [sn._buffers for _, _, sn in self.layers] * 2
        self._vector_keys = ["_u"] * len(self.layers) + ["_v"] * len(self.layers)
        self._norms = [sn for _, _, sn in self.layers]
        self._plan = _tables.Cache(self._build_plan)

    @torch.no_grad()
    def refresh(self) -> torch.Tensor:
        """Runs each layer's ``n_power_iterations`` rounds; returns their σ as a float64 CPU
        tensor of shape ``(len(layers),)``, in layer order (detached)."""
        if torch.compiler.is_compiling():
            return self._refresh_by_ops()
        weights = list(map(dict.__getitem__, self._weight_dicts, repeat("original")))
        vectors = list(map(dict.__getitem__, self._vector_dicts, self._vector_keys))  # all u, then all v
        key = [
            _tables.fingerprint(weights, _tables.SHAPE),
            _tables.fingerprint(vectors),
            SpectralNorm.settings_version,
        ]
        plan = self._plan.get(key, weights, vectors)
        if plan is None:
            return self._refresh_by_ops()
        if len(plan) == 1:  # one setting for all layers (the usual case): no scatter
            sigmas = self._launch(plan[0])
        else:
            sigmas = torch.empty(len(self.layers), dtype=torch.float64)
            for launch in plan:
                sigmas[launch.index] = self._launch(launch)
        torch.autograd.graph.increment_version(vectors)
        return sigmas

    @staticmethod
    def _launch(launch: _Launch) -> torch.Tensor:
        """Runs one launch into its σ buffer; returns a float64 CPU copy of the σ. The σ buffer is
        reused by every call: the copy to the CPU waits for the kernel, so no later call, on
        whatever stream, can overwrite it while it is still in use."""
        launch.launch(launch.vec_code, launch.table, launch.n_iters, launch.eps, launch.sigmas.data_ptr())
        return launch.sigmas.to("cpu", torch.float64, copy=True)

    def _build_plan(self, weights, vectors) -> list[_Launch] | None:
        """The launches of refresh(), validated as the op validates its arguments; None where a
        layer's matrix is not its weight's own memory (``dim != 0`` or a non-contiguous weight:
        the op path makes the matrix each time)."""
        if any(sn.dim != 0 for sn in self._norms) or not all(w.is_contiguous() for w in weights):
            return None
        us, vs = vectors[: len(weights)], vectors[len(weights) :]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (sn, u) in enumerate(zip(self._norms, us)):
            groups[(sn.n_power_iterations, sn.eps, u.dtype)].append(i)
        plan = []
        for (n_iters, eps, _), indices in groups.items():
            w, u, v = ([ts[i] for i in indices] for ts in (weights, us, vs))
            vec_dtype, sizes = spectral_ops.validate(w, u, v, n_iters, eps, written=True)
            table, _ = spectral_ops.make_table(w, u, v, sizes, vec_dtype)  # the weights are contiguous: no copies
            spectral_ops.check_disjoint(w, u, v, table, w)
            launch = spectral_ops.launcher("spectral_norm_power_iter", w[0].device)
            index = torch.tensor(indices, dtype=torch.long)
            sigmas = torch.empty(len(indices), dtype=vec_dtype, device=w[0].device)
            plan.append(_Launch(launch, _native.DTYPE_CODES[vec_dtype], table, n_iters, eps, index, sigmas))
        return plan

    def _refresh_by_ops(self) -> torch.Tensor:
        """refresh() through ``torch.ops.kexue.spectral_norm_power_iter_`` (what torch.compile
        and torch.export trace, and the path of layers whose matrix is a copy)."""
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
def conv_spectral_norm(
    weight: torch.Tensor,
    input_shape,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    n_power_iterations: int = 20,
    eps: float = 1e-12,
    x: torch.Tensor | None = None,
):
    """Norm of the operator ``x ↦ conv2d(x, weight, stride, padding, dilation, groups)`` on
    inputs of shape ``input_shape`` (C, H, W), by ``n_power_iterations`` rounds of power
    iteration with its adjoint ``conv_transpose2d``; ``eps`` floors the norms as in
    ``SpectralNorm``. ``weight``: ``(out, C/groups, kH, kW)``, any float dtype and device.

    Returns ``(σ, x)``: a 0-dim tensor of ``weight``'s dtype, and the unit-norm input
    ``(1, C, H, W)`` the iteration reached; pass ``x`` back in to continue the iteration
    (i-ResNet keeps it between steps). Plain PyTorch (no custom op); errors are ``conv2d``'s."""
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if x is None:
        x = torch.randn(1, *input_shape, device=weight.device, dtype=weight.dtype)
        x = F.normalize(x.flatten(), dim=0, eps=eps).view(1, *input_shape)
    out = F.conv2d(x, weight, **conv)

    def adjoint(y):
        # output_padding makes conv_transpose2d return exactly the input shape
        s, p, d = _pair(stride), _pair(padding), _pair(dilation)
        expected = [(y.shape[2 + k] - 1) * s[k] - 2 * p[k] + d[k] * (weight.shape[2 + k] - 1) + 1 for k in range(2)]
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
