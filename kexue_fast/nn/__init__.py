"""Modules a PyTorch user drops into a model."""

from kexue_fast.nn.cond_layer_norm import AdaLayerNorm, ConditionalLayerNorm, modulate

__all__ = ["AdaLayerNorm", "ConditionalLayerNorm", "modulate"]
