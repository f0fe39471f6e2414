"""FedCCFA: the authors' classifier clustering, cluster aggregation and local round on fixed
inputs (golden numbers), and real runs: the clusters follow a label-swap stream, accuracy
beats FedAvg's there, a static partition ends close to FedAvg, resume and Ray give the bits.

The golden numbers come from running the authors' code, github.com/wenwenwenwenti/FedCCFA at
commit 647d8b097509e05278b7a68f116d2e84e106c72c, on the inputs of :func:`_client_input` and
:func:`_server_input` (its torchvision and tensorboard imports stubbed out, nothing else
changed): ``FedCCFAServer.madd`` and ``merge_classifiers`` (eps 0.1), ``aggregate_label_params``
and ``aggregate_label_protos`` for the groups found (weights "uniform" and by label counts),
and one client's ``update_label_distribution``, ``balance_train`` and ``train_with_protos``
at its round 20 (penalize CL and L2, gamma 20, temperature 0.1, batch 64, momentum 0.9,
weight decay 1e-5, balanced 2 epochs at lr 0.1, classifier 1 epoch at lr 0.1, extractor 2
epochs at lr 0.05) on a Flatten-Linear(6, 4)-ReLU extractor with a Linear(4, 4) classifier.
Every batch holds the whole (12-sample) set, so the order the two draw samples in changes
only float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsim import checkpoint
from fedsim.build import load_experiment
from fedsim.data import ClientData
from fedsim.models import MLP
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from fedsim.trainer import ClientCall, RoundConfig
from strategies.fedccfa import (
    BALANCED_BIAS,
    BALANCED_WEIGHT,
    LABEL_COUNTS,
    OWN_BIAS,
    OWN_WEIGHT,
    PRESENT,
    PROTOTYPES,
    FedCCFA,
    FedCCFATrainer,
    entropy_weight,
    madd,
    merge_classifiers,
)
from tests.conftest import QUICKSTART, interrupted_and_resumed, tiny_experiment

NAME = "strategy.name=strategies.fedccfa:FedCCFA"
C, D_IN, D = 4, 6, 4  # classes, inputs, features of the golden client
NODE = 100  # node ids: NODE + client


# -- fixed inputs ---------------------------------------------------------------------------------
def _client_input() -> dict[str, np.ndarray]:
    """12 samples (3 a class), the global model, the client's own classifier, its prototypes."""
    rng = np.random.default_rng(20241024)
    x = rng.normal(size=(12, D_IN)).astype(np.float32)
    y = np.repeat(np.arange(C), 3)
    return {
        "x": x,
        "y": y,
        "features.1.weight": (0.4 * rng.normal(size=(D, D_IN))).astype(np.float32),
        "features.1.bias": (0.1 * rng.normal(size=D)).astype(np.float32),
        "head.weight": (0.4 * rng.normal(size=(C, D))).astype(np.float32),
        "head.bias": (0.1 * rng.normal(size=C)).astype(np.float32),
        "own.weight": (0.4 * rng.normal(size=(C, D))).astype(np.float32),
        "own.bias": (0.1 * rng.normal(size=C)).astype(np.float32),
        "prototypes": np.abs(rng.normal(size=(C, D))).astype(np.float32),
    }


def _server_input():
    """7 clients' balanced and trained classifiers (rows: weight | bias, 3 features), their
    prototypes and label counts: clients 3-5 swap classes 1 and 2, client 6's class 3 is off."""
    rng = np.random.default_rng(20241025)
    n, d = 7, 3
    base = rng.normal(size=(C, d + 1))
    balanced = []
    for k in range(n):
        v = base + 0.02 * rng.normal(size=(C, d + 1))
        if 3 <= k < 6:
            v[[1, 2]] = v[[2, 1]]
        if k == 6:
            v[3] = rng.normal(size=d + 1)
        balanced.append(v.astype(np.float32))
    trained = [rng.normal(size=(C, d + 1)).astype(np.float32) for _ in range(n)]
    prototypes = [rng.normal(size=(C, d)).astype(np.float32) for _ in range(n)]
    counts = [rng.integers(1, 20, size=C) for _ in range(n)]
    return balanced, trained, prototypes, counts


# -- the server: MADD, DBSCAN, aggregation within clusters ----------------------------------------
def test_madd_and_the_clusters_are_the_references():
    balanced, *_ = _server_input()
    rows = np.stack(balanced)
    distances = madd(rows[:, 1])
    np.testing.assert_allclose(distances[np.triu_indices(7, 1)], MADD_CLASS_1_UPPER, atol=1e-6)
    np.testing.assert_allclose(distances, distances.T)
    assert merge_classifiers(rows, eps=0.1) == MERGED
    assert merge_classifiers(rows[:2], eps=0.1) == {c: [] for c in range(C)}  # MADD needs 3 clients


class _Grid:
    """What Flower's configure_train asks of a Grid, and fedsim's node -> client map."""

    def __init__(self, n: int) -> None:
        self.clients = {NODE + k: k for k in range(n)}

    def get_node_ids(self):
        return list(self.clients)


def _aggregated(weighting: str, **options) -> tuple[FedCCFA, list]:
    """A FedCCFA server after one round whose replies carry :func:`_server_input`."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1  # as a ServerApp has them
    balanced, trained, prototypes, counts = inputs = _server_input()
    body = {"features.1.weight": np.zeros((3, 2), np.float32), "features.1.bias": np.zeros(3, np.float32)}
    strategy = FedCCFA(weighting=weighting, **options)
    start = {**body, "head.weight": trained[0][:, :-1], "head.bias": trained[0][:, -1]}
    sent = list(strategy.configure_train(1, _record(start), ConfigRecord(), _Grid(7)))
    assert len(sent) == 7
    replies = []
    for k in range(7):
        arrays = {
            "features.1.weight": np.full((3, 2), float(k), np.float32),
            "features.1.bias": np.full(3, float(k), np.float32),
            "head.weight": trained[k][:, :-1],
            "head.bias": trained[k][:, -1],
            BALANCED_WEIGHT: balanced[k][:, :-1],
            BALANCED_BIAS: balanced[k][:, -1],
            PROTOTYPES: prototypes[k],
            LABEL_COUNTS: counts[k],
        }
        content = RecordDict(
            {"arrays": _record(arrays), "metrics": MetricRecord({"num-examples": 10 + k, "train_loss": 1.0})}
        )
        replies.append(Message(content, reply_to=Message(content, dst_node_id=NODE + k, message_type="train")))
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = sum((10 + k) * k for k in range(7)) / sum(10 + k for k in range(7))
    np.testing.assert_allclose(arrays["features.1.weight"].numpy(), expected, rtol=1e-6)  # by examples
    np.testing.assert_array_equal(arrays["head.weight"].numpy(), start["head.weight"])  # never updated
    assert metrics["clusters-per-class"] == pytest.approx((1 + 2 + 2 + 2) / 4)
    return strategy, inputs


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


@pytest.mark.parametrize("weighting", ["uniform", "labels"])
def test_each_cluster_gets_the_references_rows_and_prototypes(weighting):
    strategy, (_, trained, prototypes, _) = _aggregated(weighting)
    rows, protos = (ROWS_UNIFORM, PROTOTYPES_UNIFORM) if weighting == "uniform" else (ROWS_LABEL, PROTOTYPES_LABEL)
    for name, row in rows.items():
        c, group = name.split(":")
        for k in map(int, group.split(",")):
            np.testing.assert_allclose(strategy.heads[k][int(c)], row, atol=1e-6)
            np.testing.assert_allclose(strategy.targets[k][int(c)], protos[name], atol=1e-6)
    # client 6 is alone for class 3: its own row and prototype
    np.testing.assert_array_equal(strategy.heads[6][3], trained[6][3])
    np.testing.assert_array_equal(strategy.targets[6][3], prototypes[6][3])
    assert strategy.clusters == {str(c): groups for c, groups in MERGED.items()}
    # what client 4 receives next: its classifier and prototypes to train, its classifier to evaluate
    (message,) = [
        m
        for m in strategy.configure_train(2, _record(_bare()), ConfigRecord(), _Grid(7))
        if m.metadata.dst_node_id == NODE + 4
    ]
    record = message.content["arrays"]
    np.testing.assert_array_equal(record[OWN_WEIGHT].numpy(), strategy.heads[4][:, :-1])
    np.testing.assert_array_equal(record[PROTOTYPES].numpy(), strategy.targets[4])
    (evaluate,) = [
        m
        for m in strategy.configure_evaluate(2, _record(_bare()), ConfigRecord(), _Grid(7))
        if m.metadata.dst_node_id == NODE + 4
    ]
    np.testing.assert_array_equal(evaluate.content["arrays"]["head.bias"].numpy(), strategy.heads[4][:, -1])
    assert not any(key.startswith("fedccfa.") for key in evaluate.content["arrays"].keys())


def _bare() -> dict[str, np.ndarray]:
    return {
        "features.1.weight": np.zeros((3, 2), np.float32),
        "features.1.bias": np.zeros(3, np.float32),
        "head.weight": np.zeros((C, 3), np.float32),
        "head.bias": np.zeros(C, np.float32),
    }


def test_global_prototypes_and_the_fallback_for_a_missing_class():
    strategy, (_, _, prototypes, _) = _aggregated("uniform", clustered_prototypes=False)
    targets, present = strategy._alignment_targets(3)
    np.testing.assert_allclose(targets, np.mean(prototypes, axis=0), atol=1e-6)
    assert present.all()
    clustered, _ = _aggregated("uniform")
    clustered.present[6][3] = False  # as if client 6 held no class 3
    targets, present = clustered._alignment_targets(6)
    np.testing.assert_allclose(targets[3], np.mean(prototypes, axis=0)[3], atol=1e-6)
    assert present.all()
    assert clustered._alignment_targets(99) is None  # never trained: nothing to align to


def test_a_reply_without_fedccfas_arrays_is_refused():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    strategy = FedCCFA()
    list(strategy.configure_train(1, _record(_bare()), ConfigRecord(), _Grid(3)))
    content = RecordDict({"arrays": _record(_bare()), "metrics": MetricRecord({"num-examples": 5})})
    replies = [
        Message(content, reply_to=Message(content, dst_node_id=NODE + k, message_type="train")) for k in range(3)
    ]
    with pytest.raises(ValueError, match="balanced classifier"):
        strategy.aggregate_train(1, replies)


# -- the client: balanced classifier, classifier, aligned extractor --------------------------------
@pytest.mark.parametrize("alignment", ["contrastive", "l2"])
def test_a_clients_round_is_the_references(alignment):
    given = _client_input()
    model = MLP((D_IN,), C, hidden=(D,))
    arrays = {key: given[key] for key in ("features.1.weight", "features.1.bias", "head.weight", "head.bias")}
    arrays.update({OWN_WEIGHT: given["own.weight"], OWN_BIAS: given["own.bias"], PROTOTYPES: given["prototypes"]})
    arrays[PRESENT] = np.ones(C, np.float32)
    strategy = FedCCFA(balanced_epochs=2, alignment=alignment)
    extra = dict(strategy._config(21, ConfigRecord()))
    assert extra["fedccfa-align"] and not dict(strategy._config(20, ConfigRecord()))["fedccfa-align"]
    config = RoundConfig(
        server_round=21, local_epochs=2, batch_size=64, lr=0.05, momentum=0.9, weight_decay=1e-5, extra=extra
    )
    data = ClientData(given["x"], given["y"], given["x"][:0], given["y"][:0])
    call = ClientCall(model, _record(arrays), data, config, {}, torch.Generator().manual_seed(0), torch.device("cpu"))
    result = FedCCFATrainer().train(call)
    assert result.metrics["alignment_weight"] == pytest.approx(np.log(4) / 20)
    assert result.metrics["alignment_loss"] > 0
    golden = CLIENT_CL if alignment == "contrastive" else CLIENT_L2
    names = {"balanced.weight": BALANCED_WEIGHT, "balanced.bias": BALANCED_BIAS, "prototypes": PROTOTYPES}
    for key, value in golden.items():
        np.testing.assert_allclose(result.arrays[names.get(key, key)].numpy(), value, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(result.arrays[LABEL_COUNTS].numpy(), [3, 3, 3, 3])
    assert all(p.requires_grad for p in model.parameters()), "the worker's model is left trainable"


def test_the_alignment_weight_is_the_label_entropy_over_gamma():
    assert entropy_weight(np.array([5, 5, 0, 0]), gamma=20.0, fixed=0.3) == pytest.approx(np.log(2) / 20)
    assert entropy_weight(np.array([5, 5, 0, 0]), gamma=0.0, fixed=0.3) == 0.3


@pytest.mark.parametrize(
    "options, match",
    [
        ({"eps": 0.0}, "eps"),
        ({"balanced_epochs": -1}, "balanced_epochs"),
        ({"balanced_samples": 0}, "balanced_samples"),
        ({"classifier_lr": 0}, "classifier_lr"),
        ({"gamma": -1.0}, "gamma"),
        ({"temperature": 0.0}, "temperature"),
        ({"alignment": "cosine"}, "alignment"),
        ({"weighting": "samples"}, "weighting"),
        ({"align_from_round": 0}, "align_from_round"),
        ({"clustered_prototypes": 1}, "clustered_prototypes"),
    ],
)
def test_bad_options_are_refused_in_one_line(options, match):
    with pytest.raises(ValueError, match=match) as error:
        FedCCFA(**options)
    assert "\n" not in str(error.value)


# -- real runs ------------------------------------------------------------------------------------
ROUNDS_PER_SLOT = 6
# FedCCFA's label swaps on the 8x8 digits: 10 clients, sudden drift at slot 1 (round 7):
# clients 0-2 swap labels 1 and 2, clients 3-5 swap 3 and 4, clients 6-9 swap 5 and 6
STREAM = [
    "dataset.name=digits",
    "partition.name=drift",
    "partition.preset=fedccfa",
    "partition.num_clients=10",
    "partition.num_slots=2",
    f"partition.rounds_per_slot={ROUNDS_PER_SLOT}",
    "partition.reshuffle_shards=false",
    f"rounds={2 * ROUNDS_PER_SLOT}",
    "model.name=mlp",
    "model.hidden=[32]",
    "client.lr=0.1",
    "client.batch_size=32",
    "strategy.fraction_train=1.0",
]
SWAPPED = {1: [0, 1, 2], 2: [0, 1, 2], 3: [3, 4, 5], 4: [3, 4, 5], 5: [6, 7, 8, 9], 6: [6, 7, 8, 9]}


def _accuracy(path):
    """Clients' mean accuracy on their held-out data, by round."""
    metrics = RunDirectory(path).read_metrics()
    rows = metrics[(metrics.scope == "federated") & (metrics.id == "evaluate") & (metrics.metric == "accuracy")]
    return rows.set_index("round").value


def test_clusters_follow_the_label_swaps_and_beat_fedavg(tmp_path):
    experiment = load_experiment(QUICKSTART, [*STREAM, NAME, "strategy.align_from_round=3"])
    result = run_experiment(experiment, tmp_path / "fedccfa")
    state = checkpoint.load(RunDirectory(result.path).checkpoint).strategy_state
    everyone = list(range(10))
    for c in range(10):
        swapped = SWAPPED.get(c, [])
        expected = sorted(group for group in (swapped, [k for k in everyone if k not in swapped]) if group)
        assert sorted(state["clusters"][str(c)]) == expected, f"class {c}"
    metrics = RunDirectory(result.path).read_metrics()
    clusters = metrics[metrics.metric == "clusters-per-class"].set_index("round").value
    assert clusters.loc[1 : ROUNDS_PER_SLOT - 1].max() == 1.0, "before the swaps, one cluster for every class"
    alignment = metrics[(metrics.metric == "alignment_loss") & (metrics.id == "train")].set_index("round").value
    assert alignment.loc[1:2].max() == 0 and alignment.loc[3:].min() > 0
    fedavg = run_experiment(load_experiment(QUICKSTART, [*STREAM, "strategy.name=fedavg"]), tmp_path / "fedavg")
    ours, theirs = _accuracy(result.path), _accuracy(fedavg.path)
    assert ours.iloc[-1] > theirs.iloc[-1] + 0.05


def test_on_a_static_partition_it_ends_close_to_fedavg(tmp_path):
    shared = ["rounds=5", "partition.alpha=100.0"]  # nearly IID: nothing to personalise
    ours = run_experiment(tiny_experiment(NAME, "strategy.align_from_round=2", *shared), tmp_path / "fedccfa")
    theirs = run_experiment(tiny_experiment("strategy.name=fedavg", *shared), tmp_path / "fedavg")
    final = _accuracy(ours.path).iloc[-1]
    assert final > 0.8
    assert abs(final - _accuracy(theirs.path).iloc[-1]) < 0.08


def _short(*extra: str):
    """The stream in 2 slots of 2 rounds, aligning from round 2."""
    kept = [o for o in STREAM if not o.startswith(("partition.rounds_per_slot=", "rounds="))]
    overrides = [*kept, "partition.rounds_per_slot=2", "rounds=4", NAME, "strategy.align_from_round=2", *extra]
    return load_experiment(QUICKSTART, overrides)


def test_fedccfa_resumes_exactly(tmp_path, monkeypatch):
    assert interrupted_and_resumed(_short(), tmp_path, monkeypatch, crash_round=2).status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    mine = checkpoint.load(tmp_path / "run/checkpoint.npz").strategy_state
    theirs = checkpoint.load(tmp_path / "reference/checkpoint.npz").strategy_state
    assert sorted(mine["heads"].keys(), key=int) == [str(k) for k in range(10)], "every client's classifier is kept"
    for name in ("heads", "targets", "present"):
        assert list(mine[name].keys()) == list(theirs[name].keys())
        for key in mine[name].keys():
            np.testing.assert_array_equal(mine[name][key].numpy(), theirs[name][key].numpy())
    assert mine["clusters"] == theirs["clusters"]


@pytest.mark.ray
def test_fedccfa_on_ray_gives_the_in_process_bits(tmp_path):
    run_experiment(_short(), tmp_path / "local")
    run_experiment(_short("engine.name=ray", "engine.num_workers=2"), tmp_path / "ray")
    assert (tmp_path / "ray/metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()


# -- golden numbers: the authors' code on the inputs above (see the module docstring) -----------
MADD_CLASS_1_UPPER = [
    0.030034453,
    0.030911917,
    0.551157,
    0.5554527,
    0.54382122,
    0.016605938,
    0.0011675954,
    0.56146109,
    0.5655688,
    0.55426556,
    0.013577074,
    0.5616253,
    0.56568396,
    0.55457354,
    0.014566476,
    0.0083975969,
    0.014452457,
    0.55707246,
    0.022708625,
    0.56098115,
    0.54958165,
]
MERGED = {
    0: [[0, 1, 2, 3, 4, 5, 6]],
    1: [[0, 1, 2, 6], [3, 4, 5]],
    2: [[0, 1, 2, 6], [3, 4, 5]],
    3: [[0, 1, 2, 3, 4, 5]],
}
ROWS_UNIFORM = {
    "0:0,1,2,3,4,5,6": [0.30199617, 0.25057852, -0.37425312, 0.1095435],
    "1:0,1,2,6": [0.034165069, 0.66284347, 0.48224366, -0.47060356],
    "1:3,4,5": [-0.69132042, -0.60806847, -0.34202841, -0.77167636],
    "2:0,1,2,6": [-0.18054458, -0.46456236, -0.31753954, -1.237429],
    "2:3,4,5": [-0.79002827, 0.014299829, -0.68623227, 0.12631391],
    "3:0,1,2,3,4,5": [0.48838511, -0.355382, 0.35704282, -0.015229896],
}
PROTOTYPES_UNIFORM = {
    "0:0,1,2,3,4,5,6": [1.0299532, 0.17978287, 0.56195593],
    "1:0,1,2,6": [0.85361725, 0.80316532, -0.14797781],
    "1:3,4,5": [-0.68587285, -0.1642236, -0.82492524],
    "2:0,1,2,6": [-0.76934409, 0.80639005, 0.42613858],
    "2:3,4,5": [-0.34755722, -0.31521457, -0.70961189],
    "3:0,1,2,3,4,5": [-0.65441591, 0.10375782, -0.20891166],
}
ROWS_LABEL = {
    "0:0,1,2,3,4,5,6": [0.26784775, 0.22664626, -0.55259943, -0.14171834],
    "1:0,1,2,6": [0.22669496, 0.89882773, 0.54631764, -0.36232108],
    "1:3,4,5": [-0.65369534, -0.76228648, -0.6126129, -0.80648583],
    "2:0,1,2,6": [-0.14546956, -0.79832214, -0.75748968, -1.6088632],
    "2:3,4,5": [-0.84651607, 0.022090333, -0.83071488, 0.11872355],
    "3:0,1,2,3,4,5": [0.16684721, -0.70443159, -0.41684607, 0.68866444],
}
PROTOTYPES_LABEL = {
    "0:0,1,2,3,4,5,6": [0.83664095, 0.044156652, 0.36307192],
    "1:0,1,2,6": [0.7616027, 0.89511901, -0.11483791],
    "1:3,4,5": [-0.94589037, 0.061035536, -0.63628739],
    "2:0,1,2,6": [-0.61722827, 0.63778013, 0.074164122],
    "2:3,4,5": [-0.36931291, -0.29018733, -0.7499705],
    "3:0,1,2,3,4,5": [-0.53359938, -0.25839415, -0.3863253],
}
CLIENT_CL = {
    "balanced.weight": [
        [-0.53087044, 0.67764395, -0.32449597, -0.31893104],
        [-0.14733528, -0.46195602, -0.13005522, 0.033687752],
        [-0.65737778, 0.15570387, -0.049523029, -0.23575744],
        [-0.23570584, 0.22816005, 0.14168601, 0.25645772],
    ],
    "balanced.bias": [-0.012775333, -0.080153838, 0.0023871455, -0.13899079],
    "features.1.weight": [
        [-0.10404842, 0.086405315, 0.34082308, -0.34645435, -0.29312721, -0.089121841],
        [-0.031899117, 0.25385427, 0.29882568, 0.23881966, 0.10576004, -1.0627271],
        [-0.15159929, 0.40427721, 0.25181416, 0.24837129, -0.22736859, -0.70285493],
        [0.36776552, 0.61430997, -1.0113542, 0.59643191, 0.22854418, 0.34820604],
    ],
    "features.1.bias": [0.19235964, 0.040892027, 0.037111349, -0.10282828],
    "head.weight": [
        [-0.43177959, -0.22857435, 1.1231542, 0.11040919],
        [-0.070840217, -0.28493166, 0.26249301, -0.37531507],
        [0.42355424, -0.044402782, -0.21915732, 0.31148341],
        [-0.033042077, 0.46394959, -0.17220862, -0.39756596],
    ],
    "head.bias": [0.099345893, 0.094508789, -0.047085639, 0.30050236],
    "prototypes": [
        [0.18847972, 0.69339126, 0.78210372, 1.6956691],
        [0.84433824, 0, 0.043582324, 0.17977124],
        [0, 0.17474975, 0.17508863, 1.5751821],
        [0.71717411, 0.27197981, 0.48471364, 0.18102075],
    ],
}
CLIENT_L2 = {
    "features.1.weight": [
        [-0.10192449, 0.08343491, 0.33904168, -0.34511727, -0.3023358, -0.091513403],
        [-0.032852411, 0.25347266, 0.29878843, 0.24041934, 0.10647106, -1.0621476],
        [-0.15562709, 0.40752926, 0.2541959, 0.24831705, -0.21398807, -0.70243305],
        [0.36652723, 0.61292708, -1.0103937, 0.59279013, 0.22830449, 0.34700689],
    ],
    "features.1.bias": [0.1925422, 0.041185319, 0.032707162, -0.10465129],
    "prototypes": [
        [0.19291119, 0.69454193, 0.77637941, 1.6866618],
        [0.84457284, 0, 0.042580485, 0.17846824],
        [0, 0.17596762, 0.17609744, 1.5674664],
        [0.72593135, 0.27214018, 0.46465436, 0.17943187],
    ],
}
