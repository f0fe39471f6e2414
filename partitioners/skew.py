"""How skewed a partition really is: per-client distances to the federation's distribution.

Label measures compare each client's label distribution p with the distribution q of all
dealt samples: Hellinger distance sqrt(1 - sum sqrt(p q)), Jensen-Shannon divergence
(base 2, so both lie in [0, 1]) and the earth mover's distance on the class index line
(ground distance |i - j| between classes i and j). The effective number of classes is
exp(Shannon entropy of p). Across clients, the Gini coefficient of the sizes measures
quantity skew. Each per-sample group of the partition (``"cluster"``, ``"domain"``) gets
its own Hellinger distance, and given embeddings, the squared Frechet distance between
Gaussians fitted to the client's embeddings and to all dealt ones (as in FID) measures
feature skew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.linalg import sqrtm
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, wasserstein_distance

from partitioners.base import Partition


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


def _gaussian(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows, dtype=np.float64)
    return rows.mean(axis=0), np.atleast_2d(np.cov(rows, rowvar=False))


def measure_skew(partition: Partition, embeddings: np.ndarray | None = None) -> SkewReport:
    """Per-client label (and group, and embedding) distances to the federation's distribution."""
    labels = partition.label_matrix()
    p, q = distributions(labels), labels.sum(axis=0) / max(labels.sum(), 1)
    classes = np.arange(partition.num_classes)
    table = pd.DataFrame(
        {
            "client": np.arange(partition.num_clients),
            "size": partition.sizes,
            "classes": (labels > 0).sum(axis=1),
            "effective_classes": np.exp(entropy(p, axis=1)),
            "hellinger": hellinger(p, q),
            "jensen_shannon": jensenshannon(p, q[None, :], axis=1, base=2) ** 2,
            "emd": [wasserstein_distance(classes, classes, row, q) if np.isfinite(row).all() else np.nan for row in p],
        }
    )
    for name, group_ids in sorted(partition.groups.items()):
        groups = partition.group_matrix(group_ids, max(int(group_ids.max()) + 1, 1))
        table[f"hellinger_{name}"] = hellinger(distributions(groups), groups.sum(axis=0) / max(groups.sum(), 1))
    if embeddings is not None:
        table["frechet"] = frechet_distances(np.asarray(embeddings), partition.client_indices)
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
    return SkewReport(table, summary)
