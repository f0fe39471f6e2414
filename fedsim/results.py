"""The run directory: everything one run leaves behind, written so that nothing is lost.

::

    config.toml      the resolved experiment (defaults filled in, overrides applied)
    partition.npz    the clients' index arrays
    skew.json        how skewed the partition is (partitioners.skew)
    metrics.csv      long form: round, scope, id, metric, value
    summary.json     final figures; present only once the run has finished
    checkpoint.npz   the global model, the strategy's state and the run's position after the
                     last checkpointed round (fedsim.checkpoint: arrays and JSON, no pickle)
    client_state/    per-client persistent state, by round (see fedsim.state)
    plots/           accuracy.png, partition.png
    tensorboard/, mlflow.db, mlartifacts/, mlflow_run.json
                     what [tracking] sends to TensorBoard and MLflow (fedsim.observers.tracking)
    .fedsim.lock     held by the command working on the run

``metrics.csv`` grows by whole rounds; the checkpoint remembers its length and digest, so a
resumed run first cuts away anything written after the checkpoint, and refuses a file that
changed. Everything else is written atomically; what a killed write leaves behind is
removed when the next command takes the run.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import socket
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim import atomic
from fedsim import checkpoint as checkpoints
from fedsim.checkpoint import Checkpoint
from fedsim.config import Experiment
from fedsim.errors import UserError

if TYPE_CHECKING:  # pandas is imported where used: a run reads its metrics once, at the end
    import pandas as pd

METRIC_COLUMNS = ["round", "scope", "id", "metric", "value"]

# Where a run's headline accuracy comes from (summary.json's accuracy_evaluated_on):
GLOBAL_TEST = "global-test"  # the global model on the dataset's test split
CLIENT_HOLDOUT = "client-holdout"  # each client's own model on its held-out data (FedBN)
# metrics.csv's (scope, id) of the per-round series behind that headline accuracy
HEADLINE_SERIES = {GLOBAL_TEST: ("server", "global"), CLIENT_HOLDOUT: ("federated", "evaluate")}


@dataclass(frozen=True)
class MetricRow:
    round: int
    scope: str  # "server", "client", "federated", "domain", ...
    id: str
    metric: str
    value: float


class RunDirectory:
    """One run's folder. ``status`` tells whether it is new, resumable or finished;
    ``locked()`` keeps a second command out while one works on it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._metrics_hash: Any = None  # SHA-256 of metrics.csv so far, kept as rows are appended

    config = property(lambda self: self.path / "config.toml")
    partition = property(lambda self: self.path / "partition.npz")
    metrics = property(lambda self: self.path / "metrics.csv")
    summary = property(lambda self: self.path / "summary.json")
    checkpoint = property(lambda self: self.path / "checkpoint.npz")
    legacy_checkpoint = property(lambda self: self.path / "checkpoint.pkl")  # fedsim <= 0.1's pickle, never read
    client_state = property(lambda self: self.path / "client_state")
    plots = property(lambda self: self.path / "plots")
    lock_file = property(lambda self: self.path / ".fedsim.lock")

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
            if self.legacy_checkpoint.exists():
                raise UserError(
                    f"{self.path} holds checkpoint.pkl, a checkpoint of an older fedsim, which fedsim no longer "
                    "loads (unpickling a file can run any code); --overwrite starts the run over"
                )
        elif self.path.exists() and any(child != self.lock_file for child in self.path.iterdir()):
            raise UserError(f"--out {str(self.path)!r} is not empty and is not a fedsim run; choose another --out")
        return "new"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory for this process: a second command on the same folder
        fails at once, naming this one's pid. The operating system releases the lock when
        the process ends, however it ends, so a killed run leaves no stale lock."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_file, "a+")  # noqa: SIM115 - held for the whole run
        except OSError as error:
            raise UserError(
                f"--out {str(self.path)!r} cannot be written: {error.strerror}; choose another --out"
            ) from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UserError(
                    f"{self.path} is in use by another fedsim command ({holder}); wait for it to finish, "
                    "stop it, or choose another --out"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            self.remove_temporary_files()
            yield
        finally:
            handle.close()  # releases the lock
            if created and [child.name for child in self.path.iterdir()] == [self.lock_file.name]:
                shutil.rmtree(self.path)  # nothing was written: leave no folder behind

    def remove_temporary_files(self) -> None:
        """Remove what an atomic write interrupted by a kill left behind (``.NAME.*.tmp``)."""
        for leftover in self.path.rglob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def start(self, experiment: Experiment) -> None:
        """Begin a new run here: clear what a previous run left, write config.toml."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config.exists():
            self.clear()
        atomic.write_text(self.config, experiment.to_toml())

    def clear(self) -> None:
        """Remove a previous run's files (only a folder that holds a fedsim run); the lock
        stays, held by this command."""
        self._metrics_hash = None
        for child in self.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            elif child != self.lock_file:
                child.unlink()

    def read_config(self) -> dict[str, Any]:
        try:
            return json.loads(json.dumps(tomllib.loads(self.config.read_text(encoding="utf-8"))))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as error:
            raise UserError(
                f"{self.config} is not a readable fedsim config ({type(error).__name__}: {_first_line(error)}); "
                "choose another --out, or --overwrite to start over"
            ) from None

    # metrics.csv ------------------------------------------------------------------
    def append_metrics(self, rows: list[MetricRow]) -> None:
        """Append whole rows in one write (the header first, for a new file)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if not self.metrics.exists() or self.metrics.stat().st_size == 0:
            writer.writerow(METRIC_COLUMNS)
        for row in rows:
            writer.writerow([row.round, row.scope, row.id, row.metric, _format(row.value)])
        data = buffer.getvalue().encode("utf-8")
        self._running_hash()  # of what is there before this write
        with open(self.metrics, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self._metrics_hash.update(data)

    def metrics_digest(self) -> tuple[int, str]:
        """The length of metrics.csv and the SHA-256 of its content (kept up to date as rows
        are appended, so a checkpoint does not read the whole file)."""
        digest = self._running_hash()
        return self.metrics.stat().st_size if self.metrics.exists() else 0, digest.hexdigest()

    def _running_hash(self) -> Any:
        if self._metrics_hash is None:
            self._metrics_hash = hashlib.sha256(self.metrics.read_bytes() if self.metrics.exists() else b"")
        return self._metrics_hash

    def read_metrics(self) -> pd.DataFrame:
        import pandas as pd

        return pd.read_csv(self.metrics, dtype={"id": str})

    # checkpoint -------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        checkpoints.save(self.checkpoint, checkpoint)

    def load_checkpoint(self, experiment: Experiment) -> Checkpoint:
        """The checkpoint, checked against this experiment and against metrics.csv, whose
        rows after the checkpoint are cut away (a run killed mid-round wrote them)."""
        checkpoint = checkpoints.load(self.checkpoint)
        if checkpoint.fingerprint != experiment.fingerprint():
            raise UserError(
                f"{self.checkpoint} belongs to another experiment (fingerprint {checkpoint.fingerprint}, this one "
                f"is {experiment.fingerprint()}); --overwrite starts the run over"
            )
        content = self.metrics.read_bytes() if self.metrics.exists() else b""
        kept = content[: checkpoint.metrics_bytes]
        if len(kept) < checkpoint.metrics_bytes or hashlib.sha256(kept).hexdigest() != checkpoint.metrics_sha256:
            raise UserError(
                f"{self.metrics} does not hold the {checkpoint.round} rounds its checkpoint recorded (it is missing, "
                "shorter or changed); --overwrite starts the run over"
            )
        if len(content) > len(kept):
            atomic.write_bytes(self.metrics, kept)  # drop rows written after the checkpoint
        self._metrics_hash = hashlib.sha256(kept)
        return checkpoint

    # summary.json -----------------------------------------------------------------
    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic.write_text(self.summary, json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def read_summary(self) -> dict[str, Any]:
        try:
            summary = json.loads(self.summary.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
            summary = error
        if not isinstance(summary, dict):
            raise UserError(
                f"{self.summary} is not a readable fedsim summary; delete it to finish the run again from its "
                "last checkpoint, or --overwrite to start over"
            )
        return summary


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _format(value: float) -> str:
    value = float(value)
    return "nan" if math.isnan(value) else repr(value)
