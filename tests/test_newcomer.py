"""The path a new user takes: `fedsim run` with the quickstart's settings on each offline
dataset, leaving the model to the dataset (`fedsim list` names it), learns well above
chance; a model too large for the inputs is a one-line warning naming one that fits.

The figures below were measured on a 2-core Intel Xeon (in-process engine, seed 0);
another CPU's kernels move the last digits, so each test checks a floor a few hundredths
under its figure, and that the floor itself is well above chance."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from fedsim.build import load_experiment
from fedsim.cli import main
from fedsim.data import DATASETS
from fedsim.environment import experiment_dataset

from .conftest import QUICKSTART


@dataclass(frozen=True)
class Figure:
    rounds: int
    measured: float  # the final accuracy seen when the floor was set
    floor: float  # what the test asks for


# per offline dataset: the quickstart's 20 rounds, and a few rounds for CI
QUICKSTART_FIGURES = {
    "digits": Figure(20, 0.861, 0.80),
    "mnist5k": Figure(20, 0.940, 0.92),  # README.md's quickstart figure (tests/test_run.py)
    "digits-domains": Figure(20, 0.869, 0.80),
    "synthetic": Figure(20, 0.921, 0.88),
}
FEW_ROUNDS_FIGURES = {
    "digits": Figure(10, 0.694, 0.55),
    # 10 rounds, not fewer: round 6 read 0.647 here and 0.477 with AVX2 kernels, round 10 0.875 and 0.865
    "mnist5k": Figure(10, 0.875, 0.75),
    "digits-domains": Figure(10, 0.690, 0.55),
    "synthetic": Figure(3, 0.915, 0.85),
}
OFFLINE = [name for name, info in DATASETS.items() if info.offline]


def test_every_offline_dataset_has_its_figures():
    assert sorted(QUICKSTART_FIGURES) == sorted(FEW_ROUNDS_FIGURES) == sorted(OFFLINE)
    assert {figure.rounds for figure in QUICKSTART_FIGURES.values()} == {load_experiment(QUICKSTART).rounds}


def chance(name: str) -> float:
    """The accuracy of always answering the test set's most common class."""
    labels = np.asarray(experiment_dataset(load_experiment(QUICKSTART, [f"dataset.name={name}"])).y_test)
    return float(np.bincount(labels).max() / len(labels))


@pytest.mark.parametrize(
    ("name", "figures"),
    [(name, FEW_ROUNDS_FIGURES) for name in OFFLINE]
    + [pytest.param(name, QUICKSTART_FIGURES, marks=pytest.mark.slow) for name in OFFLINE],
    ids=[f"{name}-few-rounds" for name in OFFLINE] + [f"{name}-quickstart" for name in OFFLINE],
)
def test_the_quickstart_learns_on_every_offline_dataset_with_its_default_model(name, figures, tmp_path, capsys):
    figure = figures[name]
    baseline = chance(name)
    assert figure.floor >= baseline + (1 - baseline) / 3, "a floor must close a third of the gap from chance to 1"
    assert figure.floor <= figure.measured
    out = tmp_path / name
    argv = ["run", "--set", f"dataset.name={name}", "--set", f"rounds={figure.rounds}", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().err == "", "the newcomer's run says nothing but its results"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] >= figure.floor, (
        f"{name}: {summary['accuracy']:.4f} after {figure.rounds} rounds (chance {baseline:.3f}), "
        f"floor {figure.floor}, measured {figure.measured}"
    )
    assert f'name = "{DATASETS[name].model}"' in (out / "config.toml").read_text().split("[model]")[1]


def test_the_quickstart_leaves_the_model_to_its_dataset_and_keeps_its_fingerprint():
    """mnist5k's default is the LeNet-5 the quickstart used to name: its resolved experiment,
    and so its run directory and figure, are those of the file with ``[model] name = "lenet"``."""
    assert "[model]" not in QUICKSTART.read_text().replace("# [model]", "")
    left_out = load_experiment(QUICKSTART)
    named = load_experiment(QUICKSTART, ["model.name=lenet"])
    assert left_out.model.name == "lenet"
    assert left_out.to_toml() == named.to_toml() and left_out.fingerprint() == named.fingerprint()


def test_a_named_model_is_never_replaced_by_the_default():
    assert load_experiment(QUICKSTART, ["dataset.name=digits", "model.name=lenet"]).model.name == "lenet"
    assert load_experiment(QUICKSTART, ["dataset.name=digits"]).model.name == "mlp"
    assert load_experiment(QUICKSTART, ["model.name=mlp"]).model.name == "mlp"


def test_a_model_too_large_for_the_inputs_warns_in_one_line_naming_one_that_fits(tmp_path, capsys):
    """LeNet-5 on the 8x8 digits runs, but its second 5x5 convolution reads a 4x4 map: it
    ends near chance (0.153 after 20 rounds, against the MLP's 0.861)."""
    argv = ["run", "--set", "dataset.name=digits", "--set", "model.name=lenet", "--set", "rounds=1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: "), err
    for words in ("[model] name = 'lenet'", "at least 10x10", "1x8x8", "use name = 'mlp'"):
        assert words in err, f"{words!r} not in {err!r}"
