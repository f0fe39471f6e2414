"""FLAME (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from flwr.serverapp.strategy import Strategy
from sklearn.cluster import HDBSCAN

from strategies.defences.base import Aggregate, Defence, Updates, check, clip_to, cosine_similarities, mean_update


def majority_cluster(distances: np.ndarray, min_cluster_size: int) -> list[int]:
    """The members of the largest HDBSCAN cluster of a precomputed distance matrix
    (``min_samples = 1``, a single cluster allowed); none when every point is noise."""
    n = len(distances)
    if n < 2 or min_cluster_size > n:
        return list(range(n)) if n < 2 else []
    labels = (
        HDBSCAN(
            metric="precomputed",
            min_cluster_size=max(2, min_cluster_size),
            min_samples=1,
            allow_single_cluster=True,
            copy=True,
        )
        .fit(distances)
        .labels_
    )
    found = labels[labels >= 0]
    if len(found) == 0:
        return []
    largest = np.bincount(found).argmax()
    return [int(i) for i in np.flatnonzero(labels == largest)]


def cosine_distances(vectors: np.ndarray) -> np.ndarray:
    distances = np.clip(1.0 - cosine_similarities(vectors), 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    return distances


class FLAME(Defence):
    """FLAME (Nguyen et al., USENIX Security 2022): cluster, clip, add noise.

    HDBSCAN on the pairwise cosine distances of the updates (``min_cluster_size =
    n // 2 + 1``, ``min_samples = 1``, one cluster allowed) keeps the majority cluster;
    each kept update is clipped to S, the median L2 norm of all n updates; the clipped
    updates are averaged with equal weights, and Gaussian noise of standard deviation
    ``noise_lambda * S`` is added to every parameter. Default ``noise_lambda = 0.001``,
    the paper's value for image classification.

    ``cluster_on = "models"`` clusters the local models (global + update) instead, as the
    paper's Algorithm 1 appears to (cosine distances between the local models W_i); the
    default clusters the updates. With one cluster allowed, HDBSCAN (scikit-learn's, like
    the ``hdbscan`` package the ports use) labels the points that join the cluster late as
    noise, so some benign updates are dropped too. When HDBSCAN finds no
    cluster, no update is accepted and the global model stays as it was (no noise). The
    noise is seeded by (``seed``, round); BatchNorm statistics get none.
    """

    name = "flame"

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_lambda: float = 0.001,
        cluster_on: Literal["updates", "models"] = "updates",
        **kwargs,
    ) -> None:
        super().__init__(strategy, **kwargs)
        check(
            isinstance(noise_lambda, (int, float)) and math.isfinite(noise_lambda) and noise_lambda >= 0,
            f"noise_lambda must be a finite number >= 0, got {noise_lambda!r}",
        )
        check(cluster_on in ("updates", "models"), f"cluster_on must be 'updates' or 'models', got {cluster_on!r}")
        self.noise_lambda = float(noise_lambda)
        self.cluster_on = cluster_on

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        n = len(updates)
        points = updates.vectors if self.cluster_on == "updates" else updates.vectors + updates.global_vector
        kept = majority_cluster(cosine_distances(points), n // 2 + 1)
        if not kept:
            return Aggregate(np.zeros(updates.vectors.shape[1]), [])
        bound = float(np.median(np.linalg.norm(updates.vectors, axis=1)))
        update = mean_update(clip_to(updates.vectors[kept], bound))
        noise = self.rng(server_round).normal(0.0, self.noise_lambda * bound, size=update.shape)
        return Aggregate(update + noise, kept)
