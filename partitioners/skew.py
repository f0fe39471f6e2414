"""How skewed a partition really is: per-client distances to the federation's distribution.

Label measures compare each client's label distribution p with the distribution q of all
dealt samples: Hellinger distance sqrt(1 - sum sqrt(p q)), Jensen-Shannon divergence
(base 2, so both lie in [0, 1]) and the earth mover's distance of Zhao et al. (2018),
sum |p - q| in [0, 2]. Class labels have no order, so every pair of distinct classes is
equally far apart (EMD with ground distance 2, i.e. twice the total variation), and
renumbering the classes changes nothing. The effective number of classes is exp(Shannon
entropy of p). Across clients, the Gini coefficient of the sizes measures quantity skew.
Each per-sample group of the partition (``"cluster"``, ``"domain"``) gets its own
Hellinger distance. Given embeddings, two distances measure feature skew: the squared
Frechet distance between Gaussians fitted to the client's embeddings and to all dealt ones
(as in FID), which grows as a client shrinks even when its samples are IID, and the
unbiased squared MMD with a Gaussian kernel, which is zero in expectation for IID
clients of any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pandas and SciPy are imported where used: `import partitioners` stays light
    import pandas as pd

    from partitioners.base import Partition  # only the type: a Partition measures itself with this module


@dataclass(frozen=True)
class SkewReport:
    """One row per client (``clients``) and the federation-wide figures (``summary``)."""

    clients: pd.DataFrame
    summary: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary and every per-client column (NaN as None)."""
        return {
            "summary": {k: _plain(v) for k, v in self.summary.items()},
            "clients": {col: [_plain(v) for v in self.clients[col]] for col in self.clients.columns},
        }


def _plain(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and math.isnan(value) else value


def distributions(counts: np.ndarray) -> np.ndarray:
    """Rows of counts as probability rows (an empty row stays all NaN)."""
    totals = counts.sum(axis=1, keepdims=True).astype(float)
    return np.divide(counts, totals, out=np.full(counts.shape, np.nan), where=totals > 0)


def hellinger(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hellinger distance of every row of ``p`` to the distribution ``q``."""
    return np.sqrt(np.clip(1.0 - np.sqrt(p * q[None, :]).sum(axis=1), 0.0, None))


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``p``, with 0 log 0 = 0. (NumPy rather than
    ``scipy.stats.entropy``, whose import alone takes half a second.)"""
    return -_plogq(p, p).sum(axis=1)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between rows of ``p`` and ``q``."""
    m = (p + q) / 2
    kl_p = (_plogq(p, p) - _plogq(p, m)).sum(axis=1)
    kl_q = (_plogq(q, q) - _plogq(q, m)).sum(axis=1)
    return np.maximum((kl_p + kl_q) / (2 * np.log(2)), 0.0)


def _plogq(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p * log(q) elementwise, 0 where p is 0."""
    p, q = np.broadcast_arrays(p, q)
    out = np.zeros(p.shape)
    np.multiply(p, np.log(q, out=np.zeros(q.shape), where=p > 0), out=out, where=p > 0)
    return out


def group_hellinger(partition: Partition, group_ids: np.ndarray) -> np.ndarray:
    """Hellinger distance of each client's distribution over a per-sample group (cluster,
    domain) to the federation's, NaN for an empty client.

    Summed over the (client, group) pairs that occur rather than over a clients x groups
    matrix: memory grows with the samples, not with clients times groups (10,000 clients
    of one group each would make that matrix 10,000 x 10,000).
    """
    sizes = partition.sizes
    clients = np.repeat(np.arange(partition.num_clients), sizes)
    groups = np.asarray(group_ids, dtype=np.int64)[partition.assigned()]
    num_groups = int(groups.max()) + 1 if groups.size else 1
    pairs, counts = np.unique(clients * num_groups + groups, return_counts=True)
    client_of, group_of = np.divmod(pairs, num_groups)
    q = np.bincount(groups, minlength=num_groups) / max(len(groups), 1)
    affinity = np.bincount(
        client_of, weights=np.sqrt(counts / sizes[client_of] * q[group_of]), minlength=partition.num_clients
    )
    distances = np.sqrt(np.clip(1.0 - affinity, 0.0, None))
    distances[sizes == 0] = np.nan
    return distances


def gini(sizes: np.ndarray) -> float:
    """Gini coefficient of non-negative sizes: 0 for equal sizes, towards 1 for one holding all."""
    sizes = np.sort(np.asarray(sizes, dtype=float))
    if sizes.sum() == 0:
        return 0.0
    ranks = np.arange(1, len(sizes) + 1)
    return float(((2 * ranks - len(sizes) - 1) * sizes).sum() / (len(sizes) * sizes.sum()))


def frechet_distances(embeddings: np.ndarray, client_indices: tuple[np.ndarray, ...]) -> np.ndarray:
    """Squared Frechet distance between Gaussian fits of each client's embeddings and of all
    dealt embeddings: |mu_i - mu|^2 + tr(S_i + S - 2 (S_i S)^(1/2)). NaN below 2 samples.

    tr((S_i S)^(1/2)) is computed as tr((R S_i R)^(1/2)) with R = S^(1/2), a symmetric
    matrix whose eigenvalues are cheap and real; S gets a tiny ridge, since embeddings
    often have dead (constant) features that make it singular.
    """
    from scipy.linalg import sqrtm

    dealt = np.concatenate(client_indices)
    mean, cov = _gaussian(embeddings[dealt])
    cov += np.eye(len(cov)) * 1e-9 * max(np.trace(cov) / len(cov), 1e-12)
    root = np.real(sqrtm(cov))
    distances = np.full(len(client_indices), np.nan)
    for client, indices in enumerate(client_indices):
        if len(indices) < 2:
            continue
        client_mean, client_cov = _gaussian(embeddings[indices])
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ client_cov @ root), 0.0, None)).sum()
        distances[client] = np.sum((client_mean - mean) ** 2) + np.trace(client_cov) + np.trace(cov) - 2 * cross
    return np.clip(distances, 0.0, None)


MMD_ROWS = 256  # rows per client and (x4) of the federation that the MMD compares, at most


def mmd_distances(embeddings: np.ndarray, client_indices: tuple[np.ndarray, ...], seed: int = 0) -> np.ndarray:
    """Unbiased squared MMD (Gretton et al., 2012) between each client's embeddings and all
    dealt ones, with the Gaussian kernel exp(-|x - y|^2 / h), h the median squared distance
    of the federation's rows. Clients and the federation are subsampled without
    replacement (at most ``MMD_ROWS`` and four times that), which keeps it unbiased and the
    cost flat in the number of samples. NaN below 2 samples.
    """
    rng = np.random.default_rng(seed)
    dealt = np.concatenate(client_indices)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    reference_indices = dealt[_subsample(len(dealt), 4 * MMD_ROWS, rng)]
    reference = embeddings[reference_indices]
    squared = _squared_distances(reference, reference)
    bandwidth = max(float(np.median(squared[np.triu_indices(len(reference), 1)])), 1e-12)
    within_reference = _mean_off_diagonal(np.exp(-squared / bandwidth))
    distances = np.full(len(client_indices), np.nan)
    for client, indices in enumerate(client_indices):
        if len(indices) < 2:
            continue
        row_indices = indices[_subsample(len(indices), MMD_ROWS, rng)]
        rows = embeddings[row_indices]
        within = _mean_off_diagonal(np.exp(-_squared_distances(rows, rows) / bandwidth))
        # a sample the reference also drew is no evidence of closeness: leave those pairs out
        distinct = row_indices[:, None] != reference_indices[None, :]
        across = np.exp(-_squared_distances(rows, reference) / bandwidth)[distinct].mean()
        distances[client] = within + within_reference - 2 * across
    return distances


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= limit else np.sort(rng.choice(n, limit, replace=False))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0, None)


def _mean_off_diagonal(kernel: np.ndarray) -> float:
    n = len(kernel)
    return float((kernel.sum() - np.trace(kernel)) / (n * (n - 1)))


def _gaussian(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows, dtype=np.float64)
    return rows.mean(axis=0), np.atleast_2d(np.cov(rows, rowvar=False))


def measure_skew(partition: Partition, embeddings: np.ndarray | None = None) -> SkewReport:
    """Per-client label (and group, and embedding) distances to the federation's distribution."""
    labels = partition.label_matrix()
    p, q = distributions(labels), labels.sum(axis=0) / max(labels.sum(), 1)
    import pandas as pd

    table = pd.DataFrame(
        {
            "client": np.arange(partition.num_clients),
            "size": partition.sizes,
            "classes": (labels > 0).sum(axis=1),
            "effective_classes": np.exp(entropy(p)),
            "hellinger": hellinger(p, q),
            "jensen_shannon": jensen_shannon(p, q[None, :]),
            "emd": np.abs(p - q[None, :]).sum(axis=1),
        }
    )
    for name, group_ids in sorted(partition.groups.items()):
        table[f"hellinger_{name}"] = group_hellinger(partition, group_ids)
    if embeddings is not None:
        table["frechet"] = frechet_distances(np.asarray(embeddings), partition.client_indices)
        table["mmd"] = mmd_distances(np.asarray(embeddings), partition.client_indices)
    dealt = int(partition.sizes.sum())
    summary: dict[str, float] = {
        "num_clients": partition.num_clients,
        "num_classes": partition.num_classes,
        "samples_dealt": dealt,
        "coverage": dealt / max(len(partition.labels), 1),
        "size_min": int(partition.sizes.min()) if partition.num_clients else 0,
        "size_max": int(partition.sizes.max()) if partition.num_clients else 0,
        "gini_sizes": gini(partition.sizes),
    }
    for column in table.columns.drop(["client", "size"]):
        summary[f"mean_{column}"] = float(table[column].mean())
    for name, group_ids in sorted(partition.groups.items()):
        summary.update(group_label_agreement(name, np.asarray(group_ids), partition.labels))
    return SkewReport(table, summary)


def group_label_agreement(name: str, group_ids: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How much a grouping of the samples (an embedding split's clusters, domains) says
    about their labels: ``purity_<name>``, the share of samples whose group's most common
    label is their own, and ``nmi_<name>``, the normalised mutual information of groups and
    labels (1: the groups are the classes, 0: independent). Samples without a group (a
    negative id: a public share held out) are left out."""
    from sklearn.metrics import normalized_mutual_info_score

    grouped = group_ids >= 0
    groups, classes = group_ids[grouped].astype(np.int64), np.asarray(labels)[grouped].astype(np.int64)
    if len(groups) == 0:
        return {}
    counts = np.zeros((groups.max() + 1, classes.max() + 1), np.int64)
    np.add.at(counts, (groups, classes), 1)
    return {
        f"purity_{name}": float(counts.max(axis=1).sum() / len(groups)),
        f"nmi_{name}": float(normalized_mutual_info_score(classes, groups)),
    }
