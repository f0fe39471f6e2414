"""Experiment tracking: a run's figures sent to TensorBoard or MLflow as it goes, by round
observers that the experiment's ``[tracking]`` table names::

    [tracking]
    backends = ["tensorboard", "mlflow"]
    mlflow_uri = "http://localhost:5000"   # default: sqlite:///<run dir>/mlflow.db
    mlflow_experiment = "mnist-skew"       # default: the experiment's name

Each tracker sends the resolved experiment, flattened to dotted keys (``client.lr``,
``strategy.name``), as hyperparameters; every row of metrics.csv as a scalar whose step is
its round, tagged ``<scope>/<id>/<metric>``; and, at the run's end, the numbers of
summary.json (tagged ``summary/<key>``, at the last round) and the figures in ``plots/``.

A resumed run continues the same TensorBoard run and the same MLflow run, with one value
per step, whatever moment the interrupted process stopped at:

- TensorBoard (``<run dir>/tensorboard``): a round's events are flushed before its
  checkpoint is written, and a resumed run reopens the folder with ``purge_step`` = the
  last round of its metrics.csv (the checkpoint's), whose rows it writes again: TensorBoard's
  readers discard whatever the interrupted process wrote for that round or later (the
  rounds the resumed run plays again, an end that was cut short).
- MLflow cannot discard a logged value, so it is sent a round's rows only once the
  checkpoint that covers them is written (every ``checkpoint_every`` rounds): the store
  never holds a round that a resumed run plays again. ``mlflow_run.json`` in the run
  directory keeps the run's id and the last round sent; a resumed run sends what was
  checkpointed but not sent, less what the store already has (a send cut short).

The packages are optional extras, imported when a run starts; :func:`check_backends`
reports a missing one when the experiment is validated.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedsim import atomic
from fedsim.config import TrackingTable
from fedsim.errors import UserError
from fedsim.observers.base import Observer
from fedsim.observers.records import checkpointed
from fedsim.results import MetricRow

# what each backend imports (the import name, the distribution to name when it is missing)
BACKEND_PACKAGES = {
    "tensorboard": [("tensorboard", "tensorboard")],
    "mlflow": [("mlflow", "mlflow")],
}
# MLflow's default store here is SQLite, which its client reaches through these
SQLITE_STORE_PACKAGES = [("sqlalchemy", "sqlalchemy"), ("alembic", "alembic")]
SUMMARY = "summary"  # the tag prefix of summary.json's numbers
MLFLOW_RUN_FILE = "mlflow_run.json"


def check_backends(tracking: TrackingTable) -> None:
    """A one-line UserError unless every package the ``[tracking]`` backends need is installed."""
    for backend in tracking.backends:
        needed = list(BACKEND_PACKAGES[backend])
        if backend == "mlflow" and uses_local_store(tracking):
            needed += SQLITE_STORE_PACKAGES
        for module, package in needed:
            if find_spec(module) is None:
                raise UserError(
                    f'[tracking] backends: "{backend}" needs the {package} package: pip install -e ".[{backend}]"'
                )


def uses_local_store(tracking: TrackingTable) -> bool:
    """Whether MLflow's store is SQLite: the default one in the run directory, or a ``sqlite:`` URI."""
    return tracking.mlflow_uri is None or tracking.mlflow_uri.startswith("sqlite:")


def trackers(tracking: TrackingTable) -> list[Observer]:
    """The observers of the ``[tracking]`` backends, in the table's order."""
    made = {"tensorboard": TensorBoardTracker, "mlflow": lambda: MLflowTracker(tracking)}
    return [made[backend]() for backend in tracking.backends]


# -- what both send ----------------------------------------------------------------------
def flat_config(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The resolved experiment as (dotted key, value): tables and inline tables nest
    (``strategy.defence_options.f``), an array of tables counts from 0 (``attack.0.method``),
    any other array is one JSON value."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from flat_config(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        for index, item in enumerate(data):
            yield from flat_config(item, f"{prefix}.{index}")
    elif isinstance(data, list):
        yield prefix, json.dumps(data)
    elif isinstance(data, bool):
        yield prefix, str(data).lower()  # as the experiment file spells it
    else:
        yield prefix, data


def summary_numbers(summary: dict[str, Any], prefix: str = SUMMARY) -> Iterator[tuple[str, float]]:
    """The numbers of summary.json, nested keys joined with dots: ``summary/faults.drop``."""
    for key, value in summary.items():
        name = f"{prefix}/{key}" if prefix == SUMMARY else f"{prefix}.{key}"
        if isinstance(value, dict):
            yield from summary_numbers(value, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, float(value)


def tag(row: MetricRow) -> str:
    return f"{row.scope}/{row.id}/{row.metric}"


def recorded_rows(metrics) -> list[MetricRow]:
    """The rows of metrics.csv (as :meth:`~fedsim.results.RunDirectory.read_metrics` reads it)."""
    columns = (metrics["round"], metrics["scope"], metrics["id"], metrics["metric"], metrics["value"])
    return [
        MetricRow(int(r), str(scope), str(ident), str(metric), float(value))
        for r, scope, ident, metric, value in zip(*columns)
    ]


def plot_files(context) -> list[Path]:
    return sorted(context.run.plots.glob("*.png")) if context.run.plots.is_dir() else []


# -- TensorBoard -------------------------------------------------------------------------
class TensorBoardTracker(Observer):
    """Writes the run to TensorBoard event files in ``<run dir>/tensorboard``: the resolved
    experiment in the HParams dashboard, every metrics.csv row as a scalar, and at the end
    summary.json's numbers and the plots as images (see the module docstring)."""

    def __init__(self) -> None:
        self.writer: Any = None
        self.resumed_at: int | None = None  # a resumed run's last round in metrics.csv
        self.resumed_rows: list[MetricRow] = []  # and that round's rows

    def restore(self, context, metrics):
        rows = recorded_rows(metrics)
        self.resumed_at = max((row.round for row in rows), default=0)
        self.resumed_rows = [row for row in rows if row.round == self.resumed_at]

    def open(self, context) -> None:
        """The writer. A resumed run's starts at the last round metrics.csv holds
        (``purge_step``): TensorBoard's readers drop every event the interrupted process
        wrote for that round or later (rounds played again, the end of a run cut short),
        and the round's rows are written again from metrics.csv."""
        # lazy: optional extra
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(context.run.path / "tensorboard"), purge_step=self.resumed_at)
        if self.resumed_at is None or self.resumed_at == 0:  # a resumed run's session started before
            self.write_session_start(context)
        if self.resumed_at is not None:
            self.write_rows(self.resumed_at, self.resumed_rows)

    def write_session_start(self, context) -> None:
        # lazy: optional extra
        from torch.utils.tensorboard.summary import hparams

        _, session_start, _ = hparams(self.hparams(context), {})
        self.writer.file_writer.add_summary(session_start)

    @staticmethod
    def hparams(context) -> dict[str, Any]:
        return {key: value if isinstance(value, (int, float, str)) else str(value) for key, value in _config(context)}

    def write_rows(self, server_round: int, rows: list[MetricRow]) -> None:
        for row in rows:
            self.writer.add_scalar(tag(row), row.value, server_round)
        self.writer.flush()  # on disk before the round's checkpoint: a resume never needs it again

    def on_rows(self, context, server_round, rows):
        if self.writer is None:
            self.open(context)
        self.write_rows(server_round, rows)

    def on_finish(self, context, summary):
        # lazy: optional extra
        from torch.utils.tensorboard.summary import hparams

        if self.writer is None:  # a resumed run whose rounds were all played: only its end is left
            self.open(context)
        last = context.experiment.rounds
        numbers = dict(summary_numbers(summary))
        for name, value in numbers.items():
            self.writer.add_scalar(name, value, last)
        for path in plot_files(context):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"plots/{path.stem}", pixels, last, dataformats="HWC")
        experiment, _, session_end = hparams(self.hparams(context), numbers)
        self.writer.file_writer.add_summary(experiment)  # the HParams dashboard's columns
        self.writer.file_writer.add_summary(session_end)
        self.writer.close()
        self.writer = None


# -- MLflow ------------------------------------------------------------------------------
MLFLOW_MAX_METRICS = 1000  # per log_batch request (MLflow's limit)
MLFLOW_MAX_PARAMS = 100
MLFLOW_MAX_PARAM_LENGTH = 6000
MLFLOW_MAX_KEY_LENGTH = 250


def mlflow_key(name: str) -> str:
    """``name`` as an MLflow key: characters MLflow refuses (it allows letters, digits,
    ``_ - . /`` and spaces everywhere) become ``_``, and no path part is empty, ``.`` or ``..``."""
    parts = [re.sub(r"[^\w.\- ]", "_", part) for part in name.split("/")]
    parts = [part if part.strip(".") else part.replace(".", "_") or "_" for part in parts]
    return "/".join(parts)[:MLFLOW_MAX_KEY_LENGTH].rstrip("/")


class MLflowTracker(Observer):
    """Logs the run to an MLflow run: the resolved experiment as params (and config.toml as
    an artifact), every metrics.csv row as a metric once its round is checkpointed, and at
    the end summary.json's numbers and the plots as artifacts (see the module docstring)."""

    def __init__(self, tracking: TrackingTable) -> None:
        self.tracking = tracking
        self.client: Any = None
        self.run_id: str | None = None
        self.sent_through = -1  # the last round whose rows the store holds in full
        self.unsent: list[MetricRow] = []  # rows of rounds whose checkpoint is not yet written

    # -- the run's MLflow run ------------------------------------------------------------
    def uri(self, context) -> str:
        if self.tracking.mlflow_uri is not None:
            return self.tracking.mlflow_uri
        return f"sqlite:///{context.run.path.resolve() / 'mlflow.db'}"

    def connect(self, context) -> None:
        # lazy: optional extra
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if self.client is not None:
            return
        # a new SQLite store announces its tables at INFO, in the middle of the progress line
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        uri = self.uri(context)
        try:
            self.client = MlflowClient(tracking_uri=uri)
        except MlflowException as error:
            raise UserError(f"[tracking] mlflow_uri = {uri!r}: {_first_line(error)}") from None

    def start(self, context) -> None:
        """A new MLflow run, its id saved at once, then the experiment's params."""
        self.connect(context)
        run = self.client.create_run(
            self.experiment_id(context),
            run_name=context.run.path.resolve().name,
            tags={
                "fedsim.run_dir": str(context.run.path.resolve()),
                "fedsim.fingerprint": context.experiment.fingerprint(),
            },
        )
        self.run_id = run.info.run_id
        self.sent_through = -1
        self.save_state(context)
        self.log_params(context)

    def experiment_id(self, context) -> str:
        """The MLflow experiment's id, made if it does not exist yet (the local store keeps
        its artifacts in ``<run dir>/mlartifacts``)."""
        # lazy: optional extra
        from mlflow.exceptions import MlflowException

        name = self.tracking.mlflow_experiment or context.experiment.name
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (context.run.path.resolve() / "mlartifacts").as_uri() if self.tracking.mlflow_uri is None else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another run made it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_params(self, context) -> None:
        """The resolved experiment as params (logging a param again with the same value is
        allowed, so a resumed run may repeat it), and config.toml as an artifact."""
        # lazy: optional extra
        from mlflow.entities import Param

        params = [
            Param(mlflow_key(key), str(value)[:MLFLOW_MAX_PARAM_LENGTH]) for key, value in _config(context) if key
        ]
        for start in range(0, len(params), MLFLOW_MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_MAX_PARAMS])
        self.client.log_artifact(self.run_id, str(context.run.config))

    def state_file(self, context) -> Path:
        return context.run.path / MLFLOW_RUN_FILE

    def save_state(self, context) -> None:
        state = {"run_id": self.run_id, "sent_through_round": self.sent_through}
        atomic.write_text(self.state_file(context), json.dumps(state, indent=2) + "\n")

    def read_state(self, context) -> dict[str, Any]:
        """What the interrupted process saved: JSON only, and nothing if it is unreadable (a
        new MLflow run is then started)."""
        try:
            state = json.loads(self.state_file(context).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        if not isinstance(state, dict) or not isinstance(state.get("run_id"), str):
            return {}
        return state

    # -- the hooks ------------------------------------------------------------------------
    def restore(self, context, metrics):
        """Continue the interrupted process's MLflow run: send the rounds it checkpointed
        but did not send, or sent only in part (MLflow would keep a value sent twice: skip
        what the store has)."""
        # lazy: optional extra
        from mlflow.exceptions import MlflowException

        state = self.read_state(context)
        self.connect(context)
        try:
            self.client.update_run(state["run_id"], status="RUNNING")
        except (KeyError, MlflowException):  # no state, or the store lost the run: start one
            self.start(context)
            known = False
        else:
            self.run_id = state["run_id"]
            sent = state.get("sent_through_round")
            self.sent_through = sent if isinstance(sent, int) and not isinstance(sent, bool) else -1
            self.log_params(context)  # the process may have stopped before they were all sent
            known = True
        rows = recorded_rows(metrics)
        self.send([row for row in rows if row.round > self.sent_through], skip_present=known)
        self.sent_through = max([self.sent_through, *(row.round for row in rows)])
        self.save_state(context)

    def on_rows(self, context, server_round, rows):
        if self.run_id is None:
            self.start(context)
        self.unsent += rows

    def on_round_end(self, context, server_round, rows, strategy, arrays, final, trained):
        if checkpointed(context.experiment, server_round):  # Checkpoints, before this observer, wrote it
            self.send(self.unsent)
            self.unsent = []
            self.sent_through = server_round
            self.save_state(context)

    def on_finish(self, context, summary):
        """summary.json's numbers (those the store does not have yet: a run whose end was
        cut short finishes again), the plots, and the run marked finished."""
        # lazy: optional extra
        from mlflow.entities import Metric

        if self.run_id is None:
            self.start(context)
        self.send(self.unsent)
        self.unsent = []
        present = self.client.get_run(self.run_id).data.metrics
        last, now = context.experiment.rounds, _now_ms()
        numbers = [
            Metric(key, value, now, last)
            for key, value in ((mlflow_key(name), value) for name, value in summary_numbers(summary))
            if key not in present
        ]
        self.log_metrics(numbers)
        if plot_files(context):
            self.client.log_artifacts(self.run_id, str(context.run.plots), "plots")
        self.client.set_terminated(self.run_id, "FINISHED")

    # -- sending --------------------------------------------------------------------------
    def send(self, rows: list[MetricRow], skip_present: bool = False) -> None:
        """``rows`` as metrics at their rounds; with ``skip_present``, not those whose key
        already has a value at that round."""
        # lazy: optional extra
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [Metric(mlflow_key(tag(row)), row.value, now, row.round) for row in rows]
        if skip_present:
            steps = {
                key: {m.step for m in self.client.get_metric_history(self.run_id, key)}
                for key in {m.key for m in metrics}
            }
            metrics = [m for m in metrics if m.step not in steps[m.key]]
        self.log_metrics(metrics)

    def log_metrics(self, metrics: list) -> None:
        for start in range(0, len(metrics), MLFLOW_MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + MLFLOW_MAX_METRICS])


def _config(context) -> Iterator[tuple[str, Any]]:
    return flat_config(context.experiment.to_dict())


def _now_ms() -> int:
    return int(time.time() * 1000)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
