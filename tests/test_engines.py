"""The engines: workers that reuse one model and share the server's arrays give the same
bits as a fresh model and a private copy of every message; the Ray engine's pool reports
a failing client, replaces a dead worker, and agrees with the other engines."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedsim.cli import main
from fedsim.engine import tasks as engine_tasks
from fedsim.engine.tasks import NODE_ID_OFFSET, SharedArrays, pack, run_tasks
from fedsim.runner import run_experiment
from fedsim.worker import Worker

from .conftest import QUICKSTART, tiny_experiment
from .test_custom_strategy import BROKEN

STRATEGY_CASES = {
    "fedavg": [],
    "fedprox": ["strategy.name=fedprox", "strategy.proximal_mu=0.1"],
    # clients first sampled in later rounds start from fresh BatchNorm layers
    "fedbn": ["strategy.name=fedbn", "model.name=digitcnn", "strategy.fraction_train=0.5"],
    "fedwon": ["strategy.name=fedwon", "model.name=digitcnn"],
}


@pytest.mark.parametrize("case", STRATEGY_CASES)
def test_a_reused_model_and_shared_arrays_give_the_same_bits(case, tmp_path, monkeypatch):
    """The worker path against the engine before workers: a new model for every message
    and a deep copy of every message."""
    experiment = tiny_experiment("rounds=3", *STRATEGY_CASES[case])
    run_experiment(experiment, tmp_path / "worker")

    built = []

    def fresh_model(self):
        built.append(1)
        return self.env.new_model().to(self.device)

    monkeypatch.setattr(Worker, "model", fresh_model)
    monkeypatch.setattr(engine_tasks, "SharedArrays", copy.deepcopy)
    run_experiment(experiment, tmp_path / "fresh")
    assert len(built) > 3 * 4, "the reference run builds a model per message"
    assert (tmp_path / "worker/metrics.csv").read_bytes() == (tmp_path / "fresh/metrics.csv").read_bytes()


def _round_messages(num_clients: int) -> tuple[ArrayRecord, list[Message]]:
    import numpy as np

    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1, "layers": [1, 2]})})
    messages = [Message(content, NODE_ID_OFFSET + client, "train") for client in range(num_clients)]
    return arrays, messages


def test_a_rounds_arrays_are_packed_once_and_delivered_read_only():
    arrays, messages = _round_messages(3)
    shared, tasks = pack(messages, num_clients=3)
    assert shared == [arrays] and shared[0] is arrays, "one ArrayRecord, however many clients read it"
    assert [task.client for task in tasks] == [0, 1, 2]
    seen = []

    def client_app(message, context):
        received = message.content["arrays"]
        assert isinstance(received, SharedArrays)
        with pytest.raises(TypeError, match="read-only"):
            received["w"] = Array(received["w"].numpy() * 2)
        with pytest.raises(TypeError, match="read-only"):
            del received["w"]
        message.content["config"]["lr"] = 99.0  # a client's own copy
        message.content["config"]["layers"].append(3)
        seen.append((context.node_config["partition-id"], received.to_torch_state_dict()["w"].tolist()))
        return Message(RecordDict(), reply_to=message)

    results = run_tasks(client_app, shared, tasks)
    assert [client for client, _ in seen] == [0, 1, 2]
    assert all(values == [0, 1, 2, 3, 4, 5] for _, values in seen)
    assert messages[0].content["config"]["lr"] == 0.1 and messages[0].content["config"]["layers"] == [1, 2]
    assert all(not result.reply.has_error() for result in results)


def test_a_client_exception_becomes_an_error_reply_and_the_next_client_still_runs():
    _, messages = _round_messages(2)
    shared, tasks = pack(messages, num_clients=2)

    def client_app(message, context):
        if context.node_config["partition-id"] == 0:
            raise RuntimeError("boom")
        context.state["seen"] = ConfigRecord({"times": 1})
        return Message(RecordDict(), reply_to=message)

    first, second = run_tasks(client_app, shared, tasks)
    assert first.reply.has_error() and "RuntimeError: boom" in first.reply.error.reason
    assert not second.reply.has_error()
    assert first.state is None and second.state["seen"]["times"] == 1, "Context.state comes back only if used"


# -- Ray -------------------------------------------------------------------------------------
CRASHING = '''
import os
from pathlib import Path

from flwr.serverapp.strategy import FedAvg

from fedsim.trainer import ClientTrainer

MARKER = Path({marker!r})


class CrashingTrainer(ClientTrainer):
    """Kills its worker process when client 1 trains: once, or every time."""

    def fit(self, model, data, config, generator, device):
        if config.client == 1 and ({always} or not MARKER.exists()):
            MARKER.touch()
            os._exit(9)
        return super().fit(model, data, config, generator, device)


class Crashing(FedAvg):
    client_trainer = CrashingTrainer
'''


def _write_crashing_strategy(tmp_path, monkeypatch, always: bool) -> str:
    """A strategy module whose client 1 kills its worker; returns its name."""
    name = "crashing_always" if always else "crashing_once"
    (tmp_path / f"{name}.py").write_text(CRASHING.format(marker=str(tmp_path / f"{name}.marker"), always=always))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # Ray's workers import it too
    return name


@pytest.mark.ray
def test_ray_replaces_a_dead_worker_and_retries_its_clients(tmp_path, monkeypatch):
    name = _write_crashing_strategy(tmp_path, monkeypatch, always=False)
    ray_run = tiny_experiment("rounds=2", f"strategy.name={name}:Crashing", "engine.name=ray", "engine.num_workers=2")
    result = run_experiment(ray_run, tmp_path / "ray")
    assert (tmp_path / f"{name}.marker").exists(), "client 1 did kill its worker once"
    assert result.summary["rounds_completed"] == 2
    local = tiny_experiment("rounds=2", f"strategy.name={name}:Crashing")
    run_experiment(local, tmp_path / "local")  # the marker exists: no crash here
    assert (tmp_path / "ray/metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()


@pytest.mark.ray
def test_ray_reports_a_client_that_kills_its_worker_twice(tmp_path, monkeypatch):
    """Its reply is an error, counted as a dead worker; the round goes on without it."""
    name = _write_crashing_strategy(tmp_path, monkeypatch, always=True)
    experiment = tiny_experiment(
        "rounds=1", f"strategy.name={name}:Crashing", "engine.name=ray", "engine.num_workers=2"
    )
    summary = run_experiment(experiment, tmp_path / "run").summary
    assert summary["faults"] == {"worker_died": 1}
    metrics = pd.read_csv(tmp_path / "run/metrics.csv", dtype={"id": str})
    trained = metrics[(metrics.scope == "client") & (metrics.metric == "train_loss")]
    assert sorted(trained.id) == ["0", "2", "3"]


@pytest.mark.ray
def test_a_client_exception_inside_a_ray_worker_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_on_ray.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    args = ["run", str(QUICKSTART), "--quiet", "--out", str(tmp_path / "run")]
    overrides = ["strategy.name=broken_on_ray:Broken", "dataset.name=digits", "model.name=mlp", "rounds=1"]
    for override in [*overrides, "engine.name=ray", "engine.num_workers=2"]:
        args += ["--set", override]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "failed in round 1 (train): RuntimeError: exploded on purpose" in err


@pytest.mark.ray
def test_a_strategy_the_ray_workers_cannot_import_is_one_line(tmp_path, monkeypatch, capsys):
    """On the driver's path but not the workers' (neither the current folder nor
    PYTHONPATH): a one-line error, exit code 2."""
    (tmp_path / "driver_only.py").write_text("from flwr.serverapp.strategy import FedAvg as Mine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["run", str(QUICKSTART), "--quiet", "--out", str(tmp_path / "run")]
    for override in ["strategy.name=driver_only:Mine", "dataset.name=digits", "model.name=mlp", "rounds=1"]:
        args += ["--set", override]
    assert main([*args, "--set", "engine.name=ray", "--set", "engine.num_workers=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot import module 'driver_only'" in err


@pytest.mark.ray
def test_the_three_engines_agree_to_the_bit(tmp_path):
    """One torch thread per client on every engine: identical metrics."""
    runs = {
        "inprocess": [],
        "ray": ["engine.name=ray", "engine.num_workers=2", "strategy.fraction_train=0.75"],
        "flower": ["engine.name=flower"],
    }
    outputs = {}
    for engine, overrides in runs.items():
        overrides = [o for o in overrides if not o.startswith("strategy.")]
        experiment = tiny_experiment("strategy.fraction_train=0.75", "rounds=2", *overrides)
        summary = run_experiment(experiment, tmp_path / engine).summary
        assert summary["engine"] == engine
        outputs[engine] = (tmp_path / engine / "metrics.csv").read_bytes()
    assert outputs["ray"] == outputs["inprocess"] == outputs["flower"]
    assert json.loads((tmp_path / "ray/summary.json").read_text())["rounds_time_s"] > 0


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["engine.name=ray", "engine.num_workers=0"], "[engine] num_workers = 0 is invalid"),
        (["engine.name=ray", "engine.num_gpus=1.5"], "num_gpus = 1.5 is invalid"),
        (["engine.name=ray", "engine.device=cpu", "engine.num_gpus=0.5"], "device = 'cpu'"),
        (
            ["engine.name=inprocess", "engine.num_gpus=0.5"],
            "'num_gpus' is not an option of engine 'inprocess' but of 'ray', 'flower'; set [engine] name = 'ray'",
        ),
        (
            ["engine.name=ray", "engine.address=nowhere"],
            "address = 'nowhere' is invalid: use 'auto', 'host:port' or 'ray://host:port'",
        ),
    ],
)
def test_engine_options_are_checked(overrides, words, capsys):
    args = ["run", str(QUICKSTART), "--quiet"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_an_address_where_no_cluster_listens_fails_at_once(tmp_path, capsys):
    """Ray itself retries such an address for minutes."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        args = ["run", str(QUICKSTART), "--quiet", "--out", str(tmp_path / "run"), "--overwrite"]
        assert main([*args, "--set", "engine.name=ray", "--set", f"engine.address={address!r}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"address = '{address}': no Ray cluster answers there" in err


@pytest.mark.ray
@pytest.mark.parametrize("join", ["head", pytest.param("client", marks=pytest.mark.slow)])
def test_the_ray_engine_joins_a_running_cluster(join, tmp_path):
    """`ray start --head` first, then the head's address or `"ray://127.0.0.1:PORT"` (Ray
    Client: the slow form, its own server takes seconds to start) runs on it, and leaves
    it running."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    head_port, client_port = ports
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable))
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    start = [
        ray_cli,
        "start",
        "--head",
        "--num-cpus=2",
        f"--port={head_port}",
        f"--ray-client-server-port={client_port}",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, capture_output=True, env=env)
    try:
        reference = tiny_experiment("rounds=1")
        run_experiment(reference, tmp_path / "local")
        address = {"head": f"127.0.0.1:{head_port}", "client": f"ray://127.0.0.1:{client_port}"}[join]
        experiment = tiny_experiment("rounds=1", "engine.name=ray", f"engine.address={address!r}")
        run_experiment(experiment, tmp_path / join)
        assert (tmp_path / join / "metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()
        status = subprocess.run(
            [ray_cli, "status", f"--address=127.0.0.1:{head_port}"], capture_output=True, text=True, env=env
        )
        assert status.returncode == 0, "the cluster is still up after the runs"
    finally:
        _stop_processes_mentioning(temp_dir)  # this cluster only; `ray stop` ends every one
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_processes_mentioning(text: str) -> None:
    import os
    import signal
    import time
    from pathlib import Path

    def matching() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if text.encode() in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in matching():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while matching() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.mark.ray
def test_a_failed_ray_client_connection_leaves_ray_usable(monkeypatch):
    """ray.init("ray://...") puts the process in Ray Client mode before it connects; after a
    failed connection fedsim leaves that mode, so the next ray.init starts a local Ray (one
    failed join once made every later Ray test of a CI run fail)."""
    import socket
    import threading

    import ray._private.client_mode_hook as client_mode
    import ray.util.client.worker as client_worker

    from fedsim.engine.ray import connect
    from fedsim.errors import UserError

    monkeypatch.setattr(client_worker, "INITIAL_TIMEOUT_SEC", 1)
    monkeypatch.setattr(client_worker, "MAX_TIMEOUT_SEC", 2)
    server = socket.socket()  # a port that accepts connections but speaks no Ray
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def hang_up():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        with pytest.raises(UserError, match="no Ray cluster there"):
            connect(f"ray://127.0.0.1:{server.getsockname()[1]}")
    finally:
        server.close()
    assert not client_mode.is_client_mode_enabled, "the process was left in Ray Client mode"
    assert not client_mode.client_mode_should_convert()


@pytest.mark.parametrize(
    "failure",
    [
        "The current node timed out during startup. This could happen ...",
        "Timed out waiting for file <session folder>/gcs_server_port_d7ded0393dae",  # a GCS that never ran
    ],
)
def test_a_local_ray_node_that_starts_too_slowly_is_stopped_and_started_again(monkeypatch, capsys, failure):
    """Ray waits a fixed 30 s for a new local node, and for its GCS to write its port; on a
    busy machine, or with a GCS process stuck before it ran, it gives up (this failed CI and
    full test runs). fedsim stops the half-started node and tries again."""
    import ray
    from ray._private.node import Node

    from fedsim.engine import ray as ray_engine

    killed = []

    class SlowNode(Node):
        def __init__(self):  # Ray's Node.__init__ raises like this after starting processes
            raise Exception(failure)

        def kill_all_processes(self, check_alive=True, allow_graceful=False, wait=False):
            killed.append((check_alive, wait))

    attempts = []

    def init(**options):
        attempts.append(options)
        if len(attempts) == 1:
            SlowNode()

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    assert ray_engine.connect(None) is True
    assert len(attempts) == 2 and killed == [(False, True)]
    assert "did not start within Ray's wait" in capsys.readouterr().err

    attempts.clear()
    monkeypatch.setattr(ray, "init", lambda **options: (attempts.append(options), SlowNode()))
    with pytest.raises(Exception, match="[Tt]imed out"):
        ray_engine.connect(None)
    assert len(attempts) == ray_engine.LOCAL_START_ATTEMPTS


def test_only_a_local_start_is_retried(monkeypatch):
    import ray

    from fedsim.engine import ray as ray_engine

    attempts = []

    def init(**options):
        attempts.append(options)
        raise RuntimeError("something else went wrong")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(RuntimeError, match="something else"):
        ray_engine.connect(None)
    assert len(attempts) == 1
