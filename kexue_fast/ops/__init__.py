"""The ``torch.ops.kexue.*`` custom ops, one module per op. Importing registers them."""

from kexue_fast.ops.cond_layer_norm import cond_layer_norm
from kexue_fast.ops.ema_update import ema_update_
from kexue_fast.ops.langevin import langevin_step_, philox_normal
from kexue_fast.ops.spectral_norm import spectral_norm_power_iter_, spectral_sigma

__all__ = ["cond_layer_norm", "ema_update_", "langevin_step_", "philox_normal", "spectral_norm_power_iter_", "spectral_sigma"]
