"""kexue_fast: fast, exact PyTorch ops for the techniques of eight kexue.fm posts.

``import kexue_fast`` registers every ``torch.ops.kexue.*`` op. Where things live:

* ``kexue_fast``: the op functions :func:`cond_layer_norm`, :func:`spectral_norm_power_iter_`,
  :func:`spectral_sigma`, :func:`philox_normal`, :func:`langevin_step_`, :func:`ema_update_`,
  :func:`iresnet_inverse`, :func:`modulated_batch_norm`, and :class:`EMA`;
* :mod:`kexue_fast.ops`: one module per op family, where the ``torch.ops.kexue.*`` ops are defined;
* :mod:`kexue_fast.nn`: modules for a model (conditional LayerNorm, spectral normalisation);
* :mod:`kexue_fast.ebm`: Langevin sampler, replay buffer and loss for energy-based models;
* :mod:`kexue_fast.ema`: the weight EMA;
* :mod:`kexue_fast.gan`: the GAN toolkit (modulated BatchNorm, Cascading Rejection, orthogonality,
  penalties);
* :mod:`kexue_fast.iresnet`: the inverse of an invertible residual block for any branch
  (:func:`~kexue_fast.iresnet.fixed_point_inverse`) and for an MLP branch;
* :mod:`kexue_fast.reference`: pure-PyTorch references of every op, under the same names.

The contract of every op is in the repository's docs/ folder (start at docs/index.md).
"""

from kexue_fast import ebm, ema, gan, iresnet, nn, ops, reference
from kexue_fast.ema import EMA
from kexue_fast.ops.cond_layer_norm import cond_layer_norm
from kexue_fast.ops.ema_update import ema_update_
from kexue_fast.ops.iresnet import iresnet_inverse
from kexue_fast.ops.langevin import langevin_step_, philox_normal
from kexue_fast.ops.modulated_batch_norm import modulated_batch_norm
from kexue_fast.ops.spectral_norm import spectral_norm_power_iter_, spectral_sigma

__version__ = "0.1.0"
__all__ = [
    "EMA", "__version__", "cond_layer_norm", "ebm", "ema", "ema_update_", "gan", "iresnet", "iresnet_inverse",
    "langevin_step_", "modulated_batch_norm", "nn", "ops", "philox_normal", "reference", "spectral_norm_power_iter_",
    "spectral_sigma",
]  # fmt: skip
