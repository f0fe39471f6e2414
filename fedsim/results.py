"""The run directory: everything one run leaves behind, written so that nothing is lost.

::

    config.toml      the resolved experiment (defaults filled in, overrides applied)
    partition.npz    the clients' index arrays
    skew.json        how skewed the partition is (partitioners.skew)
    metrics.csv      long form: round, scope, id, metric, value
    summary.json     final figures; present only once the run has finished
    checkpoint.pkl   global arrays + strategy after the last finished round
    client_state/    per-client persistent state (see fedsim.state)
    plots/           accuracy.png, partition.png

``metrics.csv`` grows by whole rounds; the checkpoint remembers its length, so a resumed
run first cuts away anything written after the checkpoint. Everything else is written
atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord

from fedsim import atomic
from fedsim.config import Experiment
from fedsim.errors import UserError

if TYPE_CHECKING:  # pandas is imported where used: a run reads its metrics once, at the end
    import pandas as pd

METRIC_COLUMNS = ["round", "scope", "id", "metric", "value"]

# Where a run's headline accuracy comes from (summary.json's accuracy_evaluated_on):
GLOBAL_TEST = "global-test"  # the global model on the dataset's test split
CLIENT_HOLDOUT = "client-holdout"  # each client's own model on its held-out data (FedBN)


@dataclass(frozen=True)
class MetricRow:
    round: int
    scope: str  # "server", "client", "federated", "domain", ...
    id: str
    metric: str
    value: float


@dataclass
class Checkpoint:
    """The server's state after ``round``: enough to continue as if never stopped."""

    round: int
    arrays: ArrayRecord
    strategy: Any
    metrics_bytes: int
    elapsed_s: float
    rounds_time_s: float = 0.0


class RunDirectory:
    """One run's folder. ``status`` tells whether it is new, resumable or finished."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.toml")
    partition = property(lambda self: self.path / "partition.npz")
    metrics = property(lambda self: self.path / "metrics.csv")
    summary = property(lambda self: self.path / "summary.json")
    checkpoint = property(lambda self: self.path / "checkpoint.pkl")
    client_state = property(lambda self: self.path / "client_state")
    plots = property(lambda self: self.path / "plots")

    def status(self, experiment: Experiment, overwrite: bool = False) -> str:
        """ "new", "resume" or "finished", without touching anything; refuses to mix two
        experiments in one folder."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {str(self.path)!r} is a file, not a folder")
        if self.config.exists():
            if overwrite:
                return "new"
            if self.read_config() != experiment.to_dict():
                raise UserError(
                    f"{self.path} holds a run of a different experiment; "
                    "pass --overwrite to replace it, or choose another --out"
                )
            if self.summary.exists():
                return "finished"
            if self.checkpoint.exists():
                return "resume"
        elif self.path.exists() and any(self.path.iterdir()):
            raise UserError(f"--out {str(self.path)!r} is not empty and is not a fedsim run; choose another --out")
        return "new"

    def start(self, experiment: Experiment) -> None:
        """Begin a new run here: clear what a previous run left, write config.toml."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config.exists():
            self.clear()
        atomic.write_text(self.config, experiment.to_toml())

    def clear(self) -> None:
        """Remove a previous run's files (only a folder that holds a fedsim run)."""
        for child in self.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def read_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(tomllib.loads(self.config.read_text())))

    # metrics.csv ------------------------------------------------------------------
    def append_metrics(self, rows: list[MetricRow]) -> None:
        """Append whole rows in one write (the header first, for a new file)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if not self.metrics.exists() or self.metrics.stat().st_size == 0:
            writer.writerow(METRIC_COLUMNS)
        for row in rows:
            writer.writerow([row.round, row.scope, row.id, row.metric, _format(row.value)])
        with open(self.metrics, "a", encoding="utf-8") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())

    def metrics_size(self) -> int:
        return self.metrics.stat().st_size if self.metrics.exists() else 0

    def read_metrics(self) -> pd.DataFrame:
        import pandas as pd

        return pd.read_csv(self.metrics, dtype={"id": str})

    # checkpoint -------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        atomic.write_pickle(self.checkpoint, checkpoint)

    def load_checkpoint(self) -> Checkpoint:
        """Our own checkpoint, written by this run (never a downloaded file)."""
        with open(self.checkpoint, "rb") as handle:
            checkpoint: Checkpoint = pickle.load(handle)
        with open(self.metrics, "r+b") as handle:  # drop rows written after the checkpoint
            handle.truncate(checkpoint.metrics_bytes)
        return checkpoint

    # summary.json -----------------------------------------------------------------
    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic.write_text(self.summary, json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())


def _format(value: float) -> str:
    value = float(value)
    return "nan" if math.isnan(value) else repr(value)
