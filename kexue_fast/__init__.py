"""kexue_fast: fast, exact PyTorch ops for the techniques of eight kexue.fm posts.

``import kexue_fast`` registers every ``torch.ops.kexue.*`` op.
"""

from kexue_fast import ops
from kexue_fast.ema import EMA
from kexue_fast.ops import cond_layer_norm, ema_update_

__version__ = "0.1.0"
__all__ = ["EMA", "cond_layer_norm", "ema_update_", "ops", "__version__"]
