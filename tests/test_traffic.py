"""Communication cost: the array bytes each client is sent and sends back, per round, are
the serialized arrays of the messages as sent (several models count each), a client that
drops out or fails counts down but not up, the count is the same on every engine and
after a resume, and it changes no other number of a run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsim.environment import RunEnvironment
from fedsim.faults import FAULT_KEY
from fedsim.ordered_grid import ArrayTraffic, array_bytes
from fedsim.runner import run_experiment

from .conftest import interrupted_and_resumed, tiny_experiment
from .test_ggeur import ggeur_experiment

CLIENTS = 4
TIMES = ("wall_time_s", "rounds_time_s")


def model_bytes(experiment) -> int:
    """The serialized size of the experiment's model: every Array's ``.npy`` buffer."""
    record = ArrayRecord(RunEnvironment(experiment, run_dir=None).new_model().state_dict())
    return sum(len(array.data) for array in record.values())


def traffic(path) -> pd.DataFrame:
    """Round, client and direction -> bytes, from the run's metrics.csv."""
    metrics = pd.read_csv(path / "metrics.csv", dtype={"id": str})
    return metrics[metrics.metric.isin(["bytes_down", "bytes_up"])].reset_index(drop=True)


def per_client(rows: pd.DataFrame, metric: str) -> dict[tuple[int, int], float]:
    clients = rows[(rows.scope == "client") & (rows.metric == metric)]
    return {(int(r), int(c)): v for r, c, v in zip(clients["round"], clients.id, clients.value)}


def test_the_tiny_mlp_is_a_known_number_of_bytes():
    """64 -> 32 -> 10 in float32, each array a .npy buffer with its 128-byte header."""
    by_hand = sum(128 + 4 * size for size in (32 * 64, 32, 10 * 32, 10))
    assert model_bytes(tiny_experiment()) == by_hand == 10152


def test_fedavg_sends_the_model_down_for_training_and_evaluation_and_up_after_training(tmp_path):
    experiment = tiny_experiment("rounds=3", "strategy.fraction_train=0.5")
    summary = run_experiment(experiment, tmp_path / "run").summary
    size = model_bytes(experiment)
    rows = traffic(tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run/metrics.csv", dtype={"id": str})
    trained = metrics[(metrics.scope == "client") & (metrics.metric == "train_loss")]
    down, up = per_client(rows, "bytes_down"), per_client(rows, "bytes_up")
    for server_round in (1, 2, 3):
        sampled = set(trained[trained["round"] == server_round].id.astype(int))
        assert len(sampled) == CLIENTS // 2
        for client in range(CLIENTS):
            # every client evaluates the global model; the sampled ones also train on it
            assert down[server_round, client] == size * (1 + (client in sampled))
            assert up[server_round, client] == size * (client in sampled)  # evaluation replies carry no arrays
        totals = rows[(rows.scope == "federated") & (rows.id == "traffic") & (rows["round"] == server_round)]
        assert dict(zip(totals.metric, totals.value)) == {
            "bytes_down": size * (CLIENTS + CLIENTS // 2),
            "bytes_up": size * CLIENTS // 2,
        }
    assert summary["bytes_down_total"] == 3 * size * (CLIENTS + CLIENTS // 2)
    assert summary["bytes_up_total"] == 3 * size * CLIENTS // 2


def test_several_models_in_one_message_count_each_model(tmp_path):
    """IFCA sends its K models to every client (training and evaluation) and gets back
    the one model each client trained."""
    experiment = tiny_experiment("rounds=2", "strategy.name=ifca", "strategy.num_models=3")
    summary = run_experiment(experiment, tmp_path / "run").summary
    size = model_bytes(experiment)
    rows = traffic(tmp_path / "run")
    assert set(per_client(rows, "bytes_down").values()) == {2 * 3 * size}
    assert set(per_client(rows, "bytes_up").values()) == {size}
    assert summary["bytes_down_total"] == 2 * CLIENTS * 6 * size
    assert summary["bytes_up_total"] == 2 * CLIENTS * size


def test_ggeur_counts_its_statistics_up_and_its_class_geometry_down(tmp_path):
    """The statistics round sends the head and gets each class's count, mean and covariance
    (float64); every train message carries the head and the classes' eigenvalues and
    eigenvectors (float32); evaluation sends the head alone. LeNet's features: 84 dims."""
    summary = run_experiment(ggeur_experiment(), tmp_path / "run").summary
    dims, classes, header = 84, 10, 128
    head = (header + 4 * classes * dims) + (header + 4 * classes)
    statistics = (header + 8 * classes) + (header + 8 * classes * dims) + (header + 8 * classes * dims * dims)
    geometry = (header + 4 * classes * dims) + (header + 4 * classes * dims * dims)
    rows = traffic(tmp_path / "run")
    down, up = per_client(rows, "bytes_down"), per_client(rows, "bytes_up")
    for client in range(CLIENTS):
        assert down[1, client] == head + (head + geometry) + head  # query, train, evaluate
        assert up[1, client] == statistics + head
        assert down[2, client] == (head + geometry) + head
        assert up[2, client] == head
    assert summary["bytes_up_total"] == CLIENTS * (statistics + 2 * head)


@pytest.mark.parametrize(
    "fault",
    [["faults.drop=1.0"], ["faults.error=1.0"], ["faults.hang=1.0", "engine.client_timeout_s=0.5"]],
    ids=["drop", "error", "hang"],
)
def test_a_client_that_drops_out_or_fails_counts_down_but_not_up(fault, tmp_path):
    experiment = tiny_experiment("rounds=2", "faults.clients=[1]", *fault)
    summary = run_experiment(experiment, tmp_path / "run").summary
    assert sum(summary["faults"].values()) == 2, "client 1 failed in both rounds"
    size = model_bytes(experiment)
    rows = traffic(tmp_path / "run")
    down, up = per_client(rows, "bytes_down"), per_client(rows, "bytes_up")
    for server_round in (1, 2):
        assert [down[server_round, client] for client in range(CLIENTS)] == [2 * size] * CLIENTS
        assert [up[server_round, client] for client in range(CLIENTS)] == [size, 0, size, size]
    assert summary["bytes_up_total"] == 2 * 3 * size


def _as_a_server_app() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1  # Flower's messages need them


def test_array_bytes_count_arrays_only():
    _as_a_server_app()
    arrays = ArrayRecord({"w": Array(np.zeros((3, 5), np.float32)), "b": Array(np.zeros(5, np.float64))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1}), "metrics": MetricRecord({"n": 3})})
    message = Message(content, dst_node_id=7, message_type="train")
    assert array_bytes(message) == (128 + 60) + (128 + 40)
    assert array_bytes(Message(RecordDict({"config": ConfigRecord({"lr": 0.1})}), 7, "train")) == 0


def test_a_reply_to_a_message_marked_to_drop_counts_0_up_and_the_counter_starts_over_when_taken():
    _as_a_server_app()
    model = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))})})
    dropped = RecordDict({**model, "config": ConfigRecord({FAULT_KEY: "drop"})})
    messages = [Message(model, dst_node_id=10, message_type="train"), Message(dropped, 11, "train")]
    replies = [Message(model, reply_to=message) for message in messages]  # from node 10, 11
    counter = ArrayTraffic()
    counter.sent(messages, {10: 0, 11: 1})
    counter.received(messages, replies, {10: 0, 11: 1})
    assert counter.take() == ({0: 144, 1: 144}, {0: 144, 1: 0})
    assert counter.take() == ({}, {})


def test_a_resumed_run_counts_as_an_uninterrupted_one(tmp_path, monkeypatch):
    experiment = tiny_experiment("rounds=4", "strategy.fraction_train=0.5")
    assert interrupted_and_resumed(experiment, tmp_path, monkeypatch, crash_round=3).status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    summaries = [json.loads((tmp_path / folder / "summary.json").read_text()) for folder in ("run", "reference")]
    for summary in summaries:
        for key in TIMES:
            summary.pop(key)
    assert summaries[0] == summaries[1]
    assert summaries[0]["bytes_down_total"] == 4 * model_bytes(experiment) * (CLIENTS + CLIENTS // 2)


@pytest.mark.ray
def test_ray_counts_the_same_bytes_as_in_process(tmp_path):
    """With clients that drop out, and several models per message."""
    overrides = ["rounds=2", "strategy.name=ifca", "strategy.num_models=2", "seed=5", "faults.drop=0.3"]
    runs = {"inprocess": [], "ray": ["engine.name=ray", "engine.num_workers=2"]}
    found = {}
    for engine, extra in runs.items():
        summary = run_experiment(tiny_experiment(*overrides, *extra), tmp_path / engine).summary
        found[engine] = (traffic(tmp_path / engine), summary["bytes_down_total"], summary["bytes_up_total"])
    assert found["ray"][0].equals(found["inprocess"][0])
    assert found["ray"][1:] == found["inprocess"][1:]
    assert (found["inprocess"][0].value == 0).any(), "seed 5 drops somebody"
