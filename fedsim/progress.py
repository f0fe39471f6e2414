"""What a run shows as its rounds finish.

On a terminal, a progress bar; anywhere else (a pipe, a log file, CI) one line per round::

    round 3/20  accuracy 0.8123  loss 0.6021  12.4 s

with a dash for a figure the round did not measure (``evaluate_every``); nothing with
``--quiet``. Whatever the display, a warning goes to stderr, once per run, when the
global loss stops being finite and when a round trained no client.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from fedsim.config import Experiment
from fedsim.notices import warn


def evaluates_after(experiment: Experiment, server_round: int) -> bool:
    """Whether a round ends with an evaluation: every ``evaluate_every`` rounds and after
    the last, never if it is 0 (as :meth:`fedsim.serverapp.Federation.evaluates_after`)."""
    every = experiment.evaluate_every
    return every > 0 and (server_round % every == 0 or server_round == experiment.rounds)


class RoundWarnings:
    """The warnings a run gives once each: its global loss became NaN or infinite; a round
    trained no client (``trained`` is the number of clients that trained in the round,
    where the caller knows it)."""

    def __init__(self) -> None:
        self.diverged = False
        self.untrained = False

    def __call__(self, server_round: int, metrics: dict[str, float], trained: int | None = None) -> None:
        loss = metrics.get("loss")
        if not self.diverged and isinstance(loss, float) and not math.isfinite(loss):
            self.diverged = True
            warn(
                f"round {server_round}: the global loss is {loss}; training diverged "
                "(a smaller client.lr usually helps)"
            )
        if not self.untrained and trained == 0:
            self.untrained = True
            warn(
                f"round {server_round}: no client trained (the strategy sampled none); "
                "check [strategy] fraction_train and min_train_nodes"
            )


def format_figure(metrics: dict[str, float], key: str, measured: bool) -> str:
    value = metrics.get(key)
    return f"{value:.4f}" if measured and isinstance(value, (int, float)) else "-"


def round_line(server_round: int, rounds: int, metrics: dict[str, float], measured: bool, elapsed_s: float) -> str:
    """``round 3/20  accuracy 0.8123  loss 0.6021  12.4 s``."""
    accuracy, loss = (format_figure(metrics, key, measured) for key in ("accuracy", "loss"))
    return f"round {server_round}/{rounds}  accuracy {accuracy}  loss {loss}  {elapsed_s:.1f} s"


RoundReporter = Callable[..., None]  # (server_round, metrics, trained=None)


@contextmanager
def round_reporter(
    experiment: Experiment, enabled: bool, done: int, stream: IO[str] | None = None
) -> Iterator[RoundReporter]:
    """The round callback for ``experiment`` resumed after round ``done``: a progress bar
    when ``stream`` (stdout) is a terminal, else one line per round, nothing more if not
    ``enabled``; the warnings always."""
    stream = stream if stream is not None else sys.stdout
    warnings = RoundWarnings()
    if not enabled:
        yield warnings
        return
    started = time.monotonic()
    if not _is_terminal(stream):

        def print_line(server_round: int, metrics: dict[str, float], trained: int | None = None) -> None:
            measured = evaluates_after(experiment, server_round)
            line = round_line(server_round, experiment.rounds, metrics, measured, time.monotonic() - started)
            print(line, file=stream, flush=True)
            warnings(server_round, metrics, trained)

        yield print_line
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

        def update_bar(server_round: int, metrics: dict[str, float], trained: int | None = None) -> None:
            bar.update(task, completed=server_round, accuracy=f"{metrics.get('accuracy', float('nan')):.4f}")
            warnings(server_round, metrics, trained)  # rich prints it above the bar

        yield update_bar


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
