"""Defences (strategies/defences): hand-computed aggregates, Flower equivalence, composition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from fedsim.checkpoint import Checkpoint
from fedsim.checkpoint import load as load_checkpoint
from fedsim.checkpoint import save as save_checkpoint
from fedsim.seeding import derive_seed
from strategies.defences import DEFENCES, defend
from strategies.defences.base import ACCEPTED, REJECTED, Defence, defended
from strategies.defences.deepsight import DeepSight, neups, threshold_exceedings
from strategies.defences.flame import FLAME
from strategies.defences.flower import (
    FlowerBulyan,
    FlowerKrum,
    FlowerMedian,
    FlowerMultiKrum,
    FlowerTrimmedAvg,
)
from strategies.defences.fltrust import FLTrust, root_trainer
from strategies.defences.foolsgold import FoolsGold, foolsgold_weights
from strategies.defences.norm_clipping import NormClipping
from strategies.defences.rlr import RLR
from strategies.defences.weak_dp import WeakDP
from strategies.fedbn import FedBN, FedBNTrainer
from tests.conftest import tiny_experiment

NODE = 100  # node ids: NODE + client index


# -- building blocks ----------------------------------------------------------------------
def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})


def _reply(node: int, arrays: dict[str, np.ndarray], examples: int = 10, loss: float = 1.0) -> Message:
    """A train reply from ``node`` (its ``metadata.src_node_id``)."""
    from flwr.supercore.task_identity import TaskIdentity

    content = RecordDict(
        {"arrays": _record(arrays), "metrics": MetricRecord({"num-examples": examples, "train_loss": loss})}
    )
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    return Message(content, reply_to=Message(content, dst_node_id=node, message_type="train"))


class _Grid:
    """Just what Flower's configure_train asks of a Grid."""

    def __init__(self, n: int) -> None:
        self.nodes = [NODE + i for i in range(n)]

    def get_node_ids(self):
        return list(self.nodes)


def _configure(defence: Defence, arrays: dict[str, np.ndarray], n: int, server_round: int = 1) -> list[Message]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    return list(defence.configure_train(server_round, _record(arrays), ConfigRecord(), _Grid(n)))


def _split(vector: np.ndarray) -> dict[str, np.ndarray]:
    """A 3-vector as two arrays: "w" (2,) and "b" (1,)."""
    return {"w": vector[:2], "b": vector[2:]}


GLOBAL3 = np.array([1.0, 2.0, 0.5])


def _round(defence: Defence, updates, examples=None, server_round: int = 1, global_vector=GLOBAL3):
    """Aggregate ``global_vector + u`` for each update u; return the new vector and metrics."""
    _configure(defence, _split(global_vector), len(updates), server_round)
    examples = examples or [10] * len(updates)
    replies = [
        _reply(NODE + i, _split(global_vector + np.asarray(u, float)), examples[i], loss=float(i))
        for i, u in enumerate(updates)
    ]
    arrays, metrics = defence.aggregate_train(server_round, replies)
    return np.concatenate([arrays["w"].numpy(), arrays["b"].numpy()]), metrics


def _clip(u: np.ndarray, bound: float) -> np.ndarray:
    return u * min(1.0, bound / np.linalg.norm(u))


# -- norm clipping and weak DP ------------------------------------------------------------
def test_norm_clipping_clips_each_update_then_averages_as_fedavg():
    defence = NormClipping(FedAvg(), clip_norm=1.0)
    new, metrics = _round(defence, [[3.0, 4.0, 0.0], [0.3, 0.0, 0.4]], examples=[10, 30])
    # [3, 4, 0] has norm 5 -> [0.6, 0.8, 0]; [0.3, 0, 0.4] has norm 0.5 and stays
    expected = (10 * np.array([0.6, 0.8, 0.0]) + 30 * np.array([0.3, 0.0, 0.4])) / 40  # [0.375, 0.2, 0.3]
    np.testing.assert_allclose(new - GLOBAL3, expected, rtol=1e-12)
    assert defence.last_accepted == [NODE, NODE + 1]
    assert metrics[ACCEPTED] == 2 and metrics[REJECTED] == 0
    assert metrics["train_loss"] == pytest.approx((10 * 0 + 30 * 1) / 40)  # FedAvg's metric weighting


def test_weak_dp_adds_seeded_gaussian_noise_to_the_clipped_mean():
    updates = [[3.0, 4.0, 0.0], [0.3, 0.0, 0.4]]
    clipped, _ = _round(NormClipping(FedAvg(), clip_norm=1.0), updates)
    quiet, _ = _round(WeakDP(FedAvg(), clip_norm=1.0, noise_std=0.0), updates)
    np.testing.assert_allclose(quiet, clipped, rtol=1e-12)

    noisy, _ = _round(WeakDP(FedAvg(), clip_norm=1.0, noise_std=0.5, seed=7), updates, server_round=3)
    drawn = np.random.default_rng(derive_seed(7, "defence-weak-dp", 3)).normal(0.0, 0.5, 3)
    np.testing.assert_allclose(noisy - clipped, drawn, rtol=1e-9)
    # the same draw whatever global state says; another round or seed draws anew
    np.random.seed(123)
    again, _ = _round(WeakDP(FedAvg(), clip_norm=1.0, noise_std=0.5, seed=7), updates, server_round=3)
    np.testing.assert_array_equal(again, noisy)
    other_round, _ = _round(WeakDP(FedAvg(), clip_norm=1.0, noise_std=0.5, seed=7), updates, server_round=4)
    other_seed, _ = _round(WeakDP(FedAvg(), clip_norm=1.0, noise_std=0.5, seed=8), updates, server_round=3)
    assert not np.allclose(other_round, noisy) and not np.allclose(other_seed, noisy)


def test_weak_dp_noise_has_the_given_standard_deviation():
    d = 20_000
    defence = WeakDP(FedAvg(), clip_norm=1e9, noise_std=0.05)
    _configure(defence, {"w": np.zeros(d)}, 2)
    replies = [_reply(NODE, {"w": np.ones(d)}), _reply(NODE + 1, {"w": np.ones(d)})]
    arrays, _ = defence.aggregate_train(1, replies)
    assert np.std(arrays["w"].numpy() - 1.0) == pytest.approx(0.05, rel=0.03)


# -- FLAME --------------------------------------------------------------------------------
def _planted(seed: int = 0) -> np.ndarray:
    """6 similar updates and a 7th pointing the other way."""
    rng = np.random.default_rng(seed)
    base = np.array([1.0, 0.8, -0.5])
    benign = [base * rng.uniform(0.5, 2.0) + 0.05 * rng.standard_normal(3) for _ in range(6)]
    return np.stack([*benign, -2.0 * base])


@pytest.mark.parametrize("cluster_on", ["updates", "models"])
def test_flame_drops_a_planted_outlier_and_clips_the_rest_to_the_median_norm(cluster_on):
    updates = _planted()
    defence = FLAME(FedAvg(), noise_lambda=0.0, cluster_on=cluster_on)
    new, metrics = _round(defence, updates, global_vector=np.zeros(3) if cluster_on == "models" else GLOBAL3)
    outlier = NODE + 6
    assert outlier not in defence.last_accepted
    assert len(defence.last_accepted) >= 4  # the majority cluster: more than half of the 7
    kept = [node - NODE for node in defence.last_accepted]
    bound = np.median(np.linalg.norm(updates, axis=1))  # of all 7 updates, the outlier's included
    expected = np.mean([_clip(updates[i], bound) for i in kept], axis=0)  # equal weights
    start = np.zeros(3) if cluster_on == "models" else GLOBAL3
    np.testing.assert_allclose(new - start, expected, rtol=1e-10)
    assert metrics[REJECTED] == 7 - len(kept)


def test_flame_noise_is_lambda_times_the_median_norm_seeded_by_round():
    updates = _planted()
    quiet, _ = _round(FLAME(FedAvg(), noise_lambda=0.0), updates, server_round=2)
    noisy, _ = _round(FLAME(FedAvg(), noise_lambda=0.01, seed=3), updates, server_round=2)
    bound = np.median(np.linalg.norm(updates, axis=1))
    drawn = np.random.default_rng(derive_seed(3, "defence-flame", 2)).normal(0.0, 0.01 * bound, 3)
    np.testing.assert_allclose(noisy - quiet, drawn, rtol=1e-8, atol=1e-15)


def test_flame_leaves_statistics_out_of_the_vector_and_averages_them_over_the_accepted():
    updates = _planted()
    start = {"w": GLOBAL3.astype(np.float32), "bn.running_mean": np.zeros(2, np.float32)}
    defence = FLAME(FedAvg(), noise_lambda=0.0)
    _configure(defence, {**start, "bn.num_batches_tracked": np.array(0)}, 7)
    replies = []
    for i, u in enumerate(updates):
        stats = np.full(2, 1000.0 if i == 6 else float(i), np.float32)  # huge statistics: not a direction
        arrays = {
            "w": (GLOBAL3 + u).astype(np.float32),
            "bn.running_mean": stats,
            "bn.num_batches_tracked": np.array(5 + i),
        }
        replies.append(_reply(NODE + i, arrays, examples=1 + i))
    arrays, _ = defence.aggregate_train(1, replies)
    kept = [node - NODE for node in defence.last_accepted]
    assert 6 not in kept
    weights = np.array([1.0 + i for i in kept])
    np.testing.assert_allclose(arrays["bn.running_mean"].numpy(), np.full(2, weights @ kept / weights.sum()), rtol=1e-6)
    assert arrays["bn.num_batches_tracked"].numpy().dtype == np.int64
    assert arrays["bn.num_batches_tracked"].numpy() == round(weights @ (5 + np.array(kept)) / weights.sum())
    assert arrays["w"].numpy().dtype == np.float32


# -- FoolsGold ----------------------------------------------------------------------------
def test_foolsgold_weights_by_hand():
    e = 1e-5  # the reference's guard, in the maximum similarities and inside the logit's log
    h = np.array([[1.0, 0.0, 0.0], [0.5, math.sqrt(0.75), 0.0], [0.0, 0.0, 1.0]])
    # cs_12 = 0.5, the third is orthogonal: alpha = [0.5, 0.5, 1] -> [0.5, 0.5, 0.99];
    # logit + 0.5: ln(1 + e) + 0.5 ~ 0.5, ln(99 + e) + 0.5 > 1 -> 1
    half = math.log(1 + e) + 0.5
    np.testing.assert_allclose(foolsgold_weights(h), [half, half, 1.0], rtol=1e-12)
    np.testing.assert_allclose(foolsgold_weights(h, kappa=0.5), [half / 2, half / 2, 1.0], rtol=1e-12)
    # pardoning: cs_12 = 0.9, cs_13 = 0.6, cs_23 = 0.54, the 4th orthogonal to all; client 3's
    # max similarity (0.6 + e) is below client 1's (0.9 + e), so cs_31 -> 0.6 (0.6 + e) / (0.9 + e)
    # ~ 0.4 and cs_32 ~ 0.36: alpha ~ 1 - [0.9, 0.9, 0.4, 0] = [0.1, 0.1, 0.6, 1] (max already 1)
    h = np.array([[1.0, 0.0, 0.0, 0.0], [0.9, math.sqrt(0.19), 0.0, 0.0], [0.6, 0.0, 0.8, 0.0], [0.0, 0.0, 0.0, 1.0]])
    alpha3 = 1 - 0.6 * (0.6 + e) / (0.9 + e)
    logit = np.log(np.array([0.1 / 0.9, 0.1 / 0.9, alpha3 / (1 - alpha3)]) + e) + 0.5  # < 0, < 0, 0.905
    np.testing.assert_allclose(foolsgold_weights(h), [0.0, 0.0, logit[2], 1.0], rtol=1e-12)


def test_foolsgold_gives_two_identical_sybils_no_weight():
    honest = [[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]]
    sybil = [0.0, 0.0, 0.0, 2.0, 2.0]
    defence = FoolsGold(FedAvg())
    global5 = np.zeros(5)
    _configure(defence, {"w": global5}, 5)
    replies = [_reply(NODE + i, {"w": np.asarray(u)}) for i, u in enumerate([*honest, sybil, sybil])]
    arrays, metrics = defence.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean(honest, axis=0), rtol=1e-12)
    assert defence.last_accepted == [NODE, NODE + 1, NODE + 2]
    assert metrics[REJECTED] == 2


def test_foolsgold_history_survives_a_checkpoint_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    rounds = [rng.standard_normal((4, 6)) for _ in range(3)]

    def play(defence, server_round):
        _configure(defence, {"w": np.zeros(6)}, 4, server_round)
        replies = [_reply(NODE + i, {"w": u}) for i, u in enumerate(rounds[server_round - 1])]
        return defence.aggregate_train(server_round, replies)[0]["w"].numpy()

    original = defend(FedAvg(), "foolsgold")
    play(original, 1)
    play(original, 2)
    state = original.state_dict()
    assert isinstance(state["defence.history"], np.ndarray) and state["defence.history_nodes"] == [100, 101, 102, 103]
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(2, _record({"w": np.zeros(6)}), state, 0, "", 0.0))
    restored = defend(FedAvg(), "foolsgold")
    restored.load_state_dict(load_checkpoint(path).strategy_state)  # np.load(allow_pickle=False)
    np.testing.assert_array_equal(play(restored, 3), play(original, 3))


# -- RLR ----------------------------------------------------------------------------------
def test_rlr_reverses_the_coordinates_with_too_little_sign_agreement():
    updates = np.array(
        [
            [1.0, 1.0, 1.0],
            [2.0, -1.0, 1.0],
            [1.0, 1.0, 2.0],
            [3.0, -2.0, -1.0],
        ]
    )  # sign sums: 4, 0, 2
    defence = RLR(FedAvg(), threshold=3, server_lr=0.5)
    new, metrics = _round(defence, updates, examples=[1, 1, 2, 4])
    mean = np.array([1, 1, 2, 4]) @ updates / 8
    np.testing.assert_allclose(new - GLOBAL3, np.array([0.5, -0.5, -0.5]) * mean, rtol=1e-12)
    assert metrics[ACCEPTED] == 4
    # with threshold 2 the third coordinate (|sum of signs| = 2) keeps its direction
    new, _ = _round(RLR(FedAvg(), threshold=2), updates, examples=[1, 1, 2, 4])
    np.testing.assert_allclose(new - GLOBAL3, np.array([1.0, -1.0, 1.0]) * mean, rtol=1e-12)


def test_rlr_refuses_a_threshold_above_the_sampled_clients():
    with pytest.raises(ValueError, match="threshold = 5 exceeds the 4 clients a round samples"):
        _configure(RLR(FedAvg(min_train_nodes=4, min_available_nodes=4), threshold=5), _split(GLOBAL3), 4)
    # fewer useful replies than the threshold (clients failed): the global model is kept
    defence = RLR(FedAvg(), threshold=3)
    _configure(defence, _split(GLOBAL3), 3)
    arrays, metrics = defence.aggregate_train(1, [_reply(NODE + i, _split(GLOBAL3 + 1.0)) for i in range(2)])
    np.testing.assert_array_equal(np.concatenate([arrays["w"].numpy(), arrays["b"].numpy()]), GLOBAL3)
    assert defence.last_accepted == [] and metrics[REJECTED] == 2


# -- FLTrust ------------------------------------------------------------------------------
def test_fltrust_trusts_by_cosine_to_the_root_update_and_rescales_to_its_norm():
    server = np.array([1.0, 0.0, 0.0])

    def root_update(arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        start = np.concatenate([arrays["w"].numpy(), arrays["b"].numpy()])
        return _record(_split(start + server))

    defence = FLTrust(FedAvg(), root_update=root_update)
    updates = [[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-3.0, 0.0, 0.0]]
    new, metrics = _round(defence, updates)
    # trust: 1, cos 45 deg = 0.7071, ReLU(-1) = 0; each update rescaled to ||g0|| = 1
    t = 1 / math.sqrt(2)
    expected = (1.0 * np.array([1.0, 0.0, 0.0]) + t * np.array([t, t, 0.0])) / (1.0 + t)
    np.testing.assert_allclose(new - GLOBAL3, expected, rtol=1e-12)
    assert defence.last_accepted == [NODE, NODE + 1]
    assert defence.last_trust[NODE + 2] == 0.0
    assert metrics[REJECTED] == 1


def test_fltrust_keeps_the_global_model_when_no_update_is_trusted():
    defence = FLTrust(FedAvg(), root_update=lambda arrays, r: _record(_split(GLOBAL3 + [1.0, 0.0, 0.0])))
    new, metrics = _round(defence, [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(new, GLOBAL3)
    assert defence.last_accepted == [] and metrics[ACCEPTED] == 0


def test_root_trainer_is_seeded_by_round_and_trains():
    import torch

    def model_fn():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 2, 2)).astype(np.float32), rng.integers(0, 3, 20)
    train = root_trainer(model_fn, x, y, lr=0.1, epochs=2, batch_size=8, seed=1)
    start = ArrayRecord(model_fn().state_dict())
    first, again, other = train(start, 1), train(start, 1), train(start, 2)
    key = "1.weight"
    assert np.array_equal(first[key].numpy(), again[key].numpy())
    assert not np.array_equal(first[key].numpy(), start[key].numpy())
    assert not np.array_equal(first[key].numpy(), other[key].numpy())
    # it drives FLTrust end to end: a client that moved with the server is trusted
    defence = FLTrust(FedAvg(), root_update=train)
    _configure(defence, {k: start[k].numpy() for k in start.keys()}, 2)
    moved = {k: first[k].numpy() for k in first.keys()}
    against = {k: 2 * start[k].numpy() - first[k].numpy() for k in first.keys()}
    defence.aggregate_train(1, [_reply(NODE, moved), _reply(NODE + 1, against)])
    assert defence.last_accepted == [NODE]


def test_root_trainer_takes_the_clients_local_iterations_when_given_steps():
    import torch

    calls = []

    class Counted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            calls.append(len(x))
            return self.linear(x.flatten(1))

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 2, 2)).astype(np.float32), rng.integers(0, 3, 20)
    start = ArrayRecord(Counted().state_dict())
    root_trainer(Counted, x, y, lr=0.1, epochs=2, batch_size=8)(start, 1)
    assert calls == [8, 8, 4] * 2, "two passes over the root set"
    calls.clear()
    root_trainer(Counted, x, y, lr=0.1, epochs=2, batch_size=8, steps=7)(start, 1)
    assert len(calls) == 7 and sum(calls) == 8 + 8 + 4 + 8 + 8 + 4 + 8, "passes repeat until 7 steps"
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        root_trainer(Counted, x, y, steps=0)


def test_fltrusts_server_in_a_run_takes_an_average_clients_local_iterations(monkeypatch):
    from fedsim.build.factories import server_resources
    from fedsim.environment import experiment_dataset
    from strategies.defences import fltrust

    seen = {}
    monkeypatch.setattr(fltrust, "root_trainer", lambda *args, **kwargs: seen.update(kwargs) or (lambda a, r: a))
    experiment = tiny_experiment("strategy.defence=fltrust", "client.batch_size=16", "client.local_epochs=3")

    class Env:
        new_model = None

        @staticmethod
        def dataset():
            return experiment_dataset(experiment)

    fltrust.FLTrust.from_server(server_resources(experiment, Env()))
    per_client = len(Env.dataset().y_train) * 0.8 / 4  # 4 clients, a fifth of each held out
    assert seen["steps"] == 3 * int(np.ceil(per_client / 16))


# -- DeepSight ----------------------------------------------------------------------------
def _deepsight_round(defence, seed=0):
    """6 benign clients spread their output-layer update over all 4 labels; 2 backdoor
    clients put theirs on label 0, in another direction."""
    rng = np.random.default_rng(seed)
    start = {"body.weight": np.zeros(2), "fc.weight": np.zeros((4, 3)), "fc.bias": np.zeros(4)}
    updates = []
    for i in range(8):
        if i < 6:
            fc_w = rng.uniform(0.8, 1.2, (4, 3)) * np.sign(rng.standard_normal((4, 3)))
            fc_b = rng.uniform(0.8, 1.2, 4)
        else:
            fc_w = np.zeros((4, 3))
            fc_w[0] = 5.0 + 0.1 * rng.standard_normal(3)
            fc_b = np.array([-4.0, -0.01, -0.01, -0.01]) + 0.01 * rng.standard_normal(4)
        updates.append({"body.weight": rng.standard_normal(2), "fc.weight": fc_w, "fc.bias": fc_b})
    _configure(defence, start, 8)
    replies = [_reply(NODE + i, u) for i, u in enumerate(updates)]
    arrays, metrics = defence.aggregate_train(1, replies)
    return updates, arrays, metrics


def test_deepsight_labels_low_threshold_exceedings_suspicious_and_drops_their_cluster():
    defence = DeepSight(FedAvg(), num_seeds=0)
    updates, arrays, metrics = _deepsight_round(defence)
    # by hand for one benign and one backdoor client: NEUP_k = e_k^2 / sum e^2,
    # e_k = |db_k| + sum_j |dW_kj|; TE = #{NEUP_k > max(0.01, 1/4) max NEUP}
    for i, te in ((0, 4), (6, 1)):
        e = np.abs(updates[i]["fc.bias"]) + np.abs(updates[i]["fc.weight"]).sum(axis=1)
        neup = e**2 / (e**2).sum()
        np.testing.assert_allclose(neups(updates[i]["fc.weight"][None], updates[i]["fc.bias"][None])[0], neup)
        assert threshold_exceedings(neup[None])[0] == te
    assert [node for node, flag in defence.last_suspicious.items() if flag] == [NODE + 6, NODE + 7]
    assert defence.last_accepted == [NODE + i for i in range(6)]
    vectors = np.stack([np.concatenate([u["body.weight"], u["fc.weight"].ravel(), u["fc.bias"]]) for u in updates])
    bound = np.median(np.linalg.norm(vectors, axis=1))
    expected = np.mean([_clip(v, bound) for v in vectors[:6]], axis=0)
    got = np.concatenate(
        [arrays["body.weight"].numpy(), arrays["fc.weight"].numpy().ravel(), arrays["fc.bias"].numpy()]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert metrics[REJECTED] == 2


def test_deepsight_ddifs_run_the_models_on_seeded_noise():
    import torch

    def model_fn():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 4))

    defence = DeepSight(FedAvg(), num_seeds=2, num_samples=64, batch_size=16, model_fn=model_fn, input_shape=(1, 2))
    # the model's keys are "1.weight" (4, 2) and "1.bias" (4,)
    start = {key: value.numpy() for key, value in model_fn().state_dict().items()}
    _configure(defence, start, 3)
    rng = np.random.default_rng(0)
    replies = [
        _reply(NODE + i, {key: value + 0.1 * rng.standard_normal(value.shape) for key, value in start.items()})
        for i in range(3)
    ]
    defence.aggregate_train(1, replies)
    updates = defence.updates_of([r for r in replies])
    ddifs = defence.ddifs(updates)
    assert len(ddifs) == 2 and ddifs[0].shape == (3, 4)
    # DDif of a client that equals the global model is 1 for every label
    same = defence.updates_of([_reply(NODE, start)])
    np.testing.assert_allclose(defence.ddifs(same)[0], np.ones((1, 4)), rtol=1e-9)
    np.testing.assert_array_equal(ddifs[1], defence.ddifs(updates)[1])  # seeded


# -- Flower's own aggregators, wired in ---------------------------------------------------
def _random_replies(n: int = 7, seed: int = 0) -> list[Message]:
    rng = np.random.default_rng(seed)
    return [
        _reply(NODE + i, {"w": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.standard_normal(2)}, 5 + i)
        for i in range(n)
    ]


def _split_reply(reply: Message) -> dict[str, np.ndarray]:
    record = reply.content["arrays"]
    return {key: record[key].numpy() for key in record.keys()}


@pytest.mark.parametrize(
    ("ours", "flowers"),
    [
        (lambda s: FlowerKrum(s, num_malicious_nodes=2), lambda: Krum(num_malicious_nodes=2)),
        (lambda s: FlowerMedian(s), lambda: FedMedian()),
        (
            lambda s: FlowerMultiKrum(s, num_malicious_nodes=1, num_nodes_to_select=3),
            lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
        ),
        (lambda s: FlowerTrimmedAvg(s, beta=0.2), lambda: FedTrimmedAvg(beta=0.2)),
        (lambda s: FlowerBulyan(s, num_malicious_nodes=1), lambda: Bulyan(num_malicious_nodes=1)),
    ],
    ids=["krum", "fedmedian", "multikrum", "fedtrimmedavg", "bulyan"],
)
def test_our_wiring_gives_exactly_what_flowers_class_gives(ours, flowers):
    """From a zero global model the updates are the models: Flower's class on the models
    in float64 gives exactly our arrays (rounded to the models' dtype), and Flower's class
    on the float32 models themselves the same to float32 rounding."""
    defence = ours(FedAvg())
    _configure(defence, {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2)}, 7)
    replies = _random_replies()
    arrays, metrics = defence.aggregate_train(1, replies)
    in_float64 = [
        _reply(NODE + i, {key: np.float64(value) for key, value in _split_reply(reply).items()}, 5 + i)
        for i, reply in enumerate(_random_replies())
    ]
    expected, _ = flowers().aggregate_train(1, in_float64)
    on_models, _ = flowers().aggregate_train(1, _random_replies())  # identical replies, built again
    assert list(arrays.keys()) == list(expected.keys())
    for key in expected.keys():
        dtype = replies[0].content["arrays"][key].numpy().dtype
        np.testing.assert_array_equal(arrays[key].numpy(), expected[key].numpy().astype(dtype))
        np.testing.assert_allclose(arrays[key].numpy(), on_models[key].numpy(), rtol=0, atol=1e-6)
    assert all(list(reply.content["arrays"].keys()) == ["w", "b"] for reply in replies)  # not emptied
    assert metrics[ACCEPTED] == len(defence.last_accepted) and metrics[ACCEPTED] + metrics[REJECTED] == 7


def test_krum_reports_the_client_it_chose():
    defence = defend(FedAvg(), "krum", num_malicious_nodes=2)
    _configure(defence, {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2)}, 7)
    replies = _random_replies()
    arrays, _ = defence.aggregate_train(1, replies)
    (chosen,) = defence.last_accepted
    np.testing.assert_array_equal(arrays["w"].numpy(), replies[chosen - NODE].content["arrays"]["w"].numpy())


# -- composition --------------------------------------------------------------------------
FEDBN_START = {
    "conv.weight": np.zeros((2, 2), np.float32),
    "bn.weight": np.ones(2, np.float32),
    "bn.bias": np.zeros(2, np.float32),
    "bn.running_mean": np.zeros(2, np.float32),
    "bn.running_var": np.ones(2, np.float32),
    "bn.num_batches_tracked": np.array(0),
    "fc.weight": np.zeros((3, 2), np.float32),
    "fc.bias": np.zeros(3, np.float32),
}


def test_a_defence_composes_with_fedbn_and_keeps_its_client_trainer():
    defence = defend(FedBN(), "norm-clipping", clip_norm=1.0)
    assert isinstance(defence, NormClipping) and type(defence) is defended(FedBN, NormClipping)
    assert type(defence).client_trainer is FedBNTrainer and defence.client_trainer is FedBNTrainer
    assert type(defence).personalized is True and defence.personalized is True
    assert type(defence).validate_model is FedBN.validate_model
    assert defence.weighting == "uniform"  # the wrapped strategy's attributes, by delegation

    sent = _configure(defence, FEDBN_START, 3)
    assert set(sent[0].content["arrays"].keys()) == set(FEDBN_START)  # FedBN's message: a complete model
    rng = np.random.default_rng(0)
    shared = [key for key in FEDBN_START if not key.startswith("bn.")]
    replies = [
        _reply(
            NODE + i,
            {key: FEDBN_START[key] + rng.standard_normal(FEDBN_START[key].shape).astype(np.float32) for key in shared},
            examples=10 * (i + 1),
        )
        for i in range(3)
    ]
    arrays, _ = defence.aggregate_train(1, replies)
    assert list(arrays.keys()) == shared  # only the keys the replies carry
    vectors = [np.concatenate([r.content["arrays"][k].numpy().ravel() for k in shared]) for r in replies]
    expected = np.mean([_clip(v.astype(np.float64), 1.0) for v in vectors], axis=0)  # FedBN's uniform weighting
    got = np.concatenate([arrays[k].numpy().ravel() for k in shared])
    np.testing.assert_allclose(got, expected, rtol=1e-6)

    # FedBN's own check still runs: a reply that carries BatchNorm arrays is refused
    leaky = _reply(NODE, {**{k: FEDBN_START[k] for k in shared}, "bn.running_mean": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="carries BatchNorm arrays"):
        defence.aggregate_train(2, [leaky])

    # the state merges FedBN's with the defence's and loads back
    state = defend(FedBN(), "foolsgold").state_dict()
    assert state == {"defence.history_nodes": []}
    fresh = defend(FedBN(), "norm-clipping", clip_norm=1.0)
    fresh.load_state_dict(defence.state_dict())
    assert set(fresh.initial_batchnorm.keys()) == {key for key in FEDBN_START if key.startswith("bn.")}


class _ReplyingGrid(_Grid):
    """A Grid whose client i adds ``deltas[i]`` to what it receives."""

    def __init__(self, deltas: np.ndarray) -> None:
        super().__init__(len(deltas))
        self.deltas = deltas

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            if message.metadata.message_type == "train":
                received = message.content["arrays"]
                delta = _split(self.deltas[message.metadata.dst_node_id - NODE])
                arrays = {key: received[key].numpy() + delta[key] for key in received.keys()}
                content = RecordDict({"arrays": _record(arrays), "metrics": MetricRecord({"num-examples": 10})})
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "accuracy": 1.0})})
            replies.append(Message(content, reply_to=message))
        return replies


def test_flowers_own_loop_runs_a_defended_strategy():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    deltas = _planted()
    # clustering the updates, which are the same each round, keeps the same clients in both
    # rounds (the models move with the global model)
    defence = FLAME(FedAvg(min_available_nodes=7), noise_lambda=0.0, cluster_on="updates")
    result = defence.start(_ReplyingGrid(deltas), _record(_split(GLOBAL3)), num_rounds=2)
    kept = [node - NODE for node in defence.last_accepted]
    assert 6 not in kept
    bound = np.median(np.linalg.norm(deltas, axis=1))
    step = np.mean([_clip(deltas[i], bound) for i in kept], axis=0)
    final = np.concatenate([result.arrays["w"].numpy(), result.arrays["b"].numpy()])
    np.testing.assert_allclose(final, GLOBAL3 + 2 * step, rtol=1e-10)
    assert result.train_metrics_clientapp[2][REJECTED] == 7 - len(kept)


def test_every_registered_defence_builds_around_fedavg():
    import torch

    options = {
        "fltrust": {"root_update": lambda arrays, r: arrays},
        "deepsight": {"model_fn": lambda: torch.nn.Linear(2, 2), "input_shape": (2,)},
        **{name: {"num_malicious_nodes": 1} for name in ("krum", "multikrum", "bulyan")},
    }
    for name, defence_cls in DEFENCES.items():
        defence = defend(FedAvg(), name, **options.get(name, {}))
        assert isinstance(defence, defence_cls) and defence_cls.name == name
        assert defence_cls.__doc__ and defence.min_train_nodes == 2
        assert set(defence_cls.needs) <= set(options.get(name, {}))


# -- parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("defence_cls", "options", "named"),
    [
        (NormClipping, {"clip_norm": 0}, "clip_norm"),
        (NormClipping, {"clip_norm": float("nan")}, "clip_norm"),
        (NormClipping, {"seed": "seven"}, "seed"),
        (WeakDP, {"noise_std": -0.1}, "noise_std"),
        (FLAME, {"noise_lambda": -1.0}, "noise_lambda"),
        (FLAME, {"cluster_on": "weights"}, "cluster_on"),
        (FoolsGold, {"kappa": 0.0}, "kappa"),
        (FoolsGold, {"clip_updates": "no"}, "clip_updates"),
        (RLR, {"threshold": 0}, "threshold"),
        (RLR, {"threshold": 2.5}, "threshold"),
        (RLR, {"server_lr": -1.0}, "server_lr"),
        (FLTrust, {"root_update": None}, "root_update"),
        (DeepSight, {"tau": 0.0}, "tau"),
        (DeepSight, {"num_seeds": 3}, "model_fn"),
        (DeepSight, {"num_seeds": 1, "model_fn": lambda: None}, "input_shape"),
        (DeepSight, {"num_seeds": 0, "min_cluster_size": 1}, "min_cluster_size"),
        (DeepSight, {"num_seeds": 0, "min_samples": 0}, "min_samples"),
        (FlowerKrum, {"num_malicious_nodes": -1}, "num_malicious_nodes"),
        (FlowerMultiKrum, {"num_malicious_nodes": 1, "num_nodes_to_select": 0}, "num_nodes_to_select"),
        (FlowerMultiKrum, {"num_malicious_nodes": 0}, "num_malicious_nodes = 0 makes MultiKrum select all n"),
        (FlowerTrimmedAvg, {"beta": 0.5}, "beta"),
        (FlowerTrimmedAvg, {"beta": 0.0}, "beta = 0 trims nothing: a plain mean"),
        (FlowerBulyan, {"num_malicious_nodes": 1.5}, "num_malicious_nodes"),
        (FlowerBulyan, {"num_malicious_nodes": 0}, "an unweighted mean; set num_malicious_nodes >= 1"),
    ],
)
def test_bad_parameters_raise_one_line_value_errors(defence_cls, options, named):
    with pytest.raises(ValueError, match=named) as error:
        defence_cls(FedAvg(), **options)
    assert "\n" not in str(error.value)


def test_a_defence_needs_a_strategy_and_does_not_stack():
    with pytest.raises(ValueError, match="strategy must be a flwr Strategy"):
        NormClipping("fedavg")
    with pytest.raises(ValueError, match="strategy is already defended by NormClipping"):
        FLAME(NormClipping(FedAvg()))
    with pytest.raises(ValueError, match="'flamee' is not known"):
        defend(FedAvg(), "flamee")
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got 0"):
        root_trainer(lambda: None, np.zeros((2, 1)), np.zeros(2), lr=0)
