"""The Ray engine on a cluster of several nodes (Ray's own ``cluster_utils.Cluster``, all on
this machine, each node with its own CPU): the workers spread over the nodes and give the
in-process engine's bits; a node that leaves mid-round has its clients run again on the
surviving nodes, with the same result, and a cluster that loses every worker stops the run
with one line, after which it resumes to the same result."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

from fedsim import checkpoint as checkpoints
from fedsim.cli import main
from fedsim.engine import ray as ray_engine
from fedsim.runner import run_experiment

from .conftest import QUICKSTART, tiny_experiment, tiny_overrides

pytestmark = pytest.mark.ray

PAUSING = '''
import os
import time
from pathlib import Path

from flwr.serverapp.strategy import FedAvg

from fedsim.trainer import ClientTrainer

CONTROL = Path({control!r})


class PausingTrainer(ClientTrainer):
    """With CONTROL/armed present, every client of round {round} first leaves a mark
    (started-<pid>-<client>) and then waits for CONTROL/go: the test sees every worker busy
    in that round before it removes nodes. Waiting changes no result."""

    def fit(self, model, data, config, generator, device):
        if config.server_round == {round} and (CONTROL / "armed").exists():
            (CONTROL / f"started-{{os.getpid()}}-{{config.client}}").touch()
            for _ in range(6000):
                if (CONTROL / "go").exists():
                    break
                time.sleep(0.05)
        return super().fit(model, data, config, generator, device)


class Pausing(FedAvg):
    client_trainer = PausingTrainer
'''
PAUSE_ROUND = 2
WORKER_NODES = 2  # the head holds no CPU: every worker runs on a node that can be removed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The pausing strategy on the driver's and the workers' path, the in-process run of the
    experiment (the reference) and a cluster whose head has no CPU."""
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("cluster")
    control = root / "control"
    control.mkdir()
    (root / "pausing_cluster.py").write_text(PAUSING.format(control=str(control), round=PAUSE_ROUND))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        patch.setenv("PYTHONPATH", str(root))  # Ray's workers import it too
        patch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        reference = root / "inprocess"
        run_experiment(_experiment(), reference)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            yield cluster, control, reference
        finally:
            cluster.shutdown()
            sys.modules.pop("pausing_cluster", None)


@pytest.fixture
def cluster_setup(setup):
    """The module's cluster with WORKER_NODES nodes of one CPU each (nodes a test removed
    are added again), and the pause disarmed."""
    cluster, control, reference = setup
    while len(cluster.worker_nodes) < WORKER_NODES:
        cluster.add_node(num_cpus=1)
    for entry in control.iterdir():
        entry.unlink()
    return cluster, control, reference


def _overrides(*more: str) -> list[str]:
    return tiny_overrides("rounds=2", "strategy.name=pausing_cluster:Pausing", *more)


def _experiment(*more: str):
    return tiny_experiment("rounds=2", "strategy.name=pausing_cluster:Pausing", *more)


def _on_cluster(cluster) -> list[str]:
    return ["engine.name=ray", f"engine.address={cluster.address!r}", f"engine.num_workers={WORKER_NODES}"]


def _pools(monkeypatch) -> list[dict]:
    """Each WorkerPool's workers as the pool started them and as they were at its end:
    ``{"start": [(pid, node id), ...], "end": [...]}``."""
    seen: list[dict] = []
    start, shutdown = ray_engine.WorkerPool.__init__, ray_engine.WorkerPool.shutdown

    def recording_start(self, *args, **kwargs):
        start(self, *args, **kwargs)
        seen.append({"start": list(zip(self.pids, self.nodes, strict=True))})

    def recording_shutdown(self):
        seen[-1]["end"] = list(zip(self.pids, self.nodes, strict=True))
        shutdown(self)

    monkeypatch.setattr(ray_engine.WorkerPool, "__init__", recording_start)
    monkeypatch.setattr(ray_engine.WorkerPool, "shutdown", recording_shutdown)
    return seen


def _assert_same_results(run, reference) -> None:
    """metrics.csv byte for byte, and the final checkpoint's model and round (the file itself
    also records the experiment's fingerprint, which names the engine, and timings)."""
    assert (run / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    ours, theirs = checkpoints.load(run / "checkpoint.npz"), checkpoints.load(reference / "checkpoint.npz")
    assert ours.round == theirs.round == 2
    assert list(ours.arrays.keys()) == list(theirs.arrays.keys())
    for key in ours.arrays.keys():
        assert np.asarray(ours.arrays[key].numpy()).tobytes() == np.asarray(theirs.arrays[key].numpy()).tobytes()


def _remove_nodes_mid_round(cluster, control, nodes, workers: int) -> threading.Thread:
    """Arm the pause; in a thread, once ``workers`` distinct worker processes are inside round
    PAUSE_ROUND's training, remove ``nodes`` and let the paused clients go on."""
    (control / "armed").touch()
    seen: list[set[str]] = []

    def remove():
        busy: set[str] = set()
        for _ in range(3000):  # a bound, so that a broken run cannot hang this thread
            busy = {entry.name.split("-")[1] for entry in control.glob("started-*")}
            if len(busy) >= workers:
                break
            time.sleep(0.1)
        seen.append(busy)
        for node in nodes:
            cluster.remove_node(node)
        (control / "go").touch()

    thread = threading.Thread(target=remove, daemon=True)
    thread.start()
    thread.busy = seen  # type: ignore[attr-defined]
    return thread


def test_the_workers_spread_over_the_nodes_and_give_the_in_process_bits(cluster_setup, tmp_path, monkeypatch):
    cluster, _, reference = cluster_setup
    pools = _pools(monkeypatch)
    summary = run_experiment(_experiment(*_on_cluster(cluster)), tmp_path / "ray").summary
    assert summary["engine"] == "ray" and summary["rounds_completed"] == 2
    [pool] = pools
    nodes = {node for _, node in pool["start"]}
    assert nodes == {node.node_id for node in cluster.worker_nodes}, "one worker on each node, none on the head"
    assert pool["end"] == pool["start"], "no worker was replaced"
    _assert_same_results(tmp_path / "ray", reference)


@pytest.mark.parametrize("view", ["current", "late"])
def test_a_node_lost_mid_round_has_its_clients_run_on_the_survivor(view, cluster_setup, tmp_path, monkeypatch):
    """``late``: the pool's first look at the cluster after the loss still counts the lost
    node's CPU (as when a worker dies on a leaving node before the cluster counts the node
    gone), so the pool starts a replacement that cannot be placed, and must give it up."""
    cluster, control, reference = cluster_setup
    pools = _pools(monkeypatch)
    looks = []
    if view == "late":
        capacity = ray_engine.WorkerPool.capacity

        def late_capacity(self):
            looks.append(capacity(self))
            return looks[-1] + (len(looks) == 1)

        monkeypatch.setattr(ray_engine.WorkerPool, "capacity", late_capacity)
    doomed = next(iter(cluster.worker_nodes))
    thread = _remove_nodes_mid_round(cluster, control, [doomed], workers=WORKER_NODES)
    summary = run_experiment(_experiment(*_on_cluster(cluster)), tmp_path / "ray").summary
    thread.join()
    [pool] = pools
    lost = [pid for pid, node in pool["start"] if node == doomed.node_id]
    assert len(lost) == 1 and str(lost[0]) in thread.busy[0], "the lost node's worker was inside the round"
    assert [node for _, node in pool["end"]] == [node.node_id for node in cluster.worker_nodes], (
        "the pool shrank to the surviving node's worker"
    )
    assert summary["rounds_completed"] == 2 and not summary.get("faults"), "no client counted as failed"
    if view == "late":
        assert looks[0] == 1 and len(looks) >= 2, "a replacement was started, then given up"
    _assert_same_results(tmp_path / "ray", reference)


def test_losing_every_worker_stops_the_run_in_one_line_and_it_resumes(cluster_setup, tmp_path, capsys):
    cluster, control, reference = cluster_setup
    thread = _remove_nodes_mid_round(cluster, control, list(cluster.worker_nodes), workers=WORKER_NODES)
    args = ["run", str(QUICKSTART), "--quiet", "--out", str(tmp_path / "ray")]
    for override in _overrides(*_on_cluster(cluster)):
        args += ["--set", override]
    assert main(args) == 1
    thread.join()
    assert len(thread.busy[0]) == WORKER_NODES, "both workers were inside the round"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every Ray worker was lost with its node" in err
    assert checkpoints.load(tmp_path / "ray/checkpoint.npz").round == PAUSE_ROUND - 1

    for entry in control.iterdir():
        entry.unlink()
    for _ in range(WORKER_NODES):
        cluster.add_node(num_cpus=1)
    assert main(args) == 0
    _assert_same_results(tmp_path / "ray", reference)
