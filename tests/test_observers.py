"""Round observers: what a run records is a list of observers the round loop calls without
knowing them by name; a user adds one with an ``[[observer]]`` table."""

from __future__ import annotations

import ast
import json

import pytest

from fedsim.errors import UserError
from fedsim.observers import Observer, RoundObserver, metric_rows
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from tests.conftest import ROOT, tiny_experiment

CALLS: list[tuple[str, int]] = []


class Recorder(Observer):
    """A user's observer: records every hook, adds a row per round and a summary key."""

    def __init__(self, label: str = "seen", every: int = 1) -> None:
        self.label = label
        self.every = every
        self.trained: dict[int, int] = {}

    def on_start(self, context, arrays, final):
        CALLS.append(("on_start", 0))
        return []

    def on_train_replies(self, context, server_round, replies, faults):
        CALLS.append(("on_train_replies", server_round))
        return []

    def on_evaluated(self, context, server_round, arrays, on_clients, final):
        CALLS.append(("on_evaluated", server_round))
        if server_round % self.every:
            return []
        return metric_rows(server_round, "observer", self.label, {"accuracy_squared": final["accuracy"] ** 2})

    def on_round_end(self, context, server_round, rows, strategy, arrays, final, trained):
        CALLS.append(("on_round_end", server_round))
        self.trained[server_round] = trained

    def on_run_end(self, context, metrics):
        CALLS.append(("on_run_end", context.experiment.rounds))

    def summary(self):
        return {"trained_by_round": {str(r): n for r, n in self.trained.items()}}


def test_a_users_observer_from_the_experiment_file_records_into_the_run(tmp_path):
    CALLS.clear()
    experiment = tiny_experiment("rounds=3", "observer=[{name='tests.test_observers:Recorder', label='mine'}]")
    assert experiment.observer[0].params == {"label": "mine", "every": 1}, "defaults spelled out"
    run = run_experiment(experiment, tmp_path / "run")
    assert [name for name, _ in CALLS] == [
        "on_start",
        *["on_train_replies", "on_evaluated", "on_round_end"] * 3,
        "on_run_end",
    ]
    metrics = RunDirectory(run.path).read_metrics()
    mine = metrics[metrics.scope == "observer"]
    server = metrics[(metrics.scope == "server") & (metrics.metric == "accuracy") & (metrics["round"] > 0)]
    assert list(mine.value.round(10)) == list((server.value**2).round(10))
    assert run.summary["trained_by_round"] == {"1": 4, "2": 4, "3": 4}
    assert 'name = "tests.test_observers:Recorder"' in (run.path / "config.toml").read_text()


@pytest.mark.parametrize(
    "table, message",
    [
        ("{name='tests.test_observers:Nothing'}", r"\[\[observer\]\] name = .* cannot be (found|imported)|has no"),
        ("{name='tests.test_observers:CALLS'}", r"is not a subclass of fedsim.observers.Observer"),
        (
            "{name='tests.test_observers:Recorder', lable='x'}",
            r"\[\[observer\]\] #1 unknown key 'lable'; did you mean 'label'",
        ),
        ("{name='tests.test_observers:Recorder', every='often'}", r"\[\[observer\]\] #1 every = 'often' is invalid"),
        ("{every=2}", r"\[\[observer\]\] #1 is missing the required key 'name'"),
    ],
)
def test_a_bad_observer_table_is_a_one_line_error(table, message):
    with pytest.raises(UserError, match=message) as error:
        tiny_experiment(f"observer=[{table}]")
    assert "\n" not in str(error.value)


def test_observer_must_be_written_as_tables():
    with pytest.raises(UserError, match="'observer' must be written as \\[\\[observer\\]\\] tables"):
        tiny_experiment("observer='tests.test_observers:Recorder'")


def test_the_round_loop_names_no_observer():
    """The loop calls its observers through the protocol; no observer class, and no
    module of fedsim.observers but the protocol's, is named in it."""
    source = (ROOT / "fedsim/serverapp.py").read_text()
    tree = ast.parse(source)
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module is not None}
    assert {module for module in imported if module.startswith("fedsim.observers")} == {"fedsim.observers.base"}
    for name in (
        "AttackMetrics",
        "StreamMetrics",
        "FaultCounts",
        "RoundMetrics",
        "ClientFairness",
        "Traffic",
        "MetricsWriter",
        "Checkpoints",
    ):
        assert name not in source


def test_every_built_in_observer_follows_the_protocol():
    from fedsim.observers import (
        AttackMetrics,
        Checkpoints,
        ClientFairness,
        FaultCounts,
        MetricsWriter,
        RoundCallback,
        RoundMetrics,
        StreamMetrics,
        Traffic,
    )

    built_in = (AttackMetrics, Checkpoints, ClientFairness, FaultCounts, MetricsWriter, RoundCallback, RoundMetrics)
    for cls in (*built_in, StreamMetrics, Traffic):
        assert issubclass(cls, Observer) and issubclass(cls, RoundObserver)


def test_an_observers_summary_lands_in_summary_json(tmp_path):
    experiment = tiny_experiment("rounds=1", "observer=[{name='tests.test_observers:Recorder'}]")
    run = run_experiment(experiment, tmp_path / "run")
    assert json.loads((run.path / "summary.json").read_text())["trained_by_round"] == {"1": 4}
