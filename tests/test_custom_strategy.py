"""Plugging in a strategy without editing fedsim: the example of docs/guide/own-strategy.md,
by reference and by entry point; and fedsim's strategies inside Flower's own Strategy.start
loop."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from flwr.app import ArrayRecord

from fedsim.cli import main
from fedsim.clientapp import make_client_app
from fedsim.data import load_dataset
from fedsim.engine import InProcessGrid
from fedsim.environment import RunEnvironment
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from fedsim.serverapp import train_config
from fedsim.splitting import split_dataset
from strategies import STRATEGIES

from .conftest import ROOT, tiny_experiment
from .docs_pages import code_block_after, page


def docs_example() -> str:
    """The Python block that follows the mention of `my_strategy.py` in "Your own strategy"."""
    return code_block_after(page("guide/own-strategy.md"), "`my_strategy.py`")


@pytest.fixture
def example_module(tmp_path, monkeypatch):
    (tmp_path / "my_strategy.py").write_text(docs_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_strategy", None)


def test_the_docs_example_is_about_thirty_lines():
    lines = [line for line in docs_example().splitlines() if line.strip()]
    assert 15 <= len(lines) <= 35


def test_the_docs_strategy_runs_by_reference(example_module, tmp_path):
    experiment = tiny_experiment("strategy.name=my_strategy:ClippedFedAvg", "strategy.max_grad_norm=0.5")
    assert experiment.strategy.params["max_grad_norm"] == 0.5
    result = run_experiment(experiment, tmp_path / "run")
    assert result.summary["strategy"] == "my_strategy:ClippedFedAvg"
    assert 0 <= result.summary["accuracy"] <= 1


def test_the_docs_strategy_clips_for_real(example_module, tmp_path):
    """A tiny bound must change training: the clipping reaches the clients."""
    clipped = tiny_experiment("strategy.name=my_strategy:ClippedFedAvg", "strategy.max_grad_norm=0.001")
    plain = tiny_experiment()
    a = run_experiment(clipped, tmp_path / "clipped").summary["loss"]
    b = run_experiment(plain, tmp_path / "plain").summary["loss"]
    assert a > b + 0.1, "with norm 0.001 the model should barely move from its initial loss"


def test_constructor_parameters_are_validated(example_module, capsys):
    code = main(
        [
            "run",
            str(ROOT / "experiments/quickstart.toml"),
            "--quiet",
            "--set",
            "strategy.name=my_strategy:ClippedFedAvg",
            "--set",
            "strategy.max_grad_norm=big",
        ]
    )
    assert code == 2
    assert "[strategy] max_grad_norm = 'big' is invalid" in capsys.readouterr().err


def test_entry_point_plugin(example_module, tmp_path, capsys):
    """An installed package registers a name in the `fedsim.strategies` group."""
    dist_info = example_module / "my_strategy-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-strategy\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [fedsim.strategies]
            clipped-fedavg = my_strategy:ClippedFedAvg
            """
        )
    )
    assert main(["list"]) == 0
    assert "clipped-fedavg" in capsys.readouterr().out
    result = run_experiment(tiny_experiment("strategy.name=clipped-fedavg"), tmp_path / "run")
    assert json.loads((tmp_path / "run/summary.json").read_text())["strategy"] == "clipped-fedavg"
    assert result.summary["rounds_completed"] == 2


def test_builtin_strategies_run_under_flowers_own_start(tmp_path):
    """fedsim's strategies are plain Flower strategies: Strategy.start drives them against
    the in-process Grid and fedsim's ClientApp, with no fedsim server code involved."""
    experiment = tiny_experiment()
    run = RunDirectory(tmp_path / "run")
    run.start(experiment)
    split_dataset(experiment, load_dataset("digits")).save(run.partition)
    env = RunEnvironment(experiment, run.path)
    grid = InProcessGrid(make_client_app(env), num_clients=4)
    strategy = STRATEGIES["fedavg"](min_available_nodes=4)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(env.new_model().state_dict()),
        num_rounds=2,
        train_config=train_config(experiment, 0),  # Flower's FedAvg stamps each round itself
    )
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert 0 <= result.evaluate_metrics_clientapp[2]["accuracy"] <= 1


BROKEN = """
from flwr.serverapp.strategy import FedAvg

from fedsim.trainer import ClientTrainer


class ExplodingTrainer(ClientTrainer):
    def fit(self, model, data, config, generator, device):
        raise RuntimeError("exploded on purpose")


class Broken(FedAvg):
    client_trainer = ExplodingTrainer
"""


def test_a_client_exception_is_one_line_and_exit_code_1(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_strategy.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["run", str(ROOT / "experiments/quickstart.toml"), "--quiet", "--out", str(tmp_path / "run")]
    for override in ("strategy.name=broken_strategy:Broken", "dataset.name=digits", "model.name=mlp", "rounds=1"):
        args += ["--set", override]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "client 0 failed in round 1 (train): RuntimeError: exploded on purpose" in err
    assert main([*args, "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err, "--verbose shows the client's traceback"
