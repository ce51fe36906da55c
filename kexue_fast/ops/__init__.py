"""The ``torch.ops.kexue.*`` custom ops, one module per op. Importing registers them."""

from kexue_fast.ops.cond_layer_norm import cond_layer_norm

__all__ = ["cond_layer_norm"]
