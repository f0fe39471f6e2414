"""Label skew by a Dirichlet distribution over clients, per class."""

from __future__ import annotations

import numpy as np

from partitioners.base import (
    Partition,
    Partitioner,
    check_integer,
    check_labels,
    check_min_size,
    check_positive,
    indices_by_owner,
)


class Dirichlet(Partitioner):
    """Dirichlet label skew (Hsu et al. 2019): each class is spread over clients by Dir(alpha).

    For every class c, proportions p_c ~ Dir(alpha * 1) over the clients decide how many of
    the class's samples each client receives (cut points floor(cumsum(p_c) * n_c)). The
    whole draw is repeated until every client holds at least ``min_size`` samples; small
    alpha gives few classes per client, large alpha approaches IID.

    Parameters
    ----------
    num_clients : int
    alpha : float
        Dirichlet concentration, > 0.
    min_size : int
        Smallest number of samples any client may hold.
    max_draws : int
        How many whole draws to try before declaring ``min_size`` unreachable.
    """

    def __init__(self, num_clients: int, alpha: float = 0.5, min_size: int = 10, max_draws: int = 1000) -> None:
        super().__init__(num_clients)
        check_positive("alpha", alpha)
        check_integer("min_size", min_size, minimum=0)
        check_integer("max_draws", max_draws, minimum=1)
        self.alpha = float(alpha)
        self.min_size = min_size
        self.max_draws = max_draws

    def split(self, y, *, domains=None, embeddings=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        check_min_size(self.min_size, self.num_clients, len(y))
        rng = np.random.default_rng(seed)
        classes, class_sizes = np.unique(y, return_counts=True)
        counts = self._draw_counts(rng, class_sizes)

        owner = np.empty(len(y), dtype=np.int64)
        clients = np.arange(self.num_clients)
        for cls, class_counts in zip(classes, counts):
            members = rng.permutation(np.flatnonzero(y == cls))
            owner[members] = np.repeat(clients, class_counts)
        return Partition(indices_by_owner(owner, self.num_clients), y)

    def _draw_counts(self, rng: np.random.Generator, class_sizes: np.ndarray) -> np.ndarray:
        """Classes x clients sample counts, redrawn until min_size holds."""
        concentration = np.full(self.num_clients, self.alpha)
        for _ in range(self.max_draws):
            proportions = rng.dirichlet(concentration, size=len(class_sizes))
            cuts = np.floor(np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
            cuts[:, -1] = class_sizes
            counts = np.diff(cuts, axis=1, prepend=0)
            if counts.sum(axis=0).min() >= self.min_size:
                return counts
        raise ValueError(
            f"min_size={self.min_size} was not reached for every client in {self.max_draws} "
            f"Dirichlet draws at alpha={self.alpha}; lower min_size, raise alpha or use fewer clients"
        )
