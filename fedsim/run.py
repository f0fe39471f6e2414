"""Run one experiment end to end: config -> dataset -> partition -> engine -> results."""

from __future__ import annotations

import logging
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch

import fedsim
from fedsim.clientapp import make_client_app
from fedsim.components import check_model, make_engine
from fedsim.config import Experiment
from fedsim.data import load_dataset
from fedsim.environment import RunEnvironment
from fedsim.plots import plot_training
from fedsim.results import RunDirectory
from fedsim.serverapp import Federation
from fedsim.splitting import describe_partition, split_dataset
from partitioners import Partition


@dataclass(frozen=True)
class RunResult:
    path: Path
    summary: dict[str, Any]
    status: str  # "new", "resume" (was resumed) or "finished" (had already finished)


def default_out(experiment: Experiment) -> Path:
    """``runs/<name>-<fingerprint>``: the same experiment always lands in the same folder,
    so running it again resumes or reuses it, and a changed one never overwrites it."""
    return Path("runs") / f"{experiment.name}-{experiment.fingerprint()}"


def quiet_flower(verbose: bool = False) -> None:
    """Flower logs every sampling and aggregation step at INFO, and a client's traceback
    at ERROR; fedsim reports failures itself, so Flower speaks only with ``verbose``."""
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def run_experiment(
    experiment: Experiment,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    verbose: bool = False,
) -> RunResult:
    """Run (or resume) ``experiment`` into its run directory and return its summary.

    ``progress`` shows a progress bar; ``verbose`` lets Flower's own log through.
    """
    started = time.monotonic()
    quiet_flower(verbose)
    run = RunDirectory(out if out is not None else default_out(experiment))
    status = run.status(experiment, overwrite)
    if status == "finished":
        return RunResult(run.path, run.read_summary(), status)

    dataset = load_dataset(experiment.dataset.name, **experiment.dataset.params)
    checkpoint = None
    if status == "resume":
        checkpoint = run.load_checkpoint()
        partition = Partition.load(run.partition)
    else:
        check_model(experiment, dataset.input_shape, dataset.num_classes)  # fails before anything is written
        partition = split_dataset(experiment, dataset)
        run.start(experiment)
        partition.save(run.partition)
        describe_partition(experiment, dataset, partition, run.path, labels_plot="partition.png")
    engine = make_engine(experiment)
    env = RunEnvironment(experiment, run.path.resolve(), engine.device, engine.client_threads)
    client_app = make_client_app(env)

    with round_progress(experiment, enabled=progress, done=checkpoint.round if checkpoint else 0) as on_round:
        federation = Federation(env, run, partition.num_clients, checkpoint, on_round, started)
        engine.execute(federation, client_app, partition.num_clients)

    summary = make_summary(experiment, federation, partition, federation.elapsed())
    plot_training(run.read_metrics(), run.plots / "accuracy.png", f"{experiment.name}: {experiment.strategy.name}")
    run.write_summary(summary)
    return RunResult(run.path, summary, status)


def make_summary(experiment: Experiment, federation: Federation, partition: Partition, wall_time_s: float) -> dict:
    accuracy = _across_clients(federation.client_latest["accuracy"])
    loss = _across_clients(federation.client_latest["loss"])
    summary = {
        "name": experiment.name,
        "fingerprint": experiment.fingerprint(),
        "accuracy": federation.final.get("accuracy"),
        "accuracy_evaluated_on": federation.evaluated_on,
        "loss": federation.final.get("loss"),
        "client_accuracy_mean": float(np.mean(accuracy)) if accuracy else None,
        # Borazjani et al.'s heterogeneity measure: the model's loss on each client's data
        "client_loss_mean": float(np.mean(loss)) if loss else None,
        "client_loss_std": float(np.std(loss)) if loss else None,
        "accuracy_by_domain": federation.accuracy_by_domain or None,
        "rounds_completed": experiment.rounds,
        "seed": experiment.seed,
        "engine": experiment.engine.name,
        "strategy": experiment.strategy.name,
        "dataset": experiment.dataset.name,
        "partition": experiment.partition.name,
        "num_clients": partition.num_clients,
        "wall_time_s": round(wall_time_s, 3),
        "versions": {
            "fedsim": fedsim.__version__,
            "flwr": flwr.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}


def _across_clients(latest: dict[int, float]) -> list[float]:
    """The clients' latest values, in client order so that a resumed run sums exactly as
    an uninterrupted one; clients that reported none are left out."""
    return [latest[client] for client in sorted(latest) if not math.isnan(latest[client])]


@contextmanager
def round_progress(experiment: Experiment, enabled: bool, done: int):
    """A rich progress bar over rounds showing the latest global accuracy."""
    if not enabled:
        yield lambda _round, _metrics: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds  accuracy {task.fields[accuracy]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(experiment.name, total=experiment.rounds, completed=done, accuracy="-")

        def on_round(server_round: int, metrics: dict[str, float]) -> None:
            bar.update(task, completed=server_round, accuracy=f"{metrics.get('accuracy', float('nan')):.4f}")

        yield on_round
