"""An interrupted run resumes from its last finished round and ends exactly as an
uninterrupted run would."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from fedsim.results import RunDirectory
from fedsim.run import run_experiment

from .conftest import QUICKSTART, TINY, tiny_experiment


def test_crash_between_metrics_and_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    experiment = tiny_experiment("rounds=4", "strategy.fraction_train=0.5")
    run_experiment(experiment, tmp_path / "reference")

    original = RunDirectory.save_checkpoint

    def crash_in_round_3(self, checkpoint):
        if checkpoint.round == 3:
            raise KeyboardInterrupt  # after round 3's metrics were appended
        original(self, checkpoint)

    monkeypatch.setattr(RunDirectory, "save_checkpoint", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, tmp_path / "run")
    assert not (tmp_path / "run/summary.json").exists()
    monkeypatch.setattr(RunDirectory, "save_checkpoint", original)

    resumed = run_experiment(experiment, tmp_path / "run")
    assert resumed.status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()


def test_killed_process_resumes_exactly(tmp_path):
    """SIGKILL a real `fedsim run` mid-run, run the same command again, compare."""
    overrides = [*TINY, "rounds=12"]
    command = [sys.executable, "-m", "fedsim", "run", str(QUICKSTART), "--quiet", "--out", str(tmp_path / "run")]
    for override in overrides:
        command += ["--set", override]
    checkpoint = tmp_path / "run/checkpoint.pkl"

    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not (checkpoint.exists() and pickle.loads(checkpoint.read_bytes()).round >= 2):
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = pickle.loads(checkpoint.read_bytes()).round
    assert interrupted_at < 12 and not (tmp_path / "run/summary.json").exists()

    assert subprocess.run(command).returncode == 0
    run_experiment(tiny_experiment("rounds=12"), tmp_path / "reference")
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()


def test_resumed_fedbn_run_ends_exactly_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """Client state (FedBN's BatchNorm layers) and the running figures in summary.json
    come back after a crash as they were."""
    experiment = tiny_experiment(
        "strategy.name=fedbn", "model.name=resnet", "model.width=4", "rounds=4", "strategy.fraction_train=0.5"
    )
    reference = run_experiment(experiment, tmp_path / "reference").summary

    original = RunDirectory.save_checkpoint

    def crash_in_round_3(self, checkpoint):
        if checkpoint.round == 3:
            raise KeyboardInterrupt
        original(self, checkpoint)

    monkeypatch.setattr(RunDirectory, "save_checkpoint", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, tmp_path / "run")
    monkeypatch.setattr(RunDirectory, "save_checkpoint", original)
    resumed = run_experiment(experiment, tmp_path / "run").summary

    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    for key in ("accuracy", "loss", "client_accuracy_mean", "accuracy_evaluated_on"):
        assert resumed[key] == reference[key], key
