"""Drift-aware strategies (FedDAA, IFCA, the oracle, FedAvg with history) and the contracts
they use: several models per message, per-round client views, query rounds, stream metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from torch import nn

from fedsim import multimodel
from fedsim.build import load_experiment
from fedsim.data import ClientData
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from fedsim.trainer import ClientCall, RoundConfig
from partitioners.drift import DriftPartitioner
from strategies import history
from strategies.feddaa import CENTRES, STAGE, FedDAA, FedDAATrainer, choose_clusters
from tests.conftest import QUICKSTART, interrupted_and_resumed

# a tiny drift stream on the 8x8 digits: 8 clients, 4 slots of 2 rounds, FedDAA's concepts
STREAM = [
    "dataset.name=digits",
    "partition.name=drift",
    "partition.preset=feddaa",
    "partition.num_clients=8",
    "partition.num_slots=4",
    "partition.rounds_per_slot=2",
    "rounds=8",
    "model.name=mlp",
    "model.hidden=[32]",
    "client.lr=0.1",
    "client.batch_size=32",
    "strategy.fraction_train=0.5",
]


def drift_experiment(*overrides: str):
    return load_experiment(QUICKSTART, [*STREAM, *overrides])


# -- several models per message -------------------------------------------------------------
def test_packed_models_round_trip():
    records = [ArrayRecord({"w": Array(np.full(3, k, np.float32)), "b": Array(np.zeros(1))}) for k in range(3)]
    packed = multimodel.pack(records)
    assert multimodel.is_packed(packed) and not multimodel.is_packed(records[0])
    unpacked = multimodel.unpack(packed)
    assert list(unpacked) == ["model.0", "model.1", "model.2"]
    for k, record in enumerate(unpacked.values()):
        np.testing.assert_array_equal(record["w"].numpy(), np.full(3, k, np.float32))


# -- module 1: the number of clusters ----------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 5])
def test_silhouette_picks_the_right_number_of_well_separated_clusters(k):
    rng = np.random.default_rng(k)
    centres = rng.normal(0, 10, size=(k, 100))
    points = np.concatenate([centre + rng.normal(0, 0.1, size=(6, 100)) for centre in centres])
    chosen, found, score = choose_clusters(points, max_k=9)
    assert chosen == k
    assert score > 0.9
    assert found.shape == (k, 100)


# -- module 2: drift detection on a stream where it is trivial -----------------------------
class OneHotModel(nn.Module):
    """Logits = the input itself: inputs are one-hot images of the true (unmapped) class,
    so a client's prototype is the permutation matrix of its concept's label map."""

    def forward(self, x):
        return x.flatten(1) * 10.0


def test_detection_is_perfect_when_prototypes_reveal_the_concept():
    classes = 10
    y = np.repeat(np.arange(classes), 40)
    stream = DriftPartitioner(num_clients=12, preset="feddaa", num_slots=4, rounds_per_slot=1).split(y, seed=3)
    x = np.eye(classes, dtype=np.float32)[y].reshape(len(y), 1, 1, classes)
    trainer, model = FedDAATrainer(), OneHotModel()
    models = {"model.0": ArrayRecord(model.state_dict())}

    def data(client: int, slot: int) -> ClientData:
        view = stream.view_at(client, slot)
        labels = stream.label_maps[view.concepts, y[view.indices]] if view.concepts is not None else y[view.indices]
        return ClientData(
            x[view.indices],
            labels,
            x[:0],
            labels[:0],
            slot=slot,
            concept=view.concept,
            earlier=lambda before: data(client, before),
        )

    verdicts, truths = [], []
    for slot in range(1, stream.num_slots):
        config = RoundConfig(server_round=slot + 1, extra={STAGE: "prototypes"})
        points = np.stack(
            [
                trainer.query(ClientCall(model, models, data(c, slot), config, {}, None, "cpu")).statistics["prototype"]
                for c in range(12)
            ]
        )
        _, centres, _ = choose_clusters(points, max_k=9)
        detect = RoundConfig(server_round=slot + 1, extra={STAGE: "detect", CENTRES: centres.ravel().tolist()})
        for client in range(12):
            verdicts.append(
                trainer.query(ClientCall(model, models, data(client, slot), detect, {}, None, "cpu")).metrics[
                    "real-drift"
                ]
            )
            truths.append(float(stream.view_at(client, slot - 1).concept != stream.view_at(client, slot).concept))
    assert sum(truths) > 0  # the stream does drift
    assert verdicts == truths


# -- module 3: the history buffer ----------------------------------------------------------------
def _slot_data(slot: int, size: int = 30) -> ClientData:
    x = np.full((size, 1, 2, 2), slot, np.float32)
    y = np.arange(size) % 10
    return ClientData(x, y, x[:0], y[:0], slot=slot, earlier=lambda before: _slot_data(before, size))


@pytest.mark.parametrize("bound", [0, 10, 45, 1000])
def test_the_history_buffer_stays_within_its_bound(bound):
    state: dict = {}
    for slot in range(6):
        data = _slot_data(slot)
        state = history.update(state, data, keep=True, bound=bound)
        limit = bound if bound > 0 else data.num_train
        assert history.history_size(state) <= limit
        merged = history.merged(state, data)
        assert merged.num_train == data.num_train + history.history_size(state)
        if slot:  # the newest samples are kept: the previous slot's are all in when they fit
            kept = merged.x_train[data.num_train :, 0, 0, 0]
            assert (kept == slot - 1).sum() == min(30, limit)
    state = history.update(state, _slot_data(6), keep=False, bound=bound)  # real drift: history goes
    assert history.history_size(state) == 0


# -- end to end ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["feddaa", "ifca", "oracle", "fedavg-history", "fedavg"])
def test_drift_strategies_run_and_report_per_slot_and_concept(strategy, tmp_path):
    extra = {"ifca": ["strategy.num_models=4"], "oracle": ["strategy.num_models=4"]}.get(strategy, [])
    result = run_experiment(drift_experiment(f"strategy.name={strategy}", *extra), tmp_path / strategy)
    summary = result.summary
    assert set(summary["accuracy_by_slot"]) == {"0", "1", "2", "3"}
    assert summary["accuracy_mean_over_slots"] == pytest.approx(np.mean(list(summary["accuracy_by_slot"].values())))
    assert set(summary["accuracy_by_concept"]) <= {"0", "1", "2", "3"}
    metrics = RunDirectory(result.path).read_metrics()
    assert set(metrics[metrics.scope == "slot"].id) == {"0", "1", "2", "3"}
    assert len(metrics[metrics.scope == "test_set"])
    if strategy == "feddaa":
        detection = summary["drift_detection"]
        assert detection["checks"] == 8 * 3  # every client at the start of slots 1, 2, 3
        assert detection["tp"] + detection["fn"] > 0
        query = metrics[(metrics.scope == "federated") & (metrics.id == "query")]
        assert {"clusters", "silhouette", "real-drift-detected"} <= set(query.metric)
    else:
        assert summary["drift_detection"] is None
    assert (result.path / "plots" / "accuracy.png").exists()


def test_feddaa_resumes_with_each_clients_history(tmp_path, monkeypatch):
    experiment = drift_experiment("strategy.name=feddaa")
    assert interrupted_and_resumed(experiment, tmp_path, monkeypatch, crash_round=5).status == "resume"
    for name in ("metrics.csv",):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    states = sorted((tmp_path / "run" / "client_state").rglob("*.npz"))
    assert states, "FedDAA's clients keep their history and mixture in their state"
    with np.load(states[-1]) as state:
        assert history.SLOTS in state.files
    for path in states:
        twin = tmp_path / "reference" / path.relative_to(tmp_path / "run")
        with np.load(path) as mine, np.load(twin) as theirs:
            assert mine.files == theirs.files
            for key in mine.files:
                np.testing.assert_array_equal(mine[key], theirs[key])


def test_history_discard_is_fedavg(tmp_path):
    runs = {
        name: run_experiment(drift_experiment(*overrides), tmp_path / name)
        for name, overrides in {
            "fedavg": ["strategy.name=fedavg"],
            "discard": ["strategy.name=fedavg-history", "strategy.history=discard"],
        }.items()
    }
    frames = {name: RunDirectory(r.path).read_metrics() for name, r in runs.items()}
    accuracy = {name: f[f.metric == "accuracy"].reset_index(drop=True) for name, f in frames.items()}
    assert accuracy["fedavg"].equals(accuracy["discard"])


def test_several_model_strategies_refuse_a_single_model():
    strategy = FedDAA()
    with pytest.raises(ValueError, match="packed"):
        strategy.configure_evaluate(1, ArrayRecord({"w": Array(np.zeros(2))}), None, None)


def test_feddaa_options_are_checked():
    with pytest.raises(ValueError, match="num_models"):
        FedDAA(num_models="elbow")
    with pytest.raises(ValueError, match="aggregation"):
        FedDAA(aggregation="mean")
    assert FedDAA(num_models=[2, 3, 4]).initial_models == 2


def test_summary_json_has_drift_keys_only_for_streams(tmp_path, tiny):
    summary = json.loads((run_experiment(tiny(), tmp_path / "static").path / "summary.json").read_text())
    assert "accuracy_by_slot" not in summary
