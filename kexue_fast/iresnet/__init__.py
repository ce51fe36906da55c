r"""Invertible residual networks (i-ResNet, Residual Flows; docs/iresnet.md, docs/iresnet_flow.md).

A block ``y = x + g(x)`` whose branch ``g`` is a contraction is a bijection. This package gives
what such a block needs, for any branch ``g`` (generic, through autograd) and fast for MLP
branches:

* the inverse: :func:`fixed_point_inverse` (any ``g``), :func:`iresnet_inverse` (an MLP, one
  native kernel) — :mod:`kexue_fast.iresnet.inverse`;
* the log-determinant ``ln det(I + J_g(x))``: :func:`logdet` and :func:`residual_logdet` (the
  power series with Hutchinson probes and the Neumann-series gradient, the Russian-roulette
  estimator, the exact value) — :mod:`kexue_fast.iresnet.logdet`;
* the modules: :class:`MLPBranch` (a spectrally normalised MLP branch), and the flow's
  :class:`InvertibleResBlock`, :class:`ActNorm`, :class:`IResNetFlow` — :mod:`kexue_fast.iresnet.flow`.
"""

from kexue_fast.iresnet.branch import MLPBranch
from kexue_fast.iresnet.flow import ActNorm, InvertibleResBlock, IResNetFlow
from kexue_fast.iresnet.inverse import NOT_CONVERGED, fixed_point_inverse, iresnet_inverse, mlp_residual
from kexue_fast.iresnet.logdet import logdet, residual_logdet

__all__ = [
    "NOT_CONVERGED", "ActNorm", "IResNetFlow", "InvertibleResBlock", "MLPBranch", "fixed_point_inverse",
    "iresnet_inverse", "logdet", "mlp_residual", "residual_logdet",
]  # fmt: skip
