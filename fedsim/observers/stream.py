"""What a run over a drift stream (:mod:`partitioners.drift`) reports besides the usual.

- scope ``concept``: every evaluation round, the clients' held-out accuracy grouped by the
  concept each client holds in that round (each client evaluated with the model its
  method gives it), id = concept id;
- scope ``slot``: at the last evaluated round of each time slot, the clients' held-out
  accuracy then, id = slot;
- scope ``drift``: per round, how a method's real-drift detections compare with the
  stream's ground truth (counts ``tp``, ``fp``, ``fn``, ``tn``).

A trainer that detects real drift reports, in its train metrics, the slot it compared
against (``drift-from-slot``) and its verdict (``real-drift``, 1 or 0); the truth is
whether the client's main concept differs between that slot and the current one.
``summary.json`` gains ``accuracy_by_slot``, ``accuracy_mean_over_slots``,
``accuracy_by_concept`` (the last evaluation's) and ``drift_detection`` (precision,
recall, F1 and the counts over the run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord

from fedsim import multimodel
from fedsim.data import Dataset
from fedsim.data.transforms import parse_transform
from fedsim.observers.base import Observer
from fedsim.results import MetricRow
from fedsim.trainer import DRIFT_FROM_SLOT, NUM_EXAMPLES, REAL_DRIFT
from partitioners import Partition

COUNTS = ("tp", "fp", "fn", "tn")


class StreamMetrics(Observer):
    """Per-slot and per-concept accuracy, and drift-detection scores, over one run."""

    def __init__(self, partition: Partition, rounds: int, evaluate_every: int) -> None:
        self.partition = partition
        self.rounds = rounds
        self.evaluate_every = evaluate_every
        self.by_slot: dict[int, float] = {}
        self.by_concept: dict[int, float] = {}
        self.detection = dict.fromkeys(COUNTS, 0)
        self.by_test_set: dict[str, float] = {}
        self._test_sets: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def concept_of(self, client: int, server_round: int) -> int:
        return self.partition.view_at(client, self.partition.slot_of(server_round)).concept

    def last_evaluated_round(self, slot: int) -> int | None:
        """The last round of ``slot`` that evaluates (every ``evaluate_every`` rounds and
        the run's last), or None."""
        rounds = [r for r in range(1, self.rounds + 1) if self.partition.slot_of(r) == slot]
        evaluated = [
            r for r in rounds if self.evaluate_every > 0 and (r % self.evaluate_every == 0 or r == self.rounds)
        ]
        return evaluated[-1] if evaluated else None

    def evaluation_rows(self, server_round: int, results: list[tuple[int, dict[str, Any]]]) -> list[MetricRow]:
        """``results``: (client, its evaluate metrics) for every useful evaluate reply."""
        correct: dict[int, float] = {}
        seen: dict[int, float] = {}
        for client, metrics in results:
            count = float(metrics.get(NUM_EXAMPLES, 0))
            if count <= 0 or "accuracy" not in metrics:
                continue
            concept = self.concept_of(client, server_round)
            correct[concept] = correct.get(concept, 0.0) + float(metrics["accuracy"]) * count
            seen[concept] = seen.get(concept, 0.0) + count
        self.by_concept = {concept: correct[concept] / seen[concept] for concept in sorted(seen)}
        rows = [MetricRow(server_round, "concept", str(c), "accuracy", a) for c, a in self.by_concept.items()]
        slot = self.partition.slot_of(server_round)
        if seen and self.last_evaluated_round(slot) == server_round:
            self.by_slot[slot] = sum(correct.values()) / sum(seen.values())
            rows.append(MetricRow(server_round, "slot", str(slot), "accuracy", self.by_slot[slot]))
        return rows

    def detection_rows(self, server_round: int, results: list[tuple[int, dict[str, Any]]]) -> list[MetricRow]:
        """``results``: (client, its train metrics); clients that checked for drift count."""
        counts = dict.fromkeys(COUNTS, 0)
        for client, metrics in results:
            if DRIFT_FROM_SLOT not in metrics or REAL_DRIFT not in metrics:
                continue
            before = self.partition.view_at(client, int(metrics[DRIFT_FROM_SLOT])).concept
            truth = before != self.concept_of(client, server_round)
            said = bool(metrics[REAL_DRIFT])
            counts[("t" if said == truth else "f") + ("p" if said else "n")] += 1
        if not any(counts.values()):
            return []
        for key, value in counts.items():
            self.detection[key] += value
        return [MetricRow(server_round, "drift", "detection", key, float(value)) for key, value in counts.items()]

    def test_set_rows(
        self,
        server_round: int,
        arrays: ArrayRecord,
        dataset: Dataset,
        evaluate: Callable[[ArrayRecord, np.ndarray, np.ndarray], dict[str, float]],
    ) -> list[MetricRow]:
        """The stream's test sets: the test split through each concept's label map and
        each transform of the round's slot, scope ``test_set``, id ``concept/transform``.
        With several global models each set's best model counts (``accuracy_best_model``:
        an upper bound, as the choice uses the test labels)."""
        slot = self.partition.slot_of(server_round)
        current = {self.partition.view_at(c, slot).transform for c in range(self.partition.num_clients)}
        packed = multimodel.is_packed(arrays)
        models = list(multimodel.unpack(arrays).values()) if packed else [arrays]
        metric = "accuracy_best_model" if packed else "accuracy"
        rows = []
        for concept, transform in self.partition.test_sets():
            if transform not in current:
                continue
            if (concept, transform) not in self._test_sets:
                spec = self.partition.transform_specs[transform]
                x = dataset.x_test if spec == "identity" else parse_transform(spec)(dataset.x_test, seed=0)
                maps = self.partition.label_maps
                y = dataset.y_test if maps is None else maps[concept][dataset.y_test]
                self._test_sets[(concept, transform)] = (x, y)
            x, y = self._test_sets[(concept, transform)]
            accuracy = max(evaluate(model, x, y)["accuracy"] for model in models)
            self.by_test_set[f"{concept}/{transform}"] = accuracy
            rows.append(MetricRow(server_round, "test_set", f"{concept}/{transform}", metric, accuracy))
        return rows

    # -- the round loop's hooks ---------------------------------------------------------------
    def on_query_replies(self, context, server_round, replies, faults):
        return self.detection_rows(server_round, context.by_client(replies))

    def on_train_replies(self, context, server_round, replies, faults):
        return self.detection_rows(server_round, context.by_client(replies))

    def on_evaluate_replies(self, context, server_round, replies, faults, arrays):
        rows = self.evaluation_rows(server_round, context.by_client(replies))
        if self.last_evaluated_round(self.partition.slot_of(server_round)) == server_round:
            rows += self.test_set_rows(server_round, arrays, context.dataset, context.evaluate_global)
        return rows

    def restore(self, context, metrics: pd.DataFrame) -> None:
        """The running figures of a resumed run, from its metrics.csv."""
        frame = metrics
        concept = frame[(frame.scope == "concept") & (frame.metric == "accuracy")]
        if len(concept):
            last = concept[concept["round"] == concept["round"].max()]
            self.by_concept = {int(c): float(v) for c, v in zip(last.id, last.value)}
        slot = frame[(frame.scope == "slot") & (frame.metric == "accuracy")]
        self.by_slot = {int(s): float(v) for s, v in zip(slot.id, slot.value)}
        drift = frame[frame.scope == "drift"].groupby("metric").value.sum()
        self.detection = {key: int(drift.get(key, 0)) for key in COUNTS}
        tests = frame[frame.scope == "test_set"]
        if len(tests):
            last = tests[tests["round"] == tests["round"].max()]
            self.by_test_set = {ident: float(v) for ident, v in zip(last.id, last.value)}

    def summary(self) -> dict[str, Any]:
        tp, fp, fn = (self.detection[key] for key in ("tp", "fp", "fn"))
        checked = sum(self.detection.values())
        precision = tp / (tp + fp) if tp + fp else None
        recall = tp / (tp + fn) if tp + fn else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
        return {
            "accuracy_by_slot": {str(s): a for s, a in sorted(self.by_slot.items())} or None,
            "accuracy_mean_over_slots": float(np.mean(list(self.by_slot.values()))) if self.by_slot else None,
            "accuracy_by_concept": {str(c): a for c, a in sorted(self.by_concept.items())} or None,
            "accuracy_by_test_set": dict(sorted(self.by_test_set.items())) or None,
            "drift_detection": (
                {"precision": precision, "recall": recall, "f1": f1, "checks": checked, **self.detection}
                if checked
                else None
            ),
        }
