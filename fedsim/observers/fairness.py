"""Fairness across clients: how the clients' held-out accuracy spreads, each evaluated round.

Over the ``accuracy`` of every useful evaluation reply of the round (each client's
held-out data, with the global model or, where clients keep models of their own, theirs;
a client that reported none is left out), in client order:

- ``accuracy_mean``: the plain mean over clients (not weighted by examples, unlike the
  strategy's ``federated``/``evaluate`` aggregate);
- ``accuracy_p10``, ``accuracy_p50``, ``accuracy_p90``: percentiles by NumPy's default
  (``numpy.percentile``, linear interpolation between the sorted values);
- ``accuracy_min`` and ``accuracy_std`` (the population standard deviation, ``ddof=0``);
- ``accuracy_worst10_mean``: the mean of the worst 10% of the clients, rounded up, so at
  least one (the ``ceil(n / 10)`` lowest of ``n``).

Rows of metrics.csv: scope ``federated``, id ``fairness``, those metrics, in every round
that evaluates. summary.json gains ``client_accuracy_<stat>`` for each of them but the
mean (``client_accuracy_mean``, each client's latest accuracy averaged, is
:class:`~fedsim.observers.metrics.RoundMetrics`') at the last evaluated round, and
``client_accuracy_<stat>_best`` for each of them, the mean included, at the round with the
highest ``accuracy_mean`` (the earliest such round), which is ``client_accuracy_best_round``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsim.observers.base import Observer
from fedsim.results import MetricRow

FAIRNESS_ID = "fairness"  # the rows' id (scope "federated")
STATS = ("mean", "p10", "p50", "p90", "min", "std", "worst10_mean")
LAST = ("p10", "p50", "p90", "min", "std", "worst10_mean")  # the mean's last value is RoundMetrics'


def spread(accuracies: list[float]) -> dict[str, float]:
    """The statistics of the module docstring over one round's client accuracies."""
    values = np.asarray(accuracies, dtype=np.float64)
    worst = np.sort(values)[: math.ceil(len(values) / 10)]
    return {
        "mean": float(np.mean(values)),
        "p10": float(np.percentile(values, 10)),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "min": float(np.min(values)),
        "std": float(np.std(values)),
        "worst10_mean": float(np.mean(worst)),
    }


class ClientFairness(Observer):
    """The spread of the clients' held-out accuracy (see the module docstring)."""

    def __init__(self) -> None:
        self.last: dict[str, float] | None = None
        self.best: dict[str, float] | None = None
        self.best_round: int | None = None

    def on_evaluate_replies(self, context, server_round, replies, faults, arrays):
        accuracies = [float(metrics.get("accuracy", math.nan)) for _, metrics in context.by_client(replies)]
        accuracies = [value for value in accuracies if not math.isnan(value)]
        if not accuracies:
            return []
        stats = spread(accuracies)
        self.keep(server_round, stats)
        return [MetricRow(server_round, "federated", FAIRNESS_ID, f"accuracy_{name}", stats[name]) for name in STATS]

    def keep(self, server_round: int, stats: dict[str, float]) -> None:
        self.last = stats
        if self.best is None or stats["mean"] > self.best["mean"]:
            self.best, self.best_round = stats, server_round

    def restore(self, context, metrics):
        rows = metrics[(metrics.scope == "federated") & (metrics.id == FAIRNESS_ID)]
        for server_round, found in rows.groupby("round", sort=True):
            values = dict(zip(found.metric, found.value))
            self.keep(int(server_round), {name: float(values[f"accuracy_{name}"]) for name in STATS})

    def summary(self) -> dict[str, Any]:
        last, best = self.last or {}, self.best or {}
        return {
            **{f"client_accuracy_{name}": last.get(name) for name in LAST},
            "client_accuracy_best_round": self.best_round,
            **{f"client_accuracy_{name}_best": best.get(name) for name in STATS},
        }
