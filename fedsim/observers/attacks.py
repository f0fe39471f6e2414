"""What a run with attackers reports besides the usual (scope ``attacker`` of metrics.csv).

Every evaluation round, on the global model and the dataset's test split:

- id = the attacker's name, metric ``asr``: the attack success rate, the fraction of the
  test images the attack could poison (those not of its target class; label flipping's:
  those of its source class), stamped with its trigger, that the model classifies as its
  target. The trigger is the one it is measured with (DBA: the global trigger, all its parts; Mirage: the
  pattern it has learned so far, from the newest state of its clients);
- id ``all``: ``asr_mean`` and ``asr_gap`` (max - min over the attackers), and
  ``clean_accuracy``, the model's accuracy on the clean test split.

Every training round whose strategy is a defence that says which replies it accepted
(``last_accepted``): per attacker ``seen`` (its clients' replies, counted only in rounds
of its window: outside it an attacker trains as a benign client and is neither) and
``rejected``; the same for id ``benign``. summary.json gains ``asr_by_attacker``,
``asr_mean`` and ``asr_gap`` (the last evaluation's), ``asr_peak_by_attacker``,
``asr_at_window_end`` (each attacker's ASR at the last evaluation inside its window: with
the final figures, how long the backdoor persists), ``clean_accuracy`` and ``detection``
(true-positive rate: rejected attacker replies over attacker replies; false-positive
rate: rejected benign replies over benign replies).

The global model is what is measured: for a strategy that keeps layers on the clients
(FedBN) those layers stay at their initial values, as in the server's clean accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord

from fedsim.attack_plan import Attacker, AttackPlan, tell_attackers
from fedsim.attacks.base import AttackTrainer
from fedsim.attacks.triggers import Trigger
from fedsim.data import Dataset
from fedsim.observers.base import Observer
from fedsim.protocols import Filtering
from fedsim.results import GLOBAL_TEST, MetricRow
from fedsim.state import ClientStateStore
from fedsim.trainer import ClientTrainer

SCOPE = "attacker"
TOTALS = "all"  # id of the rows over every attacker
BENIGN = "benign"  # id of the benign clients' detection counts

Evaluate = Callable[..., dict[str, float]]  # (arrays[, x, y]) -> classification metrics


class AttackMetrics(Observer):
    """Per-attacker success rates and detection counts over one run; it also tells each
    attacker what the round tells it (the training examples of the round's clients, which
    model replacement's exact boosting factor needs)."""

    def __init__(self, plan: AttackPlan, dataset: Dataset, states: ClientStateStore, trainer: ClientTrainer) -> None:
        self.plan = plan
        self.dataset = dataset
        self.states = states
        self.attacks: dict[str, AttackTrainer] = {a.name: plan.build(a, trainer) for a in plan.attackers}
        self.asr: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.at_window_end: dict[str, float] = {}
        self.clean_accuracy: float | None = None
        self.detection: dict[str, dict[str, int]] = {}  # id -> {"seen": n, "rejected": n}

    # -- success ------------------------------------------------------------------------
    def measured_trigger(self, attacker: Attacker, server_round: int) -> Trigger | None:
        """The attacker's trigger as of ``server_round``, from the newest state among its clients."""
        newest_round, newest_state = 0, {}
        for client in attacker.clients:
            saved, state = self.states.newest(client, server_round)
            if saved > newest_round:
                newest_round, newest_state = saved, state
        return self.attacks[attacker.name].measured_trigger(newest_state)

    def poisoned_test_set(self, attacker: Attacker, server_round: int) -> tuple[np.ndarray, np.ndarray]:
        """The test images the attack could poison, with its trigger, and its target as labels."""
        attack = self.attacks[attacker.name]
        eligible = attack.eligible(torch.as_tensor(self.dataset.y_test)).numpy()
        x = self.dataset.x_test[eligible]
        trigger = self.measured_trigger(attacker, server_round)
        if trigger is not None and len(x):
            x = trigger.apply(x)
        return x, np.full(len(x), attacker.target, dtype=self.dataset.y_test.dtype)

    def evaluation_rows(
        self, server_round: int, arrays: ArrayRecord, evaluate: Evaluate, clean: dict[str, float] | None = None
    ) -> list[MetricRow]:
        """ASR of each attacker on the global ``arrays`` (``evaluate(arrays, x, y)``), their
        mean and gap, and the clean accuracy (``clean``, or ``evaluate(arrays)``)."""
        rows = []
        for attacker in self.plan.attackers:
            x, y = self.poisoned_test_set(attacker, server_round)
            asr = float(evaluate(arrays, x, y)["accuracy"]) if len(x) else float("nan")
            self.asr[attacker.name] = asr
            self.peak[attacker.name] = max(self.peak.get(attacker.name, asr), asr)
            if attacker.window is not None and attacker.window[0] <= server_round <= attacker.window[1]:
                self.at_window_end[attacker.name] = asr
            rows.append(MetricRow(server_round, SCOPE, attacker.name, "asr", asr))
        clean = clean if clean is not None else evaluate(arrays)
        self.clean_accuracy = float(clean["accuracy"])
        values = list(self.asr.values())
        rows += [
            MetricRow(server_round, SCOPE, TOTALS, "asr_mean", float(np.mean(values))),
            MetricRow(server_round, SCOPE, TOTALS, "asr_gap", float(np.max(values) - np.min(values))),
            MetricRow(server_round, SCOPE, TOTALS, "clean_accuracy", self.clean_accuracy),
        ]
        return rows

    # -- detection ----------------------------------------------------------------------
    def detection_rows(self, server_round: int, participants: list[int], accepted: list[int] | None) -> list[MetricRow]:
        """Counts of a filtering defence's verdicts: ``participants`` are the clients whose
        replies it judged, ``accepted`` those it kept (None: the strategy does not say)."""
        if accepted is None:
            return []
        kept = set(accepted)
        counts: dict[str, dict[str, int]] = {}
        for client in participants:
            attacker = self.plan.attacker_of(client)
            if attacker is None:
                ident = BENIGN
            elif attacker.attacks_in(server_round):
                ident = attacker.name
            else:
                continue  # an attacker outside its window trains as a benign client: neither
            tally = counts.setdefault(ident, {"seen": 0, "rejected": 0})
            tally["seen"] += 1
            tally["rejected"] += client not in kept
        rows = []
        for ident, tally in counts.items():
            total = self.detection.setdefault(ident, {"seen": 0, "rejected": 0})
            for key, value in tally.items():
                total[key] += value
                rows.append(MetricRow(server_round, SCOPE, ident, key, float(value)))
        return rows

    # -- the round loop's hooks ---------------------------------------------------------------
    @staticmethod
    def clean(context, final: dict[str, float]) -> dict[str, float] | None:
        """The clean accuracy the loop measured (the global model's), if it did."""
        return final if context.evaluated_on == GLOBAL_TEST else None

    def on_start(self, context, arrays, final):  # the backdoors' chance level
        return self.evaluation_rows(0, arrays, context.evaluate_global, self.clean(context, final))

    def on_train_messages(self, context, server_round, messages):
        return tell_attackers(
            self.plan, messages, context.clients, lambda client: context.train_size(client, server_round)
        )

    def on_train_aggregated(self, context, server_round, strategy, replies, metrics):
        # a filtering defence's verdict; a rule that keeps every reply gives none
        accepted = strategy.last_accepted if isinstance(strategy, Filtering) and strategy.filters else None
        return self.detection_rows(
            server_round,
            [context.clients[reply.metadata.src_node_id] for reply in replies],
            None if accepted is None else [context.clients[node] for node in accepted],
        )

    def on_evaluated(self, context, server_round, arrays, on_clients, final):
        return self.evaluation_rows(server_round, arrays, context.evaluate_global, self.clean(context, final))

    def on_run_end(self, context, metrics):
        # lazy: matplotlib takes a second to import, paid only when a plot is drawn
        from fedsim.plots import plot_attacks

        windows = {attacker.name: attacker.window for attacker in self.plan.attackers}
        title = f"{context.experiment.name}: {context.experiment.strategy.name}"
        plot_attacks(metrics, context.run.plots / "attack.png", title, windows)

    # -- resume and summary -------------------------------------------------------------
    def restore(self, context, metrics: pd.DataFrame) -> None:
        """The running figures of a resumed run, from its metrics.csv."""
        rows = metrics[metrics.scope == SCOPE]
        for attacker in self.plan.attackers:
            asr = rows[(rows.id == attacker.name) & (rows.metric == "asr")]
            if len(asr):
                self.asr[attacker.name] = float(asr.value.iloc[-1])
                self.peak[attacker.name] = float(asr.value.max())
                if attacker.window is not None:
                    inside = asr[(asr["round"] >= attacker.window[0]) & (asr["round"] <= attacker.window[1])]
                    if len(inside):
                        self.at_window_end[attacker.name] = float(inside.value.iloc[-1])
        clean = rows[(rows.id == TOTALS) & (rows.metric == "clean_accuracy")]
        self.clean_accuracy = float(clean.value.iloc[-1]) if len(clean) else None
        verdicts = rows[rows.metric.isin(["seen", "rejected"])].groupby(["id", "metric"]).value.sum()
        self.detection = {}
        for (ident, metric), value in verdicts.items():
            self.detection.setdefault(str(ident), {"seen": 0, "rejected": 0})[metric] = int(value)

    def summary(self) -> dict[str, Any]:
        values = list(self.asr.values())
        return {
            "asr_by_attacker": dict(self.asr) or None,
            "asr_mean": float(np.mean(values)) if values else None,
            "asr_gap": float(np.max(values) - np.min(values)) if values else None,
            "asr_peak_by_attacker": dict(self.peak) or None,
            "asr_at_window_end": dict(self.at_window_end) or None,
            "clean_accuracy": self.clean_accuracy,
            "detection": self.detection_summary(),
        }

    def detection_summary(self) -> dict[str, Any] | None:
        if not self.detection:
            return None
        benign = self.detection.get(BENIGN, {"seen": 0, "rejected": 0})
        attackers = {ident: tally for ident, tally in self.detection.items() if ident != BENIGN}
        seen = sum(tally["seen"] for tally in attackers.values())
        rejected = sum(tally["rejected"] for tally in attackers.values())
        return {
            "tpr": rejected / seen if seen else None,
            "fpr": benign["rejected"] / benign["seen"] if benign["seen"] else None,
            "attacker_replies": seen,
            "attacker_replies_rejected": rejected,
            "benign_replies": benign["seen"],
            "benign_replies_rejected": benign["rejected"],
            "by_attacker": {
                ident: {**tally, "tpr": tally["rejected"] / tally["seen"] if tally["seen"] else None}
                for ident, tally in sorted(attackers.items())
            },
        }
