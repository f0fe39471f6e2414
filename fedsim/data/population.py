"""Populations: datasets whose clients' data is made on demand, never all at once.

A cross-device federation has millions of phones, each with a few dozen samples; holding
every one's data in memory (a :class:`~fedsim.data.Dataset`) stops at a few million
samples. A :class:`Population` instead makes client ``k``'s training samples from (data
seed, k) whenever a worker asks (``client_samples``), keeps nothing per client, and holds
only the server's test split. fedsim gives each device its own client (the ``natural``
partition), so the run's partition is only a client count
(:class:`partitioners.PopulationPartition`), and the skew measures and partition plots
look at a sample of the clients (:func:`sample_clients`).

A Population answers what the rest of fedsim asks of a Dataset's shape (``name``,
``classes``, ``input_shape``, ``num_classes``, ``x_test``, ``y_test``); it has no
``x_train``: what needs every training sample at once (embedding splits, feature
extractors, FLTrust's root set) refuses a population with a one-line error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

SAMPLE_SEED = 0  # which clients the skew measures look at does not move with the experiment seed


class Population(ABC):
    """Clients whose data is made on demand from (data seed, client id).

    Subclasses set ``name``, ``classes``, ``input_shape``, ``num_clients``, ``x_test`` and
    ``y_test``, and make one client's samples in :meth:`client_samples`.
    """

    name: str
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]
    num_clients: int
    x_test: np.ndarray
    y_test: np.ndarray
    # what a single-domain Dataset says about domains
    domains: tuple[str, ...] = ()
    domain_train: np.ndarray | None = None
    domain_test: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @abstractmethod
    def client_samples(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``client``'s training samples (x float32, y int64), the same on every call."""

    def client_size(self, client: int) -> int:
        """How many training samples ``client`` holds (subclasses may answer faster)."""
        return len(self.client_samples(client)[1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_clients={self.num_clients:,}, test samples={len(self.y_test):,})"


def sample_clients(num_clients: int, count: int) -> np.ndarray:
    """``count`` client ids drawn without replacement from ``num_clients`` (all of them when
    there are no more), sorted; the same for every experiment seed. O(count) in time and
    memory, however many clients there are."""
    if count >= num_clients:
        return np.arange(num_clients, dtype=np.int64)
    return np.sort(np.random.default_rng(SAMPLE_SEED).choice(num_clients, count, replace=False)).astype(np.int64)
