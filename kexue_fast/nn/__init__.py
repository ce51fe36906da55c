"""Modules a PyTorch user drops into a model."""

from kexue_fast.nn.cond_layer_norm import AdaLayerNorm, ConditionalLayerNorm, modulate
from kexue_fast.nn.spectral import SpectralNorm, SpectralNormGroup, conv_spectral_norm, spectral_norm

__all__ = [
    "AdaLayerNorm", "ConditionalLayerNorm", "SpectralNorm", "SpectralNormGroup",
    "conv_spectral_norm", "modulate", "spectral_norm",
]  # fmt: skip
