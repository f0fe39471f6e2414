"""Sweeps: one experiment over a grid of values and several seeds, each run in its own folder.

``fedsim sweep exp.toml --grid strategy.name=fedavg,fedprox --grid partition.alpha=0.1,0.5
--seeds 0,1,2`` runs the 2 x 2 x 3 runs of the Cartesian product in parallel (worker
processes or Ray tasks) into ``<out>/fedavg-alpha0.1-s0``, ``<out>/fedavg-alpha0.1-s1``, ...
Each is an ordinary run directory (:mod:`fedsim.results`), so the same command run again
skips the finished runs and resumes the interrupted ones, and ``fedsim report`` reads them.

The grid can also be written in the experiment file, which ``fedsim run`` ignores; the
command line replaces its seeds and adds keys or replaces the keys they overlap::

    [sweep]
    seeds = [0, 1, 2]
    grid = { "strategy.name" = ["fedavg", "fedprox"], "partition.alpha" = [0.1, 0.5] }

A run's name is made of its grid values, so no two grid keys may set the same value: a
``--grid`` key replaces every file key it overlaps (``strategy.name`` replaces a grid of
whole ``strategy`` tables, ``strategy`` one of ``strategy.*`` keys), and overlaps that no
replacement settles (two ``--grid`` keys, two file keys, a key inside file tables that
vary more than it and ``name``) are one-line errors saying how to write them. Every run
is checked to have resolved its grid values.

``<out>/sweep.json`` lists every run, its grid values and seed, and its status in the
latest sweep: pending (not started), done, resumed, skipped (had already finished),
interrupted (stopped by Ctrl-C or SIGTERM; it resumes from its last checkpoint) or failed
(with its one-line error; the traceback is in the run directory's ``error.txt``).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedsim.errors import UserError
from fedsim.sweep.grid import SWEEP_KEYS, SweepSpec, make_spec, parse_grid_option, parse_seeds, split_values, toml_value
from fedsim.sweep.plan import (
    ERROR_FILE,
    MANIFEST,
    RunOutcome,
    RunTask,
    SweepBackend,
    SweepManifest,
    SweepResult,
    SweepRun,
    check_resolved,
    plan_runs,
    plan_sweep,
    run_name,
)
from fedsim.sweep.processes import GRACE_S, StopSignals, remove_temporary_files, run_in_processes
from fedsim.sweep.ray_tasks import run_on_ray

__all__ = [
    "ERROR_FILE",
    "GRACE_S",
    "MANIFEST",
    "SWEEP_KEYS",
    "RunOutcome",
    "RunTask",
    "StopSignals",
    "SweepInterrupted",
    "SweepBackend",
    "SweepResult",
    "SweepRun",
    "SweepSpec",
    "check_resolved",
    "make_spec",
    "parse_grid_option",
    "parse_seeds",
    "plan_runs",
    "plan_sweep",
    "remove_temporary_files",
    "run_name",
    "run_sweep",
    "split_values",
    "toml_value",
]

BACKENDS: dict[str, SweepBackend] = {"process": run_in_processes, "ray": run_on_ray}


def run_sweep(
    spec: SweepSpec,
    out: str | Path | None = None,
    *,
    workers: int | None = None,
    backend: str = "process",
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> SweepResult:
    """Run every run of ``spec`` that has not finished; one failing run does not stop the others.

    Ctrl-C (SIGINT) or SIGTERM stops the workers, each at a point its run resumes from,
    within :data:`GRACE_S` seconds (a second Ctrl-C kills them at once), records the
    stopped runs as "interrupted" and raises :class:`SweepInterrupted`.
    """
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    if address and backend != "ray":
        raise UserError("--address joins a Ray cluster; use it with --backend ray")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers} must be at least 1")
    with StopSignals() as stop:  # until the workers start, a signal raises KeyboardInterrupt
        out, runs, statuses = plan_sweep(spec, out, overwrite)
        ray_engine = next(
            (run.experiment.engine.name for run in runs if run.experiment.engine.name != "inprocess"), None
        )
        if backend == "ray" and ray_engine:
            raise UserError(
                f"runs with engine.name = {ray_engine!r} cannot run inside Ray sweep tasks (their actors would "
                "wait for CPUs the sweep's tasks hold); use --backend process, or --set engine.name=inprocess"
            )
        tasks = [
            RunTask(run.name, str((out / run.name).resolve()), run.experiment, overwrite)
            for run in runs
            if statuses[run.name] == "pending"
        ]
        stop.defer()  # from here on the sweep stops its workers itself, and says what it stopped
        manifest = SweepManifest(out, spec, runs, statuses, backend)
        manifest.write()
        stopped: list[RunTask] = []
        with sweep_progress(len(runs), len(runs) - len(tasks), enabled=progress) as advance:

            def on_outcome(outcome: RunOutcome) -> None:
                manifest.record(outcome)
                if outcome.status != "interrupted":
                    advance(outcome)

            if tasks and not stop.received:
                stopped = BACKENDS[backend](tasks, workers, address, on_outcome, stop)
        for task in stopped:  # a worker killed mid-write leaves its temporary file
            remove_temporary_files(Path(task.path))
        result = SweepResult(out, manifest.outcomes())
        if stop.received:
            raise SweepInterrupted(result, stop.received)
    return result


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the sweep; its runs resume when the same command runs again."""

    def __init__(self, result: SweepResult, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.result = result
        self.signum = signum


@contextmanager
def sweep_progress(total: int, done: int, enabled: bool) -> Iterator[Callable[[RunOutcome], None]]:
    """A rich progress bar over runs, counting failures and printing each as it happens."""
    if not enabled:
        yield lambda _outcome: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    columns = (
        TextColumn("[bold]sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("runs  {task.fields[failed]} failed"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("sweep", total=total, completed=done, failed=0)
        failed = 0

        def advance(outcome: RunOutcome) -> None:
            nonlocal failed
            if outcome.status == "failed":
                failed += 1
                bar.console.print(Text(f"failed {outcome.name}: {outcome.error}", style="red"), soft_wrap=True)
            bar.update(task, advance=1, failed=failed)

        yield advance
