"""The feature-skew papers' networks, each with a swappable ``norm``.

``norm = "bn" | "gn" | "ln" | "none"``; "none" removes every normalisation layer and
turns each convolution into a :class:`~fedsim.models.norm.WSConv2d` (FedWon's variant).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from fedsim.models.norm import Norm, conv2d, norm1d, norm2d
from fedsim.models.small import image_shape


class DigitCNN(nn.Module):
    """FedBN's digit CNN (Li et al., ICLR 2021): three 5x5 convs 64-64-128, dense 2048-512.

    Every conv and hidden dense layer is followed by the chosen normalisation; at 28x28
    the flattened feature has the paper's 6272 dimensions.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, norm: Norm = "bn") -> None:
        super().__init__()
        channels, height, width = image_shape("digitcnn", input_shape)

        def block(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
            layers = [conv2d(norm, c_in, c_out, 5, padding=2), norm2d(norm, c_out), nn.ReLU()]
            return layers + [nn.MaxPool2d(2)] if pool else layers

        flat = 128 * (height // 4) * (width // 4)
        self.features = nn.Sequential(
            *block(channels, 64, pool=True),
            *block(64, 64, pool=True),
            *block(64, 128, pool=False),
            nn.Flatten(),
            nn.Linear(flat, 2048),
            norm1d(norm, 2048),
            nn.ReLU(),
            nn.Linear(2048, 512),
            norm1d(norm, 512),
            nn.ReLU(),
        )
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut. Without normalisation the residual branch is scaled
    by a learnable scalar that starts at ``residual_gain``."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: Norm, residual_gain: float = 1.0) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            conv2d(norm, c_in, c_out, 3, stride=stride, padding=1, bias=norm == "none"),
            norm2d(norm, c_out),
            nn.ReLU(),
            conv2d(norm, c_out, c_out, 3, padding=1, bias=norm == "none"),
            norm2d(norm, c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                conv2d(norm, c_in, c_out, 1, stride=stride, bias=norm == "none"), norm2d(norm, c_out)
            )
        self.skip_gain = nn.Parameter(torch.tensor(float(residual_gain))) if norm == "none" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.branch(x)
        if self.skip_gain is not None:
            branch = branch * self.skip_gain
        return torch.relu(branch + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet for 28-32 px inputs (He et al., 2016): a 3x3 stem, three stages
    of basic blocks at widths w, 2w, 4w, global average pooling.

    ``blocks`` per stage: 1 gives ResNet-8, 3 gives ResNet-20. With ``norm = "none"``
    (FedWon) every residual branch is scaled by a learnable scalar starting at
    ``residual_gain``. SkipInit (De & Smith, 2020) starts it at 0, so that depth cannot blow
    up the untrained signal, but then the branches open far too slowly for federated
    budgets: trained centrally on 2,400 digits-domains images (batch 4, SGD lr 0.01, AGC
    0.32, 1,500 steps), ResNet-8 reached 0.100 test accuracy from 0, 0.398 from 1, and 0.288
    with BatchNorm. Hence 1 by default; lower it for deep variants.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        norm: Norm = "bn",
        blocks: Annotated[int, Field(ge=1)] = 1,
        width: Annotated[int, Field(ge=1)] = 16,
        residual_gain: Annotated[float, Field(ge=0)] = 1.0,
    ) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = [
            conv2d(norm, image_shape("resnet", input_shape)[0], width, 3, padding=1, bias=norm == "none"),
            norm2d(norm, width),
            nn.ReLU(),
        ]
        c_in = width
        for stage, c_out in enumerate(widths):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(c_in, c_out, stride, norm, residual_gain))
                c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class AlexNet(nn.Module):
    """The AlexNet of FedBN's Office-Caltech-10 experiments (Krizhevsky et al., 2012, with a
    normalisation after every conv and hidden dense layer), for images of 64 px or more.

    Adaptive pooling to 6x6 lets it take any input size; the paper used 256 px.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, norm: Norm = "bn") -> None:
        super().__init__()

        def block(c_in: int, c_out: int, kernel: int, pool: bool, **kwargs) -> list[nn.Module]:
            layers = [conv2d(norm, c_in, c_out, kernel, **kwargs), norm2d(norm, c_out), nn.ReLU()]
            return layers + [nn.MaxPool2d(3, 2)] if pool else layers

        self.features = nn.Sequential(
            *block(image_shape("alexnet", input_shape)[0], 64, 11, pool=True, stride=4, padding=2),
            *block(64, 192, 5, pool=True, padding=2),
            *block(192, 384, 3, pool=False, padding=1),
            *block(384, 256, 3, pool=False, padding=1),
            *block(256, 256, 3, pool=True, padding=1),
            nn.AdaptiveAvgPool2d((6, 6)),
            nn.Flatten(),
            nn.Linear(256 * 6 * 6, 4096),
            norm1d(norm, 4096),
            nn.ReLU(),
            nn.Linear(4096, 4096),
            norm1d(norm, 4096),
            nn.ReLU(),
        )
        self.head = nn.Linear(4096, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
