"""What a run keeps on disk as it goes: the metric rows of each round (metrics.csv) and,
every ``checkpoint_every`` rounds and after the last, a checkpoint to resume from."""

from __future__ import annotations

from fedsim.checkpoint import Checkpoint, strategy_state
from fedsim.config import Experiment
from fedsim.observers.base import Observer
from fedsim.state import ClientStateStore


class MetricsWriter(Observer):
    """Appends the rows every observer returned to the run's metrics.csv, once per round
    (and once before round 1), atomically."""

    def on_rows(self, context, server_round, rows):
        context.run.append_metrics(rows)


class Checkpoints(Observer):
    """After every ``checkpoint_every`` rounds and the last: the global model, the
    strategy's state and the run's position, in one atomic write; then the client states
    no resume can need any more go."""

    def on_round_end(self, context, server_round, rows, strategy, arrays, final, trained):
        experiment = context.experiment
        if not checkpointed(experiment, server_round):
            return
        metrics_bytes, metrics_sha256 = context.run.metrics_digest()
        checkpoint = Checkpoint(
            round=server_round,
            arrays=arrays,
            strategy_state=strategy_state(strategy),
            metrics_bytes=metrics_bytes,
            metrics_sha256=metrics_sha256,
            elapsed_s=context.elapsed(),
            rounds_time_s=context.rounds_time_s,
            fingerprint=experiment.fingerprint(),
        )
        context.run.save_checkpoint(checkpoint)
        ClientStateStore(context.run.client_state).prune(server_round)


def checkpointed(experiment: Experiment, server_round: int) -> bool:
    """Whether a checkpoint is written after ``server_round``: every ``checkpoint_every``
    rounds, and after the last."""
    return server_round % experiment.checkpoint_every == 0 or server_round == experiment.rounds


class RoundCallback(Observer):
    """Calls ``callback(round, headline, trained=clients that trained)`` at each round's end:
    the progress line and its warnings (:mod:`fedsim.progress`), or Flower's log line."""

    def __init__(self, callback) -> None:
        self.callback = callback

    def on_round_end(self, context, server_round, rows, strategy, arrays, final, trained):
        self.callback(server_round, final, trained=trained)
