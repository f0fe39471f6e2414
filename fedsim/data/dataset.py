"""The in-memory dataset every loader returns, and the per-client view built from it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsim.data.cache import cache_key, cached_arrays

SPLIT_SEED = 0  # the train/test split of a dataset never moves with the experiment seed


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays held in memory.

    ``x_*`` are float32 arrays of shape (N, C, H, W) or (N, D); ``y_*`` are int64 labels.
    ``domain_*`` hold a domain id per sample for multi-domain data, else None.
    ``group_train`` holds, for datasets made of natural groups (the devices of a
    federated benchmark, writers, speakers), an int64 group id per training sample, else
    None; the ``natural`` partitioner gives each client one group.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    domains: tuple[str, ...] = ()
    domain_train: np.ndarray | None = None
    domain_test: np.ndarray | None = None
    group_train: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class ClientData:
    """One client's data: its local training split and its local held-out split.

    Under a drift stream (:mod:`partitioners.drift`) it is the client's data in one time
    slot: ``slot``, and the view's main ``concept`` and ``transform`` ids; ``earlier(s)``
    gives the same client's data in an earlier slot ``s`` (what a method that keeps
    history, such as FedDAA, looks back at). A static partition has one slot, 0.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    domain_test: np.ndarray | None = field(default=None)
    slot: int = 0
    concept: int = 0
    transform: int = 0
    earlier: Callable[[int], ClientData] | None = field(default=None, repr=False, compare=False)

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    def at_slot(self, slot: int) -> ClientData:
        """This client's data in ``slot`` (<= its own): itself, or what ``earlier`` gives."""
        if slot == self.slot:
            return self
        if self.earlier is None or not 0 <= slot < self.slot:
            raise ValueError(f"slot {slot} is not an earlier slot of this client's data (slot {self.slot})")
        return self.earlier(slot)


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, domain: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Stratified train/test split of (x, y[, domain]), as ``(x_train, x_test, y_train,
    y_test[, domain_train, domain_test])``; falls back to a plain random split when a class
    (or class-domain pair) is too rare to stratify, or a side would be too small to hold
    every stratum.

    scikit-learn's ``train_test_split`` draws the split; its indices are cached on disk,
    keyed by the labels, so that a run on a dataset seen before does not import
    scikit-learn (a second or more) for it.
    """
    strata = y if domain is None else y * (int(domain.max()) + 1) + domain
    key = cache_key(hashlib.sha256(np.ascontiguousarray(strata).tobytes()).hexdigest(), test_fraction, seed)
    split = cached_arrays(f"splits/{key}", lambda: _split_indices(strata, test_fraction, seed))
    arrays = [x, y] if domain is None else [x, y, domain]
    return tuple(part for array in arrays for part in (array[split["train"]], array[split["test"]]))


def _split_indices(strata: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, counts = np.unique(strata, return_counts=True)
    n_test = math.ceil(test_fraction * len(strata))  # how scikit-learn rounds a fractional test_size
    roomy = min(n_test, len(strata) - n_test) >= len(counts)
    stratify = strata if counts.min() >= 2 and roomy else None
    train, test = train_test_split(
        np.arange(len(strata)), test_size=test_fraction, random_state=seed, stratify=stratify
    )
    return {"train": train, "test": test}


def client_view(dataset: Dataset, indices: np.ndarray, test_fraction: float, seed: int) -> ClientData:
    """Split a client's training indices into its local train and held-out test data."""
    x, y = dataset.x_train[indices], dataset.y_train[indices]
    domain = None if dataset.domain_train is None else dataset.domain_train[indices]
    return local_split(x, y, domain, test_fraction, seed)


def local_split(
    x: np.ndarray, y: np.ndarray, domain: np.ndarray | None, test_fraction: float, seed: int, **slot_info: Any
) -> ClientData:
    """Split a client's samples into its local train and held-out test data."""
    n_test = local_test_size(len(y), test_fraction)
    if n_test == 0:
        return ClientData(x, y, x[:0], y[:0], None if domain is None else domain[:0], **slot_info)
    if _stratifiable(y, n_test):
        from sklearn.model_selection import train_test_split

        train, test = train_test_split(np.arange(len(y)), test_size=n_test, random_state=seed, stratify=y)
    else:
        order = np.random.default_rng(seed).permutation(len(y))
        train, test = order[n_test:], order[:n_test]
    return ClientData(x[train], y[train], x[test], y[test], None if domain is None else domain[test], **slot_info)


def local_test_size(n: int, test_fraction: float) -> int:
    """How many of a client's ``n`` samples :func:`local_split` holds out: a share
    ``test_fraction``, at least one and leaving one to train on (none below 2 samples)."""
    if test_fraction <= 0 or n < 2:
        return 0
    return min(max(1, int(round(test_fraction * n))), n - 1)


def _stratifiable(y: np.ndarray, n_test: int) -> bool:
    classes, counts = np.unique(y, return_counts=True)
    return counts.min() >= 2 and n_test >= len(classes) and len(y) - n_test >= len(classes)
