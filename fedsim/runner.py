"""Run one experiment end to end: config -> dataset -> partition -> engine -> results."""

from __future__ import annotations

import math
import platform
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flwr
import torch

import fedsim
from fedsim.build import check_attacks_fit_data, check_model, make_engine, make_observers, make_strategy
from fedsim.checkpoint import Checkpoint
from fedsim.clientapp import make_client_app
from fedsim.config import Experiment
from fedsim.engine.ray import check_reachable
from fedsim.environment import RunEnvironment, experiment_dataset
from fedsim.errors import UserError
from fedsim.flower_log import quiet_flower
from fedsim.lookups import strategy_trainer
from fedsim.observers import run_observers
from fedsim.progress import round_reporter
from fedsim.results import RunDirectory
from fedsim.serverapp import Federation
from fedsim.splitting import describe_partition, split_dataset
from fedsim.state import ClientStateStore
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


@dataclass
class PreparedRun:
    """A run directory ready for the federation: new (config, partition and its figures
    written), or to be resumed from its checkpoint, or already finished."""

    run: RunDirectory
    status: str  # "new", "resume" or "finished"
    partition: Partition | None
    checkpoint: Checkpoint | None
    started: float  # time.monotonic() when the command began


@contextmanager
def open_run(experiment: Experiment, out: str | Path | None = None, *, overwrite: bool = False):
    """Take the run directory (a second command on it fails at once) and prepare it
    (:func:`prepare_run`); it stays taken until the block ends."""
    started = time.monotonic()
    run = RunDirectory(out if out is not None else default_out(experiment))
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"--out {str(run.path)!r} is a file, not a folder")
    with run.locked():
        yield prepare_run(experiment, run, overwrite=overwrite, started=started)


def prepare_run(
    experiment: Experiment, run: RunDirectory, *, overwrite: bool = False, started: float | None = None
) -> PreparedRun:
    """Everything before the first round: the run directory, the data's partition (new, or
    read back with the checkpoint of an interrupted run, whose later client states go). A
    bad model fails here, before anything is written. Call it with the run taken
    (:func:`open_run`)."""
    started = time.monotonic() if started is None else started
    status = run.status(experiment, overwrite)
    if status == "finished":
        return PreparedRun(run, status, None, None, started)
    if status == "resume":
        checkpoint = run.load_checkpoint(experiment)
        ClientStateStore(run.client_state).discard_after(checkpoint.round)
        return PreparedRun(run, status, load_partition(run), checkpoint, started)
    dataset = experiment_dataset(experiment)
    check_model(experiment, dataset.input_shape, dataset.num_classes)
    partition = split_dataset(experiment, dataset)
    if experiment.attack:
        check_attacks_fit_data(experiment, dataset.input_shape, dataset.num_classes, partition.num_clients)
    run.start(experiment)
    ClientStateStore(run.client_state).discard_after(0)  # a new run: this process forgets an earlier one's writes
    partition.save(run.partition)
    describe_partition(experiment, dataset, partition, run.path, labels_plot="partition.png")
    return PreparedRun(run, status, partition, None, started)


def load_partition(run: RunDirectory) -> Partition:
    try:
        return Partition.load(run.partition)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise UserError(f"{run.partition} cannot be read ({reason}); --overwrite starts the run over") from None


def finish_run(experiment: Experiment, prepared: PreparedRun, federation: Federation) -> RunResult:
    """After the last round: the training plot, the observers' ``on_finish``, summary.json."""
    # lazy: matplotlib takes a second to import, paid only when a plot is drawn
    from fedsim.plots import plot_training

    summary = make_summary(experiment, federation, prepared.partition, federation.elapsed())
    run = prepared.run
    partition = federation.partition
    starts = [r for r in range(2, experiment.rounds + 1) if partition.slot_of(r) != partition.slot_of(r - 1)]
    title = f"{experiment.name}: {experiment.strategy.name}"
    metrics = run.read_metrics()
    plot_training(metrics, run.plots / "accuracy.png", title, slot_starts=starts)
    # the observers' last word (a tracker sends the summary and the plots) comes before
    # summary.json, which marks the run finished: if one fails, running again ends it again
    federation.tell("on_finish", summary)
    run.write_summary(summary)
    return RunResult(run.path, summary, prepared.status)


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
    quiet_flower(verbose)
    # before the run directory exists: an engine that cannot start must leave nothing behind
    check_reachable(experiment.engine.params.get("address"), "[engine] address")
    with open_run(experiment, out, overwrite=overwrite) as prepared:
        if prepared.status == "finished":
            return RunResult(prepared.run.path, prepared.run.read_summary(), prepared.status)
        engine = make_engine(experiment)
        env = RunEnvironment(experiment, prepared.run.path.resolve(), engine.device, engine.client_threads)
        done = prepared.checkpoint.round if prepared.checkpoint else 0
        with round_progress(experiment, enabled=progress, done=done) as on_round:
            federation = new_federation(env, prepared, on_round)
            engine.execute(federation, make_client_app(env), env, prepared.partition)
        return finish_run(experiment, prepared, federation)


def new_federation(env: RunEnvironment, prepared: PreparedRun, on_round) -> Federation:
    """The ServerApp main of a prepared run, with the run's observers (the user's from its
    ``[[observer]]`` tables among them) and ``on_round`` as its round callback; the
    experiment's strategy is built when the run starts."""
    experiment, partition = env.experiment, prepared.partition
    observers = run_observers(
        experiment,
        env.dataset(),
        partition,
        prepared.run,
        strategy_trainer(experiment),
        on_round,
        make_observers(experiment),
    )
    return Federation(
        env,
        prepared.run,
        partition,
        lambda: make_strategy(experiment, partition.num_clients, env=env),
        observers,
        prepared.checkpoint,
        prepared.started,
    )


def make_summary(experiment: Experiment, federation: Federation, partition: Partition, wall_time_s: float) -> dict:
    summary = {
        "name": experiment.name,
        "fingerprint": experiment.fingerprint(),
        "accuracy": federation.final.get("accuracy"),
        "accuracy_evaluated_on": federation.evaluated_on,
        "loss": federation.final.get("loss"),
        # the observers': the clients' figures, faults, a drift stream's, the attackers'
        **federation.summary(),
        "rounds_completed": experiment.rounds,
        "seed": experiment.seed,
        "engine": experiment.engine.name,
        "strategy": experiment.strategy.name,
        "dataset": experiment.dataset.name,
        "partition": experiment.partition.name,
        "num_clients": partition.num_clients,
        "wall_time_s": round(wall_time_s, 3),
        "rounds_time_s": round(federation.rounds_time_s, 3),
        "versions": {
            "fedsim": fedsim.__version__,
            "flwr": flwr.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}


@contextmanager
def round_progress(experiment: Experiment, enabled: bool, done: int):
    """The round callback: a progress bar on a terminal, else one line per round (nothing
    more if not ``enabled``), and warnings on stderr (:mod:`fedsim.progress`)."""
    with round_reporter(experiment, enabled=enabled, done=done) as on_round:
        yield on_round
