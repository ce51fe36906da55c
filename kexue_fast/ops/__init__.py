"""The ``torch.ops.kexue.*`` custom ops, one module per op. Importing registers them."""

from kexue_fast.ops.cond_layer_norm import cond_layer_norm
from kexue_fast.ops.ema_update import ema_update_

__all__ = ["cond_layer_norm", "ema_update_"]
