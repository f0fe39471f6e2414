"""Shared fixtures: tiny experiments that run in a second or two."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedsim.build import load_experiment
from fedsim.config import Experiment

IN_CI = os.environ.get("CI") == "true"


def full_or_ci(full, ci):
    """A slow study's full size, or the small version CI runs (``CI=true``)."""
    return ci if IN_CI else full


def pytest_collection_modifyitems(config, items):
    """Under ``CI=true``, tests marked ``slow`` are skipped: each is the long form of a
    study whose small version CI runs (run ``pytest`` without CI=true for the long forms)."""
    if not IN_CI:
        return
    skip = pytest.mark.skip(reason="slow study: its small version runs in CI; run pytest without CI=true")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.toml"

TINY = [
    "dataset.name=digits",
    "model.name=mlp",
    "model.hidden=[32]",
    "partition.name=dirichlet",
    "partition.num_clients=4",
    "partition.alpha=1.0",
    "rounds=2",
    "client.lr=0.1",
]


def tiny_overrides(*overrides: str) -> list[str]:
    """TINY then ``overrides``, as ``--set`` values; choosing another model drops the MLP's
    ``hidden`` option."""
    base = TINY
    if any(override.startswith("model.name=") for override in overrides):
        base = [override for override in TINY if not override.startswith("model.hidden=")]
    return [*base, *overrides]


def tiny_experiment(*overrides: str) -> Experiment:
    """The quickstart shrunk to 4 clients on the 8x8 digits with a small MLP, 2 rounds."""
    return load_experiment(QUICKSTART, tiny_overrides(*overrides))


@pytest.fixture
def tiny():
    return tiny_experiment


def interrupted_and_resumed(experiment: Experiment, tmp_path: Path, monkeypatch, crash_round: int = 2):
    """Run ``experiment`` whole into ``tmp_path/reference``; run it into ``tmp_path/run``,
    interrupted (as by Ctrl-C) while saving round ``crash_round``'s checkpoint, then run it
    again, which resumes. Returns the resumed run's result; the caller compares the two
    folders."""
    from fedsim.results import RunDirectory
    from fedsim.runner import run_experiment

    run_experiment(experiment, tmp_path / "reference")
    original = RunDirectory.save_checkpoint

    def crash(self, checkpoint):
        if checkpoint.round == crash_round:
            raise KeyboardInterrupt
        original(self, checkpoint)

    monkeypatch.setattr(RunDirectory, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, tmp_path / "run")
    monkeypatch.setattr(RunDirectory, "save_checkpoint", original)
    return run_experiment(experiment, tmp_path / "run")
