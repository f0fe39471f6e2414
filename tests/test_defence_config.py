"""``[strategy] defence = ...`` in an experiment file: the defence wraps the strategy,
reports whom it accepted, resumes exactly, and bad keys are one-line errors."""

from __future__ import annotations

import pytest

from fedsim.build import load_experiment
from fedsim.errors import UserError
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from tests.conftest import QUICKSTART, interrupted_and_resumed, tiny_experiment


def test_a_defence_wraps_the_strategy_and_reports_whom_it_accepted(tmp_path):
    run = run_experiment(tiny_experiment("strategy.defence=flame"), tmp_path / "run")
    metrics = RunDirectory(run.path).read_metrics()
    accepted = metrics[metrics.metric == "defence-accepted"].value.tolist()
    rejected = metrics[metrics.metric == "defence-rejected"].value.tolist()
    assert len(accepted) == 2 and all(a + r == 4 for a, r in zip(accepted, rejected))
    config = (run.path / "config.toml").read_text()
    assert 'defence = "flame"' in config and "noise_lambda = 0.001" in config, "defaults are spelled out"


def test_fltrust_trains_its_root_set_from_the_training_data(tmp_path):
    run = run_experiment(tiny_experiment("strategy.defence=fltrust"), tmp_path / "run")
    assert run.summary["rounds_completed"] == 2


def test_a_defended_run_resumes_exactly(tmp_path, monkeypatch):
    experiment = tiny_experiment("rounds=3", "strategy.defence=foolsgold")
    assert interrupted_and_resumed(experiment, tmp_path, monkeypatch).status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy.defence=flmae"], r"\[strategy\] defence = 'flmae' is not a known defence; did you mean 'flame'"),
        (["strategy.defence=flame", "strategy.defence_options={lamda=1.0}"], r"defence_options unknown key 'lamda'"),
        (["strategy.defence_options={}"], r"defence_options is set but no defence"),
        (["strategy.defence=7"], r"defence = 7 must be a name"),
        (["strategy.defence=rlr", "strategy.defence_options={threshold=-1}"], r"threshold"),
    ],
)
def test_bad_defence_keys_are_one_line_errors(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message) as error:
        run_experiment(load_experiment(QUICKSTART, ["rounds=1", *overrides]), tmp_path / "run")
    assert "\n" not in str(error.value)


def test_switching_the_strategy_keeps_the_defence():
    experiment = load_experiment(
        QUICKSTART,
        [
            "strategy.defence=krum",
            "strategy.defence_options={num_malicious_nodes=1}",
            "strategy.name=fedbn",
            "model.name=digitcnn",
        ],
    )
    assert experiment.strategy.params["defence"] == "krum"


def test_defence_none_is_no_defence_so_a_sweep_can_compare_against_it(tmp_path):
    experiment = tiny_experiment("strategy.defence=none")
    assert experiment.fingerprint() != tiny_experiment().fingerprint(), "the file says so; the run is the same"
    run = run_experiment(experiment, tmp_path / "run")
    metrics = RunDirectory(run.path).read_metrics()
    assert not (metrics.metric == "defence-accepted").any()
    with pytest.raises(UserError, match="defence_options is set but no defence"):
        tiny_experiment("strategy.defence=none", "strategy.defence_options={num_malicious_nodes=1}")
