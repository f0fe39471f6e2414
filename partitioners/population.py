"""The partition of a population (:mod:`fedsim.data.population`): one client per member,
whose data the member makes on demand, so the partition is only a count of clients.

It keeps nothing per client: no index arrays and no labels. What needs every client's
labels at once (``sizes``, ``label_matrix``, ``skew``) says so; fedsim measures a
population's skew on a sample of its clients instead (:func:`fedsim.splitting.describe_partition`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from fedsim.atomic import write_npz
from fedsim.checks import check_integer
from partitioners.base import ClientView, Partition

NO_INDICES = "a population's clients have no indices into a training set; ask the population for a client's data"


class PopulationPartition(Partition):
    """``num_clients`` clients, client k being member k of a population; nothing more is kept.

    A 10,000,000-client partition is two integers in memory and on disk.
    """

    file_marker = "population_clients"

    def __init__(self, num_clients: int, num_classes: int) -> None:
        check_integer("num_clients", num_clients, minimum=1)
        check_integer("num_classes", num_classes, minimum=1)
        self._num_clients = int(num_clients)
        self.num_classes = int(num_classes)
        self.labels = np.zeros(0, np.int64)
        self.client_indices = ()
        self.groups = {}

    @property
    def num_clients(self) -> int:
        return self._num_clients

    @property
    def sizes(self) -> np.ndarray:
        raise TypeError(
            "a population's partition keeps no client sizes (its clients' data is made on demand); "
            "ask the population for client_size(k)"
        )

    def __getitem__(self, client: int) -> np.ndarray:
        raise TypeError(NO_INDICES)

    def view_at(self, client: int, slot: int) -> ClientView:
        raise TypeError(NO_INDICES)

    def group_matrix(self, group_ids: np.ndarray, num_groups: int | None = None) -> np.ndarray:
        raise TypeError("a population's partition keeps no labels; measure a sample of its clients")

    def assigned(self) -> np.ndarray:
        raise TypeError(NO_INDICES)

    def save(self, path: str | os.PathLike[str]) -> None:
        write_npz(
            path,
            {self.file_marker: np.array(self._num_clients, np.int64), "num_classes": np.array(self.num_classes)},
        )

    @classmethod
    def from_npz(cls, data: Mapping[str, np.ndarray]) -> PopulationPartition:
        return cls(int(data[cls.file_marker]), int(data["num_classes"]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return (
            isinstance(other, PopulationPartition)
            and self.num_clients == other.num_clients
            and self.num_classes == other.num_classes
        )

    def __repr__(self) -> str:
        return f"PopulationPartition(num_clients={self.num_clients:,}, num_classes={self.num_classes})"
