"""What the fault screen set aside (:mod:`fedsim.faults`): scope ``faults`` of metrics.csv,
id the phase (``query``, ``train``, ``evaluate``), one row per kind that happened in the
round (``dropped``, ``raised``, ``timed_out``, ``worker_died``, ``nonfinite``, ...), and
the totals by kind in summary.json's ``faults``."""

from __future__ import annotations

from typing import Any

from fedsim.faults import RoundFaults
from fedsim.observers.base import Observer
from fedsim.results import MetricRow


class FaultCounts(Observer):
    """Counts of the replies the fault screen set aside, by phase and kind."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}

    def rows(self, server_round: int, phase: str, faults: RoundFaults) -> list[MetricRow]:
        for kind, count in faults.counts.items():
            self.totals[kind] = self.totals.get(kind, 0) + count
        return [
            MetricRow(server_round, "faults", phase, kind, float(count))
            for kind, count in sorted(faults.counts.items())
        ]

    def on_query_replies(self, context, server_round, replies, faults):
        return self.rows(server_round, "query", faults)

    def on_train_replies(self, context, server_round, replies, faults):
        return self.rows(server_round, "train", faults)

    def on_evaluate_replies(self, context, server_round, replies, faults, arrays):
        return self.rows(server_round, "evaluate", faults)

    def restore(self, context, metrics):
        set_aside = metrics[metrics.scope == "faults"].groupby("metric").value.sum()
        self.totals = {kind: int(count) for kind, count in set_aside.items()}

    def summary(self) -> dict[str, Any]:
        return {"faults": dict(sorted(self.totals.items()))}
