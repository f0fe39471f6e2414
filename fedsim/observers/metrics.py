"""The figures of the clients, the domains and the federation, each round: what every run
records besides its observers for drift, attacks and faults.

Rows of metrics.csv: scope ``client`` (each client's train and evaluate metrics), scope
``domain`` (accuracy per domain over every evaluated client's held-out data), scope
``federated`` (the strategy's aggregates of the train, query and evaluate metrics) and
scope ``server`` (the global model on the test split, where the run reports it). The
summary gains each client's latest accuracy and loss, averaged (Borazjani et al.'s
heterogeneity measure is the model's loss on each client's data), and the accuracy by
domain.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsim.observers.base import Observer, metric_rows
from fedsim.results import GLOBAL_TEST, MetricRow
from fedsim.trainer import DOMAIN_CORRECT, DOMAIN_COUNT, METRICS_KEY

CLIENT_MEASURES = ("accuracy", "loss")  # what the summary follows on each client's held-out data


class RoundMetrics(Observer):
    """Client, domain, federated and server rows (see the module docstring)."""

    def __init__(self, domains: list[str] | None = None) -> None:
        self.domains = domains
        # each client's latest held-out figures, by measure (CLIENT_MEASURES) and client
        self.client_latest: dict[str, dict[int, float]] = {measure: {} for measure in CLIENT_MEASURES}
        self.accuracy_by_domain: dict[str, float] = {}

    def on_start(self, context, arrays, final):
        return metric_rows(0, "server", "global", final) if final else []

    def restore(self, context, metrics):
        for measure in CLIENT_MEASURES:
            clients = metrics[(metrics.scope == "client") & (metrics.metric == measure)].groupby("id").tail(1)
            self.client_latest[measure] = {int(client): value for client, value in zip(clients.id, clients.value)}
        evaluated = metrics[metrics.scope.isin(["server", "domain"]) | (metrics.id == "evaluate")]
        last = evaluated[evaluated["round"] == evaluated["round"].max()] if len(evaluated) else evaluated
        domains = last[(last.scope == "domain") & (last.metric == "accuracy")]
        self.accuracy_by_domain = dict(zip(domains.id, domains.value))

    def on_query_aggregated(self, context, server_round, metrics):
        return metric_rows(server_round, "federated", "query", metrics)

    def on_train_replies(self, context, server_round, replies, faults):
        return self.client_rows(context, server_round, replies)

    def on_train_aggregated(self, context, server_round, strategy, replies, metrics):
        return metric_rows(server_round, "federated", "train", metrics or {})

    def on_evaluate_replies(self, context, server_round, replies, faults, arrays):
        rows = self.client_rows(context, server_round, replies)
        for client, metrics in context.by_client(replies):
            for measure in CLIENT_MEASURES:
                self.client_latest[measure][client] = float(metrics.get(measure, np.nan))
        return rows + self.domain_rows(server_round, replies)

    def on_evaluated(self, context, server_round, arrays, on_clients, final):
        rows = metric_rows(server_round, "federated", "evaluate", on_clients)
        if context.evaluated_on == GLOBAL_TEST:
            rows += metric_rows(server_round, "server", "global", final)
        return rows

    @staticmethod
    def client_rows(context, server_round: int, replies) -> list[MetricRow]:
        rows = []
        for reply in replies:
            client = str(context.clients[reply.metadata.src_node_id])
            rows += metric_rows(server_round, "client", client, reply.content[METRICS_KEY])
        return rows

    def domain_rows(self, server_round: int, replies) -> list[MetricRow]:
        """Accuracy per domain over every evaluated client's held-out data."""
        counted = [reply.content[METRICS_KEY] for reply in replies if DOMAIN_COUNT in reply.content[METRICS_KEY]]
        if not self.domains or not counted:
            return []
        correct = np.sum([metrics[DOMAIN_CORRECT] for metrics in counted], axis=0)
        total = np.sum([metrics[DOMAIN_COUNT] for metrics in counted], axis=0)
        self.accuracy_by_domain = {name: float(c / n) for name, c, n in zip(self.domains, correct, total) if n > 0}
        return [
            MetricRow(server_round, "domain", name, "accuracy", acc) for name, acc in self.accuracy_by_domain.items()
        ]

    def summary(self) -> dict[str, Any]:
        accuracy = across_clients(self.client_latest["accuracy"])
        loss = across_clients(self.client_latest["loss"])
        return {
            "client_accuracy_mean": float(np.mean(accuracy)) if accuracy else None,
            # Borazjani et al.'s heterogeneity measure: the model's loss on each client's data
            "client_loss_mean": float(np.mean(loss)) if loss else None,
            "client_loss_std": float(np.std(loss)) if loss else None,
            "accuracy_by_domain": self.accuracy_by_domain or None,
        }


def across_clients(latest: dict[int, float]) -> list[float]:
    """The clients' latest values, in client order so that a resumed run sums exactly as
    an uninterrupted one; clients that reported none are left out."""
    return [latest[client] for client in sorted(latest) if not math.isnan(latest[client])]
