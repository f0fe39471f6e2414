"""An interrupted run resumes from its last checkpoint and ends exactly as an
uninterrupted run would; checkpoints hold arrays and JSON only; a run directory is used by
one command at a time."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedsim import checkpoint as checkpoints
from fedsim.cli import main
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment

from .conftest import QUICKSTART, TINY, full_or_ci, tiny_experiment, tiny_overrides

# FedBN, half the clients per round, a checkpoint every second round: resuming needs the
# global model, the strategy's state, every client's state and the metrics position.
STATEFUL = [
    "strategy.name=fedbn",
    "model.name=resnet",
    "model.width=4",
    "strategy.fraction_train=0.5",
    "checkpoint_every=2",
]
TIMES = ("wall_time_s", "rounds_time_s")


def _command(path, overrides) -> list[str]:
    command = [sys.executable, "-m", "fedsim", "run", str(QUICKSTART), "--quiet", "--out", str(path)]
    for override in tiny_overrides(*overrides):
        command += ["--set", override]
    return command


def _same_run(run, reference) -> None:
    """Identical metrics.csv, summary.json (times aside) and final model."""
    assert (run / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (run, reference)]
    for summary in summaries:
        for key in TIMES:
            summary.pop(key)
    assert summaries[0] == summaries[1]
    final = [checkpoints.load(folder / "checkpoint.npz") for folder in (run, reference)]
    assert final[0].round == final[1].round
    assert list(final[0].arrays) == list(final[1].arrays)
    for key in final[0].arrays:
        np.testing.assert_array_equal(final[0].arrays[key].numpy(), final[1].arrays[key].numpy())
    assert not list(run.rglob(".*.tmp")), "a killed write's temporary file was left behind"


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
    _same_run(tmp_path / "run", tmp_path / "reference")


def test_a_run_killed_at_random_moments_resumes_exactly(tmp_path):
    """SIGKILL a real `fedsim run` at several random moments (start-up, mid-round,
    mid-evaluation, mid-checkpoint: wherever the clock falls), rerun the same command each
    time, and compare with an uninterrupted run."""
    overrides = [*STATEFUL, "rounds=8"]
    started = time.monotonic()
    assert subprocess.run(_command(tmp_path / "reference", overrides)).returncode == 0
    duration = time.monotonic() - started

    moments = random.Random(20261202).sample(range(5, 95), full_or_ci(4, 2))  # percent of an uninterrupted run
    command = _command(tmp_path / "run", overrides)
    for percent in sorted(moments):
        process = subprocess.Popen(command)
        time.sleep(duration * percent / 100)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert subprocess.run(command).returncode == 0
    _same_run(tmp_path / "run", tmp_path / "reference")


@pytest.mark.ray
def test_a_ray_run_killed_at_random_moments_resumes_exactly(tmp_path):
    """As above on the Ray engine (its workers die with the driver): the same bits as an
    uninterrupted in-process run, since both use one torch thread per client."""
    overrides = [*STATEFUL, "rounds=8"]
    assert subprocess.run(_command(tmp_path / "reference", overrides)).returncode == 0
    command = _command(tmp_path / "run", [*overrides, "engine.name=ray", "engine.num_workers=2"])
    for delay in random.Random(7).sample(
        range(4, 16), full_or_ci(2, 1)
    ):  # seconds: Ray's start-up, rounds, checkpoints
        process = subprocess.Popen(command)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert subprocess.run(command).returncode == 0
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    final = [_final_arrays(tmp_path / folder) for folder in ("run", "reference")]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:
        np.testing.assert_array_equal(final[0][key], final[1][key])


def _final_arrays(folder) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in checkpoints.load(folder / "checkpoint.npz").arrays.items()}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_a_run_at_once_and_leaves_it_resumable(signum, tmp_path):
    command = _command(tmp_path / "run", [*STATEFUL, "rounds=16"])
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run/checkpoint.npz").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signum)
    stopped = time.monotonic()
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - stopped < 10, "it should stop within seconds"
    assert process.returncode == 130
    assert err.strip().endswith("interrupted: run the same command again to resume from the last checkpoint")
    assert not list((tmp_path / "run").rglob(".*.tmp"))
    done = checkpoints.load(tmp_path / "run/checkpoint.npz").round
    assert 0 < done < 16
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr


def test_checkpoint_every_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    experiment = tiny_experiment(*STATEFUL, "rounds=5", "checkpoint_every=3")
    run_experiment(experiment, tmp_path / "reference")
    saved = []
    original = RunDirectory.save_checkpoint

    def crash_at_the_end(self, checkpoint):
        saved.append(checkpoint.round)
        if checkpoint.round == 5:
            raise KeyboardInterrupt  # rounds 4 and 5 ran, but only round 3 was checkpointed
        original(self, checkpoint)

    monkeypatch.setattr(RunDirectory, "save_checkpoint", crash_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, tmp_path / "run")
    assert saved == [3, 5]
    assert checkpoints.load(tmp_path / "run/checkpoint.npz").round == 3
    monkeypatch.setattr(RunDirectory, "save_checkpoint", original)
    assert run_experiment(experiment, tmp_path / "run").status == "resume"
    _same_run(tmp_path / "run", tmp_path / "reference")


def _interrupted(tmp_path, *overrides):
    """A run stopped after round 2 of 4 (its checkpoint says 2), and its experiment."""
    experiment = tiny_experiment("rounds=4", *overrides)
    original = RunDirectory.save_checkpoint

    def stop_after_round_2(self, checkpoint):
        original(self, checkpoint)
        if checkpoint.round == 2:
            raise KeyboardInterrupt

    RunDirectory.save_checkpoint = stop_after_round_2
    try:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(experiment, tmp_path / "run")
    finally:
        RunDirectory.save_checkpoint = original
    return experiment


def _args(tmp_path, *overrides) -> list[str]:
    args = ["run", str(QUICKSTART), "--quiet", "--out", str(tmp_path / "run")]
    for override in tiny_overrides("rounds=4", *overrides):
        args += ["--set", override]
    return args


MARKER_PICKLE = """
import os, pickle
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
with open({path!r}, "wb") as handle:
    pickle.dump(Payload(), handle)
"""


def _plant_pickle(path, marker) -> None:
    """A pickle at ``path`` that would create ``marker`` if anything unpickled it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", MARKER_PICKLE.format(marker=marker, path=str(path))], check=True)


@pytest.mark.parametrize("where", ["checkpoint.npz", "partition.npz", "client_state/0/r000002.npz"])
def test_a_planted_pickle_is_refused_and_never_run(where, tmp_path, capsys):
    _interrupted(tmp_path, "strategy.name=fedbn", "model.name=resnet", "model.width=4")
    assert (tmp_path / "run" / where).exists(), "the file a resume reads"
    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "run" / where, marker)
    capsys.readouterr()  # the interrupted run's own output
    assert main(_args(tmp_path, "strategy.name=fedbn", "model.name=resnet", "model.width=4")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and where.split("/")[-1] in err
    assert not marker.exists(), "the pickle ran"


def test_a_planted_pickle_in_the_cache_is_rebuilt_not_run(tmp_path, monkeypatch):
    from fedsim.data.cache import cache_dir, cached_arrays

    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "pwned"
    _plant_pickle(cache_dir() / "mnist5k.npz", marker)
    arrays = cached_arrays("mnist5k", lambda: {"x": np.zeros(3)})
    assert list(arrays) == ["x"] and not marker.exists()


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda run: (run / "checkpoint.npz").write_bytes(b""), "checkpoint.npz is not a readable fedsim checkpoint"),
        (
            lambda run: (run / "checkpoint.npz").write_bytes((run / "checkpoint.npz").read_bytes()[:200]),
            "checkpoint.npz is not a readable fedsim checkpoint",
        ),
        (lambda run: (run / "checkpoint.npz").write_bytes(os.urandom(4096)), "not a readable fedsim checkpoint"),
        (lambda run: (run / "metrics.csv").unlink(), "metrics.csv does not hold the 2 rounds"),
        (
            lambda run: (run / "metrics.csv").write_bytes((run / "metrics.csv").read_bytes()[:100]),
            "metrics.csv does not hold the 2 rounds",
        ),
        (
            lambda run: (run / "metrics.csv").write_text((run / "metrics.csv").read_text().replace("0.", "1.", 1)),
            "metrics.csv does not hold the 2 rounds",
        ),
        (lambda run: (run / "partition.npz").unlink(), "partition.npz cannot be read"),
        (lambda run: (run / "partition.npz").write_bytes(b"garbage"), "partition.npz cannot be read"),
        (lambda run: (run / "config.toml").write_bytes(b"\xff\xfe\x00garbage"), "config.toml is not a readable"),
        (lambda run: os.replace(run / "checkpoint.npz", run / "checkpoint.pkl"), "holds checkpoint.pkl"),
    ],
)
def test_a_damaged_run_directory_is_a_one_line_error(damage, words, tmp_path, capsys):
    _interrupted(tmp_path)
    run = tmp_path / "run"
    size = (run / "metrics.csv").stat().st_size
    damage(run)
    assert main(_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "--overwrite" in err, err
    if (run / "metrics.csv").exists() and "metrics.csv" not in words:
        assert (run / "metrics.csv").stat().st_size == size, "a refused resume changes nothing"
    assert main([*_args(tmp_path), "--overwrite"]) == 0


def test_a_checkpoint_of_another_version_or_experiment_is_refused(tmp_path, monkeypatch, capsys):
    import fedsim

    _interrupted(tmp_path)
    monkeypatch.setattr(fedsim, "__version__", "9.9.9")
    assert main(_args(tmp_path)) == 2
    assert "written by fedsim 0.1.0 (format 1); this is fedsim 9.9.9" in capsys.readouterr().err
    monkeypatch.undo()
    other = tmp_path / "other"
    _interrupted(other, "seed=1")
    os.replace(other / "run/checkpoint.npz", tmp_path / "run/checkpoint.npz")
    assert main(_args(tmp_path)) == 2
    assert "checkpoint.npz belongs to another experiment" in capsys.readouterr().err


def test_temporary_files_of_a_killed_write_are_removed(tmp_path):
    _interrupted(tmp_path)
    run = tmp_path / "run"
    leftovers = [run / ".checkpoint.npz.abc123.tmp", run / "plots/.accuracy.png.x.tmp"]
    for leftover in leftovers:
        leftover.parent.mkdir(exist_ok=True)
        leftover.write_bytes(b"half a file")
    assert main(_args(tmp_path)) == 0
    assert not any(leftover.exists() for leftover in leftovers)


def test_a_second_command_on_a_busy_run_directory_is_refused(tmp_path, capsys):
    command = _command(tmp_path / "run", ["rounds=60"])
    first = subprocess.Popen(command)
    try:
        lock = tmp_path / "run/.fedsim.lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().startswith("pid")):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        args = ["run", str(QUICKSTART), "--quiet", "--out", str(tmp_path / "run")]
        for override in [*TINY, "rounds=60"]:
            args += ["--set", override]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"in use by another fedsim command (pid {first.pid} on" in err and err.count("\n") == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert main(args) == 0, "a killed holder leaves no stale lock"


def test_resume_option_continues_a_run_directory(tmp_path, capsys):
    experiment = _interrupted(tmp_path)
    run_experiment(experiment, tmp_path / "reference")
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    _same_run(tmp_path / "run", tmp_path / "reference")
    assert main(["run", str(QUICKSTART), "--resume", str(tmp_path / "run")]) == 2
    assert "--resume takes its experiment from the run directory" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "no fedsim run in" in capsys.readouterr().err
