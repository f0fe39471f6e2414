"""fedsim sweep: the grid, its validation, parallel runs, failures, resume, and its report."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
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

from fedsim.build import load_experiment
from fedsim.cli import main
from fedsim.errors import UserError
from fedsim.results import RunDirectory
from fedsim.sweep import (
    RunTask,
    StopSignals,
    SweepSpec,
    check_resolved,
    make_spec,
    parse_grid_option,
    plan_runs,
    remove_temporary_files,
    run_name,
    split_values,
    toml_value,
)
from fedsim.sweep import processes as sweep_processes

ROOT = Path(__file__).resolve().parents[1]
CROSS_SILO = ROOT / "experiments" / "feature-skew" / "cross-silo.toml"
QUICKSTART = ROOT / "experiments" / "quickstart.toml"

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


# --- Ctrl-C and SIGTERM ----------------------------------------------------------------------


def live_processes_in_group(pgid: int) -> list[int]:
    """The processes of a process group that are still alive (zombies are dead), from /proc."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state not in "ZX":
            alive.append(int(entry.name))
    return alive


def start_sweep(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedsim", *args],
        start_new_session=True,  # its own process group, as a terminal's foreground job
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, sweep: subprocess.Popen, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert sweep.poll() is None, f"the sweep ended before {what}: {sweep.stderr.read()}"
        if time.monotonic() > deadline:  # a guard against hanging, not a speed check
            os.killpg(sweep.pid, signal.SIGKILL)
            pytest.fail(f"not {what} within {timeout_s:.0f} s")
        time.sleep(0.05)


def stop_and_check(sweep: subprocess.Popen, out: Path, signum: int, group: bool) -> float:
    """Send the signal; the sweep must end with 130 and one line within 10 s, leaving no
    process and no temporary file behind. Returns how long it took to stop."""
    sent = time.monotonic()
    (os.killpg if group else os.kill)(sweep.pid, signum)
    try:
        code = sweep.wait(timeout=60)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    took = time.monotonic() - sent
    stderr = sweep.stderr.read()
    assert code == 130, stderr
    assert took < 10, f"took {took:.1f} s to stop"
    assert stderr.count("\n") == 1 and "run the same command again to resume" in stderr, stderr
    deadline = time.monotonic() + 5  # the resource tracker leaves when the sweep has gone
    while live_processes_in_group(sweep.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_processes_in_group(sweep.pid) == []
    assert [path.name for path in out.rglob("*.tmp")] == []
    return took


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_ctrl_c_and_sigterm_stop_a_sweep_within_seconds_and_it_resumes(tmp_path):
    """Slow (about a minute: three sweeps of two real runs, each starting two workers)."""
    out = tmp_path / "out"
    args = ["sweep", str(write_config(tmp_path)), "--seeds", "0,1", "--workers", "2", "--set", "rounds=60"]
    args += ["--out", str(out), "--quiet"]
    runs = [RunDirectory(out / name) for name in ("s0", "s1")]

    # Ctrl-C in a terminal: SIGINT to the whole process group, workers included, mid-run
    sweep = start_sweep(args)
    wait_for(lambda: all(run.checkpoint.exists() for run in runs), sweep, "both runs checkpointed")
    took_sigint = stop_and_check(sweep, out, signal.SIGINT, group=True)
    assert {name: run["status"] for name, run in read_manifest(out).items()} == {
        "s0": "interrupted",
        "s1": "interrupted",
    }
    assert not any(run.summary.exists() for run in runs)

    # SIGTERM to the sweep's main process alone, after it resumed both runs
    checkpointed = [run.checkpoint.stat().st_mtime_ns for run in runs]
    sweep = start_sweep(args)
    wait_for(
        lambda: all(run.checkpoint.stat().st_mtime_ns != before for run, before in zip(runs, checkpointed)),
        sweep,
        "both runs resumed",
    )
    took_sigterm = stop_and_check(sweep, out, signal.SIGTERM, group=False)
    print(f"stopped in {took_sigint:.2f} s (SIGINT to the group), {took_sigterm:.2f} s (SIGTERM to the sweep)")

    # the same command again finishes both, each from its checkpoint
    assert main(args) == 0
    manifest = read_manifest(out)
    assert {name: run["status"] for name, run in manifest.items()} == {"s0": "resumed", "s1": "resumed"}
    for run in runs:
        assert json.loads(run.summary.read_text())["rounds_completed"] == 60
        rounds = [round_ for round_, _value in global_curve(run.path, "accuracy")]
        assert rounds == list(range(61))  # every round once: nothing lost, nothing repeated
    assert [path.name for path in out.rglob("*.tmp")] == []


def _stubborn_worker(ready) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(60)


@pytest.mark.skipif(sys.platform != "linux", reason="forks a worker")
def test_a_worker_that_does_not_stop_is_killed_after_the_grace_period(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_processes, "GRACE_S", 0.5)
    context = multiprocessing.get_context("fork")
    ready, (receiver, sender) = context.Event(), context.Pipe(duplex=False)
    process = context.Process(target=_stubborn_worker, args=(ready,))
    process.start()
    sender.close()
    assert ready.wait(30)
    worker = sweep_processes._Worker(RunTask("s0", str(tmp_path), None, False), process, receiver)
    started = time.monotonic()
    with StopSignals() as stop:
        [stopped] = sweep_processes._stop_workers([worker], stop)
    assert 0.5 <= time.monotonic() - started < 5
    assert not process.is_alive() and process.exitcode == -signal.SIGKILL
    assert stopped.outcome.status == "interrupted"


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    (tmp_path / "client_state").mkdir(parents=True)
    leftovers = [tmp_path / ".metrics.csv.abc123.tmp", tmp_path / "client_state" / ".3.npz.x_y.tmp"]
    kept = [tmp_path / "metrics.csv", tmp_path / "notes.tmp", tmp_path / ".fedsim.lock"]
    for path in leftovers + kept:
        path.write_text("x")
    remove_temporary_files(tmp_path)
    assert [path.exists() for path in leftovers] == [False, False]
    assert all(path.exists() for path in kept)


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
    config = write_config(tmp_path, '\n[sweep.grid]\nstrategy.name = ["fedavg", "fedbn"]\n')
    assert [run.name for run in plan_runs(make_spec(config, [], None, []))] == ["fedavg-s0", "fedbn-s0"]


# --- --grid against the file's grid: a run's name is what it ran -----------------------------


def grid_values_of(config: dict, values: dict) -> dict:
    """The grid keys' values as the run's config.toml resolved them (a table value: the
    keys it sets)."""
    resolved = {}
    for key, value in values.items():
        section = config
        for part in key.split("."):
            section = section[part]
        resolved[key] = {sub: section[sub] for sub in value} if isinstance(value, dict) else section
    return resolved


def check_names_match_what_ran(out: Path) -> dict[str, str]:
    """Every run's name, rebuilt from its config.toml, is its folder's name; its
    summary.json agrees. Returns each run's strategy."""
    strategies = {}
    for name, run in read_manifest(out).items():
        config = tomllib.loads((out / name / "config.toml").read_text())
        summary = json.loads((out / name / "summary.json").read_text())
        ran = grid_values_of(config, run["values"])
        assert ran == run["values"]
        assert run_name(ran, config["seed"]) == name
        assert summary["strategy"] == config["strategy"]["name"] and summary["seed"] == config["seed"] == run["seed"]
        strategies[name] = summary["strategy"]
    return strategies


def test_grid_strategy_name_replaces_the_files_strategy_tables(tmp_path):
    """The sweep command a new user types, with tiny runs: 2 strategies, not 4 x 2. Slow-ish
    (10-25 s: two workers start; FedBN needs the file's BatchNorm CNN, not the MLP)."""
    out = tmp_path / "out"
    tiny = ["rounds=1", "dataset.name=digits", "partition.name=iid", "partition.num_clients=2"]
    args = ["sweep", str(CROSS_SILO), "--grid", "strategy.name=fedavg,fedbn", "--seeds", "0", "--workers", "2"]
    assert main([*args, *(f"--set={option}" for option in tiny), "--out", str(out), "--quiet"]) == 0
    assert check_names_match_what_ran(out) == {"fedavg-s0": "fedavg", "fedbn-s0": "fedbn"}

    # every seed of the file, planned: each run's experiment is its name's
    runs = plan_runs(make_spec(CROSS_SILO, ["strategy.name=fedavg,fedbn"], None, []))
    assert [run.name for run in runs] == ["fedavg-s0", "fedavg-s1", "fedavg-s2", "fedbn-s0", "fedbn-s1", "fedbn-s2"]
    for run in runs:
        assert run.name == f"{run.experiment.strategy.name}-s{run.experiment.seed}"
        assert "proximal_mu" not in run.experiment.strategy.params  # nothing left of the file's FedProx table


def test_a_quickstart_grid_names_what_each_run_ran(tmp_path):
    """Slow-ish (10-20 s: two tiny runs on two workers)."""
    out = tmp_path / "out"
    tiny = ["rounds=1", "dataset.name=digits", "model.name=mlp", "partition.num_clients=2", "partition.min_size=1"]
    grid = ["--grid", 'strategy={name="fedavg"},{name="fedprox",proximal_mu=0.1}', "--grid", "partition.alpha=1.0"]
    args = ["sweep", str(QUICKSTART), *grid, "--workers", "2", *(f"--set={option}" for option in tiny)]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert check_names_match_what_ran(out) == {
        "fedavg-alpha1.0-s0": "fedavg",
        "fedprox-proximal_mu0.1-alpha1.0-s0": "fedprox",
    }


NESTED = '\n[sweep.grid]\nstrategy.name = ["fedavg", "fedprox"]\nclient.lr = [0.1, 0.2]\n'


def test_grid_keys_replace_the_file_keys_they_overlap(tmp_path):
    config = write_config(tmp_path, NESTED)
    # a whole table replaces the file's keys inside it, in the file key's place
    runs = plan_runs(make_spec(config, ['strategy={name="fedprox",proximal_mu=0.5}'], None, []))
    assert [run.name for run in runs] == ["fedprox-proximal_mu0.5-lr0.1-s0", "fedprox-proximal_mu0.5-lr0.2-s0"]
    # the same key
    runs = plan_runs(make_spec(config, ["strategy.name=fedavg"], None, []))
    assert [run.name for run in runs] == ["fedavg-lr0.1-s0", "fedavg-lr0.2-s0"]
    # a key inside a table the file varies whole: the tables go
    tables = write_config(tmp_path, '\n[sweep]\ngrid = { "client" = [{ lr = 0.1 }, { lr = 0.2 }] }\n')
    runs = plan_runs(make_spec(tables, ["client.lr=0.3,0.4"], None, []))
    assert [(run.name, run.experiment.client.lr) for run in runs] == [("lr0.3-s0", 0.3), ("lr0.4-s0", 0.4)]


@pytest.mark.parametrize(
    ("config", "grid", "overrides", "message"),
    [
        # FedProx's proximal_mu alone would drop the file's choice of strategies: which to run?
        (
            CROSS_SILO,
            ["strategy.proximal_mu=0.1,1.0"],
            [],
            "--grid strategy.proximal_mu would replace the experiment file's [sweep] grid 'strategy', whose tables "
            'also set name; give whole tables, e.g. --grid \'strategy={ "name" = "fedprox", "proximal_mu" = 0.1 },'
            '{ "name" = "fedprox", "proximal_mu" = 1.0 }\', or fix strategy.name with --set',
        ),
        (
            QUICKSTART,
            ["strategy.name=fedavg,fedprox", 'strategy={name="fedprox",proximal_mu=0.1}'],
            [],
            "--grid strategy.name and --grid strategy overlap (both vary strategy.name); vary it in one --grid, "
            'e.g. --grid \'strategy={ "name" = "fedavg", "proximal_mu" = 0.1 },{ "name" = "fedprox", "proximal_mu" = 0.1 }\'',
        ),
    ],
)
def test_grid_keys_that_cannot_replace_unambiguously_are_one_line(config, grid, overrides, message):
    with pytest.raises(UserError) as raised:
        make_spec(config, grid, None, overrides)
    assert str(raised.value) == message


def test_the_suggested_ways_around_an_ambiguous_grid_run(tmp_path):
    runs = plan_runs(make_spec(CROSS_SILO, ["strategy.proximal_mu=0.1,1.0"], "0", ["strategy.name=fedprox"]))
    assert [run.name for run in runs] == ["proximal_mu0.1-s0", "proximal_mu1.0-s0"]
    assert {run.experiment.strategy.name for run in runs} == {"fedprox"}
    grid = ['strategy={name="fedprox",proximal_mu=0.1},{name="fedprox",proximal_mu=1.0}']
    runs = plan_runs(make_spec(CROSS_SILO, grid, "0", []))
    assert [run.name for run in runs] == ["fedprox-proximal_mu0.1-s0", "fedprox-proximal_mu1.0-s0"]


def test_a_file_grid_with_overlapping_keys_is_one_line(tmp_path):
    config = write_config(
        tmp_path, '\n[sweep]\ngrid = { "strategy" = [{ name = "fedprox" }], "strategy.name" = ["fedavg"] }\n'
    )
    with pytest.raises(UserError, match=r"grid: 'strategy' and 'strategy.name' overlap \(both vary strategy.name\)"):
        make_spec(config, [], None, [])
    twice = write_config(tmp_path, '\n[sweep]\ngrid = { "strategy.name" = ["fedavg"], strategy = { name = ["x"] } }\n')
    with pytest.raises(UserError, match="lists 'strategy.name' twice"):
        make_spec(twice, [], None, [])


def test_a_run_that_did_not_resolve_its_grid_values_is_refused(tmp_path):
    experiment = load_experiment(write_config(tmp_path))
    check_resolved({"client.lr": 0.1, "strategy": {"name": "fedavg"}}, experiment)
    with pytest.raises(UserError, match=r"strategy.name = \"fedbn\" in the grid, but the experiment resolved it to"):
        check_resolved({"client.lr": 0.1, "strategy": {"name": "fedbn"}}, experiment)


def test_an_inline_table_in_the_grid_matches_its_resolved_table_with_defaults_filled_in(tmp_path):
    experiment = load_experiment(
        write_config(tmp_path), ["strategy.defence=krum", "strategy.defence_options={num_malicious_nodes=0}"]
    )
    assert experiment.strategy.params["defence_options"]["include_statistics"] is False, "a default, filled in"
    check_resolved({"strategy": {"defence_options": {"num_malicious_nodes": 0}}}, experiment)
    with pytest.raises(UserError, match=r"in the grid, but the experiment resolved it to"):
        check_resolved({"strategy": {"defence_options": {"num_malicious_nodes": 1}}}, experiment)


def test_a_spec_whose_keys_overlap_is_refused_before_anything_runs(tmp_path):
    spec = SweepSpec(write_config(tmp_path), {"strategy": [{"name": "fedbn"}], "strategy.name": ["fedavg"]}, None)
    with pytest.raises(UserError, match="overlap"):
        plan_runs(spec)


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
