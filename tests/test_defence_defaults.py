"""A named defence defends with its defaults: a planted attacker is dropped or down-weighted,
options that would make it no defence are refused or said once, and distances are
computed in float64 on the trainable parameters."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.multikrum import compute_distances

from fedsim.build import load_experiment
from fedsim.errors import UserError
from fedsim.runner import run_experiment
from strategies.defences import DEFENCES, defend
from strategies.defences.base import Defence
from tests.conftest import QUICKSTART
from tests.test_defences import NODE, _configure, _Grid, _record, _reply

N, D = 10, 20  # clients of a round, parameters


def benign_updates(seed: int = 0, n: int = N - 1) -> np.ndarray:
    """Benign updates: a shared direction of norm ~1 plus noise, and diverse enough that
    FoolsGold does not take them for sybils."""
    rng = np.random.default_rng(seed)
    direction = np.abs(rng.standard_normal(D))
    direction /= np.linalg.norm(direction)
    return direction + 0.4 * rng.standard_normal((n, D)) / np.sqrt(D)


def aggregate(defence: Defence, updates: np.ndarray, server_round: int = 1) -> tuple[np.ndarray, list[int]]:
    """The defence's new global vector from zero, and the indices it accepted."""
    _configure(defence, {"w": np.zeros(D)}, len(updates), server_round)
    replies = [_reply(NODE + i, {"w": update}) for i, update in enumerate(updates)]
    arrays, _ = defence.aggregate_train(server_round, replies)
    return arrays["w"].numpy(), [node - NODE for node in defence.last_accepted]


def influence(defence: Defence, benign: np.ndarray, attack: np.ndarray) -> float:
    """How far the attack moves the aggregate from the benign mean, over how far it moves
    FedAvg's: 1 is no defence, 0 a perfect one."""
    updates = np.vstack([benign, attack])
    result, _ = aggregate(defence, updates)
    plain = updates.mean(axis=0)
    return float(np.linalg.norm(result - benign.mean(axis=0)) / np.linalg.norm(plain - benign.mean(axis=0)))


# -- every defence, with its defaults (and the f that Krum's family requires) --------------
REQUIRED = {
    "krum": {"num_malicious_nodes": 1},
    "multikrum": {"num_malicious_nodes": 1},
    "bulyan": {"num_malicious_nodes": 1},
}


@pytest.mark.parametrize(
    "name", ["krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg", "norm-clipping", "weak-dp"]
)
def test_a_large_outlier_barely_moves_the_aggregate(name):
    benign = benign_updates()
    attack = -30 * benign.mean(axis=0)[None]  # a boosted update against the benign direction
    defence = defend(FedAvg(), name, **REQUIRED.get(name, {}))
    assert influence(defence, benign, attack) < 0.25  # weak DP's own noise is ~0.2 of the attack's pull
    if defence.filters:
        _, accepted = aggregate(defence, np.vstack([benign, attack]))
        assert N - 1 not in accepted


def test_flame_drops_an_update_in_another_direction():
    benign = benign_updates()
    attack = np.roll(benign.mean(axis=0), 7)[None] * 1.0  # as large as a benign update, elsewhere
    defence = defend(FedAvg(), "flame")
    _, accepted = aggregate(defence, np.vstack([benign, attack]))
    assert N - 1 not in accepted and len(accepted) >= (N // 2 + 1)


def test_foolsgold_gives_sybils_pushing_one_direction_no_weight():
    rng = np.random.default_rng(1)
    benign = rng.standard_normal((7, D))  # honest clients disagree with each other
    sybil = rng.standard_normal(D)
    sybils = np.vstack([sybil + 0.01 * rng.standard_normal(D) for _ in range(3)])
    defence = defend(FedAvg(), "foolsgold")
    for server_round in (1, 2):
        _, accepted = aggregate(defence, np.vstack([benign, sybils]), server_round)
    assert not {7, 8, 9} & set(accepted) and set(range(7)) <= set(accepted)


def test_rlr_reverses_an_attack_on_coordinates_the_benign_clients_disagree_on():
    rng = np.random.default_rng(2)
    benign = np.zeros((N - 1, D))
    benign[:, :10] = np.abs(rng.standard_normal((N - 1, 10)))  # agreed on
    benign[:, 10:] = np.tile([1.0, -1.0], (N - 1) // 2 + 1)[: N - 1, None] * 0.1  # split 5 to 4
    attack = np.zeros((1, D))
    attack[0, 10:] = 5.0
    result, _ = aggregate(defend(FedAvg(), "rlr"), np.vstack([benign, attack]))
    assert np.all(result[10:] < 0), "the attack's push is reversed where fewer than 4 signs agree"
    assert np.all(result[:10] > 0), "the benign direction is kept where they agree"


def test_fltrust_rejects_an_update_against_the_servers():
    benign = benign_updates()
    server = benign.mean(axis=0)

    def root_update(arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        return ArrayRecord({"w": Array(arrays["w"].numpy() + server)})

    defence = defend(FedAvg(), "fltrust", root_update=root_update)
    attack = -5 * server[None]
    assert influence(defence, benign, attack) < 0.2
    _, accepted = aggregate(defence, np.vstack([benign, attack]))
    assert N - 1 not in accepted


def test_deepsight_drops_a_backdoor_concentrated_on_one_output_neuron():
    """The update of a backdoor concentrates on its target's output neuron: few threshold
    exceedings, so it is suspicious, and its cluster (itself) is dropped."""
    rng = np.random.default_rng(3)
    classes, features = 5, 4

    def model_fn():
        return torch.nn.Sequential(torch.nn.Linear(features, classes))

    shapes = {"0.weight": (classes, features), "0.bias": (classes,)}
    start = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    updates = []
    for _ in range(N - 1):
        updates.append({key: 0.1 * rng.standard_normal(shape).astype(np.float32) for key, shape in shapes.items()})
    backdoor = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    backdoor["0.weight"][2] = 1.0
    backdoor["0.bias"][2] = 1.0
    updates.append(backdoor)
    defence = defend(FedAvg(), "deepsight", model_fn=model_fn, input_shape=(features,), num_samples=200)
    _configure(defence, start, N)
    replies = [_reply(NODE + i, update) for i, update in enumerate(updates)]
    defence.aggregate_train(1, replies)
    accepted = [node - NODE for node in defence.last_accepted]
    assert N - 1 not in accepted and len(accepted) >= N // 2


def test_every_defence_has_a_test_that_its_defaults_defend():
    covered = {"krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg", "norm-clipping", "weak-dp"}
    covered |= {"flame", "foolsgold", "rlr", "fltrust", "deepsight"}
    assert covered == set(DEFENCES)


# -- options that would make a defence no defence ---------------------------------------------
def test_multikrum_selects_n_minus_f_by_default():
    benign = benign_updates()
    attacks = -30 * np.vstack([benign.mean(axis=0)] * 2) + 0.01
    defence = defend(FedAvg(), "multikrum", num_malicious_nodes=2)
    _, accepted = aggregate(defence, np.vstack([benign[:8], attacks]))
    assert sorted(accepted) == list(range(8))  # n - f = 8 selected: exactly the benign ones


def test_a_selection_of_every_update_is_said_once(capsys):
    defence = defend(FedAvg(), "multikrum", num_malicious_nodes=1, num_nodes_to_select=10)
    for server_round in (1, 2):
        aggregate(defence, benign_updates(n=N), server_round)
    err = capsys.readouterr().err
    assert err.count("multikrum: num_nodes_to_select = 10 keeps all 10 updates of a round: a plain mean") == 1


def test_a_trimmed_mean_that_trims_nothing_is_said_once(capsys):
    defence = defend(FedAvg(), "fedtrimmedavg")  # beta 0.2 of 4 clients: int(0.8) = 0 cut
    for server_round in (1, 2):
        aggregate(defence, benign_updates(n=4), server_round)
    assert capsys.readouterr().err.count("trims int(0.2 * 4) = 0 updates") == 1


@pytest.mark.parametrize(
    "name, f, n, rule",
    [("krum", 2, 6, "n >= 2f + 3 = 7"), ("multikrum", 1, 4, "n >= 2f + 3 = 5"), ("bulyan", 1, 6, "n >= 4f + 3 = 7")],
)
def test_a_round_too_small_for_f_is_refused(name, f, n, rule):
    defence = defend(FedAvg(min_available_nodes=n), name, num_malicious_nodes=f)
    expected = f"{name} with num_malicious_nodes = {f} needs {rule} clients per round, but a round samples {n}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        defence.configure_train(1, _record({"w": np.zeros(D)}), ConfigRecord(), _Grid(n))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy.defence=krum"], r"missing required key 'num_malicious_nodes' \(f, the number of malicious clients"),
        (["strategy.defence=bulyan"], r"Bulyan needs n >= 4f \+ 3 clients per round\)"),
        (
            ["strategy.defence=bulyan", "strategy.defence_options={num_malicious_nodes=2}"],
            r"defence = 'bulyan': bulyan with num_malicious_nodes = 2 needs n >= 4f \+ 3 = 11 clients per round, "
            r"but a round samples 10",
        ),
        (["strategy.defence=bulyan", "strategy.defence_options={num_malicious_nodes=0}"], r"an unweighted mean"),
        (["strategy.defence=fedtrimmedavg", "strategy.defence_options={beta=0.0}"], r"a plain mean"),
    ],
)
def test_a_defence_that_would_not_defend_is_a_one_line_error_before_the_run(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message) as error:
        run_experiment(load_experiment(QUICKSTART, ["rounds=1", *overrides]), tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


# -- distances in float64 on the trainable parameters ---------------------------------------
def test_krum_ranks_small_late_updates_correctly_where_float32_models_cannot():
    """Seven updates of norm ~0.01 on a 60,000-parameter model of entries ~1 (LeNet-5's
    size): from float32 models, ||a||^2 + ||b||^2 - 2ab carries errors of ~1e-3, larger than
    the squared distances between the updates (~1e-5), so the ranking is noise; on the
    float64 updates it is right."""
    rng = np.random.default_rng(4)
    d = 60_000
    model = rng.standard_normal(d)
    close = 0.01 * rng.standard_normal(d) / np.sqrt(d)
    updates = np.vstack([close + 0.002 * rng.standard_normal(d) / np.sqrt(d) * (1 + i) for i in range(7)])
    truth = compute_distances([ArrayRecord({"u": Array(u)}) for u in updates])  # float64, on updates
    closest = np.sort(truth, axis=1)[:, 1:4].sum(axis=1)  # Krum's scores, f = 2: n - f - 2 = 3 neighbours
    models32 = [ArrayRecord({"w": Array((model + u).astype(np.float32))}) for u in updates]
    noisy = compute_distances(models32)
    assert np.abs(noisy - truth).max() > 10 * np.abs(truth).max(), "float32 errors swamp the distances"
    noisy_scores = np.sort(noisy, axis=1)[:, 1:4].sum(axis=1)
    assert np.argsort(noisy_scores).tolist() != np.argsort(closest).tolist()

    defence = defend(FedAvg(), "krum", num_malicious_nodes=2)
    _configure(defence, {"w": model.astype(np.float32)}, 7)
    replies = [_reply(NODE + i, {"w": (model + u).astype(np.float32)}) for i, u in enumerate(updates)]
    defence.aggregate_train(1, replies)
    rounded = np.vstack([(model + u).astype(np.float32).astype(np.float64) - model.astype(np.float32) for u in updates])
    exact = compute_distances([ArrayRecord({"u": Array(u)}) for u in rounded])
    expected = int(np.argmin(np.sort(exact, axis=1)[:, 1:4].sum(axis=1)))
    assert defence.last_accepted == [NODE + expected] and expected == int(np.argmin(closest))


def test_batchnorm_statistics_stay_out_of_the_distances_unless_asked():
    """A client whose running variance is far off (a BatchNorm statistic, not a direction of
    learning) is not an outlier to Krum; with include_statistics it is."""
    benign = benign_updates(n=7)
    start = {"w": np.zeros(D), "bn.running_var": np.ones(3)}
    replies = []
    for i, update in enumerate(benign):
        variance = np.full(3, 1000.0 if i == 0 else 1.0)
        replies.append(_reply(NODE + i, {"w": update, "bn.running_var": variance}))
    chosen = {}
    for include in (False, True):
        defence = defend(FedAvg(), "multikrum", num_malicious_nodes=1, include_statistics=include)
        _configure(defence, start, 7)
        defence.aggregate_train(1, replies)
        chosen[include] = [node - NODE for node in defence.last_accepted]
    assert 0 not in chosen[True]
    assert len(chosen[False]) == 6 and chosen[False] != chosen[True]


def test_flame_takes_batchnorm_statistics_into_its_vectors_only_when_asked():
    benign = benign_updates(n=7)
    start = {"w": np.zeros(D), "bn.running_var": np.ones(3)}
    replies = [_reply(NODE + i, {"w": u, "bn.running_var": np.full(3, 1.0 + i)}) for i, u in enumerate(benign)]
    bounds = {}
    for include in (False, True):
        defence = defend(FedAvg(), "flame", include_statistics=include, noise_lambda=0.0)
        _configure(defence, start, 7)
        defence.aggregate_train(1, replies)
        bounds[include] = defence.last_bound
    assert bounds[False] == pytest.approx(np.median(np.linalg.norm(benign, axis=1)))
    assert bounds[True] > bounds[False]  # the statistics' changes (0 to 6) count in the norms
