"""Domain skew: for datasets that record a domain (source, style, site) per sample."""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedsim.checks import check_integer, check_number, check_positive
from partitioners.allocation import cut_counts, deal
from partitioners.base import Partition, Partitioner, check_group_ids, check_labels
from partitioners.mixture import MixtureOptions


def _domains_per_client(domains: np.ndarray, num_clients: int) -> tuple[np.ndarray, int]:
    """Domain ids renumbered 0..D-1 over the domains present, and clients per domain."""
    present, domain_ids = np.unique(domains, return_inverse=True)
    if num_clients % len(present):
        raise ValueError(
            f"num_clients={num_clients} must be a multiple of the {len(present)} domains "
            f"(the same number of clients per domain), e.g. num_clients={len(present) * max(1, num_clients // len(present))}"
        )
    return domain_ids, num_clients // len(present)


def _shared_within_domain(kept: np.ndarray, clients_per_domain: int) -> np.ndarray:
    """(groups x clients) counts: group g of domain ``g // (rows per domain)``'s kept samples
    shared equally among that domain's clients (clients d*N .. d*N+N-1)."""
    num_domains = kept.shape[0]
    owners = np.kron(np.eye(num_domains), np.full((1, clients_per_domain), 1.0 / clients_per_domain))
    shares = np.repeat(owners, kept.shape[1], axis=0)
    return cut_counts(shares, kept.ravel())


class DomainPerClient(Partitioner):
    """One domain per client (the FedBN setting, Li et al. 2021), N clients per domain.

    ``num_clients / domains`` clients per domain, each holding an equal IID share of its
    domain. Client i holds domain ``i // clients_per_domain`` (domains numbered in sorted
    order of the ids present). A random ``fraction`` of each domain is dealt (FedBN trains
    on 10% of each dataset); with the default 1.0 every sample is. The partition keeps the
    ``"domain"`` group.
    """

    requires = frozenset({"domains"})

    def __init__(self, num_clients: int, fraction: float = 1.0) -> None:
        super().__init__(num_clients)
        self.fraction = check_number("fraction", fraction, above=0, at_most=1)

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        domains = check_group_ids("domains", domains, len(y))
        domain_ids, per_domain = _domains_per_client(domains, self.num_clients)
        rng = np.random.default_rng(seed)
        kept = np.floor(np.bincount(domain_ids) * self.fraction).astype(np.int64)
        counts = _shared_within_domain(kept[:, None], per_domain)
        return Partition(deal(domain_ids, counts, rng), y, groups={"domain": domains})


class DomainMixture(MixtureOptions, Partitioner):
    """Per-client domain mix q_i ~ Dir(beta) (Borazjani et al. 2025's mixture procedure on domains).

    Client i draws q_i ~ Dir(beta * 1) over domains and takes its samples of each domain
    without replacement; labels follow the domains' own label mix. ``sizes``, ``min_size``
    and ``max_draws`` are those of :class:`~partitioners.mixture.LabelMixture`. The
    partition keeps the ``"domain"`` group.

    Parameters
    ----------
    num_clients : int
    beta : float
        Dirichlet concentration over domains, > 0; small beta gives one domain per client.
    """

    requires = frozenset({"domains"})

    def __init__(
        self,
        num_clients: int,
        beta: float = 0.5,
        sizes: Literal["equal", "fit"] = "fit",
        min_size: int = 10,
        max_draws: int = 100_000,
    ) -> None:
        super().__init__(num_clients)
        check_positive("beta", beta)
        self.beta = float(beta)
        self._set_mixture_options(sizes, min_size, max_draws)

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        domains = check_group_ids("domains", domains, len(y))
        rng = np.random.default_rng(seed)
        domain_sizes = np.bincount(domains)
        counts = self._counts(domain_sizes, np.full(len(domain_sizes), self.beta), rng)
        return Partition(deal(domains, counts, rng), y, groups={"domain": domains})


class LabelDomainSkew(Partitioner):
    """Label x domain skew of Office-Home-LDS (Dai et al., GGEUR, CVPR 2025): per class, Dir(beta) over domains.

    For each class, proportions q_c ~ Dir(beta * 1) across the domains decide how much of
    that class each domain keeps: domain d keeps floor(q_cd * n_dc) of its n_dc samples of
    class c. Each domain's kept samples are shared equally among its ``num_clients / domains``
    clients (one client per domain in the paper). Samples a domain does not keep belong
    to no client, so about 1/D of the data is dealt. The draw is repeated until every
    client holds ``min_size``. The partition keeps the ``"domain"`` group.

    Parameters
    ----------
    num_clients : int
        A multiple of the number of domains.
    beta : float
        Dirichlet concentration across domains, > 0 (the paper uses 0.1).
    min_size : int
        Smallest number of samples any client may hold.
    max_draws : int
        How many draws to try before declaring ``min_size`` unreachable.
    """

    requires = frozenset({"domains"})

    def __init__(self, num_clients: int, beta: float = 0.1, min_size: int = 10, max_draws: int = 1000) -> None:
        super().__init__(num_clients)
        check_positive("beta", beta)
        check_integer("min_size", min_size, minimum=0)
        check_integer("max_draws", max_draws, minimum=1)
        self.beta = float(beta)
        self.min_size = min_size
        self.max_draws = max_draws

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        domains = check_group_ids("domains", domains, len(y))
        domain_ids, per_domain = _domains_per_client(domains, self.num_clients)
        num_domains, num_classes = domain_ids.max() + 1, y.max() + 1
        pair_ids = domain_ids * num_classes + y  # group = (domain, class)
        pair_sizes = np.bincount(pair_ids, minlength=num_domains * num_classes).reshape(num_domains, num_classes)
        rng = np.random.default_rng(seed)
        for _ in range(self.max_draws):
            keep = rng.dirichlet(np.full(num_domains, self.beta), size=num_classes).T  # domains x classes
            counts = _shared_within_domain(np.floor(keep * pair_sizes).astype(np.int64), per_domain)
            if counts.sum(axis=0).min() >= self.min_size:
                return Partition(deal(pair_ids, counts, rng), y, groups={"domain": domains})
        raise ValueError(
            f"min_size={self.min_size} was not reached for every client in {self.max_draws} draws "
            f"at beta={self.beta}; lower min_size, raise beta or use fewer clients per domain"
        )
