"""A sweep's runs, named and validated before anything runs; their state on disk and the
``sweep.json`` manifest."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedsim import atomic
from fedsim.build import load_experiment
from fedsim.config import Experiment
from fedsim.errors import UserError
from fedsim.results import RunDirectory
from fedsim.sweep.grid import SweepSpec, check_disjoint, toml_value

MANIFEST = "sweep.json"
ERROR_FILE = "error.txt"


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


class SweepBackend(Protocol):
    """How a sweep's runs are run (worker processes, Ray tasks): every task, ``workers`` at a
    time, each outcome handed to ``on_outcome`` as it comes; on a stop signal (``stop``:
    :class:`fedsim.sweep.processes.StopSignals`) the runs under way stop at a point they
    resume from, and come back as the result."""

    def __call__(
        self,
        tasks: list[RunTask],
        workers: int | None,
        address: str | None,
        on_outcome: Callable[[RunOutcome], None],
        stop: Any,
    ) -> list[RunTask]: ...


@dataclass(frozen=True)
class SweepResult:
    path: Path
    outcomes: list[RunOutcome]

    @property
    def failures(self) -> list[RunOutcome]:
        return [outcome for outcome in self.outcomes if outcome.status == "failed"]

    def count(self, status: str) -> int:
        return sum(outcome.status == status for outcome in self.outcomes)


def plan_runs(spec: SweepSpec) -> list[SweepRun]:
    """Every grid point with every seed, validated up front: one bad point stops the sweep
    before anything runs. Each run's name is made from its grid values, which it is
    checked to have run with."""
    check_disjoint(spec.grid, "the grid")
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
    for values, experiment in validated:
        check_resolved(values, experiment)
    names = unique_names(
        [run_name(values, experiment.seed) for values, experiment in validated],
        [experiment for _values, experiment in validated],
    )
    return [SweepRun(name, values, experiment) for name, (values, experiment) in zip(names, validated)]


def check_resolved(values: dict[str, Any], experiment: Experiment) -> None:
    """The run's resolved experiment holds every grid value its name shows."""
    resolved = experiment.to_dict()
    for key, value in values.items():
        for item_key, item in value.items() if isinstance(value, dict) else [(None, value)]:
            path = [*key.split("."), *([item_key] if item_key else [])]
            found: Any = resolved
            for part in path:
                found = found.get(part, _MISSING) if isinstance(found, dict) else _MISSING
            if found is _MISSING or not _same(found, item):
                shown = "unset" if found is _MISSING else toml_value(found)
                raise UserError(
                    f"{'.'.join(path)} = {toml_value(item)} in the grid, but the experiment resolved it to "
                    f"{shown}; grid values must be the experiment's own"
                )


_MISSING = object()


def _same(resolved: Any, given: Any) -> bool:
    if isinstance(given, dict) and isinstance(resolved, dict):  # an inline table: the defaults filled in
        return all(key in resolved and _same(resolved[key], value) for key, value in given.items())
    if isinstance(given, float) and isinstance(resolved, float) and math.isnan(given):
        return math.isnan(resolved)
    return resolved == given and isinstance(resolved, bool) == isinstance(given, bool)


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
