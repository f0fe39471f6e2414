"""Adaptive gradient clipping (Brock et al., "High-Performance Large-Scale Image Recognition
Without Normalization", ICML 2021), which a client trainer may declare.

A trainer declares it with :meth:`fedsim.trainer.ClientTrainer.gradient_clipping` (FedWon's
does) instead of writing it into its step, so that the sequential loop and the vectorised
one (:mod:`fedsim.vectorize`, which clips K clients at once) apply the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

AGC_EPS = 1e-3  # the floor on a weight's norm, so zero-initialised units can still move


def unitwise_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Norm per output unit: over each row of a dense weight and each output channel's
    fan-in of a conv weight (WSConv's per-channel gain, shaped (C, 1, 1, 1), is thus one
    unit per channel); a vector or a scalar (a bias) counts as one unit."""
    if tensor.ndim <= 1:
        return torch.linalg.vector_norm(tensor)
    return torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.ndim)), keepdim=True)


@torch.no_grad()
def agc_scale(max_norm: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """AGC's factor per unit: max_norm / ||G_i|| where ||G_i|| exceeds max_norm, else 1.
    Shared with the vectorised trainers, which must clip as this does."""
    return torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-12), torch.ones_like(grad_norm))


def adaptive_clip_(parameters: Iterable[nn.Parameter], clip_lambda: float, eps: float = AGC_EPS) -> None:
    """Adaptive gradient clipping, in place: for each unit i, if
    ||G_i|| / max(||W_i||, eps) > lambda, then G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i."""
    for parameter in parameters:
        if parameter.grad is None:
            continue
        max_norm = clip_lambda * unitwise_norm(parameter).clamp_min(eps)
        grad_norm = unitwise_norm(parameter.grad)
        parameter.grad.mul_(agc_scale(max_norm, grad_norm))


def classifier(model: nn.Module) -> nn.Module:
    """The layer AGC leaves alone, as NFNets do: ``model.head`` (every fedsim model has
    one), else the model's last ``nn.Linear``, else none (an empty module)."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return head
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else nn.Module()


@dataclass(frozen=True)
class AdaptiveClipping:
    """Adaptive gradient clipping at ``threshold`` (lambda) on every parameter but the
    classifier's (:func:`classifier`); ``metric`` names the train metric that reports the
    threshold applied (None: none)."""

    threshold: float
    metric: str | None = None
    eps: float = AGC_EPS

    @staticmethod
    def clipped(model: nn.Module) -> list[nn.Parameter]:
        """The parameters it clips: all but the classifier's."""
        head = {id(p) for p in classifier(model).parameters()}
        return [p for p in model.parameters() if id(p) not in head]

    def apply(self, model: nn.Module) -> None:
        """Clip the gradients of ``model``'s parameters, in place."""
        adaptive_clip_(self.clipped(model), self.threshold, self.eps)
