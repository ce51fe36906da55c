"""The MLP residual branch of an invertible residual block, spectrally normalised (docs/iresnet_flow.md)."""

from __future__ import annotations

import numbers
from itertools import pairwise

from torch import nn

from kexue_fast.nn.spectral import spectral_norm
from kexue_fast.reference.iresnet import ACTIVATIONS, mlp_residual


class MLPBranch(nn.Module):
    """``g(x) = W_L a(… a(W_1 x + b_1) …) + b_L`` (:func:`~kexue_fast.iresnet.mlp_residual`) with
    ``n_layers`` linear layers ``dim → hidden → … → hidden → dim``, each weight under
    ``kexue_fast.nn.spectral_norm(coeff=coeff)`` (``W / max(1, σ/coeff)``), so
    ``Lip(g) ≤ coeff^n_layers < 1`` once the power iteration has converged.

    What the fused kernels need is :meth:`mlp_parameters`; :func:`~kexue_fast.iresnet.iresnet_inverse`
    and :func:`~kexue_fast.iresnet.residual_logdet` use it (the log-det's MLP fast path).

    Args:
        dim: the size of a row (input and output).
        hidden: the width of the hidden layers.
        n_layers: the number of linear layers (``>= 1``; 1 is a single ``dim × dim`` layer).
        activation: one of ``elu``, ``relu``, ``tanh``, ``softplus``, ``lipswish``.
        coeff: the Lipschitz bound of each layer, in ``(0, 1)`` for an invertible block.
        n_power_iterations: power-iteration rounds per training-mode forward (or per
            ``SpectralNormGroup.refresh()``).
    """

    def __init__(self, dim: int, hidden: int, n_layers: int = 3, activation: str = "elu", coeff: float = 0.9,
                 n_power_iterations: int = 5):  # fmt: skip
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("n_layers", n_layers)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MLPBranch: {name} must be an int >= 1, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLPBranch: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not (isinstance(coeff, numbers.Real) and 0 < coeff < 1):
            raise ValueError(f"MLPBranch: coeff must be a number in (0, 1) for an invertible block, got {coeff!r}")
        widths = [dim] + [hidden] * (n_layers - 1) + [dim]
        self.activation = activation
        self.layers = nn.ModuleList(
            spectral_norm(nn.Linear(n_in, n_out), n_power_iterations=n_power_iterations, coeff=coeff)
            for n_in, n_out in pairwise(widths)
        )

    def mlp_parameters(self):
        """``(weights, biases, activation)``: the normalised weights (one power iteration each in
        training mode, unless a ``SpectralNormGroup`` runs them) and the biases, as the ops take them."""
        weights = [layer.weight for layer in self.layers]
        return weights, [layer.bias for layer in self.layers], self.activation

    def forward(self, x):
        """The branch's output ``g(x)`` for a batch ``x`` of shape ``(B, dim)``."""
        return mlp_residual(x, *self.mlp_parameters())

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
