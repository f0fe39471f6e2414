"""Per-client mixtures over groups: each client draws its own mix of classes (or clusters,
or domains) from a Dirichlet distribution and takes its samples without replacement.

The procedure is Borazjani et al.'s ("Redefining non-IID Data in Federated Learning for
Computer Vision Tasks", 2025); :class:`LabelMixture` runs it on class labels (their
label-based baseline), and :mod:`partitioners.embedding` and :mod:`partitioners.domain`
run the identical procedure on embedding clusters and on domains.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedsim.checks import check_choice, check_integer, check_positive
from partitioners.allocation import deal, equal_sizes, fill_quotas
from partitioners.base import Partition, Partitioner, check_labels, check_min_size

SIZE_RULES = ("equal", "fit")
FIT_BATCH_ENTRIES = 2_000_000  # draws x clients x groups held in memory at once by the "fit" rule


def mixture_counts(
    group_sizes: np.ndarray,
    concentration: np.ndarray,
    num_clients: int,
    *,
    sizes: str,
    min_size: int,
    max_draws: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Groups x clients counts for clients whose mixes are p_i ~ Dir(concentration).

    ``sizes="equal"``: every client gets an equal quota, filled from its mix without
    replacement (a group that runs out is dropped from the mixes of those still filling).
    ``sizes="fit"``: the authors' rule; client sizes n solve sum_i n_i p_i = group sizes in
    the least-squares sense, client i takes round(n_i p_ik) of group k, and the mixes are
    redrawn until every client holds ``min_size`` and no group is over-drawn. Near-uniform
    mixes make that system ill-conditioned (its exact solutions swing to negative sizes), so
    at concentrations of about 50 per group and above most draws fail: use "equal" there.
    """
    present = np.flatnonzero(group_sizes)  # a group with no samples can take no share
    available = group_sizes[present]
    check_min_size(min_size, num_clients, int(available.sum()))
    if sizes == "fit" and num_clients < len(available):
        # n solves sum_i n_i p_i = group sizes: with fewer clients than groups there are more
        # equations than unknowns, and the least-squares sizes leave much of the data undealt
        raise ValueError(
            f"sizes='fit' needs num_clients >= the {len(available)} groups (classes, clusters or domains) "
            f"it fits client sizes to, got num_clients={num_clients}; use sizes='equal' or more clients"
        )
    if sizes == "equal":
        mixes = rng.dirichlet(concentration[present], size=num_clients)
        found = fill_quotas(available, equal_sizes(int(available.sum()), num_clients), mixes, rng)
    else:
        found = _fitted_counts(available, concentration[present], num_clients, min_size, max_draws, rng)
    counts = np.zeros((len(group_sizes), num_clients), dtype=np.int64)
    counts[present] = found
    return counts


def _fitted_counts(available, concentration, num_clients, min_size, max_draws, rng) -> np.ndarray:
    # Many draws at once (at equal numbers of clients and groups ~1 in 1,000 passes), in
    # batches that double, so that an easy case stays cheap.
    largest = max(1, FIT_BATCH_ENTRIES // (num_clients * len(available)))
    drawn, batch = 0, 64
    while drawn < max_draws:
        batch = min(batch, largest, max_draws - drawn)
        drawn += batch
        mixes = rng.dirichlet(concentration, size=(batch, num_clients))
        sizes = np.floor(np.linalg.pinv(mixes.transpose(0, 2, 1)) @ available.astype(float))
        counts = np.rint(np.clip(sizes, 0, None)[..., None] * mixes).astype(np.int64)
        fits = (counts.sum(axis=2).min(axis=1) >= max(min_size, 1)) & np.all(counts.sum(axis=1) <= available, axis=1)
        if fits.any():
            return counts[np.argmax(fits)].T
        batch *= 2
    raise ValueError(
        f"sizes='fit' found no draw in {max_draws} where every client holds min_size={min_size} and no group "
        "is over-drawn (near-uniform mixes, from a large alpha or beta, rarely admit one); "
        "use sizes='equal', raise max_draws, or lower min_size"
    )


class MixtureOptions:
    """The parameters every mixture scheme shares, checked in one place."""

    def _set_mixture_options(self, sizes: str, min_size: int, max_draws: int) -> None:
        check_choice("sizes", sizes, SIZE_RULES)
        check_integer("min_size", min_size, minimum=0)
        check_integer("max_draws", max_draws, minimum=1)
        self.sizes = sizes
        self.min_size = min_size
        self.max_draws = max_draws

    def _counts(self, group_sizes: np.ndarray, concentration: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return mixture_counts(
            group_sizes,
            concentration,
            self.num_clients,
            sizes=self.sizes,
            min_size=self.min_size,
            max_draws=self.max_draws,
            rng=rng,
        )


class LabelMixture(MixtureOptions, Partitioner):
    """Per-client class mix p_i ~ Dir(alpha * pi) (Borazjani et al. 2025's label-based baseline).

    Client i draws its class mix p_i ~ Dir(alpha * pi), pi being the class proportions, and
    takes its samples of each class without replacement. The concentration is alpha times
    the proportions, not alpha * 1: at equal class sizes alpha = 0.5 is Dir(0.05) per class,
    far more skewed than ``dirichlet`` at 0.5. ``sizes`` picks how client sizes are set (see
    :func:`mixture_counts`): ``"fit"`` (the default) is the authors' rule, which keeps
    each client's drawn mix, may leave a few samples undealt (rounding), and finds no
    valid draw with fewer clients than classes; ``"equal"`` always succeeds and deals
    every sample, but a client whose groups run out is topped up from others, which
    flattens its mix (at alpha 0.1 on ten classes, about 2 effective classes per client
    against 1.1 with ``"fit"``).

    Parameters
    ----------
    num_clients : int
    alpha : float
        Dirichlet concentration multiplier, > 0.
    sizes : "equal" or "fit"
    min_size : int
        Smallest number of samples any client may hold.
    max_draws : int
        Mixes tried by ``sizes="fit"`` before giving up.
    """

    def __init__(
        self,
        num_clients: int,
        alpha: float = 0.5,
        sizes: Literal["equal", "fit"] = "fit",
        min_size: int = 10,
        max_draws: int = 100_000,
    ) -> None:
        super().__init__(num_clients)
        check_positive("alpha", alpha)
        self.alpha = float(alpha)
        self._set_mixture_options(sizes, min_size, max_draws)

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        rng = np.random.default_rng(seed)
        class_sizes = np.bincount(y)
        counts = self._counts(class_sizes, self.alpha * class_sizes / len(y), rng)
        return Partition(deal(y, counts, rng), y)
