"""Pure-PyTorch references of every op: written for clarity, not speed. Every kernel is tested against them.

The functions have the names and signatures of the top-level ones (``kexue_fast.reference.cond_layer_norm``
mirrors ``kexue_fast.cond_layer_norm``) and are importable from here; the modules that define them are
:mod:`~kexue_fast.reference.layer_norm`, :mod:`~kexue_fast.reference.batch_norm`,
:mod:`~kexue_fast.reference.spectral_norm`, :mod:`~kexue_fast.reference.iresnet`,
:mod:`~kexue_fast.reference.langevin`, :mod:`~kexue_fast.reference.ema_update`,
:mod:`~kexue_fast.reference.cascading` and :mod:`~kexue_fast.reference.orthogonality` (none shares a name with a
function). The definitions they implement are in docs/.
"""

from kexue_fast.reference import (
    batch_norm,
    cascading,
    ema_update,
    iresnet,
    langevin,
    layer_norm,
    orthogonality,
    spectral_norm,
)
from kexue_fast.reference.batch_norm import modulated_batch_norm
from kexue_fast.reference.cascading import cascading_rejection
from kexue_fast.reference.ema_update import ema_update_
from kexue_fast.reference.iresnet import iresnet_inverse, iresnet_inverse_backward, mlp_residual
from kexue_fast.reference.langevin import langevin_step_, philox_normal
from kexue_fast.reference.layer_norm import cond_layer_norm
from kexue_fast.reference.orthogonality import orthogonal_regularizer, self_orthogonality
from kexue_fast.reference.spectral_norm import spectral_norm_power_iter_, spectral_sigma

__all__ = [
    "batch_norm", "cascading", "cascading_rejection", "cond_layer_norm", "ema_update", "ema_update_", "iresnet",
    "iresnet_inverse", "iresnet_inverse_backward", "langevin", "langevin_step_", "layer_norm", "mlp_residual",
    "modulated_batch_norm", "orthogonal_regularizer", "orthogonality", "philox_normal", "self_orthogonality",
    "spectral_norm", "spectral_norm_power_iter_", "spectral_sigma",
]  # fmt: skip
