"""10,000 registered clients, 1% of them sampled per round, on both of fedsim's engines:
the driver keeps no per-client model and only a few bytes per registered client."""

from __future__ import annotations

import tracemalloc

import pandas as pd
import pytest

from fedsim.build import load_experiment
from fedsim.engine import InProcessEngine
from fedsim.runner import run_experiment
from fedsim.serverapp import Federation
from fedsim.worker import worker_for

from .conftest import QUICKSTART

CLIENTS = 10_000
SCALE = [
    "name=scale",
    "dataset.name=synthetic",
    f"dataset.num_devices={CLIENTS}",
    "dataset.size_distribution=equal",
    "dataset.samples_per_device=12",
    "partition.name=natural",
    f"partition.num_clients={CLIENTS}",
    "model.name=mlp",
    "model.hidden=[16]",
    "strategy.fraction_train=0.01",
    "strategy.fraction_evaluate=0.01",
    "rounds=2",
    "client.lr=0.1",
]
# The grid numbers its nodes and computes node -> client, so nothing is kept per registered
# client: what the driver allocates is the sampled clients' messages and replies.
BYTES_PER_CLIENT = 30


def test_ten_thousand_clients_in_process_with_bounded_driver_memory(tmp_path, monkeypatch):
    import torch._dynamo  # noqa: F401  (imported by the worker; slow to import under tracemalloc)

    experiment = load_experiment(QUICKSTART, SCALE)
    engine_memory = []
    play_round = Federation.play_round
    execute = InProcessEngine.execute

    def traced(self, *args):
        tracemalloc.start()  # from the engine's start: the grid and the server loop's structures
        try:
            execute(self, *args)
        finally:
            tracemalloc.stop()

    def measured(self, server_round, strategy, arrays, grid, started):
        arrays = play_round(self, server_round, strategy, arrays, grid, started)
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*/fedsim/engine/*"), tracemalloc.Filter(True, "*/fedsim/serverapp.py")]
        )
        engine_memory.append(sum(stat.size for stat in snapshot.statistics("filename")))
        return arrays

    monkeypatch.setattr(Federation, "play_round", measured)
    monkeypatch.setattr(InProcessEngine, "execute", traced)
    summary = run_experiment(experiment, tmp_path / "run").summary
    assert summary["num_clients"] == CLIENTS and summary["rounds_completed"] == 2
    assert 0 <= summary["accuracy"] <= 1

    metrics = pd.read_csv(tmp_path / "run/metrics.csv", dtype={"id": str})
    trained = metrics[(metrics.scope == "client") & (metrics.metric == "train_loss")]
    assert trained.groupby("round").id.count().tolist() == [100, 100], "1% of 10,000 clients per round"
    # What the driver keeps for the registered clients, grid and server loop together
    assert len(engine_memory) == 2
    assert max(engine_memory) < BYTES_PER_CLIENT * CLIENTS, f"{max(engine_memory) / CLIENTS:.0f} bytes per client"
    # ... and data views only for the clients that ran, one model for all of them
    worker = worker_for_run(experiment, tmp_path / "run")
    visited = set(metrics[metrics.scope == "client"].id.astype(int))
    assert set(worker.cached_clients()) <= visited and len(visited) <= 400


def worker_for_run(experiment, path):
    from fedsim.environment import RunEnvironment

    return worker_for(RunEnvironment(experiment, path.resolve(), "auto", 1))


@pytest.mark.ray
@pytest.mark.slow  # CI: the in-process form; Ray's bits are checked in test_engines
def test_ten_thousand_clients_on_ray_match_in_process(tmp_path):
    local = load_experiment(QUICKSTART, [*SCALE, "rounds=1"])
    on_ray = load_experiment(QUICKSTART, [*SCALE, "rounds=1", "engine.name=ray", "engine.num_workers=2"])
    run_experiment(local, tmp_path / "local")
    run_experiment(on_ray, tmp_path / "ray")
    assert (tmp_path / "ray/metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()
