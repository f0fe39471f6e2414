"""fedsim as a Flower App: the run config's mapping onto an experiment (no Flower runtime),
the ClientApp's environment finder, and ``flwr run .`` end to end on Flower's runtime."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import flatten_dict

from fedsim.build import load_experiment
from fedsim.errors import UserError
from fedsim.flower_app import (
    CONTROL_KEYS,
    EnvironmentFinder,
    check_federation_size,
    environment,
    read_run_config,
    run_config_overrides,
)
from fedsim.runner import run_experiment

from .conftest import QUICKSTART, ROOT

SMALL = {"rounds": 1, "dataset.name": "digits", "model.name": "mlp", "partition.num_clients": 2}


def default_run_config() -> dict:
    """``[tool.flwr.app.config]`` as Flower flattens it into ``context.run_config``."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])


def run_config(**overrides) -> dict:
    return {**default_run_config(), **overrides}


# -- the run config -> experiment mapping, without Flower's runtime --------------------


def test_the_default_run_config_is_the_quickstart_on_flowers_runtime():
    flower_run = read_run_config(default_run_config(), ROOT)
    expected = load_experiment(QUICKSTART, ['engine.name="flower"'])
    assert flower_run.experiment == expected
    assert flower_run.out == ROOT / "runs" / "flwr" / f"quickstart-{expected.fingerprint()}"
    assert flower_run.out.is_absolute() and not flower_run.overwrite


def test_run_config_keys_are_set_overrides_on_the_experiment_file(tmp_path):
    config = run_config(
        **{"rounds": 3, "partition.alpha": 0.1, "dataset.name": "digits", "client.lr": 0.1},
        set="model.name=mlp 'model.hidden=[16, 8]'",
        out=str(tmp_path / "here"),
        overwrite=True,
    )
    assert run_config_overrides(config) == [
        "rounds=3",
        "dataset.name=digits",
        "partition.alpha=0.1",
        "client.lr=0.1",
        "model.name=mlp",
        "model.hidden=[16, 8]",
    ]
    flower_run = read_run_config(config, ROOT)
    expected = load_experiment(
        QUICKSTART,
        [*run_config_overrides(config), 'engine.name="flower"'],
    )
    assert flower_run.experiment == expected
    assert expected.rounds == 3 and expected.partition.params["alpha"] == 0.1
    assert tuple(expected.model.params["hidden"]) == (16, 8)
    assert flower_run.out == tmp_path / "here" and flower_run.overwrite
    # a relative path is the app directory's, whatever the working directory
    assert read_run_config(run_config(out="elsewhere/run"), ROOT).out == ROOT / "elsewhere" / "run"
    assert read_run_config(run_config(config=str(QUICKSTART)), tmp_path).experiment.name == "quickstart"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"set": "partition.alhpa=0.1"}, "[partition] unknown key 'alhpa'; did you mean 'alpha'?"),
        ({"client.lr": 0}, "[client] lr = 0 is invalid: Input should be greater than 0"),
        ({"partition.name": "iid", "partition.alpha": 0.1}, "'alpha' is not an option of partition 'iid'"),
        ({"set": "dataset.name.x=1"}, "keys are at most two levels deep"),
        ({"set": "engine.name=ray"}, "under `flwr run` the engine is Flower's runtime"),
        ({"config": "experiments/nope.toml"}, "config = 'experiments/nope.toml': no experiment file"),
        ({"out": 3}, "run config: out = 3 must be a str"),
    ],
)
def test_a_bad_run_config_is_fedsims_one_line_error(overrides, message):
    with pytest.raises(UserError) as error:
        read_run_config(run_config(**overrides), ROOT)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_bad_key_reads_as_it_does_from_fedsim_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError) as from_fedsim_run:
        load_experiment("experiments/quickstart.toml", ["partition.alhpa=0.1"])
    with pytest.raises(UserError) as from_flwr_run:
        read_run_config(run_config(set="partition.alhpa=0.1"), ROOT)
    assert str(from_flwr_run.value) == str(from_fedsim_run.value)


def test_every_run_config_key_is_an_experiment_key():
    experiment_keys = load_experiment(QUICKSTART).to_dict()
    for key in default_run_config():
        if key in CONTROL_KEYS:
            continue
        table, _, name = key.rpartition(".")
        assert (table or name) in experiment_keys, key


def test_a_federation_of_the_wrong_size_says_what_to_change():
    check_federation_size(4, 4)
    with pytest.raises(UserError, match=r'--federation-config "num-supernodes=10", or set partition.num_clients=2$'):
        check_federation_size(2, 10)


def test_the_client_app_finds_the_servers_run_directory_once(tmp_path):
    config = run_config(**SMALL, out=str(tmp_path / "run"))
    finder = EnvironmentFinder(ROOT)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=config)
    env = finder(context)
    assert env == environment(read_run_config(config, ROOT))
    assert env.run_dir == tmp_path / "run" and env.threads == 1 and env.device == "cpu"
    assert finder(context) is env, "cached per process and run config"


# -- flwr run . on Flower's own runtime ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process /proc shows."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def stop_local_superlink(flwr_home: Path) -> list[int]:
    """Stop the local SuperLink that ``flwr run`` started, detached, for ``flwr_home``
    (the only one whose log file is under it), and every process it started.

    Flower 1.42 has no command for this. Its children (SuperExec, the simulation
    process and its Ray cluster) watch their parent and would follow it anyway.
    """
    processes = _processes()
    marker = str(flwr_home / "local-superlink")
    ours = {pid for pid, (_, cmd) in processes.items() if "flower-superlink" in cmd and marker in cmd}
    while True:  # and their descendants
        more = {pid for pid, (parent, _) in processes.items() if parent in ours} - ours
        if not more:
            break
        ours |= more
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in ours):
            time.sleep(0.1)
        if not any(_alive(pid) for pid in ours):
            break
    return sorted(ours)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (former) parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def flwr_env(tmp_path):
    """An environment for the ``flwr`` CLI that touches nothing of the developer's: its own
    FLWR_HOME and ports (so it never finds a SuperLink already running), no runtime
    installation of the app's dependencies, no update check."""
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        # `flwr` starts `flower-superlink`, and that `flwr-simulation`, from the PATH
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    try:
        yield env
    finally:
        stop_local_superlink(home)


def _flwr(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    flwr = Path(sys.executable).with_name("flwr")
    command = [str(flwr) if flwr.exists() else "flwr", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="stopping the detached SuperLink reads /proc")
def test_flwr_run_runs_the_experiment_on_flowers_runtime(tmp_path, flwr_env):
    out = tmp_path / "run"
    settings = " ".join(f"{key}={json.dumps(value)}" for key, value in SMALL.items())
    started = time.monotonic()
    ran = _flwr(
        "run",
        ".",
        "--stream",
        "--run-config",
        f"{settings} out={json.dumps(str(out))}",
        "--federation-config",
        "num-supernodes=2",
        env=flwr_env,
        timeout=300,
    )
    log = ran.stdout + ran.stderr
    took = time.monotonic() - started
    assert ran.returncode == 0, log
    run_id = re.search(r"Successfully started run (\d+)", log)
    assert run_id, log
    listed = _flwr("ls", "--run-id", run_id.group(1), "--format", "json", env=flwr_env, timeout=60)
    (status,) = json.loads(listed.stdout)["runs"]
    assert status["status"] == "finished:completed", (status, log)
    assert "fedsim: round 1/1, accuracy" in log, log

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rounds_completed"], summary["num_clients"], summary["engine"]) == (1, 2, "flower")
    assert 0.0 <= summary["accuracy"] <= 1.0
    metrics = pd.read_csv(out / "metrics.csv", dtype={"id": str})
    clients = metrics[(metrics.scope == "client") & (metrics.metric == "accuracy")]
    assert sorted(clients.id.unique()) == ["0", "1"]
    assert metrics[metrics.scope == "server"]["round"].max() == 1

    # the FAB Flower installed holds the app, not the virtual environment or the runs
    (app_dir,) = (Path(flwr_env["FLWR_HOME"]) / "apps").iterdir()
    packed = [path for path in app_dir.rglob("*") if path.is_file() and not path.is_relative_to(app_dir / "runs")]
    assert (app_dir / "fedsim" / "flower_app.py") in packed
    assert not any(part.startswith(".venv") for path in packed for part in path.relative_to(app_dir).parts)
    assert sum(path.stat().st_size for path in packed) < 2_000_000

    # the same bits as fedsim's own in-process engine (engine tables differ, results do not)
    inprocess = run_experiment(load_experiment(QUICKSTART, [f"{k}={v}" for k, v in SMALL.items()]), tmp_path / "ip")
    assert (inprocess.path / "metrics.csv").read_bytes() == (out / "metrics.csv").read_bytes()
    print(f"flwr run took {took:.1f} s")
