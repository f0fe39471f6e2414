"""FLAME (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from flwr.serverapp.strategy import Strategy
from sklearn.cluster import HDBSCAN

from fedsim.checks import check_bool, check_choice, check_number
from strategies.defences.base import Aggregate, Defence, Updates, clip_to, cosine_similarities, mean_update


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
            # scikit-learn counts the point itself, the hdbscan package does not; at 1 (and 2)
            # every mutual reachability distance is the plain distance in both, so the ports'
            # min_samples = 1 gives the same tree
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
    """Pairwise cosine distances 1 - cos of the rows, in [0, 2], 0 on the diagonal (float64)."""
    distances = np.clip(1.0 - cosine_similarities(np.asarray(vectors, np.float64)), 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    return distances


class FLAME(Defence):
    """FLAME (Nguyen et al., USENIX Security 2022): cluster, clip, add noise.

    The rule (the paper's Algorithm 1), on the n replies of a round:

    1. HDBSCAN on the pairwise cosine distances of the local models W_i = G + u_i
       (``min_cluster_size = n // 2 + 1``, ``min_samples = 1``, one cluster allowed) keeps
       the members of the largest cluster;
    2. S = the median of the L2 norms ||W_i - G|| of all n updates (the mean of the two
       middle ones when n is even);
    3. each kept update is clipped to S and the clipped updates are averaged with equal
       weights;
    4. Gaussian noise of standard deviation ``sigma = noise_lambda * S`` is added to every
       trainable parameter. Default ``noise_lambda = 0.001``, the paper's value for image
       classification.

    Vectors are the trainable floating-point parameters in float64 (see :class:`Updates`):
    BatchNorm running statistics and integer buffers are not clustered, clipped nor noised;
    they are averaged over the accepted replies as FedAvg would (``include_statistics =
    True`` treats the floating-point statistics as parameters, as FLPoison's whole-state
    vector does). ``cluster_on = "updates"``
    clusters the updates u_i instead of the models. With one cluster allowed, HDBSCAN labels
    the points that join the cluster late as noise, so some benign replies are dropped too
    (the ports' behaviour as well). Should every point be noise (which one allowed cluster
    all but rules out), every reply is kept. The noise is seeded by (``seed``, round);
    ``last_bound`` and ``last_noise_std`` hold the last round's S and sigma.

    Both public ports (BackFed, FLPoison) cluster the models too. Where they and the paper
    part, fedsim follows the paper, or a port where the paper is silent:

    - noise: the paper's ``sigma = lambda * S``. Both ports draw each tensor's noise with
      ``lambda * S * std(tensor)`` (FLPoison with lambda = 1.2e-5), a rule the paper does
      not state; BackFed noises only tensors named ``weight`` or ``bias``;
    - clustering input: the whole model's trainable parameters, as W_i in the paper.
      BackFed clusters only the last two state entries (the output layer); FLPoison the
      whole state vector, BatchNorm statistics and counters included;
    - S: ``numpy.median``. BackFed's ``torch.median`` takes the lower of the two middle
      norms when n is even, and BackFed measures norms over tensors named ``weight`` or
      ``bias``; FLPoison over the whole state vector, statistics included;
    - the aggregate is added as it is: BackFed scales it by a server learning rate
      ``eta = 0.1`` before the noise, which the paper does not have;
    - clipping has no epsilon (FLPoison divides by ``norm + 1e-6``);
    - when no cluster is found, FLPoison averages an empty set (NaN); fedsim keeps every
      reply, as BackFed does (the paper is silent). FLPoison keeps HDBSCAN's label 0 where
      BackFed and fedsim keep the largest cluster: the same set, as no second cluster can
      reach n // 2 + 1 members.

    The HDBSCAN is scikit-learn's, the ports use the ``hdbscan`` package. With
    ``min_samples = 1`` both cluster the plain distances (their counts of min_samples differ
    by one, which matters only above 2), and on the parity tests' inputs they give the same
    labels.
    """

    name = "flame"

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_lambda: float = 0.001,
        cluster_on: Literal["updates", "models"] = "models",
        include_statistics: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(strategy, **kwargs)
        self.include_statistics = check_bool("include_statistics", include_statistics)
        self.noise_lambda = check_number("noise_lambda", noise_lambda, at_least=0)
        check_choice("cluster_on", cluster_on, ("updates", "models"))
        self.cluster_on = cluster_on
        self.last_bound = 0.0  # the last round's clipping bound S
        self.last_noise_std = 0.0  # and its noise's standard deviation, noise_lambda * S

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        n = len(updates)
        points = updates.vectors if self.cluster_on == "updates" else updates.vectors + updates.global_vector
        # no cluster at all: nothing singles anyone out, so every reply stays (clipped, noised)
        kept = majority_cluster(cosine_distances(points), n // 2 + 1) or list(range(n))
        bound = float(np.median(np.linalg.norm(updates.vectors, axis=1)))
        update = mean_update(clip_to(updates.vectors[kept], bound))
        self.last_bound, self.last_noise_std = bound, self.noise_lambda * bound
        noise = self.rng(server_round).normal(0.0, self.last_noise_std, size=update.shape)
        return Aggregate(update + noise, kept)
