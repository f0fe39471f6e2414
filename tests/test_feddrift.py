"""FedDrift and FedDrift-Eager (strategies.feddrift): the reference's decisions on fixed
numbers, detection and clustering on a tiny stream, resume, Ray, a static partition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import nn

from fedsim import checkpoint
from fedsim.build import load_experiment
from fedsim.data import ClientData
from fedsim.errors import UserError
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from fedsim.trainer import TIME_SLOT, RoundConfig
from strategies.feddrift import (
    LOCAL_STEPS,
    Clustering,
    FedDrift,
    FedDriftEager,
    FedDriftTrainer,
    average_pair,
    distances,
    goodness,
    merge_groups,
)
from tests.conftest import QUICKSTART, interrupted_and_resumed, tiny_experiment

FEDDRIFT = "strategy.name=strategies.feddrift:FedDrift"
EAGER = "strategy.name=strategies.feddrift:FedDriftEager"

# -- the reference's decisions ------------------------------------------------------------------
# Golden numbers from microsoft/FedDrift at e4ac32fe17edf8de23579678a12fb4d7b5f45746: its own
# SoftClusterState (fedml_api/distributed/fedavg_ens/FedAvgEnsDataLoader.py) run slot by slot,
# cluster_init at slot 0 then cluster_hierarchical ("H_A_C_1_06_0", "H_A_F_1_06_0") or
# cluster_mmacc2 ("mmacc_06"), on the inputs below: its accuracy matrix and the correct
# counts behind its cluster accuracies come from the concept of each (client, slot) (100
# samples each) and the concept each model knows at each slot's start (None: untrained),
# through `_accuracy`. After each slot's decisions every model holding data of that slot
# "trains" (weight += m + 1, bias += t + 1), so that copies and merges mix different numbers.
# Per slot: every slot's row of the assignment after the slot's decisions (merges rewrite
# earlier rows), each client's previous score, the isolated clients {client: (model, until)},
# the next model index, and the parameters (weight, bias) of the models holding data. The
# drifted clients follow from the previous scores (before - after > delta, clients not
# isolated).
N = None
GOLDEN = {
    "feddrift-shared": {
        "eager": False,
        "start": "shared",
        "capacity": 4,
        "concepts": [
            [0, 0, 0, 0, 2, 2],
            [0, 0, 0, 0, 2, 2],
            [0, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1],
        ],
        "knows": [[N, N, N, N], [0, N, N, N], [0, N, N, N], [0, 1, 1, N], [0, 1, N, N], [0, 1, 2, 2]],
        "params": [(10.0, 1.0), (20.0, 2.0), (30.0, 3.0), (40.0, 4.0)],
        "drifted": {1: [], 2: [3, 4], 3: [], 4: [0, 1], 5: []},
        "slots": [
            ([[0, 0, 0, 0, 0]], [0.1, 0.1, 0.1, 0.1, 0.1], {}, 1, {0: (10.0, 1.0)}),
            ([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], [0.9, 0.9, 0.4, 0.9, 0.9], {}, 1, {0: (11.0, 2.0)}),
            (
                [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 2]],
                [0.9, 0.9, 0.4, 0.4, 0.4],
                {3: (1, 3), 4: (2, 3)},
                3,
                {0: (12.0, 4.0), 1: (12.0, 4.0), 2: (12.0, 4.0)},
            ),
            (
                [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]],
                [0.9, 0.9, 0.89, 0.89, 0.89],
                {},
                3,
                {0: (13.0, 7.0), 1: (14.199999809265137, 7.0)},
            ),
            (
                [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [3, 2, 1, 0, 1]],
                [0.4, 0.4, 0.89, 0.9, 0.89],
                {0: (3, 5), 1: (2, 5)},
                4,
                {0: (14.0, 11.0), 1: (16.200000762939453, 11.0), 2: (14.0, 11.0), 3: (14.0, 11.0)},
            ),
            (
                [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [2, 2, 1, 0, 1], [2, 2, 1, 0, 1]],
                [0.88, 0.88, 0.89, 0.9, 0.89],
                {},
                4,
                {0: (15.0, 16.0), 1: (18.200000762939453, 16.0), 2: (17.25, 16.0)},
            ),
        ],
    },
    "feddrift-local": {
        "eager": False,
        "start": "local",
        "capacity": 4,
        "concepts": [[0, 0, 2], [0, 0, 1], [1, 1, 1], [1, 1, 1]],
        "knows": [[N, N, N, N], [0, 0, 1, 1], [0, N, 1, N]],
        "params": [(10.0, 1.0), (20.0, 2.0), (30.0, 3.0), (40.0, 4.0)],
        "drifted": {1: [], 2: [0]},
        "slots": [
            (
                [[0, 1, 2, 3]],
                [0.1, 0.1, 0.1, 0.1],
                {},
                1,
                {0: (10.0, 1.0), 1: (20.0, 2.0), 2: (30.0, 3.0), 3: (40.0, 4.0)},
            ),
            ([[0, 0, 2, 2], [0, 0, 2, 2]], [0.9, 0.9, 0.88, 0.88], {}, 1, {0: (13.75, 2.25), 2: (35.75, 4.25)}),
            (
                [[0, 0, 2, 2], [0, 0, 2, 2], [1, 2, 2, 2]],
                [0.4, 0.88, 0.88, 0.88],
                {0: (1, 3)},
                2,
                {0: (14.75, 4.25), 1: (14.75, 4.25), 2: (38.75, 6.25)},
            ),
        ],
    },
    "eager": {
        "eager": True,
        "start": "shared",
        "capacity": 3,
        "concepts": [[0, 0, 0, 2, 2], [0, 0, 0, 2, 2], [0, 0, 0, 0, 3], [0, 0, 1, 1, 1], [0, 0, 1, 0, 0]],
        "knows": [[N, N, N], [0, N, N], [0, N, N], [0, 1, N], [0, 1, 2]],
        "params": [(10.0, 1.0), (20.0, 2.0), (30.0, 3.0)],
        "drifted": {1: [], 2: [3, 4], 3: [0, 1], 4: [2]},
        "slots": [
            ([[0, 0, 0, 0, 0]], [0.1, 0.1, 0.1, 0.1, 0.1], {}, 1, {0: (10.0, 1.0)}),
            ([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], [0.9, 0.9, 0.9, 0.9, 0.9], {}, 1, {0: (11.0, 2.0)}),
            (
                [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1]],
                [0.9, 0.9, 0.9, 0.4, 0.4],
                {},
                2,
                {0: (12.0, 4.0), 1: (12.0, 4.0)},
            ),
            (
                [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [2, 2, 0, 1, 0]],
                [0.4, 0.4, 0.9, 0.89, 0.9],
                {},
                3,
                {0: (13.0, 7.0), 1: (14.0, 7.0), 2: (13.0, 7.0)},
            ),
            (
                [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [2, 2, 0, 1, 0], [2, 2, 0, 1, 0]],
                [0.88, 0.88, 0.4, 0.89, 0.9],
                {},
                3,
                {0: (14.0, 11.0), 1: (16.0, 11.0), 2: (16.0, 11.0)},
            ),
        ],
    },
}


def _accuracy(knows: list, model: int, concept: int) -> float:
    """The fixture's accuracy of a model on data of a concept (see above)."""
    known = knows[model]
    if known is None:
        return 0.1
    return round(0.9 - 0.01 * model, 10) if known == concept else round(0.4 - 0.01 * model, 10)


def _record(weight: float, bias: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.array([weight], np.float32)), "b": Array(np.array([bias], np.float32))})


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_decisions_match_the_reference_on_fixed_numbers(name):
    case = GOLDEN[name]
    concepts, knows, eager = np.array(case["concepts"]), case["knows"], case["eager"]
    clients, slots = concepts.shape
    clustering = Clustering(clients, case["capacity"], case["start"])
    params = {m: _record(*p) for m, p in enumerate(case["params"])}
    for client in range(clients):
        clustering.previous[client] = _accuracy(knows[0], int(clustering.assignment[0, client]), concepts[client, 0])
    for t in range(slots):
        if t > 0:
            clustering.begin(t)
            in_use = clustering.in_use(t, isolate=not eager)
            scores = np.array([[_accuracy(knows[t], m, concepts[c, t]) for c in range(clients)] for m in in_use])
            verdicts, copies = clustering.decide(t, in_use, scores, 0.06, eager=eager)
            assert sorted(np.flatnonzero(verdicts == 1).tolist()) == case["drifted"][t], f"slot {t}"
            for new, original in copies:
                params[new] = params[original]
            if not eager and len(in_use) > 1:
                sums, counts = np.zeros((len(in_use), len(in_use))), np.zeros(len(in_use))
                for j, held in enumerate(in_use):
                    cells = np.argwhere(clustering.assignment[: t + 1] == held)  # (slot, client) pairs
                    counts[j] = 100 * len(cells)
                    for i, model in enumerate(in_use):
                        sums[i, j] = sum(round(100 * _accuracy(knows[t], model, concepts[c, s])) for s, c in cells)
                for base, second, share in clustering.merge(t, in_use, merge_groups(sums, counts, 0.06, "complete")):
                    params[base] = average_pair(params[base], params[second], share)
        assignment, previous, marked, next_free, held = case["slots"][t]
        assert clustering.assignment.tolist() == assignment, f"slot {t}"
        assert clustering.previous.tolist() == pytest.approx(previous), f"slot {t}"
        isolated = {int(c): (int(clustering.marked_model[c]), int(clustering.marked_until[c])) for c in range(clients)}
        assert {c: v for c, v in isolated.items() if v[0] >= 0} == marked, f"slot {t}"
        assert clustering.next_free == next_free, f"slot {t}"
        for model, (weight, bias) in held.items():
            got = (float(params[model]["w"].numpy()[0]), float(params[model]["b"].numpy()[0]))
            assert got == pytest.approx((weight, bias), rel=1e-6), f"slot {t}, model {model}"
        for model in {int(m) for m in clustering.assignment[t] if m >= 0}:  # the slot's training stand-in
            w, b = params[model]["w"].numpy(), params[model]["b"].numpy()
            params[model] = ArrayRecord({"w": Array(w + np.float32(model + 1)), "b": Array(b + np.float32(t + 1))})


def test_distance_is_the_worse_of_the_two_drops():
    sums = np.array([[90.0, 40.0, 88.0], [45.0, 80.0, 44.0], [89.0, 41.0, 87.0]])
    counts = np.array([100.0, 100.0, 100.0])
    matrix = distances(sums, counts)
    assert matrix[0, 1] == pytest.approx(max(0.90 - 0.40, 0.80 - 0.45))
    assert matrix[0, 2] == pytest.approx(max(0.90 - 0.88, 0.87 - 0.89, 0.0))
    np.testing.assert_array_equal(matrix, matrix.T)
    assert merge_groups(sums, counts, 0.06, "complete") == [[0, 2], [1]]
    assert merge_groups(sums, counts, 0.6, "complete") == [[0, 1, 2]]


def test_loss_measure_is_minus_the_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = np.array([0, 0])
    assert goodness(logits, y, "accuracy").tolist() == [1.0, 0.0]
    expected = -nn.functional.cross_entropy(logits, torch.as_tensor(y), reduction="none").double().numpy()
    np.testing.assert_allclose(goodness(logits, y, "loss"), expected)


def test_local_steps_take_that_many_steps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = np.random.default_rng(0).normal(size=(50, 1, 2, 2)).astype(np.float32)
    data = ClientData(x, np.arange(50) % 3, x[:0], np.zeros(0, np.int64))
    steps = []
    model.register_forward_hook(lambda module, args, out: steps.append(len(out)))
    config = RoundConfig(batch_size=8, lr=0.1, extra={LOCAL_STEPS: 3})
    metrics = FedDriftTrainer().fit(model, data, config, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert steps == [8, 8, 8] and np.isfinite(metrics["train_loss"])


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"delta": -0.1}, "delta"),
        ({"max_models": 1}, "max_models"),
        ({"max_models": -2}, "max_models"),
        ({"window": 0}, "window"),
        ({"start": "random"}, "start"),
        ({"linkage": "single"}, "linkage"),
        ({"measure": "f1"}, "measure"),
        ({"first_reference": "never"}, "first_reference"),
        ({"local_steps": -1}, "local_steps"),
        ({"delta_merge": -1.0}, "delta_merge"),
    ],
)
def test_bad_options_are_refused_in_one_line(kwargs, word):
    with pytest.raises(ValueError, match=word) as error:
        FedDrift(**kwargs)
    assert "\n" not in str(error.value)


def test_eager_takes_no_merging_options():
    with pytest.raises(UserError, match="window"):
        load_experiment(QUICKSTART, [EAGER, "strategy.window=2"])
    with pytest.raises(ValueError, match="max_models"):
        FedDriftEager(max_models=1)
    assert FedDriftEager().eager and not FedDrift().eager
    assert FedDrift(delta=0.1).delta_merge == 0.1  # 0: the detection threshold, as the code reads it


class _Nodes:
    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self):
        return list(range(100, 100 + self.count))


def test_the_local_start_needs_a_model_per_client():
    arrays = FedDrift().initial_arrays(lambda index: _record(0.0, 0.0))
    with pytest.raises(ValueError, match="max_models must be 0 or >= 4, got 3"):
        FedDrift(max_models=3).configure_query(1, arrays, ConfigRecord({TIME_SLOT: 0}), _Nodes(4))
    shared = FedDrift(max_models=3, start="shared", first_reference="trained")  # no slot-0 query: no message
    assert list(shared.configure_query(1, arrays, ConfigRecord({TIME_SLOT: 0}), _Nodes(4))) == []
    assert shared.clustering.capacity == 3 and shared.clustering.assignment.tolist() == [[0, 0, 0, 0]]


# -- end to end on a tiny stream -------------------------------------------------------------
# 4 clients on the 8x8 digits, 4 slots; at slot 2 half the clients swap to reversed labels
# (y -> 9 - y) and keep them: the only real drift of the stream.
STREAM = [
    "dataset.name=digits",
    "partition.name=drift",
    "partition.num_clients=4",
    "partition.num_slots=4",
    'partition.concepts=["identity", "reverse"]',
    "partition.drift_every=2",
    "partition.drift_fraction=0.5",
    "model.name=mlp",
    "model.hidden=[32]",
    "client.lr=0.1",
    "strategy.fraction_train=1.0",
]


def stream_experiment(*overrides: str, rounds_per_slot: int = 3):
    rounds = [f"partition.rounds_per_slot={rounds_per_slot}", f"rounds={4 * rounds_per_slot}"]
    return load_experiment(QUICKSTART, [*STREAM, *rounds, *overrides])


def _query(metrics, name: str):
    rows = metrics[(metrics.scope == "federated") & (metrics.id == "query") & (metrics.metric == name)]
    return dict(zip(rows["round"], rows.value))


def _detections(metrics):
    """Per round that checked: (tp, fp, fn, tn)."""
    rows = metrics[metrics.scope == "drift"].pivot_table(index="round", columns="metric", values="value")
    return {int(r): tuple(int(rows.loc[r, key]) for key in ("tp", "fp", "fn", "tn")) for r in rows.index}


@pytest.mark.parametrize("variant", ["feddrift", "eager"])
def test_drift_is_detected_at_the_change_and_gets_a_new_model(variant, tmp_path):
    overrides = [FEDDRIFT, "strategy.delta_merge=0.2"] if variant == "feddrift" else [EAGER]
    result = run_experiment(stream_experiment(*overrides), tmp_path / variant)
    metrics = RunDirectory(result.path).read_metrics()
    # slot 1 (round 4) and slot 3 (round 10): no drift, none found; slot 2 (round 7): both found
    assert _detections(metrics) == {4: (0, 0, 0, 4), 7: (2, 0, 0, 2), 10: (0, 0, 0, 4)}
    detection = result.summary["drift_detection"]
    assert (detection["precision"], detection["recall"]) == (1.0, 1.0)
    assert _query(metrics, "new-models")[7] == (2 if variant == "feddrift" else 1)
    assignment = checkpoint.load(result.path / "checkpoint.npz").strategy_state["clustering/assignment"]
    drifted = np.flatnonzero(assignment[2] != assignment[1])
    assert len(drifted) == 2
    stayed = np.setdiff1d(np.arange(4), drifted)
    # the drifted clients' data of slots 2 and 3 sits on one model, the others' on another
    assert len(set(assignment[2:, drifted].ravel())) == 1
    assert set(assignment[2:, drifted].ravel()).isdisjoint(assignment[:, stayed].ravel())
    if variant == "feddrift":
        # slot 1: the four clients' own models (one concept) merge; slot 3: the two new ones do
        assert _query(metrics, "merges") == {4: 3.0, 10: 1.0}
        assert (assignment[:2] == 0).all()
    else:
        assert "merges" not in set(metrics.metric)


@pytest.mark.parametrize("first_reference, found", [("initial", 0), ("trained", 2)])
def test_a_drift_into_slot_1_is_seen_only_against_the_trained_score(first_reference, found, tmp_path):
    experiment = stream_experiment(
        FEDDRIFT,
        "partition.drift_every=1",
        "partition.num_slots=2",
        "rounds=6",
        "strategy.delta=0.3",
        f"strategy.first_reference={first_reference}",
    )
    result = run_experiment(experiment, tmp_path / first_reference)
    detection = result.summary["drift_detection"]
    assert (detection["tp"], detection["fp"], detection["fn"]) == (found, 0, 2 - found)


def test_resume_is_exact_and_keeps_the_clustering(tmp_path, monkeypatch):
    experiment = stream_experiment(FEDDRIFT, rounds_per_slot=2)
    assert interrupted_and_resumed(experiment, tmp_path, monkeypatch, crash_round=5).status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    mine = checkpoint.load(tmp_path / "run/checkpoint.npz")
    theirs = checkpoint.load(tmp_path / "reference/checkpoint.npz")
    assert set(mine.strategy_state) >= {"slot", "clustering/assignment", "clustering/previous", "clustering/next_free"}
    for key, value in theirs.strategy_state.items():
        np.testing.assert_array_equal(mine.strategy_state[key], value)


@pytest.mark.ray
@pytest.mark.slow  # CI: Ray's bits are checked generically in test_engines and test_resume
def test_ray_gives_the_in_process_bits(tmp_path):
    run_experiment(stream_experiment(FEDDRIFT, rounds_per_slot=1), tmp_path / "local")
    run_experiment(
        stream_experiment(FEDDRIFT, "engine.name=ray", "engine.num_cpus=1", rounds_per_slot=1), tmp_path / "ray"
    )
    assert (tmp_path / "ray/metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()


def test_on_a_static_partition_the_shared_start_is_fedavg(tmp_path):
    """One slot, no drift to find: every client stays on model 0, which is FedAvg's model."""
    runs = {
        name: RunDirectory(run_experiment(tiny_experiment("rounds=3", *extra), tmp_path / name).path).read_metrics()
        for name, extra in {
            "fedavg": [],
            "feddrift": [FEDDRIFT, "strategy.start=shared"],
            "eager": [EAGER],
        }.items()
    }

    def held_out(metrics):
        rows = metrics[(metrics.scope == "federated") & (metrics.id == "evaluate")]
        return rows[rows.metric.isin(["accuracy", "loss"])].sort_values(["round", "metric"]).value.to_numpy()

    np.testing.assert_allclose(held_out(runs["feddrift"]), held_out(runs["fedavg"]), rtol=1e-6)
    np.testing.assert_allclose(held_out(runs["eager"]), held_out(runs["fedavg"]), rtol=1e-6)
