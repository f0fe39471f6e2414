"""FRAug's networks and losses (Chen et al., ICCV 2023; :mod:`strategies.fraug`): the shared
generator G, the local RTNet, the kernel MMD, and the augmentation schedule r_L."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Generator(nn.Module):
    """G: [z, onehot(y)] -> Linear-BN-ReLU-Linear-BN-ReLU -> feature_dim (shared)."""

    def __init__(self, feature_dim: int, latent_dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim + num_classes, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(),
            nn.Linear(feature_dim, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], dim=1))


class RTNet(nn.Module):
    """RTNet: anchor + ([g, onehot(y)] -> Linear-BN-ReLU-Linear-BN) (local); hidden = G's latent size."""

    def __init__(self, feature_dim: int, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(feature_dim + num_classes, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, feature_dim),
            nn.BatchNorm1d(feature_dim),
        )

    def forward(self, g: torch.Tensor, anchor: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return anchor + self.net(torch.cat([g, F.one_hot(y, self.num_classes).to(g.dtype)], dim=1))


def mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Kernel MMD^2 of two samples (the code's ``MMD_loss(kernel_type="gaussian")``): a sum of
    Gaussian kernels exp(-d^2 / b), b = m / kernel_mul^(kernel_num // 2) * kernel_mul^i, with m
    the mean pairwise squared distance over both samples (no gradient through b)."""
    total = torch.cat([x, y])
    n = len(total)
    d2 = (total.unsqueeze(0) - total.unsqueeze(1)).pow(2).sum(2)
    base = (d2.detach().sum() / max(n * n - n, 1) / kernel_mul ** (kernel_num // 2)).clamp_min(1e-12)
    kernel = sum(torch.exp(-d2 / (base * kernel_mul**i)) for i in range(kernel_num))
    k = len(x)
    return kernel[:k, :k].mean() + kernel[k:, k:].mean() - kernel[:k, k:].mean() - kernel[k:, :k].mean()


def distance(kind: str, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """D: ``"mmd"`` (kernel MMD between the samples) or ``"l2"`` (mean squared error to the anchors)."""
    return mmd(x, anchor) if kind == "mmd" else F.mse_loss(x, anchor)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits)."""
    return -(F.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def ratio(server_round: int, total_rounds: int, gamma: float) -> float:
    """r = exp(gamma (t - T)) with t = server_round - 1 (the code's 0-based round)."""
    return math.exp(gamma * (server_round - 1 - total_rounds))


def augmentation_weight(server_round: int, total_rounds: int, gamma: float) -> float:
    """r_L = min(0.5, r): the synthetic embeddings' share of the model's loss."""
    return min(0.5, ratio(server_round, total_rounds, gamma))
