"""Fairness across clients: the spread of the clients' held-out accuracy in each evaluated
round is NumPy's statistics of the per-client accuracies in metrics.csv, summary.json
gives the last evaluated round's and the best round's, and a resumed run gives the same."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fedsim.observers.fairness import STATS, ClientFairness, spread
from fedsim.runner import run_experiment

from .conftest import interrupted_and_resumed, tiny_experiment

TIMES = ("wall_time_s", "rounds_time_s")


def numpy_spread(accuracies: np.ndarray) -> dict[str, float]:
    ordered = np.sort(accuracies)
    return {
        "mean": np.mean(accuracies),
        "p10": np.percentile(accuracies, 10),
        "p50": np.percentile(accuracies, 50),
        "p90": np.percentile(accuracies, 90),
        "min": np.min(accuracies),
        "std": np.std(accuracies),
        "worst10_mean": np.mean(ordered[: max(1, math.ceil(len(ordered) / 10))]),
    }


def fairness_rows(metrics: pd.DataFrame) -> dict[int, dict[str, float]]:
    rows = metrics[(metrics.scope == "federated") & (metrics.id == "fairness")]
    return {
        int(r): {metric.removeprefix("accuracy_"): value for metric, value in zip(found.metric, found.value)}
        for r, found in rows.groupby("round")
    }


def test_the_statistics_on_known_values():
    ten = [0.1 * k for k in range(1, 11)]
    stats = spread(ten)
    assert stats["p10"] == pytest.approx(0.19)  # linear: 0.1 + 0.9 * (0.2 - 0.1)
    assert stats["p50"] == pytest.approx(0.55)
    assert stats["p90"] == pytest.approx(0.91)
    assert stats["min"] == pytest.approx(0.1)
    assert stats["std"] == pytest.approx(np.std(ten))
    assert stats["worst10_mean"] == pytest.approx(0.1), "10% of 10 clients: the worst one"
    assert spread([*ten, 0.0])["worst10_mean"] == pytest.approx(0.05), "11 clients: the 2 worst"
    assert spread([0.7])["worst10_mean"] == 0.7 and spread([0.7])["std"] == 0.0


def test_the_best_round_is_the_highest_mean_the_earliest_on_a_tie():
    fairness = ClientFairness()
    for server_round, accuracies in [(1, [0.2, 0.4]), (2, [0.5, 0.7]), (3, [0.6, 0.6]), (4, [0.1, 0.3])]:
        fairness.keep(server_round, spread(accuracies))
    summary = fairness.summary()
    assert summary["client_accuracy_best_round"] == 2
    assert summary["client_accuracy_mean_best"] == pytest.approx(0.6)
    assert summary["client_accuracy_min_best"] == pytest.approx(0.5)
    assert summary["client_accuracy_min"] == pytest.approx(0.1), "last: round 4's"
    assert "client_accuracy_mean" not in summary, "the clients' mean is RoundMetrics'"


def test_fairness_rows_are_numpys_statistics_of_the_clients_accuracies(tmp_path):
    experiment = tiny_experiment("rounds=4", "partition.num_clients=12", "partition.alpha=0.3", "seed=2")
    summary = run_experiment(experiment, tmp_path / "run").summary
    metrics = pd.read_csv(tmp_path / "run/metrics.csv", dtype={"id": str})
    found = fairness_rows(metrics)
    assert sorted(found) == [1, 2, 3, 4]
    clients = metrics[(metrics.scope == "client") & (metrics.metric == "accuracy")]
    for server_round, stats in found.items():
        evaluated = clients[clients["round"] == server_round]
        accuracies = evaluated.value.to_numpy()[np.argsort(evaluated.id.astype(int).to_numpy())]
        assert len(accuracies) == 12
        assert stats == numpy_spread(accuracies)  # same values, same order: the same bits
    means = {server_round: stats["mean"] for server_round, stats in found.items()}
    best = max(means, key=lambda server_round: (means[server_round], -server_round))
    assert summary["client_accuracy_best_round"] == best
    for name in STATS:
        assert summary[f"client_accuracy_{name}_best"] == found[best][name]
        if name != "mean":
            assert summary[f"client_accuracy_{name}"] == found[4][name]
    assert summary["client_accuracy_mean"] == pytest.approx(found[4]["mean"])


def test_only_evaluated_rounds_count_and_a_run_that_never_evaluates_has_none(tmp_path):
    summary = run_experiment(tiny_experiment("rounds=3", "evaluate_every=2"), tmp_path / "some").summary
    metrics = pd.read_csv(tmp_path / "some/metrics.csv", dtype={"id": str})
    assert sorted(fairness_rows(metrics)) == [2, 3]
    assert summary["client_accuracy_best_round"] in (2, 3)
    summary = run_experiment(tiny_experiment("rounds=1", "evaluate_every=0"), tmp_path / "none").summary
    assert summary["client_accuracy_best_round"] is None and summary["client_accuracy_p10"] is None


def test_a_resumed_run_has_the_same_fairness_as_an_uninterrupted_one(tmp_path, monkeypatch):
    experiment = tiny_experiment("rounds=4", "strategy.fraction_evaluate=0.75")
    assert interrupted_and_resumed(experiment, tmp_path, monkeypatch, crash_round=3).status == "resume"
    summaries = [json.loads((tmp_path / folder / "summary.json").read_text()) for folder in ("run", "reference")]
    for summary in summaries:
        for key in TIMES:
            summary.pop(key)
    assert summaries[0] == summaries[1]
    restored = ClientFairness()  # from the rows alone, wherever the best round fell
    restored.restore(None, pd.read_csv(tmp_path / "reference/metrics.csv", dtype={"id": str}))
    assert restored.summary() == {key: summaries[1][key] for key in restored.summary()}
    assert summaries[0]["client_accuracy_best_round"] is not None
