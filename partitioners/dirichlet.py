"""Label skew by a Dirichlet distribution over clients, per class."""

from __future__ import annotations

import numpy as np

from fedsim.checks import check_integer, check_positive
from partitioners.allocation import cut_counts, deal, equal_sizes, fill_quotas
from partitioners.base import Partition, Partitioner, check_labels, check_min_size


class Dirichlet(Partitioner):
    """Dirichlet label skew (Hsu et al. 2019): each class is spread over clients by Dir(alpha).

    For every class c, proportions p_c ~ Dir(alpha * 1) over the clients decide how many of
    the class's samples each client receives (cut points floor(cumsum(p_c) * n_c)). The
    whole draw is repeated until every client holds at least ``min_size`` samples; small
    alpha gives few classes per client, large alpha approaches IID.

    With ``balance=True`` every client gets the same number of samples (up to one): the
    draw above only sets each client's class mix, and clients then fill equal quotas from
    their mixes without replacement (see :func:`partitioners.allocation.fill_quotas`),
    so a client whose favourite class runs out takes its next favourites.

    Parameters
    ----------
    num_clients : int
    alpha : float
        Dirichlet concentration, > 0.
    min_size : int
        Smallest number of samples any client may hold.
    max_draws : int
        How many whole draws to try before declaring ``min_size`` unreachable.
    balance : bool
        Equal client sizes instead of the sizes the draw happens to give.
    min_per_class : int
        Samples of every class each client receives before the draw spreads the rest (the
        GGEUR authors' CIFAR partition gives 1, so that every client holds every class).
    """

    def __init__(
        self,
        num_clients: int,
        alpha: float = 0.5,
        min_size: int = 10,
        max_draws: int = 1000,
        balance: bool = False,
        min_per_class: int = 0,
    ) -> None:
        super().__init__(num_clients)
        check_positive("alpha", alpha)
        check_integer("min_size", min_size, minimum=0)
        check_integer("max_draws", max_draws, minimum=1)
        self.alpha = float(alpha)
        self.min_size = min_size
        self.max_draws = max_draws
        self.balance = bool(balance)
        check_integer("min_per_class", min_per_class, minimum=0)
        if min_per_class and balance:
            raise ValueError("min_per_class > 0 cannot be combined with balance = true; choose one")
        self.min_per_class = min_per_class

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        check_min_size(self.min_size, self.num_clients, len(y))
        rng = np.random.default_rng(seed)
        class_sizes = np.bincount(y)
        reserved = self.min_per_class * self.num_clients
        if reserved and class_sizes.min() < reserved:
            raise ValueError(
                f"min_per_class={self.min_per_class} needs {reserved} samples of every class for {self.num_clients} "
                f"clients, but the smallest class has {class_sizes.min()}; lower min_per_class or use fewer clients"
            )
        if self.balance:
            mixes = rng.dirichlet(np.full(self.num_clients, self.alpha), size=len(class_sizes)) * class_sizes[:, None]
            counts = fill_quotas(class_sizes, equal_sizes(len(y), self.num_clients), mixes.T, rng)
        else:
            counts = self._draw_counts(rng, class_sizes)
        return Partition(deal(y, counts, rng), y)

    def _draw_counts(self, rng: np.random.Generator, class_sizes: np.ndarray) -> np.ndarray:
        """Classes x clients sample counts, redrawn until min_size holds."""
        concentration = np.full(self.num_clients, self.alpha)
        floor = self.min_per_class
        for _ in range(self.max_draws):
            spread = cut_counts(
                rng.dirichlet(concentration, size=len(class_sizes)), class_sizes - floor * self.num_clients
            )
            counts = spread + floor
            if counts.sum(axis=0).min() >= self.min_size:
                return counts
        raise ValueError(
            f"min_size={self.min_size} was not reached for every client in {self.max_draws} "
            f"Dirichlet draws at alpha={self.alpha}; lower min_size, raise alpha or use fewer clients"
        )
