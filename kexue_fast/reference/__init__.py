"""Pure-PyTorch references: written for clarity, not speed. Every kernel is tested against them."""

from kexue_fast.reference.cond_layer_norm import cond_layer_norm
from kexue_fast.reference.ema_update import ema_update_
from kexue_fast.reference.langevin import langevin_step_, philox_normal
from kexue_fast.reference.spectral_norm import spectral_norm_power_iter_, spectral_sigma

__all__ = ["cond_layer_norm", "ema_update_", "langevin_step_", "philox_normal", "spectral_norm_power_iter_", "spectral_sigma"]
