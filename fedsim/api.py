"""fedsim from Python (a notebook, a script): :func:`run` an experiment, :func:`load_run` a
finished one.

::

    import fedsim

    result = fedsim.run("experiments/quickstart.toml", rounds=5, partition={"alpha": 0.1})
    result.summary["accuracy"]
    result.history().plot()  # the headline accuracy against round

:func:`run` does what ``fedsim run`` does: the same validation, the same one-line
:class:`~fedsim.errors.UserError` for a mistake, the same run directory (resumed if it was
interrupted, read back if it had finished). Both return a :class:`Run`.
"""

from __future__ import annotations

import datetime
import json
import numbers
import os
import tomllib
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.config import read_experiment_file
from fedsim.errors import UserError
from fedsim.registry import did_you_mean
from fedsim.results import GLOBAL_TEST, HEADLINE_SERIES, METRIC_COLUMNS


class Run:
    """A finished run directory, read back.

    ``path`` is the folder, ``summary`` its summary.json, ``config`` the resolved
    experiment of its config.toml (a dict, every default filled in), ``metrics`` its
    metrics.csv as a DataFrame with the file's columns (``round, scope, id, metric,
    value``; ids are strings), read when first used. :meth:`history` picks one per-round
    series out of it.
    """

    def __init__(self, path: Path, summary: dict[str, Any], config: dict[str, Any]) -> None:
        self.path = path
        self.summary = summary
        self.config = config

    @cached_property
    def metrics(self) -> pd.DataFrame:
        file = self.path / "metrics.csv"
        try:
            metrics = pd.read_csv(file, dtype={"id": str})
        except (OSError, ValueError, UnicodeDecodeError) as error:  # pandas' parser errors are ValueErrors
            raise UserError(f"{file} cannot be read as CSV ({_first_line(error)}): corrupt, or not fedsim's") from None
        missing = [column for column in METRIC_COLUMNS if column not in metrics.columns]
        if missing:
            raise UserError(f"{file} has no {', '.join(missing)} column: corrupt, or not fedsim's metrics.csv")
        return metrics

    def history(self, metric: str = "accuracy", scope: str | None = None, id: str | int | None = None) -> pd.Series:
        """One metric against round, as a Series indexed by ``round`` and named ``metric``.

        By default the series behind summary.json's ``accuracy``: the global model on the
        test split (``scope="server", id="global"``), or for a personalised run (FedBN) the
        clients' held-out accuracy (``scope="federated", id="evaluate"``). Another scope
        needs ``id`` where several ids have the metric (``"client"`` has one per client):
        ``history("loss", scope="client", id=3)``.
        """
        headline_scope, headline_id = HEADLINE_SERIES.get(
            self.summary.get("accuracy_evaluated_on"), HEADLINE_SERIES[GLOBAL_TEST]
        )
        scope = headline_scope if scope is None else scope
        metrics = self.metrics
        in_scope = metrics[metrics["scope"] == scope]
        if in_scope.empty:
            scopes = sorted(metrics["scope"].unique())
            raise UserError(
                f"{self.path}: metrics.csv has no scope {scope!r}{did_you_mean(scope, scopes)} "
                f"(its scopes: {', '.join(scopes)})"
            )
        if id is None and scope == headline_scope:
            id = headline_id
        elif id is None:
            ids = sorted(in_scope.loc[in_scope["metric"] == metric, "id"].unique())
            if len(ids) > 1:
                raise UserError(
                    f"{self.path}: scope {scope!r} has {metric!r} for several ids ({_listed(ids)}); choose one with id="
                )
            id = ids[0] if ids else None
        rows = in_scope[(in_scope["id"] == str(id)) & (in_scope["metric"] == metric)]
        if rows.empty:
            there = in_scope if id is None else in_scope[in_scope["id"] == str(id)]
            known = sorted(there["metric"].unique())
            where = f"scope {scope!r}" if id is None else f"scope {scope!r}, id {str(id)!r}"
            raise UserError(
                f"{self.path}: metrics.csv has no {metric!r} for {where}{did_you_mean(metric, known)}"
                f" ({'its metrics there: ' + ', '.join(known) if known else 'no such id there'})"
            )
        rows = rows.sort_values("round")
        return pd.Series(
            rows["value"].to_numpy(dtype=float), index=pd.Index(rows["round"].to_numpy(), name="round"), name=metric
        )

    def __repr__(self) -> str:
        s = self.summary
        accuracy = s.get("accuracy")
        accuracy = "-" if not isinstance(accuracy, (int, float)) else f"{accuracy:.4f}"
        return (
            f"Run({str(self.path)!r}: {s.get('name', '?')}, {s.get('strategy', '?')} on {s.get('dataset', '?')}, "
            f"{s.get('num_clients', '?')} clients, {s.get('rounds_completed', '?')} rounds, accuracy {accuracy})"
        )


def load_run(directory: str | os.PathLike[str]) -> Run:
    """The finished run in ``directory`` (what :func:`run` and ``fedsim run`` leave behind).

    A folder that holds no finished run is a one-line :class:`~fedsim.errors.UserError`
    that says what is missing.
    """
    path = Path(directory)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; give the folder of a finished fedsim run")
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is a file, not a run directory; give the folder of a finished fedsim run")
    if not (path / "config.toml").is_file():
        raise UserError(f"{str(path)!r} is not a fedsim run directory (it has no config.toml)")
    if not (path / "summary.json").is_file():
        raise UserError(
            f"{str(path)!r} holds a run that has not finished (it has no summary.json yet); "
            f"`fedsim run --resume {path}` finishes it"
        )
    if not (path / "metrics.csv").is_file():
        raise UserError(f"{str(path)!r} has no metrics.csv: not a complete fedsim run")
    return Run(path, _read_summary(path / "summary.json"), _read_config(path / "config.toml"))


def run(
    experiment: str | os.PathLike[str] | Mapping[str, Any],
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    **settings: Any,
) -> Run:
    """Run an experiment as ``fedsim run`` does, and return the finished :class:`Run`.

    ``experiment`` is the path of a TOML experiment file, or a dict of the same tables
    (``{"name": ..., "rounds": ..., "partition": {"name": "dirichlet", ...}, ...}``),
    validated as a file is. ``settings`` override it as ``--set`` does: a top-level key by
    its name (``rounds=3``, ``seed=1``), a table's keys as a dict merged into that table
    (``partition={"alpha": 0.1}``, ``strategy={"name": "fedprox", "proximal_mu": 0.01}``).
    A mistake in either is the CLI's one-line :class:`~fedsim.errors.UserError`.

    ``out`` is the run directory, by default ``runs/<name>-<hash>`` under the current
    folder as for ``fedsim run``. An interrupted run there is resumed from its checkpoint;
    a finished one is read back, not run again (``overwrite=True`` runs it again).
    ``quiet=False`` prints a line per round and the result line.
    """
    # lazy: validating and running load every registry and engine; reading a run back (load_run) needs none
    from fedsim.build import load_experiment_data
    from fedsim.commands.run import raise_strategy_failure, result_line
    from fedsim.runner import run_experiment

    if out is not None and not str(out).strip():
        raise UserError("out='' names no folder; give a folder for the run, or None for runs/<name>-<hash>")
    for key in settings:
        if "." in key:
            table, _, name = key.partition(".")
            raise UserError(f"{key}=...: give a table's keys as a dict, e.g. {table}={{{name!r}: ...}}")
    settings = {key: _toml_data(value, key) for key, value in settings.items()}
    if isinstance(experiment, Mapping):
        data, source = _toml_data(experiment, "experiment"), "experiment"
    elif isinstance(experiment, (str, os.PathLike)):
        data, source = read_experiment_file(experiment), os.fspath(experiment)
    else:
        raise UserError(
            f"experiment must be the path of a TOML experiment file or a dict of its tables, "
            f"not {type(experiment).__name__}"
        )
    loaded = load_experiment_data(data, source, settings)
    try:
        result = run_experiment(loaded, out, overwrite=overwrite, progress=not quiet)
    except Exception as error:
        raise_strategy_failure(loaded, error)
        raise
    if not quiet:
        print(result_line(loaded.name, result, overwrite="overwrite=True"))
    return load_run(result.path)


def _toml_data(value: Any, where: str) -> Any:
    """``value`` as TOML would give it, so that a dict is checked exactly as a file is:
    tuples become arrays, NumPy numbers Python's, paths strings; a value TOML cannot hold
    (``None``, an object) is a one-line error that names its key."""
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise UserError(f"{where}: key {key!r} is not a string; TOML keys are strings")
        return {key: _toml_data(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_toml_data(item, f"{where}[{number}]") for number, item in enumerate(value)]
    if isinstance(value, (str, bool, datetime.date, datetime.time)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None:
        raise UserError(f"{where} = None: TOML has no null; leave the key out for its default")
    raise UserError(f"{where} = {value!r} is not a TOML value (a string, number, boolean, date, list or dict of them)")


def _read_summary(file: Path) -> dict[str, Any]:
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{file} is not a readable fedsim summary ({_first_line(error)})") from None
    if not isinstance(summary, dict):
        raise UserError(f"{file} holds a JSON {type(summary).__name__}, not fedsim's summary (a JSON object)")
    return summary


def _read_config(file: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"{file} is not a readable fedsim config ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _listed(values: list[str], most: int = 8) -> str:
    shown = ", ".join(values[:most])
    return shown if len(values) <= most else f"{shown}, ... ({len(values)} in all)"


__all__ = ["Run", "load_run", "run"]
