"""Split an experiment's dataset into its clients' partition (shared by ``fedsim run``,
``fedsim partition`` and everything else that needs the partition without training)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedsim.components import make_partitioner
from fedsim.config import Experiment
from fedsim.data import Dataset
from fedsim.errors import UserError
from partitioners import Partition, Partitioner


def split_dataset(experiment: Experiment, dataset: Dataset) -> Partition:
    partitioner = make_partitioner(experiment)
    inputs = partition_inputs(experiment, dataset, partitioner)
    try:
        partition = partitioner.split(dataset.y_train, **inputs, seed=experiment.seed)
    except ValueError as error:
        raise UserError(f"[partition] {error}") from None
    smallest = int(np.argmin(partition.sizes))
    if partition.sizes[smallest] < 2:
        raise UserError(
            f"[partition] client {smallest} received {partition.sizes[smallest]} samples; every client "
            "needs at least 2 (raise min_size or use fewer clients)"
        )
    return partition


def partition_inputs(experiment: Experiment, dataset: Dataset, partitioner: Partitioner) -> dict[str, Any]:
    """The per-sample inputs besides labels that ``partitioner.requires``: the dataset's
    domains, and embeddings made by the partitioner's embedder (pixels by default)."""
    if "domains" in partitioner.requires and dataset.domain_train is None:
        raise UserError(
            f"[partition] name = {experiment.partition.name!r} splits by domain, but dataset "
            f"{dataset.name!r} has no domains; choose a multi-domain dataset (`fedsim list` shows them)"
        )
    embeddings = None
    if "embeddings" in partitioner.requires:
        embeddings = dataset_embeddings(
            experiment,
            dataset,
            getattr(partitioner, "embedder", "pixels"),
            getattr(partitioner, "embedder_options", None),
        )
    return {"domains": dataset.domain_train, "embeddings": embeddings}


def dataset_embeddings(
    experiment: Experiment, dataset: Dataset, embedder: str = "pixels", options: Mapping[str, Any] | None = None
) -> np.ndarray:
    """One embedding row per training sample, cached by dataset, embedder, options and seed."""
    from partitioners.embedders import embed

    try:
        return embed(
            dataset.x_train,
            dataset.y_train,
            embedder=embedder,
            options=options,
            seed=experiment.seed,
            dataset_key=[dataset.name, experiment.dataset.params],
        )
    except ValueError as error:
        raise UserError(f"[partition] {error}") from None
