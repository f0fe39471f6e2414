"""Adaptive-FedAvg: the rule against both reference codes on a fixed sequence, the rate's
rise after a drift and its decay without one, per-slot steps, exact resume, Ray."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.build import load_experiment
from fedsim.checkpoint import load
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from strategies.adaptive_fedavg import AdaptiveFedAvg, AdaptiveLearningRate
from tests.conftest import QUICKSTART, interrupted_and_resumed, tiny_experiment

NAME = "strategy.name=strategies.adaptive_fedavg:AdaptiveFedAvg"
# 8 clients on the 8x8 digits; from round 7 on half of them hold the labels reversed
DRIFT_AT_7 = [
    "dataset.name=digits",
    "model.name=mlp",
    "model.hidden=[32]",
    "client.lr=0.2",
    "client.local_epochs=2",
    "partition.name=drift",
    "partition.num_clients=8",
    "partition.num_slots=2",
    "partition.rounds_per_slot=6",
    "partition.drift_fraction=0.5",
    "partition.concepts=['identity','reverse']",
    "strategy.fraction_train=1.0",
    "rounds=10",
    "evaluate_every=5",
]


def drift_experiment(*overrides: str):
    return load_experiment(QUICKSTART, [*DRIFT_AT_7, NAME, *overrides])


def train_metrics(path):
    metrics = RunDirectory(path).read_metrics()
    train = metrics[(metrics.scope == "federated") & (metrics.id == "train")]
    return train.pivot(index="round", columns="metric", values="value")


# -- the rule on a fixed sequence: golden numbers from both reference codes ----------------------
def global_models() -> list[np.ndarray]:
    """20 global models: steps shrinking as 1/t, and at step 12 a jump (a drift)."""
    rng = np.random.default_rng(11)
    theta = rng.normal(size=6)
    out = []
    for t in range(20):
        step = rng.normal(size=6) * (0.5 / (t + 1))
        if t == 11:
            step = step + 0.3
        theta = theta + step
        out.append(theta.copy())
    return out


# wenwenwenwenti/FedCCFA 647d8b097509e05278b7a68f116d2e84e106c72c, entities/AdaptiveFedAvg.py
# (AdaptiveFedAvgServer.cal_adaptive_lr, lr 0.05, betas 0.7 0.3 0.7) and microsoft/FedDrift
# e4ac32fe17edf8de23579678a12fb4d7b5f45746 (AdaState.update, same settings) both give:
GOLDEN_FEDCCFA_BETAS = [
    0.05, 0.01384423244571393, 0.00756242773722212, 0.00584585814623211, 0.00454383680367863,
    0.00403644894028925, 0.00460493638084497, 0.00378243843784775, 0.0045656775908414,
    0.00360087832792011, 0.00308137139068637, 0.04899689252280703, 0.03245842499753622,
    0.02170752617133938, 0.01482871902166841, 0.0102196439050034, 0.00722029006095321,
    0.00534127890323852, 0.0041775098218118, 0.00332469165918081,
]  # fmt: skip
# FedDrift's AdaState with its default betas 0.5 0.5 0.5
GOLDEN_FEDDRIFT_BETAS = [
    0.05, 0.01404255720223457, 0.00837116651876882, 0.00652284473887221, 0.00515648198145688,
    0.0043688605835242, 0.00414392792795301, 0.00360197679847643, 0.0038757725109449,
    0.00308825037830383, 0.00272544227302909, 0.04723802674503878, 0.02326080644667979,
    0.01187529339444779, 0.00658167768017005, 0.00391698481260849, 0.00266455101979983,
    0.00213848589147153, 0.00208187127761212, 0.00181026790930331,
]  # fmt: skip


@pytest.mark.parametrize(
    ("betas", "golden"), [((0.7, 0.3, 0.7), GOLDEN_FEDCCFA_BETAS), ((0.5, 0.5, 0.5), GOLDEN_FEDDRIFT_BETAS)]
)
def test_the_rule_is_the_reference_codes(betas, golden):
    rule = AdaptiveLearningRate(0.05, *betas)
    np.testing.assert_allclose([rule.step(theta) for theta in global_models()], golden, rtol=1e-12)


def test_the_rate_rises_after_a_jump_and_settles_without_one():
    rule = AdaptiveLearningRate(0.05, 0.7, 0.3, 0.7)
    rates = [rule.step(theta) for theta in global_models()]
    assert rates[0] == 0.05  # t = 1: lr0
    assert max(rates[4:11]) < 0.05 / 5  # no drift: it decays as 1/t, up to noise
    assert rates[11] > 10 * rates[10]  # the jump at step 12
    assert all(later < earlier for earlier, later in zip(rates[11:], rates[12:]))  # and settles again
    constant = AdaptiveLearningRate(0.05, 0.7, 0.3, 0.7)
    steady = [constant.step(np.full(4, 0.1 * t)) for t in range(1, 30)]  # the same step every time
    assert steady[-1] < steady[10] < 0.05 and steady[-1] == pytest.approx(0.05 / 29, rel=0.05)


def test_options_are_checked():
    with pytest.raises(ValueError, match="beta1 must be in"):
        AdaptiveFedAvg(beta1=1.0)
    with pytest.raises(ValueError, match="beta3 must be in"):
        AdaptiveFedAvg(beta3=-0.1)
    with pytest.raises(ValueError, match="update_every must be 'round' or 'slot'"):
        AdaptiveFedAvg(update_every="epoch")


# -- end to end -------------------------------------------------------------------------------
def test_the_rate_rises_after_a_drift(tmp_path):
    train = train_metrics(run_experiment(drift_experiment(), tmp_path).path)
    assert train.loc[1, "lr"] == 0.2  # lr0: the experiment's [client] lr
    np.testing.assert_array_equal(train.lr.iloc[1:].to_numpy(), train["next-lr"].iloc[:-1].to_numpy())
    before = train["next-lr"].loc[1:7].to_numpy()
    assert all(later < earlier for earlier, later in zip(before[1:], before[2:])), "it settles before the drift"
    assert train["next-lr"].loc[8:].max() > train["next-lr"].loc[7], "and rises after it"


def test_one_step_per_slot(tmp_path):
    run = drift_experiment(
        "strategy.update_every=slot", "partition.num_slots=3", "partition.rounds_per_slot=3", "rounds=9"
    )
    train = train_metrics(run_experiment(run, tmp_path).path)
    lr = train.lr.to_numpy()
    assert (lr[:6] == 0.2).all(), "slot 0 trains with lr0, and slot 1's step (t = 1) gives lr0 again"
    assert lr[6] < 0.2 and (lr[6:] == lr[6]).all(), "slot 2's step lowers it for the whole slot"


def test_static_partition(tmp_path):
    runs = {
        name: RunDirectory(run_experiment(tiny_experiment(*overrides, "rounds=6"), tmp_path / name).path).read_metrics()
        for name, overrides in {
            "fedavg": ["strategy.name=fedavg"],
            "slot": [NAME, "strategy.update_every=slot"],
            "round": [NAME],
        }.items()
    }

    def accuracy(frame):
        rows = frame[(frame.scope == "server") & (frame.metric == "accuracy")]
        return rows.value.to_numpy()

    # one slot: lr0 throughout, which is FedAvg
    np.testing.assert_array_equal(accuracy(runs["slot"]), accuracy(runs["fedavg"]))
    # every round: the rate decays as 1/t, and the model still ends close to FedAvg's
    assert accuracy(runs["round"])[-1] > accuracy(runs["fedavg"])[-1] - 0.15


def test_resumes_exactly(tmp_path, monkeypatch):
    assert (
        interrupted_and_resumed(drift_experiment("rounds=8"), tmp_path, monkeypatch, crash_round=5).status == "resume"
    )
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    state = load(tmp_path / "run/checkpoint.npz").strategy_state
    assert state["t"] == 8 and state["mean"].shape == state["mean_hat"].shape and state["mean"].size > 0


@pytest.mark.ray
def test_on_ray_gives_the_in_process_bits(tmp_path):
    run_experiment(drift_experiment("rounds=3"), tmp_path / "local")
    run_experiment(drift_experiment("rounds=3", "engine.name=ray", "engine.num_workers=2"), tmp_path / "ray")
    assert (tmp_path / "ray/metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()
