"""Swappable normalisation, and the norm-free convolution that replaces it.

Every model with a ``norm`` option builds its layers through :func:`conv2d`,
:func:`norm2d` and :func:`norm1d`, so one keyword turns the same architecture into its
BatchNorm, GroupNorm, LayerNorm or normalisation-free (FedWon) variant.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Norm = Literal["bn", "gn", "ln", "none"]

# Var(ReLU(z)) = (1 - 1/pi) / 2 for z ~ N(0, 1); this gain restores unit variance
# (Brock et al., 2021). It is 1.71286 exactly; NFNets' code uses a sampled 1.7139.
RELU_GAMMA = math.sqrt(2.0) / math.sqrt(1.0 - 1.0 / math.pi)


class WSConv2d(nn.Conv2d):
    """Convolution with scaled weight standardisation (Brock et al., ICLR 2021; FedWon).

    The weight used is W_hat_i = g_i * gamma * (W_i - mean_i) / (std_i * sqrt(N)), where
    mean and std run over output channel i's fan-in of N = C_in * k_h * k_w weights, g_i
    is a learnable gain initialised to 1, and gamma = sqrt(2 / (1 - 1/pi)) suits ReLU.
    ``eps`` keeps the standard deviation away from zero.
    """

    def __init__(self, *args, gamma: float = RELU_GAMMA, eps: float = 1e-4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.gamma = gamma
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        fan_in = self.weight[0].numel()
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self.gain * self.gamma * (self.weight - mean) / torch.sqrt(var * fan_in + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def _groups(channels: int) -> int:
    """GroupNorm's usual 32 groups, or the largest count that divides the channels."""
    return math.gcd(32, channels)


def conv2d(norm: Norm, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> nn.Conv2d:
    """A plain convolution, or a WSConv2d when the model has no normalisation layers."""
    conv = WSConv2d if norm == "none" else nn.Conv2d
    return conv(in_channels, out_channels, kernel_size, **kwargs)


def norm2d(norm: Norm, channels: int) -> nn.Module:
    """Normalisation after a convolution; LayerNorm is GroupNorm with one group (over C, H, W)."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(_groups(channels), channels)
    if norm == "ln":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def norm1d(norm: Norm, features: int) -> nn.Module:
    """Normalisation after a dense layer."""
    if norm == "bn":
        return nn.BatchNorm1d(features)
    if norm == "gn":
        return nn.GroupNorm(_groups(features), features)
    if norm == "ln":
        return nn.LayerNorm(features)
    return nn.Identity()


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)


def has_normalization(model: nn.Module) -> bool:
    """Whether any layer of the model normalises its activations."""
    return any(isinstance(module, NORM_LAYERS) for module in model.modules())


def batchnorm_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every BatchNorm parameter and buffer (weight, bias, running
    statistics, num_batches_tracked)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys.update(prefix + key for key in module.state_dict())
    return keys
