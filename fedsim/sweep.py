"""Sweeps: one experiment over a grid of values and several seeds, each run in its own folder.

``fedsim sweep exp.toml --grid strategy.name=fedavg,fedprox --grid partition.alpha=0.1,0.5
--seeds 0,1,2`` runs the 2 x 2 x 3 runs of the Cartesian product in parallel (worker
processes or Ray tasks) into ``<out>/fedavg-alpha0.1-s0``, ``<out>/fedavg-alpha0.1-s1``, ...
Each is an ordinary run directory (:mod:`fedsim.results`), so the same command run again
skips the finished runs and resumes the interrupted ones, and ``fedsim report`` reads them.

The grid can also be written in the experiment file, which ``fedsim run`` ignores; the
command line replaces its seeds and adds or replaces its keys::

    [sweep]
    seeds = [0, 1, 2]
    grid = { "strategy.name" = ["fedavg", "fedprox"], "partition.alpha" = [0.1, 0.5] }

``<out>/sweep.json`` lists every run, its grid values and seed, and its status in the
latest sweep: pending, done, resumed, skipped (had already finished) or failed (with its
one-line error; the traceback is in the run directory's ``error.txt``).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim import atomic
from fedsim.config import Experiment, apply_overrides, load_experiment, load_sweep_table, parse_override
from fedsim.errors import UserError
from fedsim.registry import did_you_mean
from fedsim.results import RunDirectory

MANIFEST = "sweep.json"
ERROR_FILE = "error.txt"
BACKENDS = ("process", "ray")
SWEEP_KEYS = ("grid", "seeds")


@dataclass(frozen=True)
class SweepSpec:
    """What to run: an experiment file, the values to vary, the seeds and fixed overrides."""

    config: Path
    grid: dict[str, list[Any]]
    seeds: list[int] | None  # None: every run keeps the experiment's own seed
    overrides: list[str] = field(default_factory=list)  # --set, the same for every run


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid with one seed, validated."""

    name: str  # its folder inside the sweep folder
    values: dict[str, Any]  # its grid values
    experiment: Experiment


@dataclass(frozen=True)
class RunTask:
    """What a worker needs to run one run: plain, picklable data."""

    name: str
    path: str
    experiment: Experiment
    overwrite: bool


@dataclass(frozen=True)
class RunOutcome:
    name: str
    status: str  # "done", "resumed", "skipped" or "failed"
    error: str | None = None
    wall_time_s: float | None = None


@dataclass(frozen=True)
class SweepResult:
    path: Path
    outcomes: list[RunOutcome]

    @property
    def failures(self) -> list[RunOutcome]:
        return [outcome for outcome in self.outcomes if outcome.status == "failed"]

    def count(self, status: str) -> int:
        return sum(outcome.status == status for outcome in self.outcomes)


# --- the grid, from the command line and the [sweep] table ---------------------------


def make_spec(config: str | Path, grid_options: list[str], seeds_option: str | None, overrides: list[str]) -> SweepSpec:
    """The sweep of ``config``'s ``[sweep]`` table, with ``--grid`` keys added or replaced,
    ``--seeds`` replacing its seeds, and ``--set`` fixing a key the table would vary."""
    config = Path(config)
    table = load_sweep_table(config)
    for key in table:
        if key not in SWEEP_KEYS:
            raise UserError(
                f"{config}: [sweep] unknown key {key!r}{did_you_mean(key, SWEEP_KEYS)} (valid keys: grid, seeds)"
            )
    grid = _table_grid(config, table.get("grid", {}))
    given: set[str] = set()
    for text in grid_options:
        key, values = parse_grid_option(text)
        if key in given:
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid {key}=v1,v2")
        given.add(key)
        grid[key] = values
    for text in overrides:
        fixed = ".".join(parse_override(text)[0])
        for key in [key for key in grid if _overlap(key, fixed)]:
            if key in given:
                raise UserError(f"--set {fixed} and --grid {key} both set {min(key, fixed, key=len)}; keep one of them")
            del grid[key]  # the command line fixes what the file's [sweep] grid would vary
    if seeds_option is not None:
        seeds = parse_seeds(seeds_option)
    elif "seeds" in table:
        seeds = _table_seeds(config, table["seeds"])
    else:
        seeds = None
    return SweepSpec(config, grid, seeds, list(overrides))


def _overlap(key: str, other: str) -> bool:
    """Whether two dotted keys set some value in common: ``strategy`` and ``strategy.name`` do."""
    return key == other or key.startswith(other + ".") or other.startswith(key + ".")


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """``section.key=v1,v2,...`` -> the key and its TOML-typed values.

    Commas inside brackets, braces or quotes do not split, so list values are written as
    TOML lists: ``model.hidden=[64],[128,64]`` gives the two values [64] and [128, 64].
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise UserError(f"--grid {text!r} must look like section.key=value1,value2, e.g. partition.alpha=0.1,0.5")
    pieces = split_values(raw, f"--grid {text!r}")
    if any(not piece for piece in pieces):
        raise UserError(f"--grid {text!r} has an empty value; separate values with single commas")
    values = [parse_override(f"{key}={piece}")[1] for piece in pieces]
    _check_grid_key(key, values, "--grid")
    return key, values


def split_values(text: str, where: str) -> list[str]:
    """Split at the commas outside brackets, braces and quotes: ``1,[2,3],"a,b"`` -> 3 values."""
    pieces, depth, quote, start, index = [], 0, "", 0, 0
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\" and quote == '"':
                index += 1  # an escaped character inside a TOML basic string
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(text[start:index].strip())
            start = index + 1
        if depth < 0:
            break
        index += 1
    if quote or depth:
        raise UserError(f"{where} has unbalanced brackets or quotes")
    pieces.append(text[start:].strip())
    return pieces


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2]."""
    try:
        seeds = [int(piece) for piece in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds {text!r} must be whole numbers separated by commas, e.g. 0,1,2") from None
    return _unique_seeds(seeds, f"--seeds {text!r}")


def _unique_seeds(seeds: list[int], where: str) -> list[int]:
    repeated = [seed for seed, count in Counter(seeds).items() if count > 1]
    if repeated:
        raise UserError(f"{where} lists seed {repeated[0]} twice")
    return seeds


def _table_seeds(config: Path, seeds: Any) -> list[int]:
    where = f"{config}: [sweep] seeds"
    if not isinstance(seeds, list) or not seeds or not all(type(seed) is int for seed in seeds):
        raise UserError(f"{where} must be a non-empty list of whole numbers, e.g. seeds = [0, 1, 2]; got {seeds!r}")
    return _unique_seeds(seeds, where)


def _table_grid(config: Path, grid: Any) -> dict[str, list[Any]]:
    """``grid = { "section.key" = [...] }``; a ``[sweep.grid]`` table with unquoted
    ``section.key = [...]`` arrives nested one level, which means the same."""
    if not isinstance(grid, dict):
        raise UserError(f'{config}: [sweep] grid must be a table, e.g. grid = {{ "partition.alpha" = [0.1, 0.5] }}')
    flat: dict[str, Any] = {}
    for key, values in grid.items():
        if isinstance(values, dict):
            flat.update({f"{key}.{sub}": sub_values for sub, sub_values in values.items()})
        else:
            flat[key] = values
    for key, values in flat.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{config}: [sweep] grid {key!r} must be a non-empty list of values, got {values!r}")
        _check_grid_key(key, values, f"{config}: [sweep] grid")
    return flat


def _check_grid_key(key: str, values: list[Any], where: str) -> None:
    if key == "seed":
        raise UserError(f"{where}: vary the seed with --seeds (or seeds = [...] in [sweep]), not as a grid key")
    try:  # the same key checks as --set
        apply_overrides({}, [f"{key}={toml_value(values[0])}"])
    except UserError as error:
        raise UserError(f"{where}: {str(error).removeprefix('--set ')}") from None
    texts = [toml_value(value) for value in values]
    repeated = [text for text, count in Counter(texts).items() if count > 1]
    if repeated:
        raise UserError(f"{where}: {key} lists the value {repeated[0]} twice")


def toml_value(value: Any) -> str:
    """``value`` as one-line TOML, the form ``--set`` reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise UserError(f"cannot use {value!r} as a grid value (use numbers, strings, booleans, lists or tables)")


# --- the runs: named, validated, and their state on disk -----------------------------


def plan_runs(spec: SweepSpec) -> list[SweepRun]:
    """Every grid point with every seed, validated up front: one bad point stops the sweep
    before anything runs."""
    points = [
        (dict(zip(spec.grid, combination)), seed)
        for combination in itertools.product(*spec.grid.values())
        for seed in (spec.seeds or [None])
    ]
    validated, invalid = [], []
    for values, seed in points:
        overrides = [*spec.overrides, *point_overrides(values)]
        if seed is not None:
            overrides.append(f"seed={seed}")
        try:
            validated.append((values, load_experiment(spec.config, overrides)))
        except UserError as error:
            invalid.append(f"{describe_point(values, seed)}: {error}")
    if invalid:
        several = f"{len(invalid)} of {len(points)} runs are invalid; the first, " if len(points) > 1 else ""
        raise UserError(f"{several}{invalid[0]}")
    names = unique_names(
        [run_name(values, experiment.seed) for values, experiment in validated],
        [experiment for _values, experiment in validated],
    )
    return [SweepRun(name, values, experiment) for name, (values, experiment) in zip(names, validated)]


def point_overrides(values: dict[str, Any]) -> list[str]:
    """``--set`` overrides of one grid point. A table value sets its keys together and
    keeps the table's others: strategy = {name = "fedprox", proximal_mu = 0.01}."""
    return [
        f"{key}.{sub}={toml_value(sub_value)}" if isinstance(value, dict) else f"{key}={toml_value(value)}"
        for key, value in values.items()
        for sub, sub_value in (value.items() if isinstance(value, dict) else [(None, value)])
    ]


def describe_point(values: dict[str, Any], seed: int | None) -> str:
    parts = [f"{key}={toml_value(value)}" for key, value in values.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    return ", ".join(parts) or "the experiment"


def run_name(values: dict[str, Any], seed: int) -> str:
    """A folder name from the grid values: ``fedprox-alpha0.1-s2`` for strategy.name =
    "fedprox", partition.alpha = 0.1, seed 2 (a ``name`` key shows only its value)."""
    parts = []
    for key, value in values.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]  # a table: each of its keys
        for item_key, item in items:
            text = item if isinstance(item, str) else toml_value(item)
            slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"
            leaf = item_key.rsplit(".", 1)[-1]
            parts.append(slug if leaf == "name" else f"{leaf}{slug}")
    parts.append(f"s{seed}")
    return "-".join(parts).lstrip(".")


def unique_names(names: list[str], experiments: list[Experiment]) -> list[str]:
    """Values that differ only in characters a folder name drops would share a folder;
    those names get their experiment's fingerprint appended."""
    counts = Counter(names)
    return [
        f"{name}-{experiment.fingerprint()}" if counts[name] > 1 else name
        for name, experiment in zip(names, experiments)
    ]


def default_sweep_out(runs: list[SweepRun]) -> Path:
    return Path("runs") / f"{runs[0].experiment.name}-sweep"


def initial_statuses(out: Path, runs: list[SweepRun], overwrite: bool) -> dict[str, str]:
    """ "skipped" for runs that already finished, "pending" for the rest, touching nothing;
    a folder that holds a different experiment stops the sweep before anything runs."""
    if (out / "config.toml").exists():
        raise UserError(f"--out {str(out)!r} is a run directory, not a sweep folder; choose another --out")
    statuses = {}
    for run in runs:
        folder = RunDirectory(out / run.name)
        if folder.path.is_dir() and [p.name for p in folder.path.iterdir()] == [ERROR_FILE]:
            statuses[run.name] = "pending"  # it failed before it began; it is retried
            continue
        try:
            status = folder.status(run.experiment, overwrite)
        except UserError as error:
            raise UserError(f"run {run.name}: {error}") from None
        statuses[run.name] = "skipped" if status == "finished" else "pending"
    return statuses


def plan_sweep(spec: SweepSpec, out: str | Path | None, overwrite: bool) -> tuple[Path, list[SweepRun], dict[str, str]]:
    """The sweep folder, its validated runs and their statuses, before anything runs."""
    runs = plan_runs(spec)
    out = Path(out) if out is not None else default_sweep_out(runs)
    return out, runs, initial_statuses(out, runs, overwrite)


class SweepManifest:
    """``sweep.json``: every run with its values and status, rewritten atomically as runs end."""

    def __init__(self, out: Path, spec: SweepSpec, runs: list[SweepRun], statuses: dict[str, str], backend: str):
        self.path = out / MANIFEST
        self.header = {
            "config": str(spec.config.resolve()),
            "grid": spec.grid,
            "seeds": spec.seeds,
            "set": spec.overrides,
            "backend": backend,
        }
        self.runs = {
            run.name: {
                "name": run.name,
                "values": run.values,
                "seed": run.experiment.seed,
                "status": statuses[run.name],
                "error": None,
                "wall_time_s": None,
            }
            for run in runs
        }

    def record(self, outcome: RunOutcome) -> None:
        self.runs[outcome.name].update(status=outcome.status, error=outcome.error, wall_time_s=outcome.wall_time_s)
        self.write()

    def write(self) -> None:
        document = {**self.header, "runs": list(self.runs.values())}
        atomic.write_text(self.path, json.dumps(document, indent=2, default=str) + "\n")

    def outcomes(self) -> list[RunOutcome]:
        return [RunOutcome(r["name"], r["status"], r["error"], r["wall_time_s"]) for r in self.runs.values()]


# --- running ------------------------------------------------------------------------


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
    """Run every run of ``spec`` that has not finished; one failing run does not stop the others."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    if address and backend != "ray":
        raise UserError("--address joins a Ray cluster; use it with --backend ray")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers} must be at least 1")
    out, runs, statuses = plan_sweep(spec, out, overwrite)
    ray_engine = next((run.experiment.engine.name for run in runs if run.experiment.engine.name != "inprocess"), None)
    if backend == "ray" and ray_engine:
        raise UserError(
            f"runs with engine.name = {ray_engine!r} cannot run inside Ray sweep tasks (their actors would "
            "wait for CPUs the sweep's tasks hold); use --backend process, or --set engine.name=inprocess"
        )
    manifest = SweepManifest(out, spec, runs, statuses, backend)
    manifest.write()
    tasks = [
        RunTask(run.name, str((out / run.name).resolve()), run.experiment, overwrite)
        for run in runs
        if statuses[run.name] == "pending"
    ]
    with sweep_progress(len(runs), len(runs) - len(tasks), enabled=progress) as advance:

        def on_outcome(outcome: RunOutcome) -> None:
            manifest.record(outcome)
            advance(outcome)

        if tasks:
            execute = run_in_processes if backend == "process" else run_on_ray
            execute(tasks, workers, address, on_outcome)
    return SweepResult(out, manifest.outcomes())


def execute_run(task: RunTask) -> RunOutcome:
    """Run one run in a worker; any error becomes a failed outcome, with its traceback in
    the run directory's error.txt."""
    from fedsim.flower_log import quiet_flower
    from fedsim.run import run_experiment

    started = time.monotonic()
    quiet_flower()
    (Path(task.path) / ERROR_FILE).unlink(missing_ok=True)  # a previous attempt's
    try:
        result = run_experiment(task.experiment, task.path, overwrite=task.overwrite, progress=False)
    except Exception as error:  # one run's failure must not stop the sweep
        atomic.write_text(Path(task.path) / ERROR_FILE, traceback.format_exc())
        return RunOutcome(task.name, "failed", one_line(error), round(time.monotonic() - started, 3))
    status = {"new": "done", "resume": "resumed", "finished": "skipped"}[result.status]
    return RunOutcome(task.name, status, None, round(time.monotonic() - started, 3))


def one_line(error: BaseException) -> str:
    text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    lines = text.strip().splitlines()
    return lines[0][:500] if lines else type(error).__name__


def keep_in_flight(
    tasks: list[RunTask],
    workers: int,
    submit: Callable[[RunTask], Any],
    wait_any: Callable[[list[Any]], Any],
    result: Callable[[Any], RunOutcome],
    on_outcome: Callable[[RunOutcome], None],
) -> None:
    """Run ``tasks`` with at most ``workers`` submitted at a time (``submit`` returns a
    handle, ``wait_any`` a finished one). Nothing waits in a queue, so an interrupted
    sweep stops at the runs in progress."""
    queue = iter(tasks)
    pending: dict[Any, RunTask] = {}
    while True:
        for task in itertools.islice(queue, workers - len(pending)):
            pending[submit(task)] = task
        if not pending:
            return
        handle = wait_any(list(pending))
        task = pending.pop(handle)
        try:
            outcome = result(handle)
        except Exception as error:  # the worker died (killed, out of memory) or was lost
            outcome = RunOutcome(task.name, "failed", f"worker lost: {one_line(error)}")
        on_outcome(outcome)


def run_in_processes(
    tasks: list[RunTask], workers: int | None, address: str | None, on_outcome: Callable[[RunOutcome], None]
) -> None:
    """Worker processes on this machine, a fresh one (spawn) for every run, so that no run
    inherits another's state or caches. Each run uses the torch threads its experiment
    sets (the in-process engine's ``num_threads``, 1 by default), so ``--workers`` times
    that should not exceed the cores."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(workers or cpus, len(tasks))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent, max_tasks_per_child=1) as pool:
        keep_in_flight(
            tasks,
            workers,
            submit=lambda task: pool.submit(execute_run, task),
            wait_any=lambda futures: next(iter(wait(futures, return_when=FIRST_COMPLETED).done)),
            result=lambda future: future.result(),
            on_outcome=on_outcome,
        )


def _die_with_parent() -> None:
    """A worker outliving a killed sweep would write into a run the next sweep resumes;
    on Linux the kernel kills it with its parent."""
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_on_ray(
    tasks: list[RunTask], workers: int | None, address: str | None, on_outcome: Callable[[RunOutcome], None]
) -> None:
    """Ray tasks: a local Ray instance, or the cluster at ``address`` ("auto" finds a local
    head node started with ``ray start``). On a cluster the sweep folder must be on
    storage every machine can write."""
    import ray

    from fedsim.engine.ray import connect

    started_here = connect(address, where="--address")
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = min(workers or cpus, len(tasks))
        remote = ray.remote(num_cpus=max(1, cpus // workers), max_retries=0)(execute_run)
        keep_in_flight(
            tasks,
            workers,
            submit=remote.remote,
            wait_any=lambda refs: ray.wait(refs, num_returns=1)[0][0],
            result=ray.get,
            on_outcome=on_outcome,
        )
    finally:
        if started_here:
            ray.shutdown()


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
