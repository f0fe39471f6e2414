"""Split an experiment's dataset into its clients' partition (shared by ``fedsim run``
and everything else that needs the partition without training)."""

from __future__ import annotations

import numpy as np

from fedsim.components import make_partitioner
from fedsim.config import Experiment
from fedsim.data import Dataset
from fedsim.errors import UserError
from partitioners import Partition


def split_dataset(experiment: Experiment, dataset: Dataset) -> Partition:
    partitioner = make_partitioner(experiment)
    try:
        partition = partitioner.split(
            dataset.y_train, domains=dataset.domain_train, embeddings=None, seed=experiment.seed
        )
    except ValueError as error:
        raise UserError(f"[partition] {error}") from None
    smallest = int(np.argmin(partition.sizes))
    if partition.sizes[smallest] < 2:
        raise UserError(
            f"[partition] client {smallest} received {partition.sizes[smallest]} samples; every client "
            "needs at least 2 (raise min_size or use fewer clients)"
        )
    return partition
