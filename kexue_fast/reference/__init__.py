"""Pure-PyTorch references: written for clarity, not speed. Every kernel is tested against them."""

from kexue_fast.reference.cond_layer_norm import cond_layer_norm

__all__ = ["cond_layer_norm"]
