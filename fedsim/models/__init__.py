"""Models: a registry of ``nn.Module`` classes built from (input_shape, num_classes, **options).

Every model splits into ``features`` (the body) and ``head`` (the final linear layer),
so methods that work on the penultimate representation (FRAug, GGEUR, embedding
partitioners) find it in one place.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedsim.models.domain import AlexNet, DigitCNN, ResNet
from fedsim.models.small import MLP, LeNet, Linear
from fedsim.registry import build, lookup

MODELS: dict[str, type[nn.Module]] = {
    "linear": Linear,
    "mlp": MLP,
    "lenet": LeNet,
    "digitcnn": DigitCNN,
    "resnet": ResNet,
    "alexnet": AlexNet,
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """Instantiate a registered model for data of ``input_shape`` with ``num_classes``."""
    model_cls = lookup(MODELS, name, "model")
    return build(model_cls, options, "[model]", input_shape=tuple(input_shape), num_classes=num_classes)


__all__ = ["MODELS", "build_model", "AlexNet", "DigitCNN", "LeNet", "Linear", "MLP", "ResNet"]
