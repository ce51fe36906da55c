"""Pure-PyTorch references: written for clarity, not speed. Every kernel is tested against them."""

from kexue_fast.reference.cond_layer_norm import cond_layer_norm
from kexue_fast.reference.ema_update import ema_update_

__all__ = ["cond_layer_norm", "ema_update_"]
