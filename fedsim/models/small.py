"""Small models that fit the embedded datasets (8x8 digits, 28x28 MNIST)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from fedsim.models.norm import Norm, norm1d

Width = Annotated[int, Field(ge=1)]
"""A layer's width (units or channels): at least 1, as PyTorch cannot build an empty layer."""


def image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of image inputs, or a ValueError that names the fix."""
    if len(input_shape) != 3:
        raise ValueError(
            f"{model!r} takes images (channels, height, width), but the inputs have shape {tuple(input_shape)}; "
            "use name = 'mlp' or 'linear' for flat inputs such as [features]"
        )
    return input_shape


class Linear(nn.Module):
    """A linear classifier on flat inputs: the head alone, for features a frozen extractor
    made (``[features]``; GGEUR's classifier and its linear-probe baselines)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Flatten()
        self.head = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs; ``norm`` ("none", "bn", "gn", "ln")
    follows every hidden layer with that normalisation (FedBN and FRAug keep BatchNorm
    on the clients, on frozen features too)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: tuple[Width, ...] = (200, 200),
        norm: Norm = "none",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += (
                [nn.Linear(width, size), nn.ReLU()]
                if norm == "none"
                else [
                    nn.Linear(width, size),
                    norm1d(norm, size),
                    nn.ReLU(),
                ]
            )
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LeNet(nn.Module):
    """A LeNet-5-style CNN: two 5x5 conv + max-pool stages, then two hidden dense layers.

    Convolutions are padded so that the same network fits 8x8 and 28x28 inputs.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: tuple[Width, Width] = (6, 16),
        hidden: tuple[Width, Width] = (120, 84),
    ) -> None:
        super().__init__()
        in_channels, height, width = image_shape("lenet", input_shape)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(channels[1] * (height // 4) * (width // 4), hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
