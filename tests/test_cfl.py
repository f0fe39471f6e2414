"""CFL: the authors' bipartition and norms on fixed inputs, two concepts split apart and an
IID federation left whole, clients that missed a split placed later, exact resume, Ray."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.build import load_experiment
from fedsim.checkpoint import load
from fedsim.engine.tasks import NODE_ID_OFFSET
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from partitioners import Partition
from strategies.cfl import CFL, bipartition, pairwise_cosine, separation, update_norms
from tests.conftest import QUICKSTART, interrupted_and_resumed, tiny_experiment

CFL_NAME = "strategy.name=strategies.cfl:CFL"
# 8 clients on the 8x8 digits; from round 2 on, half of them hold the labels reversed (9 - y)
TWO_CONCEPTS = [
    "dataset.name=digits",
    "model.name=mlp",
    "model.hidden=[32]",
    "client.lr=0.1",
    "partition.name=drift",
    "partition.num_clients=8",
    "partition.num_slots=2",
    "partition.rounds_per_slot=1",
    "partition.drift_fraction=0.5",
    "partition.concepts=['identity','reverse']",
    "strategy.fraction_train=1.0",
    "evaluate_every=10",
]
IID = [override for override in TWO_CONCEPTS if not override.startswith("partition.")] + [
    "partition.name=iid",
    "partition.num_clients=8",
]
# thresholds read off these runs' norms: the swapped federation's mean update falls below
# 0.25 while its largest stays above 0.5 after round 15; the IID one's largest stays below
SPLITS_TWO_CONCEPTS = [CFL_NAME, "strategy.eps1=0.25", "strategy.eps2=0.5", "strategy.warmup_rounds=15"]
# thresholds every cluster of 3 or more trained clients meets: a split every round it can
ALWAYS_SPLITS = [CFL_NAME, "strategy.eps1=100.0", "strategy.eps2=0.001", "strategy.warmup_rounds=0"]


def experiment(base: list[str], *overrides: str):
    return load_experiment(QUICKSTART, [*base, *overrides])


def final_assignment(path) -> dict[int, int]:
    """Client -> cluster, from the run's last checkpoint."""
    state = load(path / "checkpoint.npz").strategy_state
    assert not state["pending"], "every client that missed a split has been placed"
    return {int(node) - NODE_ID_OFFSET: cluster for node, cluster in state["assignment"].items()}


# -- the rule on fixed inputs: golden numbers from the authors' code ---------------------------
# felisat/clustered-federated-learning 23a1c3887ed151a9c6340370337804766d11c69c, fl_devices.py:
# Server.cluster_clients (scikit-learn's complete linkage; `affinity` spelled `metric` for
# scikit-learn >= 1.4) on this matrix gives [0, 1, 2, 6, 7] and [3, 4, 5]; so do FedDrift's
# copy (microsoft/FedDrift e4ac32fe17edf8de23579678a12fb4d7b5f45746, cfl_util_bipartition)
# and FedRC's (complete linkage on 1 - S).
SIMILARITY = np.array(
    [
        [1.0, 0.285, 0.415, -0.269, -0.11, -0.227, 0.028, 0.343],
        [0.285, 1.0, 0.472, -0.357, -0.152, -0.129, 0.176, 0.233],
        [0.415, 0.472, 1.0, 0.072, 0.106, 0.059, 0.184, 0.206],
        [-0.269, -0.357, 0.072, 1.0, 0.536, 0.31, -0.079, -0.1],
        [-0.11, -0.152, 0.106, 0.536, 1.0, 0.315, 0.028, 0.092],
        [-0.227, -0.129, 0.059, 0.31, 0.315, 1.0, 0.073, 0.061],
        [0.028, 0.176, 0.184, -0.079, 0.028, 0.073, 1.0, 0.632],
        [0.343, 0.233, 0.206, -0.1, 0.092, 0.061, 0.632, 1.0],
    ]
)
# fl_devices.pairwise_angles (float32), compute_max_update_norm and compute_mean_update_norm
# on the 5 updates np.random.default_rng(7).normal(size=(5, 9))
ANGLES = np.array(
    [
        [1.0, -0.27131015, 0.19448757, 0.834415, -0.053005576],
        [-0.27131015, 1.0, 0.30606765, -0.18798319, -0.33551484],
        [0.19448757, 0.30606765, 1.0, 0.32024387, -0.4283267],
        [0.834415, -0.18798319, 0.32024387, 1.0, -0.011560826],
        [-0.053005576, -0.33551484, -0.4283267, -0.011560826, 1.0],
    ]
)
MAX_NORM, MEAN_NORM = 4.098586309561348, 1.33070207092822


def test_bipartition_is_the_authors():
    first, second = bipartition(SIMILARITY)
    assert first.tolist() == [0, 1, 2, 6, 7] and second.tolist() == [3, 4, 5]
    assert separation(SIMILARITY, first, second) == pytest.approx(np.sqrt((1 - 0.106) / 2))  # S[2, 4]


def test_similarities_and_norms_are_the_authors():
    updates = np.random.default_rng(7).normal(size=(5, 9))
    np.testing.assert_allclose(pairwise_cosine(updates), ANGLES, rtol=1e-6, atol=1e-7)
    mean_norm, max_norm = update_norms(updates)
    assert max_norm == pytest.approx(MAX_NORM, rel=1e-12)
    assert mean_norm == pytest.approx(MEAN_NORM, rel=1e-12)


def test_feddrift_thresholds_follow_the_largest_mean_norm():
    strategy = CFL(adaptive_eps=True)
    assert strategy.thresholds(1.0) == (0.1, 0.6, False)  # a new largest norm: no split this round
    assert strategy.thresholds(0.05) == (0.1, 0.6, True)
    assert strategy.thresholds(2.0) == (0.2, 1.2, False)


def test_options_are_checked():
    for bad, match in [
        ({"eps1": 0.0}, "eps1 must be a finite number > 0"),
        ({"eps2": -1.0}, "eps2 must be"),
        ({"warmup_rounds": -1}, "warmup_rounds must be an integer >= 0"),
        ({"gamma": 1.0}, "gamma must be"),
        ({"adaptive_eps": 1}, "adaptive_eps must be true or false"),
        ({"num_models": -2}, "num_models must be an integer >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            CFL(**bad)


# -- end to end -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("base", "fraction"),
    [(TWO_CONCEPTS, 1.0), (TWO_CONCEPTS, 0.75), (IID, 1.0)],
    ids=["two-concepts", "two-concepts-sampled", "iid"],
)
def test_cfl_splits_two_concepts_apart_and_leaves_iid_whole(base, fraction, tmp_path):
    rounds = 24 if fraction < 1 else 22
    result = run_experiment(
        experiment(base, *SPLITS_TWO_CONCEPTS, f"rounds={rounds}", f"strategy.fraction_train={fraction}"), tmp_path
    )
    assignment = final_assignment(result.path)
    metrics = RunDirectory(result.path).read_metrics()
    clusters = metrics[(metrics.scope == "federated") & (metrics.id == "train") & (metrics.metric == "clusters")]
    if base is IID:
        assert set(clusters.value) == {1.0} and set(assignment.values()) == {0}
        return
    stream = Partition.load(result.path / "partition.npz")
    concepts = {client: stream.view_at(client, 1).concept for client in range(8)}
    assert set(concepts.values()) == {0, 1}
    assert clusters.value.iloc[-1] == 2.0
    for a in range(8):  # same cluster exactly when same concept
        for b in range(8):
            assert (assignment[a] == assignment[b]) == (concepts[a] == concepts[b])
    if fraction < 1:  # some clients missed the split and were placed when they next trained
        pending = metrics[(metrics.scope == "federated") & (metrics.id == "train") & (metrics.metric == "pending")]
        assert pending.value.max() > 0 and pending.value.iloc[-1] == 0


def test_cfl_without_a_split_is_fedavg(tmp_path):
    runs = {
        name: run_experiment(tiny_experiment(*overrides, "rounds=3"), tmp_path / name)
        for name, overrides in {"fedavg": ["strategy.name=fedavg"], "cfl": [CFL_NAME]}.items()
    }
    frames = {name: RunDirectory(run.path).read_metrics() for name, run in runs.items()}

    def clients(frame):
        rows = frame[(frame.scope == "federated") & frame.metric.isin(["train_loss", "accuracy"])]
        return rows[["round", "id", "metric", "value"]].reset_index(drop=True)

    fedavg, cfl = clients(frames["fedavg"]), clients(frames["cfl"])
    assert fedavg[["round", "id", "metric"]].equals(cfl[["round", "id", "metric"]])
    # the same models; the mean train loss is summed in another order (last bit)
    np.testing.assert_allclose(cfl.value, fedavg.value, rtol=1e-12, atol=0)


def test_cfl_resumes_exactly_with_clients_waiting_to_be_placed(tmp_path, monkeypatch):
    run = experiment(TWO_CONCEPTS, *ALWAYS_SPLITS, "rounds=6", "strategy.fraction_train=0.75")
    assert interrupted_and_resumed(run, tmp_path, monkeypatch, crash_round=3).status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    metrics = RunDirectory(tmp_path / "run").read_metrics()
    train = metrics[(metrics.scope == "federated") & (metrics.id == "train")]
    assert train[train.metric == "clusters"].value.max() >= 3, "splits recur within clusters"
    assert train[train.metric == "pending"].value.max() > 0, "the resumed run had clients waiting"
    state = load(tmp_path / "run/checkpoint.npz").strategy_state
    assert set(state) >= {"assignment", "pending", "splits", "largest_mean_norm"}


@pytest.mark.ray
def test_cfl_on_ray_gives_the_in_process_bits(tmp_path):
    overrides = [*ALWAYS_SPLITS, "rounds=4", "strategy.fraction_train=0.75"]
    run_experiment(experiment(TWO_CONCEPTS, *overrides), tmp_path / "local")
    run_experiment(experiment(TWO_CONCEPTS, *overrides, "engine.name=ray", "engine.num_workers=2"), tmp_path / "ray")
    assert (tmp_path / "ray/metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()
