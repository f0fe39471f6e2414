"""Quantity skew: clients differ in how much data they hold, not in what it is."""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedsim.checks import check_choice, check_integer, check_positive
from partitioners.allocation import cut_counts, deal
from partitioners.base import Partition, Partitioner, check_labels, check_min_size

SIZE_DISTRIBUTIONS = ("dirichlet", "power-law")


class QuantitySkew(Partitioner):
    """Quantity skew (Li et al., NIID-Bench 2022): sizes from Dir(alpha) or a power law, labels IID.

    Each client's samples are an IID draw of its size. Every client first gets ``min_size``
    samples; the rest are shared in proportions q ~ Dir(alpha * 1)
    (``distribution="dirichlet"``), or in proportion to weights w_i ~ Pareto(``exponent``),
    P(w > t) = t^-exponent for t >= 1 (``"power-law"``, the heavy-tailed sizes of LEAF-style
    federations). No redraws are needed, and every sample is dealt.

    Parameters
    ----------
    num_clients : int
    distribution : "dirichlet" or "power-law"
    alpha : float
        Dirichlet concentration for ``"dirichlet"``; smaller is more unequal.
    exponent : float
        Tail exponent for ``"power-law"``; smaller is more unequal.
    min_size : int
        Smallest number of samples any client may hold.
    """

    def __init__(
        self,
        num_clients: int,
        distribution: Literal["dirichlet", "power-law"] = "dirichlet",
        alpha: float = 0.5,
        exponent: float = 1.5,
        min_size: int = 10,
    ) -> None:
        super().__init__(num_clients)
        check_choice("distribution", distribution, SIZE_DISTRIBUTIONS)
        check_positive("alpha", alpha)
        check_positive("exponent", exponent)
        check_integer("min_size", min_size, minimum=0)
        self.distribution = distribution
        self.alpha = float(alpha)
        self.exponent = float(exponent)
        self.min_size = min_size

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        check_min_size(self.min_size, self.num_clients, len(y))
        if self.num_clients > len(y):
            raise ValueError(f"num_clients={self.num_clients} exceeds the {len(y)} samples; lower num_clients")
        rng = np.random.default_rng(seed)
        if self.distribution == "dirichlet":
            shares = rng.dirichlet(np.full(self.num_clients, self.alpha))
        else:
            weights = 1.0 + rng.pareto(self.exponent, size=self.num_clients)
            shares = weights / weights.sum()
        rest = len(y) - self.min_size * self.num_clients
        sizes = self.min_size + cut_counts(shares[None, :], np.array([rest]))
        return Partition(deal(np.zeros(len(y), dtype=np.int64), sizes, rng), y)
