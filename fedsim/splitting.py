"""Split an experiment's dataset into its clients' partition, and describe the split (shared
by ``fedsim run``, ``fedsim partition`` and everything else that needs the partition)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedsim import atomic
from fedsim.build import make_partitioner
from fedsim.config import Experiment
from fedsim.data import Dataset
from fedsim.data.population import Population, sample_clients
from fedsim.errors import UserError
from fedsim.notices import note
from partitioners import DriftStream, Partition, Partitioner, PopulationPartition
from partitioners.base import ClientIndices
from partitioners.drift import EVENT_NAMES
from partitioners.embedders import embed
from partitioners.skew import SkewReport

# A population's skew measures and partition plots look at this many of its clients, and so
# do those of a partition of more than SKEW_ALL_CLIENTS_UP_TO clients.
SKEW_SAMPLE_CLIENTS = 1000
SKEW_ALL_CLIENTS_UP_TO = 100_000


def split_dataset(experiment: Experiment, dataset: Dataset | Population) -> Partition:
    if isinstance(dataset, Population):
        return population_partition(experiment, dataset)
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


def population_partition(experiment: Experiment, population: Population) -> PopulationPartition:
    """One client per member of a lazy population: only the natural partition applies."""
    name, params = experiment.partition.name, experiment.partition.params
    if name != "natural":
        raise UserError(
            f"[partition] name = {name!r} needs every training label at once, which a lazy population never "
            'holds; use name = "natural" (one client per device) or set [dataset] lazy = false'
        )
    wanted = params.get("num_clients")
    if wanted is not None and wanted != population.num_clients:
        raise UserError(
            f"[partition] num_clients = {wanted} must equal the population's {population.num_clients} devices; "
            f"set num_clients = {population.num_clients} or leave it out"
        )
    return PopulationPartition(population.num_clients, population.num_classes)


def sampled_partition(population: Population, count: int = SKEW_SAMPLE_CLIENTS) -> tuple[Partition, np.ndarray]:
    """A sample of ``count`` of a population's clients as an ordinary partition of their
    labels (client i of it is population client ``ids[i]``), and ``ids``."""
    ids = sample_clients(population.num_clients, count)
    labels = [population.client_samples(int(client))[1] for client in ids]
    offsets = np.concatenate([[0], np.cumsum([len(y) for y in labels], dtype=np.int64)])
    indices = ClientIndices(np.arange(offsets[-1], dtype=np.int64), offsets)
    return Partition(indices, np.concatenate(labels), population.num_classes), ids


def partition_inputs(experiment: Experiment, dataset: Dataset, partitioner: Partitioner) -> dict[str, Any]:
    """The per-sample inputs besides labels that ``partitioner.requires``: the dataset's
    domains and natural groups, and embeddings made by the partitioner's embedder (pixels
    by default)."""
    if "domains" in partitioner.requires and dataset.domain_train is None:
        raise UserError(
            f"[partition] name = {experiment.partition.name!r} splits by domain, but dataset "
            f"{dataset.name!r} has no domains; choose a multi-domain dataset (`fedsim list` shows them)"
        )
    if "groups" in partitioner.requires and dataset.group_train is None:
        raise UserError(
            f"[partition] name = {experiment.partition.name!r} gives each client one natural group, but dataset "
            f"{dataset.name!r} has none; choose a dataset of devices such as 'synthetic'"
        )
    embeddings = None
    if "embeddings" in partitioner.requires:
        embeddings = dataset_embeddings(
            experiment,
            dataset,
            getattr(partitioner, "embedder", "pixels"),
            getattr(partitioner, "embedder_options", None),
        )
    return {"domains": dataset.domain_train, "embeddings": embeddings, "groups": dataset.group_train}


def dataset_embeddings(
    experiment: Experiment, dataset: Dataset, embedder: str = "pixels", options: Mapping[str, Any] | None = None
) -> np.ndarray:
    """One embedding row per training sample, cached by dataset, embedder, options and seed."""
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


def describe_partition(
    experiment: Experiment, dataset: Dataset, partition: Partition, out: Path, labels_plot: str = "partition_labels.png"
) -> SkewReport:
    """Measure the partition's skew and write ``out/skew.json`` and the heatmaps under
    ``out/plots``: clients x classes (``labels_plot``), and clients x clusters or domains
    where the split has them. Embedding and domain splits also get the feature-skew
    distances, on the embedding split's own embeddings or else on pixel embeddings. A drift
    stream (whose skew is its first slot's) adds a ``stream`` section to skew.json and
    the clients x slots maps of :func:`describe_stream`. A lazy population, and a partition
    of more than :data:`SKEW_ALL_CLIENTS_UP_TO` clients, are measured and drawn on
    :data:`SKEW_SAMPLE_CLIENTS` of their clients, said in skew.json's ``sample`` section,
    the plots' titles and a note."""
    # lazy: matplotlib takes a second to import, paid only when a plot is drawn
    from fedsim.plots import plot_heatmap

    sampled, registered = None, partition.num_clients
    if isinstance(partition, PopulationPartition):  # its clients' labels exist only when made
        partition, sampled = sampled_partition(dataset)
    elif registered > SKEW_ALL_CLIENTS_UP_TO and not isinstance(partition, DriftStream):
        sampled = sample_clients(registered, SKEW_SAMPLE_CLIENTS)
        partition = Partition(
            [partition[int(client)] for client in sampled], partition.labels, partition.num_classes, partition.groups
        )
    embeddings = None
    if "cluster" in partition.groups or dataset.domain_train is not None:
        partitioner = make_partitioner(experiment)
        embedder = getattr(partitioner, "embedder", "pixels")
        embeddings = dataset_embeddings(experiment, dataset, embedder, getattr(partitioner, "embedder_options", None))
    report = partition.skew(embeddings)
    described = report.to_dict()
    if isinstance(partition, DriftStream):
        described["stream"] = partition.summary()
    of = ""
    if sampled is not None:
        described["sample"] = sample_section(sampled, registered)
        of = f", {said_sampled(sampled, registered)}"
    atomic.write_text(out / "skew.json", json.dumps(described, indent=2) + "\n")

    name = experiment.partition.name
    plot_heatmap(
        partition.label_matrix(),
        out / "plots" / labels_plot,
        f"{name}: samples per client and class{of} (mean Hellinger {report.summary['mean_hellinger']:.3f})",
        "class",
        dataset.classes,
    )
    if "cluster" in partition.groups:
        clusters = partition.groups["cluster"]
        plot_heatmap(
            partition.group_matrix(clusters, int(clusters.max()) + 1),
            out / "plots" / "partition_clusters.png",
            f"{name}: samples per client and embedding cluster{of}",
            "cluster",
            [str(c) for c in range(int(clusters.max()) + 1)],
        )
    if dataset.domain_train is not None:
        num_domains = int(dataset.domain_train.max()) + 1
        names = dataset.domains if len(dataset.domains) == num_domains else [str(d) for d in range(num_domains)]
        plot_heatmap(
            partition.group_matrix(dataset.domain_train, num_domains),
            out / "plots" / "partition_domains.png",
            f"{name}: samples per client and domain{of}",
            "domain",
            names,
        )
    if isinstance(partition, DriftStream):
        describe_stream(name, partition, out / "plots")
    return report


def sample_section(ids: np.ndarray, registered: int) -> dict:
    """skew.json's account of a sample of the clients (the measures' rows are ``ids``'
    clients, in order); a note says that the measures cover a sample."""
    if len(ids) < registered:
        note(
            f"skew measures and partition plots cover a sample of {len(ids):,} of {registered:,} clients "
            "(skew.json's sample section)"
        )
    return {"clients_measured": len(ids), "clients_registered": registered, "client_ids": ids.tolist()}


def said_sampled(ids: np.ndarray, registered: int) -> str:
    """How a plot's title says it shows a sample of the clients."""
    return f"a sample of {len(ids):,} of {registered:,} clients"


# Drift events by bitmask (1 real, 2 virtual, 4 label): no drift pale, each kind its own hue.
EVENT_COLOURS = {
    0: "#eeeeee",
    1: "#d62728",
    2: "#1f77b4",
    3: "#9467bd",
    4: "#2ca02c",
    5: "#ff7f0e",
    6: "#17becf",
    7: "#8c564b",
}


def describe_stream(name: str, stream: DriftStream, plots: Path) -> None:
    """Draw a drift stream: clients x slots maps of each view's main concept
    (``stream_concepts.png``) and of the drift events into each slot (``stream_events.png``)."""
    # lazy: matplotlib takes a second to import, paid only when a plot is drawn
    from fedsim.plots import plot_categories

    plot_categories(
        stream.concept_matrix(),
        plots / "stream_concepts.png",
        f"{name}: main concept per client and slot ({stream.rounds_per_slot} rounds per slot)",
        [f"{k}: {spec}" for k, spec in enumerate(stream.concept_specs)],
        legend_title="concept (label map)",
    )
    plot_categories(
        stream.events,
        plots / "stream_events.png",
        f"{name}: drift into each slot",
        EVENT_NAMES,
        colours=EVENT_COLOURS,
        legend_title="drift",
    )
