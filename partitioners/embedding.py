"""Embedding-based skew: clients differ in where their samples lie in a task's embedding
space, not (only) in their labels."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from fedsim.checks import check_integer, check_positive
from partitioners.allocation import deal
from partitioners.base import Partition, Partitioner, check_labels
from partitioners.embedders import check_embedder_options, embed, resolve_embedder
from partitioners.mixture import MixtureOptions


class EmbeddingClusters(MixtureOptions, Partitioner):
    """Embedding-cluster skew (Borazjani et al. 2025): per-client mix of k-means clusters ~ Dir(alpha * pi).

    From "Redefining non-IID Data in Federated Learning for Computer Vision Tasks": k-means
    clusters of the embeddings act as pseudo-labels, and client i draws its cluster mix p_i
    ~ Dir(alpha * pi), pi being the cluster proportions, taking its samples without
    replacement. This is :class:`~partitioners.mixture.LabelMixture` run on clusters instead
    of classes, so the two compare at equal alpha. ``split`` takes the embeddings; fedsim
    computes them with ``embedder`` (see :mod:`partitioners.embedders`: ``"pixels"``,
    ``"model"``, ``"file"`` or any registered name) and ``embedder_options``. Samples whose
    embedding row is NaN (the ``model`` embedder's public split) go to no client. The
    partition keeps the cluster of every sample as its ``"cluster"`` group (-1: none).

    Parameters
    ----------
    num_clients : int
    alpha : float
        Dirichlet concentration multiplier, > 0.
    clusters : int
        k of k-means (k-means++ initialisation), at most the number of embedded samples.
    embedder : str
        How fedsim embeds the training set before splitting.
    embedder_options : dict, optional
        Keyword arguments of the embedder, such as ``{dims = 32}`` for ``"pixels"``.
    sizes, min_size, max_draws
        As for :class:`~partitioners.mixture.LabelMixture`.
    """

    requires = frozenset({"embeddings"})

    def __init__(
        self,
        num_clients: int,
        alpha: float = 0.5,
        clusters: int = 10,
        embedder: str = "pixels",
        embedder_options: dict[str, Any] | None = None,
        sizes: Literal["equal", "fit"] = "fit",
        min_size: int = 10,
        max_draws: int = 100_000,
    ) -> None:
        super().__init__(num_clients)
        check_positive("alpha", alpha)
        check_integer("clusters", clusters, minimum=1)
        resolve_embedder(embedder)
        self.alpha = float(alpha)
        self.clusters = clusters
        self.embedder = embedder
        self.embedder_options = check_embedder_options(embedder, embedder_options)
        self._set_mixture_options(sizes, min_size, max_draws)

    def embed(self, x: np.ndarray, y: np.ndarray, *, seed: int = 0, dataset_key: Any = None) -> np.ndarray:
        """The embeddings this partitioner's embedder gives ``x`` (cached on disk)."""
        return embed(x, y, embedder=self.embedder, options=self.embedder_options, seed=seed, dataset_key=dataset_key)

    def cluster(self, embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
        """The k-means cluster of every row (-1 for a row with NaN)."""
        from sklearn.cluster import KMeans

        embeddings = np.asarray(embeddings, dtype=np.float64)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be a 2-D array (samples x features), got shape {embeddings.shape}")
        if np.isinf(embeddings).any():
            raise ValueError("embeddings contain infinite values; give finite rows (NaN rows go to no client)")
        embedded = np.flatnonzero(~np.isnan(embeddings).any(axis=1))
        if self.clusters > len(embedded):
            raise ValueError(f"clusters={self.clusters} exceeds the {len(embedded)} embedded samples; lower clusters")
        kmeans = KMeans(n_clusters=self.clusters, init="k-means++", n_init="auto", random_state=seed)
        cluster_ids = np.full(len(embeddings), -1, dtype=np.int64)
        cluster_ids[embedded] = kmeans.fit_predict(embeddings[embedded])
        return cluster_ids

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        if embeddings is None:
            raise ValueError("this scheme needs embeddings: pass split(y, embeddings=...) with one row per sample")
        if len(embeddings) != len(y):
            raise ValueError(f"embeddings has {len(embeddings)} rows for {len(y)} labels; give one row per sample")
        cluster_ids = self.cluster(embeddings, seed)
        rng = np.random.default_rng(seed)
        cluster_sizes = np.bincount(cluster_ids[cluster_ids >= 0], minlength=self.clusters)
        counts = self._counts(cluster_sizes, self.alpha * cluster_sizes / cluster_sizes.sum(), rng)
        return Partition(deal(cluster_ids, counts, rng), y, groups={"cluster": cluster_ids})
