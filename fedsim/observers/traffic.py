"""Communication cost: the array bytes the server sent each client and received from it,
each round, as counted by the grid (:class:`~fedsim.ordered_grid.ArrayTraffic`).

"Array bytes" are the serialized buffers (``Array.data``) of every ArrayRecord in a
message: the models, several models packed in one message (each counts), a strategy's
extra arrays (GGEUR's class geometry) and a query's statistics, all as they are sent.
Config and metric records, record keys and the transport's own framing are not counted:
they are small beside the arrays and depend on the engine, so the count is the same on
every engine. Every exchange of the round counts: query stages, training and evaluation.
A message counts down when it is sent, even if no useful reply comes; an error reply
counts 0 up, and so does the reply of a client injected to drop out (``[faults] drop``),
which never arrives.

Rows of metrics.csv, at the end of every round: scope ``client``, id the client, metrics
``bytes_down`` and ``bytes_up`` (only clients the round sent something to), and scope
``federated``, id ``traffic``, the round's totals ``bytes_down`` and ``bytes_up``.
summary.json gains ``bytes_down_total`` and ``bytes_up_total`` over the run.
"""

from __future__ import annotations

from typing import Any

from fedsim.observers.base import Observer
from fedsim.results import MetricRow

DIRECTIONS = ("bytes_down", "bytes_up")  # server to client, client to server
TOTALS_ID = "traffic"  # the id of the round's totals (scope "federated")


class Traffic(Observer):
    """Array bytes per client and per round, and over the run (see the module docstring)."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(DIRECTIONS, 0)

    def on_exchanges_done(self, context, server_round):
        down, up = context.traffic.take()
        rows = []
        for client in sorted(down.keys() | up.keys()):
            for metric, counted in zip(DIRECTIONS, (down, up)):
                rows.append(MetricRow(server_round, "client", str(client), metric, float(counted.get(client, 0))))
        for metric, counted in zip(DIRECTIONS, (down, up)):
            total = sum(counted.values())
            self.totals[metric] += total
            rows.append(MetricRow(server_round, "federated", TOTALS_ID, metric, float(total)))
        return rows

    def restore(self, context, metrics):
        rounds = metrics[(metrics.scope == "federated") & (metrics.id == TOTALS_ID)]
        self.totals = {metric: int(rounds[rounds.metric == metric].value.sum()) for metric in DIRECTIONS}

    def summary(self) -> dict[str, Any]:
        return {f"{metric}_total": total for metric, total in self.totals.items()}
