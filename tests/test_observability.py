"""What a run shows while it runs: one line per round when stdout is not a terminal, a
progress bar when it is, nothing with --quiet; warnings on stderr, once each."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedsim.build import load_experiment
from fedsim.cli import main
from fedsim.notices import run_label
from fedsim.progress import RoundWarnings, round_line, round_reporter

TINY = """\
name = "tiny"
seed = 0
rounds = 3

[dataset]
name = "digits"
[partition]
name = "iid"
num_clients = 2
[model]
name = "mlp"
[client]
lr = 0.1
[strategy]
name = "fedavg"
"""

ROUND_LINE = re.compile(r"^round (\d+)/(\d+)  accuracy (\S+)  loss (\S+)  (\d+\.\d) s$")

# A server-side method gone wrong: from round 2 on its global model is NaN (its clients
# go on training the last good one, so that the run does not stop).
NAN_STRATEGY = """
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg


class NaNFedAvg(FedAvg):
    good = None

    def configure_train(self, server_round, arrays, config, grid):
        return super().configure_train(server_round, self.good or arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.good = arrays
        if arrays is not None and server_round >= 2:
            state = arrays.to_torch_state_dict()
            arrays = ArrayRecord({key: torch.full_like(value, float("nan")) for key, value in state.items()})
        return arrays, metrics
"""


def write_config(folder: Path) -> Path:
    path = folder / "tiny.toml"
    path.write_text(TINY)
    return path


def round_lines(text: str) -> list[re.Match]:
    return [match for line in text.splitlines() if (match := ROUND_LINE.match(line))]


# --- fedsim run, stdout piped --------------------------------------------------------


def test_a_piped_run_prints_one_line_per_round(tmp_path):
    config = write_config(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "run",
            str(config),
            "--set",
            "evaluate_every=2",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rounds = round_lines(result.stdout)
    assert [(m[1], m[2]) for m in rounds] == [("1", "3"), ("2", "3"), ("3", "3")]
    assert len(lines) == 4 and lines[3].startswith("tiny: accuracy")  # the rounds, then the result
    # evaluate_every = 2: round 1 measures nothing; round 2 does, and the last round always
    assert rounds[0][3] == rounds[0][4] == "-"
    for match in rounds[1:]:
        assert 0 <= float(match[3]) <= 1 and math.isfinite(float(match[4]))
    assert [float(m[5]) for m in rounds] == sorted(float(m[5]) for m in rounds)
    assert "\x1b[" not in result.stdout  # no terminal escapes in a pipe
    assert "warning" not in result.stderr


def test_quiet_prints_no_round_lines(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["run", str(config), "--set", "rounds=1", "--quiet", "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --- warnings ----------------------------------------------------------------------------


@pytest.fixture
def nan_strategy(tmp_path, monkeypatch):
    (tmp_path / "nan_strategy.py").write_text(textwrap.dedent(NAN_STRATEGY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "nan_strategy:NaNFedAvg"
    sys.modules.pop("nan_strategy", None)


def test_a_non_finite_global_loss_is_one_warning(tmp_path, capsys, nan_strategy):
    config = write_config(tmp_path)
    args = ["run", str(config), "--set", f"strategy.name={nan_strategy}", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(args) == 0  # rounds 2 and 3 are both NaN: one warning
    captured = capsys.readouterr()
    assert captured.out == ""
    warnings = captured.err.splitlines()
    assert len(warnings) == 1, captured.err
    assert warnings[0].startswith("warning: round 2: the global loss is nan")


def test_warnings_come_once_each_and_name_a_sweeps_run(capsys):
    warn = RoundWarnings()
    warn(1, {"accuracy": 0.5, "loss": 1.0}, trained=2)
    warn(2, {"accuracy": 0.1, "loss": math.inf}, trained=0)
    warn(3, {"accuracy": 0.1, "loss": math.nan}, trained=0)
    with run_label("fedavg-s1"):
        RoundWarnings()(4, {"loss": math.nan})
    assert capsys.readouterr().err.splitlines() == [
        "warning: round 2: the global loss is inf; training diverged (a smaller client.lr usually helps)",
        "warning: round 2: no client trained (the strategy sampled none); "
        "check [strategy] fraction_train and min_train_nodes",
        "warning: fedavg-s1: round 4: the global loss is nan; training diverged (a smaller client.lr usually helps)",
    ]


# --- the reporter itself ---------------------------------------------------------------------


def test_round_lines_show_a_dash_where_the_round_measured_nothing(tmp_path):
    experiment = load_experiment(write_config(tmp_path), ["rounds=5", "evaluate_every=2"])
    stream = io.StringIO()  # not a terminal
    with round_reporter(experiment, enabled=True, done=2, stream=stream) as on_round:
        for server_round in (3, 4, 5):
            on_round(server_round, {"accuracy": 0.8123, "loss": 0.6021})
    rounds = round_lines(stream.getvalue())
    assert [(m[1], m[3], m[4]) for m in rounds] == [
        ("3", "-", "-"),
        ("4", "0.8123", "0.6021"),
        ("5", "0.8123", "0.6021"),
    ]
    assert round_line(3, 20, {"accuracy": 0.8123, "loss": 0.6021}, True, 12.44) == (
        "round 3/20  accuracy 0.8123  loss 0.6021  12.4 s"
    )
    assert round_line(3, 20, {}, True, 0.0) == "round 3/20  accuracy -  loss -  0.0 s"  # nothing measured yet


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_progress_bar_and_quiet_gets_nothing(tmp_path, capsys):
    experiment = load_experiment(write_config(tmp_path))
    terminal = Terminal()
    with round_reporter(experiment, enabled=True, done=0, stream=terminal) as on_round:
        on_round(1, {"accuracy": 0.5, "loss": 1.0})
    assert terminal.getvalue() == ""  # the bar draws on the console, not as round lines
    assert not round_lines(capsys.readouterr().out)
    quiet = io.StringIO()
    with round_reporter(experiment, enabled=False, done=0, stream=quiet) as on_round:
        on_round(1, {"accuracy": 0.5, "loss": 1.0})
    assert quiet.getvalue() == ""
