"""BatchNorm layers whose γ, β depend on each sample: SELF-MOD (from the noise z) and conditional
BN (from the label), both on ``kexue::modulated_batch_norm`` (docs/gan.md, "Modulated BatchNorm").

Both keep ``nn.BatchNorm2d``'s buffers (``running_mean``, ``running_var``, ``num_batches_tracked``)
and its rules for them (``momentum=None``: cumulative average; ``track_running_stats=False``: batch
statistics always), and load an ``nn.BatchNorm2d`` state dict: its ``weight``/``bias`` become the
layer's neutral modulation, with which the layer computes what the ``nn.BatchNorm2d`` computes.
"""

from __future__ import annotations

import torch
from torch import nn

from kexue_fast.ops.modulated_batch_norm import modulated_batch_norm


class _ModulatedBatchNorm2d(nn.Module):
    """The statistics half of both layers; subclasses give the per-sample γ, β."""

    def __init__(self, num_features: int, eps: float, momentum: float | None, track_running_stats: bool):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._register_load_state_dict_pre_hook(self._from_batch_norm_state)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def normalize(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """``modulated_batch_norm`` of ``x`` ``(N, C, H, W)`` with ``(N, C)`` γ, β, the running
        statistics handled as ``nn.BatchNorm2d`` handles them."""
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or not self.track_running_stats
        return modulated_batch_norm(
            x, gamma.to(x.dtype), beta.to(x.dtype), self.running_mean, self.running_var, use_batch_stats, momentum,
            self.eps,
        )  # fmt: skip

    def neutral_state(self, weight: torch.Tensor, bias: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """The layer's parameters, as state-dict entries under ``prefix``, that make γ ≡ weight and
        β ≡ bias for every sample (each subclass says how)."""
        raise NotImplementedError

    def _from_batch_norm_state(self, state_dict, prefix, *args) -> None:
        """An ``nn.BatchNorm2d`` state dict (none of this layer's parameters, but BatchNorm's
        entries) is rewritten into this layer's: ``weight``/``bias`` (1 and 0 if the BatchNorm had
        no affine) become the neutral modulation; the buffers load as they are."""
        own = [prefix + name for name, _ in self.named_parameters()]
        if any(key in state_dict for key in own) or prefix + "running_mean" not in state_dict:
            return
        ones = torch.ones(self.num_features)
        weight = state_dict.pop(prefix + "weight", ones)
        bias = state_dict.pop(prefix + "bias", torch.zeros_like(ones))
        state_dict.update(self.neutral_state(weight, bias, prefix))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
        )


class SelfModulatedBatchNorm2d(_ModulatedBatchNorm2d):
    """Self-modulated BatchNorm (SELF-MOD; TECHNIQUES.md §3): ``γ(z), β(z)`` from the generator's
    own noise ``z`` through one shared hidden layer, as compare_gan's ``self_modulated_batch_norm``::

        h = ReLU(hidden(z)),   γ = gamma(h),   β = beta(h),   y = γ·x̂ + β

    ``hidden``: ``Linear(z_dim, hidden)``; ``gamma``/``beta``: ``Linear(hidden, num_features)``;
    weights ~ N(0, 0.02), ``gamma.bias`` = 1, the other biases 0 (γ ≈ 1 at the start).
    ``forward(x, z)``: ``x`` ``(N, C, H, W)``, ``z`` ``(N, z_dim)``.
    """

    def __init__(self, num_features: int, z_dim: int, hidden: int = 32, eps: float = 1e-5,
                 momentum: float | None = 0.1, track_running_stats: bool = True):  # fmt: skip
        super().__init__(num_features, eps, momentum, track_running_stats)
        self.hidden = nn.Linear(z_dim, hidden)
        self.gamma = nn.Linear(hidden, num_features)
        self.beta = nn.Linear(hidden, num_features)
        for layer in (self.hidden, self.gamma, self.beta):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        nn.init.ones_(self.gamma.bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(z))
        return self.normalize(x, self.gamma(h), self.beta(h))

    def neutral_state(self, weight, bias, prefix):
        state = {prefix + k: v.detach().clone() for k, v in self.named_parameters()}
        state[prefix + "gamma.weight"] = torch.zeros_like(self.gamma.weight)
        state[prefix + "beta.weight"] = torch.zeros_like(self.beta.weight)
        state[prefix + "gamma.bias"], state[prefix + "beta.bias"] = weight, bias
        return state


class ConditionalBatchNorm2d(_ModulatedBatchNorm2d):
    """Conditional BatchNorm: one learnt ``(γ, β)`` per class, picked by each sample's label::

        y[n] = gamma[label[n]]·x̂[n] + beta[label[n]]

    ``gamma``/``beta``: ``(num_classes, num_features)`` parameters, starting at 1 and 0.
    ``forward(x, label)``: ``x`` ``(N, C, H, W)``, ``label`` ``(N,)`` integer class indices.
    """

    def __init__(self, num_features: int, num_classes: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 track_running_stats: bool = True):  # fmt: skip
        super().__init__(num_features, eps, momentum, track_running_stats)
        self.num_classes = num_classes
        self.gamma = nn.Parameter(torch.ones(num_classes, num_features))
        self.beta = nn.Parameter(torch.zeros(num_classes, num_features))

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.gamma[label], self.beta[label])

    def neutral_state(self, weight, bias, prefix):
        return {
            prefix + "gamma": weight.expand(self.num_classes, -1).clone(),
            prefix + "beta": bias.expand(self.num_classes, -1).clone(),
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_classes={self.num_classes}"
