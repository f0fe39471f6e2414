"""fedsim sweep: the grid, its validation, parallel runs, failures, resume, and its report."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsim.cli import main
from fedsim.config import load_experiment
from fedsim.errors import UserError
from fedsim.sweep import make_spec, parse_grid_option, plan_runs, run_name, split_values, toml_value

TINY = """\
name = "tiny"
seed = 0
rounds = 2

[dataset]
name = "digits"
[partition]
name = "iid"
num_clients = 4
[model]
name = "mlp"
[client]
lr = 0.1
[strategy]
name = "fedavg"
"""

# Two strategies that differ in their results: FedProx with a strong proximal term.
STRATEGIES = '--grid=strategy={name="fedavg"},{name="fedprox",proximal_mu=1.0}'


def write_config(folder: Path, extra: str = "") -> Path:
    path = folder / "tiny.toml"
    path.write_text(TINY + extra)
    return path


def read_manifest(out: Path) -> dict[str, dict]:
    return {run["name"]: run for run in json.loads((out / "sweep.json").read_text())["runs"]}


def global_curve(run: Path, metric: str) -> list[tuple[int, float]]:
    with open(run / "metrics.csv", newline="") as handle:
        return [
            (int(row["round"]), float(row["value"]))
            for row in csv.DictReader(handle)
            if row["scope"] == "server" and row["id"] == "global" and row["metric"] == metric
        ]


# --- a tiny sweep and its report --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    out = folder / "out"
    code = main(["sweep", str(write_config(folder)), STRATEGIES, "--seeds", "0,1", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_sweep_runs_every_combination_into_its_own_folder(tiny_sweep):
    manifest = read_manifest(tiny_sweep)
    assert sorted(manifest) == ["fedavg-s0", "fedavg-s1", "fedprox-proximal_mu1.0-s0", "fedprox-proximal_mu1.0-s1"]
    assert {run["status"] for run in manifest.values()} == {"done"}
    for name, run in manifest.items():
        summary = json.loads((tiny_sweep / name / "summary.json").read_text())
        config = tomllib.loads((tiny_sweep / name / "config.toml").read_text())
        assert summary["seed"] == config["seed"] == run["seed"]
        assert summary["strategy"] == config["strategy"]["name"] == run["values"]["strategy"]["name"]
        assert config["rounds"] == 2
    fedprox = tomllib.loads((tiny_sweep / "fedprox-proximal_mu1.0-s0" / "config.toml").read_text())
    assert fedprox["strategy"]["proximal_mu"] == 1.0
    assert fedprox["strategy"]["fraction_train"] == 1.0  # a table value keeps the table's other keys


def test_report_of_a_sweep_matches_the_runs_summaries(tiny_sweep, capsys):
    summaries = {p.parent.name: json.loads(p.read_text()) for p in tiny_sweep.glob("*/summary.json")}
    target = max(s["accuracy"] for s in summaries.values())  # reached by the best run only, perhaps others
    capsys.readouterr()
    assert main(["report", str(tiny_sweep), "--format", "csv", "--target", repr(target)]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("strategy.name")

    assert list(table.index) == ["fedavg", "fedprox"]
    for strategy, row in table.iterrows():
        runs = {name: s for name, s in summaries.items() if s["strategy"] == strategy}
        assert row["n"] == len(runs) == 2
        for metric in ("accuracy", "loss", "client_accuracy_mean"):
            values = [s[metric] for s in runs.values()]
            assert row[f"{metric}_mean"] == pytest.approx(np.mean(values))
            assert row[f"{metric}_std"] == pytest.approx(np.std(values, ddof=1))
        first_rounds = [
            next((r for r, value in global_curve(tiny_sweep / name, "accuracy") if value >= target), None)
            for name in runs
        ]
        reached = [r for r in first_rounds if r is not None]
        assert row["runs_reaching_target"] == len(reached)
        if reached:
            assert row["rounds_to_target_mean"] == pytest.approx(np.mean(reached))
        else:
            assert np.isnan(row["rounds_to_target_mean"])
    assert table["runs_reaching_target"].sum() >= 1
    assert table.loc["fedavg", "accuracy_mean"] != table.loc["fedprox", "accuracy_mean"]

    markdown = (tiny_sweep / "report.md").read_text()
    fedavg = table.loc["fedavg"]
    assert f"| fedavg | 2 | {fedavg['accuracy_mean']:.3f} ± {fedavg['accuracy_std']:.3f} |" in markdown
    assert (tiny_sweep / "report.csv").read_text().startswith("strategy.name,n,accuracy_mean,accuracy_std,")
    for name in ("report_accuracy.png", "report_final.png"):
        assert (tiny_sweep / name).read_bytes()[:4] == b"\x89PNG"


def test_rerunning_a_finished_sweep_skips_every_run(tiny_sweep, capsys):
    summary = tiny_sweep / "fedavg-s0" / "summary.json"
    before = summary.stat().st_mtime_ns
    config = str(tiny_sweep.parent / "tiny.toml")
    assert main(["sweep", config, STRATEGIES, "--seeds", "0,1", "--out", str(tiny_sweep)]) == 0
    assert "4 skipped" in capsys.readouterr().out
    assert {run["status"] for run in read_manifest(tiny_sweep).values()} == {"skipped"}
    assert summary.stat().st_mtime_ns == before


def test_a_changed_experiment_in_the_same_folder_is_refused(tiny_sweep, capsys):
    config = str(tiny_sweep.parent / "tiny.toml")
    args = ["sweep", config, STRATEGIES, "--seeds", "0,1", "--set", "client.lr=0.2", "--out", str(tiny_sweep)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "different experiment" in error


# --- resume after a kill -----------------------------------------------------------------


def test_a_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    config, out = write_config(tmp_path), tmp_path / "out"
    args = ["sweep", str(config), "--seeds", "0,1", "--workers", "1", "--out", str(out)]
    sweep = subprocess.Popen(
        [sys.executable, "-m", "fedsim", *args, "--quiet"],
        start_new_session=True,  # its own process group, killed whole as by a crash
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*/summary.json")):
            assert sweep.poll() is None, sweep.stderr.read().decode()
            if time.monotonic() > deadline:  # a guard against hanging, not a speed check
                pytest.fail("no run finished within 5 minutes")
            time.sleep(0.05)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
    finished = {path.parent.name: path.stat().st_mtime_ns for path in out.glob("*/summary.json")}
    assert list(finished) == ["s0"]  # one worker: s1 was still running

    assert main([*args, "--quiet"]) == 0
    manifest = read_manifest(out)
    assert sorted(manifest) == ["s0", "s1"]
    for name, run in manifest.items():
        assert (out / name / "summary.json").exists()
        if name in finished:
            assert run["status"] == "skipped"
            assert (out / name / "summary.json").stat().st_mtime_ns == finished[name]
        else:
            assert run["status"] in ("done", "resumed")


# --- failures ------------------------------------------------------------------------------


def test_a_failing_run_does_not_stop_the_others(tmp_path, capsys):
    out = tmp_path / "out"
    # 2000 clients cannot each get a sample of digits' 1,437: that run fails when it splits.
    args = ["sweep", str(write_config(tmp_path)), "--grid", "partition.num_clients=2000,4", "--workers", "1"]
    assert main([*args, "--set", "rounds=1", "--out", str(out), "--quiet"]) == 1
    manifest = read_manifest(out)
    assert manifest["num_clients2000-s0"]["status"] == "failed"
    assert "2000" in manifest["num_clients2000-s0"]["error"]
    assert "Traceback" in (out / "num_clients2000-s0" / "error.txt").read_text()
    assert manifest["num_clients4-s0"]["status"] == "done"
    assert (out / "num_clients4-s0" / "summary.json").exists()
    error = capsys.readouterr().err
    assert "1 of 2 runs failed" in error and "num_clients2000-s0: [partition]" in error


# --- bad input: one line, exit code 2, nothing run -------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--grid", "strategy.name"], "must look like section.key=value1,value2"),
        (["--grid", "=fedavg,fedprox"], "must look like section.key=value1,value2"),
        (["--grid", "strategy.name="], "must look like section.key=value1,value2"),
        (["--grid", "strategy.name=fedavg,,fedprox"], "empty value"),
        (["--grid", "model.hidden=[64,[128]"], "unbalanced brackets"),
        (["--grid", "partition.alpha=0.1,0.1"], "lists the value 0.1 twice"),
        (["--grid", "a.b.c=1,2"], "at most two levels deep"),
        (["--grid", "client.lr=0.1", "--grid", "client.lr=0.2"], "--grid client.lr is given twice"),
        (["--grid", "strategyy.name=fedavg"], "unknown table [strategyy]; did you mean 'strategy'?"),
        (["--grid", "seed=1,2"], "vary the seed with --seeds"),
        (["--grid", "strategy.name=fedavg,fedavgg"], "'fedavgg' is not a known strategy"),
        (["--grid", "client.lr=0.1,-1"], "client.lr=-1"),
        (["--seeds", "0,one"], "--seeds '0,one' must be whole numbers"),
        (["--seeds", "1,1"], "lists seed 1 twice"),
        (["--workers", "0"], "--workers 0 must be at least 1"),
        (["--address", "auto", "--backend", "process"], "use it with --backend ray"),
        (["--set", "engine.name=ray", "--backend", "ray"], "cannot run inside Ray sweep tasks"),
    ],
)
def test_bad_sweep_input_is_one_line_and_exit_code_2(tmp_path, capsys, options, message):
    out = tmp_path / "out"
    assert main(["sweep", str(write_config(tmp_path)), *options, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert message in error
    assert not out.exists()


def test_a_malformed_grid_exits_2_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedsim", "sweep", str(write_config(tmp_path)), "--grid", "strategy.name"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--grid 'strategy.name' must look like" in result.stderr


# --- the grid's syntax and the [sweep] table ---------------------------------------------


def test_grid_values_are_toml_and_lists_keep_their_commas():
    assert parse_grid_option("partition.alpha=0.1, 0.5,1") == ("partition.alpha", [0.1, 0.5, 1])
    assert parse_grid_option("model.hidden=[64],[128, 64]") == ("model.hidden", [[64], [128, 64]])
    assert parse_grid_option('dataset.name=digits,"a,b"') == ("dataset.name", ["digits", "a,b"])
    assert parse_grid_option("client.optimizer=sgd,adam") == ("client.optimizer", ["sgd", "adam"])
    assert split_values(r'"x\",y",2', "--grid") == [r'"x\",y"', "2"]


@pytest.mark.parametrize("value", [0.1, 1e-05, -3, True, "fed,avg", 'quote"s', [128, 64], {"name": "x", "mu": 0.5}])
def test_toml_value_reads_back_as_the_same_value(value):
    assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value


def test_run_names_are_readable_and_distinct():
    assert run_name({"strategy.name": "fedprox", "partition.alpha": 0.1}, 2) == "fedprox-alpha0.1-s2"
    assert run_name({"model.hidden": [128, 64]}, 0) == "hidden128_64-s0"
    assert run_name({}, 7) == "s7"


def test_names_that_would_collide_get_a_hash(tmp_path):
    # "a b" and "a_b" make the same folder name; each gets a hash of its experiment.
    spec = make_spec(write_config(tmp_path), ['description="a b","a_b"'], None, [])
    names = [run.name for run in plan_runs(spec)]
    assert len(set(names)) == 2 and all(name.startswith("descriptiona_b-s0-") for name in names)


SWEEP_TABLE = """
[sweep]
seeds = [0, 1]
grid = { "client.lr" = [0.1, 0.2] }
"""


def test_the_sweep_table_is_read_by_sweep_and_ignored_by_run(tmp_path):
    config = write_config(tmp_path, SWEEP_TABLE)
    (tmp_path / "plain").mkdir()
    assert load_experiment(config) == load_experiment(write_config(tmp_path / "plain"))

    runs = plan_runs(make_spec(config, [], None, []))
    assert [run.name for run in runs] == ["lr0.1-s0", "lr0.1-s1", "lr0.2-s0", "lr0.2-s1"]
    assert [(run.experiment.client.lr, run.experiment.seed) for run in runs] == [
        (0.1, 0),
        (0.1, 1),
        (0.2, 0),
        (0.2, 1),
    ]
    # The command line replaces a key's values and the seeds, and adds keys.
    runs = plan_runs(make_spec(config, ["client.lr=0.3", "partition.num_clients=2,3"], "5", []))
    assert [run.name for run in runs] == ["lr0.3-num_clients2-s5", "lr0.3-num_clients3-s5"]


def test_set_fixes_a_key_the_sweep_table_would_vary(tmp_path):
    config = write_config(tmp_path, SWEEP_TABLE)
    runs = plan_runs(make_spec(config, [], "0", ["client.lr=0.7"]))
    assert [(run.name, run.experiment.client.lr) for run in runs] == [("s0", 0.7)]
    runs = plan_runs(make_spec(config, [], "0", ["client={lr=0.7}"]))  # a whole table covers its keys
    assert [run.experiment.client.lr for run in runs] == [0.7]
    with pytest.raises(UserError, match="--set client.lr and --grid client.lr both set client.lr"):
        make_spec(config, ["client.lr=0.3,0.4"], None, ["client.lr=0.7"])


def test_a_sweep_grid_table_may_nest_its_keys(tmp_path):
    config = write_config(tmp_path, '\n[sweep.grid]\nstrategy.name = ["fedavg", "fedprox"]\n')
    assert [run.name for run in plan_runs(make_spec(config, [], None, []))] == ["fedavg-s0", "fedprox-s0"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[sweep]\nseed = [0]\n", "[sweep] unknown key 'seed'; did you mean 'seeds'?"),
        ("[sweep]\nseeds = 3\n", "[sweep] seeds must be a non-empty list of whole numbers"),
        ('[sweep]\ngrid = { "client.lr" = 0.1 }\n', "grid 'client.lr' must be a non-empty list"),
        ("sweep = 1\n", "'sweep' must be a table [sweep]"),
    ],
)
def test_a_bad_sweep_table_is_one_line(tmp_path, table, message):
    config = tmp_path / "bad.toml"
    config.write_text(table + TINY if not table.startswith("[") else TINY + table)
    with pytest.raises(UserError) as raised:
        make_spec(config, [], None, [])
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_dry_run_lists_the_runs_and_runs_nothing(tiny_sweep, capsys):
    manifest = (tiny_sweep / "sweep.json").read_bytes()
    config = str(tiny_sweep.parent / "tiny.toml")
    assert main(["sweep", config, STRATEGIES, "--seeds", "0,1,2", "--out", str(tiny_sweep), "--dry-run"]) == 0
    listed = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert listed == {
        "fedavg-s0": "finished",
        "fedavg-s1": "finished",
        "fedavg-s2": "to run",
        "fedprox-proximal_mu1.0-s0": "finished",
        "fedprox-proximal_mu1.0-s1": "finished",
        "fedprox-proximal_mu1.0-s2": "to run",
    }
    assert not (tiny_sweep / "fedavg-s2").exists()
    assert (tiny_sweep / "sweep.json").read_bytes() == manifest


# --- Ray ---------------------------------------------------------------------------------------


@pytest.mark.ray
def test_a_sweep_on_ray_runs_every_run(tmp_path):
    out = tmp_path / "out"
    args = ["sweep", str(write_config(tmp_path)), "--seeds", "0,1", "--set", "rounds=1", "--backend", "ray"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    manifest = read_manifest(out)
    assert {name: run["status"] for name, run in manifest.items()} == {"s0": "done", "s1": "done"}
    assert all((out / name / "summary.json").exists() for name in manifest)
