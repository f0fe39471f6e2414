"""``[engine] vectorize``: the engines train a round's clients K at a time, with the same
results as one at a time (to float rounding), and fall back to one at a time, saying why,
where the vectorised loop would not reproduce a client."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.build import load_experiment, validate_experiment
from fedsim.errors import UserError
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from tests.conftest import QUICKSTART, ROOT, interrupted_and_resumed, tiny_experiment

# The BatchNorm models train at lr 0.01: at 0.1, BatchNorm over a client's trailing batch of
# two samples magnifies float32 rounding a thousandfold within two rounds (fedsim.vectorize's
# own tests show the steps agree to 1e-11 in float64).
CASES = {
    "fedavg": [],
    "fedprox": ["strategy.name=fedprox", "strategy.proximal_mu=0.1"],
    "fedbn": ["strategy.name=fedbn", "model.name=digitcnn", "strategy.fraction_train=0.5", "client.lr=0.01"],
    "fedwon": ["strategy.name=fedwon", "model.name=digitcnn", "client.lr=0.01"],
    "adam-several-epochs": ["client.optimizer=adam", "client.lr=0.01", "client.local_epochs=3"],
}


def final_state(run) -> dict[str, np.ndarray]:
    experiment = validate_experiment(__import__("tomllib").loads((run.path / "config.toml").read_text()), "test")
    checkpoint = RunDirectory(run.path).load_checkpoint(experiment)
    return {key: array.numpy() for key, array in checkpoint.arrays.items()}


def client_metrics(run):
    metrics = RunDirectory(run.path).read_metrics()
    return metrics[metrics.scope.isin(["client", "server", "federated"])].reset_index(drop=True)


@pytest.mark.parametrize(
    "case", [case if case in ("fedavg", "fedbn") else pytest.param(case, marks=pytest.mark.slow) for case in CASES]
)
def test_vectorised_clients_train_as_they_would_one_at_a_time(case, tmp_path):
    """CI runs FedAvg and FedBN; tests/test_vectorize.py checks every trainer's steps."""
    overrides = ["rounds=2", "partition.num_clients=5", *CASES[case]]
    sequential = run_experiment(tiny_experiment(*overrides), tmp_path / "one")
    together = run_experiment(tiny_experiment(*overrides, "engine.vectorize=3"), tmp_path / "three")
    one, three = final_state(sequential), final_state(together)
    assert one.keys() == three.keys()
    for key in one:
        np.testing.assert_allclose(three[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)
    a, b = client_metrics(sequential), client_metrics(together)
    assert a[["round", "scope", "id", "metric"]].equals(b[["round", "scope", "id", "metric"]])
    np.testing.assert_allclose(b.value, a.value, rtol=1e-3, atol=1e-4)
    if case == "fedbn":  # each client's own BatchNorm, kept in its state
        states = sorted((together.path / "client_state").rglob("*.npz"))
        assert states, "FedBN keeps BatchNorm layers in client state"


def test_a_vectorised_run_resumes_exactly(tmp_path, monkeypatch):
    experiment = tiny_experiment("rounds=3", "engine.vectorize=2")
    assert interrupted_and_resumed(experiment, tmp_path, monkeypatch).status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()


def test_a_trainer_that_cannot_be_vectorised_trains_one_at_a_time_and_says_so_once(tmp_path, capsys):
    overrides = ["rounds=2", "strategy.name=fedavg-history", "strategy.history=keep"]
    sequential = run_experiment(tiny_experiment(*overrides), tmp_path / "one")
    capsys.readouterr()
    fallback = run_experiment(tiny_experiment(*overrides, "engine.vectorize=4"), tmp_path / "four")
    err = capsys.readouterr().err
    assert (
        err.count("vectorize: clients train one at a time") == 1
        and "HistoryTrainer declares can_vectorize = False" in err
    )
    assert (sequential.path / "metrics.csv").read_bytes() == (fallback.path / "metrics.csv").read_bytes()


def test_attackers_and_faulty_clients_train_alone_the_others_together(tmp_path):
    """An attacker runs its own trainer and a client with a fault acts it out: both leave
    the vectorised group; the group's clients train as they would alone."""
    attack = {"method": "badnets", "target": 1, "clients": [0], "trigger": {"size": 2}}
    overrides = ["rounds=2", "partition.num_clients=5", "faults.error=0.3", "faults.clients=[4]"]

    def experiment(*more):
        data = tiny_experiment(*overrides, *more).to_dict()
        return validate_experiment({**data, "attack": [attack]}, "test")

    sequential = run_experiment(experiment(), tmp_path / "one")
    together = run_experiment(experiment("engine.vectorize=4"), tmp_path / "four")
    a, b = client_metrics(sequential), client_metrics(together)
    assert a[["round", "scope", "id", "metric"]].equals(b[["round", "scope", "id", "metric"]])
    np.testing.assert_allclose(b.value, a.value, rtol=1e-3, atol=1e-4)
    assert sequential.summary["faults"] == together.summary["faults"]


def test_auto_chooses_a_size_and_says_which(tmp_path, capsys):
    run_experiment(tiny_experiment("rounds=1", "engine.vectorize='auto'"), tmp_path / "auto")
    err = capsys.readouterr().err
    assert "vectorize = 'auto':" in err and "clients at once on cpu" in err


@pytest.mark.parametrize("value", ["0", "-2", "'fast'", "2.5"])
def test_bad_vectorize_values_are_one_line_errors(value):
    with pytest.raises(UserError, match="vectorize") as error:
        tiny_experiment(f"engine.vectorize={value}")
    assert "\n" not in str(error.value) and "or 'auto'" in str(error.value)


@pytest.mark.slow  # the Ray worker runs the same run_tasks as the in-process engine, tested above
def test_the_ray_engine_vectorises_each_worker(tmp_path):
    overrides = ["rounds=1", "partition.num_clients=6", "engine.name=ray", "engine.num_workers=1"]
    sequential = run_experiment(tiny_experiment(*overrides[:2]), tmp_path / "one")
    on_ray = run_experiment(tiny_experiment(*overrides, "engine.vectorize=3"), tmp_path / "ray")
    a, b = client_metrics(sequential), client_metrics(on_ray)
    np.testing.assert_allclose(b.value, a.value, rtol=1e-3, atol=1e-4)


def test_the_quickstart_vectorised_ends_where_the_readme_says(tmp_path):
    """The quickstart (FedAvg, mnist5k, Dirichlet(0.5), 20 rounds) with all 10 clients
    trained at once: the same final accuracy as one at a time, the README's figure, within
    noise (float rounding differs, so the 20 rounds are not bit-identical)."""
    from tests.test_run import README_QUICKSTART_ROW

    figure = float(README_QUICKSTART_ROW.search((ROOT / "README.md").read_text()).group(1))
    experiment = load_experiment(QUICKSTART, ["engine.vectorize=10"])
    summary = run_experiment(experiment, tmp_path / "qs").summary
    assert abs(summary["accuracy"] - figure) <= 0.01, (summary["accuracy"], figure)
