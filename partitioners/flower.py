"""Any fedsim partitioner as a Flower Datasets partitioner, for users of ``FederatedDataset``::

    from flwr_datasets import FederatedDataset
    from partitioners import Dirichlet
    from partitioners.flower import FlowerPartitioner

    partitioner = FlowerPartitioner(Dirichlet(num_clients=100, alpha=0.3), partition_by="label")
    fds = FederatedDataset(dataset="uoft-cs/cifar10", partitioners={"train": partitioner})
    client_data = fds.load_partition(7)

Needs the optional dependency ``flwr-datasets`` (``pip install "fedsim[flower-datasets]"``).
"""

from __future__ import annotations

import numpy as np

from partitioners.base import Partition, Partitioner

try:
    from flwr_datasets.partitioner import Partitioner as FlowerDatasetsPartitioner
except ImportError as error:  # an optional dependency: say how to get it
    raise ImportError('partitioners.flower needs flwr-datasets: pip install "fedsim[flower-datasets]"') from error


class FlowerPartitioner(FlowerDatasetsPartitioner):
    """A fedsim :class:`~partitioners.base.Partitioner` behind Flower Datasets' Partitioner API.

    The whole split is computed once, on the first ``load_partition``, from the dataset's
    ``partition_by`` column (labels of any type; non-integer ones are numbered in sorted
    order), its ``domain_by`` column for domain schemes, and for embedding schemes either
    ``embeddings`` (an array with one row per sample) or its ``embedding_by`` column.

    Parameters
    ----------
    partitioner : Partitioner
        Any fedsim partitioner, e.g. ``Dirichlet(num_clients=10, alpha=0.5)``.
    partition_by : str
        The label column.
    domain_by, embedding_by : str, optional
        Columns holding a domain per sample, and an embedding vector per sample.
    embeddings : array, optional
        Embeddings given directly instead of ``embedding_by``.
    seed : int
        The seed of the split.
    """

    def __init__(
        self,
        partitioner: Partitioner,
        partition_by: str = "label",
        *,
        domain_by: str | None = None,
        embedding_by: str | None = None,
        embeddings: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(partitioner, Partitioner):
            raise TypeError(f"partitioner must be a fedsim Partitioner, got {type(partitioner).__name__}")
        if "domains" in partitioner.requires and domain_by is None:
            raise ValueError(f"{type(partitioner).__name__} splits by domain: give domain_by, the domain column")
        if "embeddings" in partitioner.requires and embedding_by is None and embeddings is None:
            raise ValueError(f"{type(partitioner).__name__} needs embeddings: give embedding_by or embeddings")
        self.partitioner = partitioner
        self.partition_by = partition_by
        self.domain_by = domain_by
        self.embedding_by = embedding_by
        self.embeddings = embeddings
        self.seed = seed
        self._partition: Partition | None = None

    @property
    def num_partitions(self) -> int:
        return self.partitioner.num_clients

    @property
    def partition(self) -> Partition:
        """The fedsim Partition of the assigned dataset (computed on first use)."""
        if self._partition is None:
            labels = _as_ids(self._column(self.partition_by))
            domains = None if self.domain_by is None else _as_ids(self._column(self.domain_by))
            embeddings = self.embeddings
            if embeddings is None and self.embedding_by is not None:
                embeddings = self._column(self.embedding_by).astype(np.float32)
            self._partition = self.partitioner.split(labels, domains=domains, embeddings=embeddings, seed=self.seed)
        return self._partition

    def load_partition(self, partition_id: int):
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition_id must be in [0, {self.num_partitions - 1}], got {partition_id}")
        return self.dataset.select(self.partition[partition_id])

    def _column(self, name: str) -> np.ndarray:
        if name not in self.dataset.column_names:
            raise ValueError(f"the dataset has no column {name!r} (columns: {', '.join(self.dataset.column_names)})")
        return np.asarray(self.dataset.with_format("numpy", columns=[name])[:][name])


def _as_ids(values: np.ndarray) -> np.ndarray:
    """Integer ids as they are; anything else numbered 0.. in sorted order of its values."""
    if np.issubdtype(values.dtype, np.integer) and (values.size == 0 or values.min() >= 0):
        return values.astype(np.int64)
    return np.unique(values, return_inverse=True)[1].astype(np.int64)
