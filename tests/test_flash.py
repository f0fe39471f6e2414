"""Flash: the server's update against FedCCFA's code on fixed inputs, its reaction when the
updates' size jumps, the clients' early stop, a static run, exact resume, Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.build import load_experiment
from fedsim.checkpoint import load
from fedsim.data import ClientData
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from fedsim.trainer import ClientCall, RoundConfig
from strategies.flash import LOSS_DECREMENT, PREVIOUS_LOSS, VALIDATION, Flash, FlashOptimizer, FlashTrainer, stops_early
from tests.conftest import QUICKSTART, interrupted_and_resumed, tiny_experiment

NAME = "strategy.name=strategies.flash:Flash"
DRIFT_AT_4 = [
    "dataset.name=digits",
    "model.name=mlp",
    "model.hidden=[32]",
    "client.lr=0.05",
    "client.local_epochs=3",
    "partition.name=drift",
    "partition.num_clients=8",
    "partition.num_slots=2",
    "partition.rounds_per_slot=3",
    "partition.drift_fraction=0.5",
    "partition.concepts=['identity','reverse']",
    "strategy.fraction_train=0.75",
    "strategy.loss_decrement=0.2",
    "rounds=6",
    "evaluate_every=3",
]


def drift_experiment(*overrides: str):
    return load_experiment(QUICKSTART, [*DRIFT_AT_4, NAME, *overrides])


# -- the server's update on fixed inputs: golden numbers from FedCCFA's code ----------------------
# wenwenwenwenti/FedCCFA 647d8b097509e05278b7a68f116d2e84e106c72c, entities/Flash.py:
# FlashServer.aggregate_by_updates (server_lr 0.01, beta1 0.9, beta2 0.99, tau 0.001; float64
# model) on three clients of 30, 50 and 20 examples, 8 rounds of the updates below, from X0.
def fixed_updates() -> tuple[np.ndarray, np.ndarray]:
    """x0 (4,) and updates (8 rounds, 3 clients, 4): small and steady, then at round 5 ten
    times larger and of the other sign (a drift)."""
    rng = np.random.default_rng(5)
    x0 = rng.normal(size=4)
    updates = [rng.normal(size=(3, 4)) * (0.01 if r < 5 else 0.1) + (0.02 if r < 5 else -0.15) for r in range(8)]
    return x0, np.array(updates)


SIZES = np.array([30.0, 50.0, 20.0])
GOLDEN_MODELS = [
    [-0.7937491287569791, -1.3148377877113293, -0.2412934569924785, 0.424061968794863],
    [-0.7835713953440612, -1.3037850106258424, -0.23185335532912793, 0.43216758988084814],
    [-0.7718158514697266, -1.2917144297107606, -0.2210215962234413, 0.44312549516408334],
    [-0.7581600656933423, -1.2773212638770655, -0.2079755217717481, 0.4545673417983104],
    [-0.7407376964657044, -1.2616829469505588, -0.19102142092180177, 0.4691193795448897],
    [-0.740268593430659, -1.2548535446051048, -0.1666148689862021, 0.48169082480351355],
    [-0.7335144473064953, -1.2389823049670485, -0.20532733452866342, 0.4987094896121305],
    [-1.292622524956065, -1.178358389688682, -0.19155484677709292, 0.4688818379108037],
]
GOLDEN_D = [
    [6.284656492798450e-04, 9.930449685585515e-04, 3.984468472309041e-04, 6.161951311564688e-05],
    [0.00028786657657953, 0.00043753887152711, 0.00020817736037557, 0.00022220446114486],
    [0.00020746040925224, 0.00022982183766578, 0.00012521654634941, 0.00024489066249299],
    [2.8890211831440320e-04, 4.4502524840186189e-04, 2.4593921090285966e-04, 8.1332856783831477e-05],
    [0.00093507395970506, 0.00042520386909868, 0.00086970402428575, 0.00040550426162966],
    [0.00581951636328345, 0.03854115377829032, 0.01774843824766179, 0.02676342521605454],
    [0.06677859432579962, 0.05321803051274659, 0.01502891173044083, 0.04751843786172273],
    [0.03322152296157209, 0.04753230153228626, 0.06262879337896735, 0.01733475968162219],
]


def run_optimizer() -> tuple[list[np.ndarray], list[np.ndarray], list[dict[str, float]]]:
    """Flash's server update on the fixed updates: each round's model, d_t and figures."""
    x, updates = fixed_updates()
    optimizer = FlashOptimizer(0.01, 0.9, 0.99, 0.001)
    models, ds, figures = [], [], []
    for round_updates in updates:
        delta = (SIZES[:, None] * round_updates).sum(axis=0) / SIZES.sum()
        x = optimizer.step({"w": x}, {"w": delta})["w"]
        models.append(x)
        ds.append(optimizer.d["w"].copy())
        figures.append(dict(optimizer.last))
    return models, ds, figures


def test_the_server_update_is_fedccfas():
    models, ds, _ = run_optimizer()
    np.testing.assert_allclose(models, GOLDEN_MODELS, rtol=1e-12)
    np.testing.assert_allclose(ds, GOLDEN_D, rtol=1e-9)


def test_the_drift_term_takes_a_jump_in_the_updates_at_once():
    _, _, figures = run_optimizer()
    steady, drift = figures[4], figures[5]
    assert drift["flash-beta3"] < 0.1 * steady["flash-beta3"], "b3 falls: d_t forgets its past"
    assert drift["flash-d"] > 10 * steady["flash-d"], "and takes the jump in Delta^2 - v_t"
    assert all(f["flash-d"] < 1e-3 for f in figures[:5]), "steady updates leave d_t small"


def test_the_early_stop_rule():
    assert not stops_early(None, 1.0, 0.5, 0)  # nothing to compare with
    assert stops_early(1.0, 0.9, 0.5, 0)  # 0 < 0.1 < 0.5
    assert not stops_early(1.0, 0.9, 0.1, 1)  # 0.1 >= 0.1 / 2
    assert not stops_early(1.0, 1.1, 0.5, 0)  # the loss rose: train on


def _client_call(decrement: float, state: dict, epochs: int = 10) -> ClientCall:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 1, 2, 2)).astype(np.float32)
    y = (x.reshape(60, 4) @ rng.normal(size=(4, 3))).argmax(axis=1)
    data = ClientData(x[:40], y[:40], x[40:], y[40:])
    config = RoundConfig(
        server_round=1, local_epochs=epochs, lr=0.1, extra={LOSS_DECREMENT: decrement, VALIDATION: "held-out"}
    )
    generator = torch.Generator().manual_seed(0)
    return ClientCall(model, ArrayRecord(model.state_dict()), data, config, state, generator, torch.device("cpu"))


def test_clients_stop_when_the_validation_loss_stalls():
    trainer = FlashTrainer()
    never = trainer.train(_client_call(0.0, {}))
    assert never.metrics["local-epochs"] == 10.0
    early = trainer.train(_client_call(10.0, {}))
    assert early.metrics["local-epochs"] == 2.0, "the second epoch's small gain stops it"
    assert PREVIOUS_LOSS in early.state
    # the client's previous loss carries over rounds: just above the first epoch's, it stops at once
    first = trainer.train(_client_call(0.0, {}, epochs=1)).state[PREVIOUS_LOSS]
    again = trainer.train(_client_call(10.0, {PREVIOUS_LOSS: np.array(float(first) + 0.01)}))
    assert again.metrics["local-epochs"] == 1.0


def test_options_are_checked():
    for bad, match in [
        ({"server_lr": 0.0}, "server_lr must be a finite number > 0"),
        ({"beta2": 1.0}, "beta2 must be in"),
        ({"tau": -1.0}, "tau must be"),
        ({"loss_decrement": -0.1}, "loss_decrement must be"),
        ({"validation": "test"}, "validation must be 'held-out' or 'train'"),
    ]:
        with pytest.raises(ValueError, match=match):
            Flash(**bad)


# -- end to end -------------------------------------------------------------------------------
def test_static_partition_ends_close_to_fedavg(tmp_path):
    accuracy = {}
    for name, overrides in {"fedavg": ["strategy.name=fedavg"], "flash": [NAME]}.items():
        run = run_experiment(tiny_experiment(*overrides, "rounds=15", "client.lr=0.05"), tmp_path / name)
        accuracy[name] = run.summary["accuracy"]
    assert accuracy["flash"] > accuracy["fedavg"] - 0.1


def test_resumes_exactly_with_each_clients_last_loss(tmp_path, monkeypatch):
    assert interrupted_and_resumed(drift_experiment(), tmp_path, monkeypatch, crash_round=4).status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    state = load(tmp_path / "run/checkpoint.npz").strategy_state
    assert set(state) == {"m", "v", "d"} and len(state["d"]) > 0
    metrics = RunDirectory(tmp_path / "run").read_metrics()
    epochs = metrics[(metrics.scope == "client") & (metrics.metric == "local-epochs")].value
    assert epochs.min() < 3 <= epochs.max(), "some clients stopped early, others trained every epoch"
    states = sorted((tmp_path / "run" / "client_state").rglob("*.npz"))
    assert states
    with np.load(states[-1]) as saved:
        assert PREVIOUS_LOSS in saved.files


@pytest.mark.ray
def test_on_ray_gives_the_in_process_bits(tmp_path):
    run_experiment(drift_experiment("rounds=3"), tmp_path / "local")
    run_experiment(drift_experiment("rounds=3", "engine.name=ray", "engine.num_workers=2"), tmp_path / "ray")
    assert (tmp_path / "ray/metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()
