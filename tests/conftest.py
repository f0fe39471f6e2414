"""Shared fixtures: tiny experiments that run in a second or two."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.config import Experiment, load_experiment

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
