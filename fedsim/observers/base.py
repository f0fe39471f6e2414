"""The round observer protocol: what a run records, called by the round loop at each moment
of a round, in the order of the run's observer list.

The loop (:class:`fedsim.serverapp.Federation`) trains and evaluates; everything a run
records is an observer: the metrics of clients and of the federation, fault counts, a drift
stream's figures, the attackers' success, the metrics file itself, checkpoints, the
progress line, and any observer a user names in an experiment's ``[[observer]]`` tables.
The loop knows none of them by name.

Each hook that can add metrics returns :class:`~fedsim.results.MetricRow`\\ s; the loop
concatenates what its observers return, in their order, and the metrics writer (itself an
observer, late in the list) appends them to ``metrics.csv`` at the round's end. A hook an
observer does not need keeps the no-op of :class:`Observer`.

A round's hooks, in order: ``on_query_replies`` and ``on_query_aggregated`` per query
stage, ``on_train_messages``, ``on_train_replies``, ``on_train_aggregated``, then in a
round that evaluates ``on_evaluate_replies`` and ``on_evaluated``; ``on_exchanges_done``
once the round has nothing more to send (what it cost in traffic:
``RunContext.traffic``); then ``on_rows`` and ``on_round_end``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedsim.config import Experiment
from fedsim.data import Dataset
from fedsim.data.dataset import local_test_size
from fedsim.data.population import Population
from fedsim.ordered_grid import ArrayTraffic
from fedsim.results import MetricRow, RunDirectory
from fedsim.trainer import METRICS_KEY, NUM_EXAMPLES

if TYPE_CHECKING:  # only the types: the loop's modules import this one
    import pandas as pd

    from fedsim.faults import RoundFaults
    from partitioners import Partition

Evaluate = Callable[..., dict[str, float]]  # (arrays[, x, y]) -> classification metrics


@dataclass
class RunContext:
    """What every hook may read, owned by the loop: the experiment, its data and partition,
    the run directory, how to evaluate arrays on the test split (``evaluate_global``),
    where the run's headline figure comes from (``evaluated_on``: the global model on the
    test split, or each client's own model on its held-out data), the clients by Flower
    node id, the run's clocks (``elapsed()``, ``rounds_time_s``) and the array bytes
    exchanged with each client since ``traffic.take()`` was last called (the grid counts
    them: :class:`~fedsim.ordered_grid.ArrayTraffic`)."""

    experiment: Experiment
    dataset: Dataset | Population
    partition: Partition
    run: RunDirectory
    evaluate_global: Evaluate
    evaluated_on: str
    clients: Mapping[int, int]
    elapsed: Callable[[], float]
    rounds_time_s: float = 0.0
    traffic: ArrayTraffic = field(default_factory=ArrayTraffic)

    def train_size(self, client: int, server_round: int) -> int:
        """How many training examples ``client`` holds in ``server_round`` (its view of the
        round's slot, less its held-out share), known from the partition without its data
        (or for a lazy population, which keeps no indices, from the population)."""
        if isinstance(self.dataset, Population):
            n = self.dataset.client_size(client)
        else:
            n = len(self.partition.view_at(client, self.partition.slot_of(server_round)).indices)
        return n - local_test_size(n, self.experiment.client.local_test_fraction)

    def by_client(self, replies: list[Message]) -> list[tuple[int, dict[str, Any]]]:
        """Each reply's client and metrics."""
        return [(self.clients[reply.metadata.src_node_id], dict(reply.content[METRICS_KEY])) for reply in replies]


@runtime_checkable
class RoundObserver(Protocol):
    """The hooks the round loop calls (see the module docstring); :class:`Observer`
    implements each as a no-op."""

    def on_start(self, context: RunContext, arrays: ArrayRecord, final: dict[str, float]) -> list[MetricRow]:
        """Before round 1 of a new run that evaluates: ``final`` is the initial model's
        figures on the test split where the run reports the global model, else empty."""

    def restore(self, context: RunContext, metrics: pd.DataFrame) -> None:
        """Before the first round of a resumed run: rebuild what the observer keeps from
        the run's metrics.csv so far (it is the record; nothing else is saved)."""

    def on_query_replies(
        self, context: RunContext, server_round: int, replies: list[Message], faults: RoundFaults
    ) -> list[MetricRow]:
        """The useful replies of one stage of a query round (a round that does not train)."""

    def on_query_aggregated(self, context: RunContext, server_round: int, metrics: MetricRecord) -> list[MetricRow]:
        """What the strategy's ``aggregate_query`` made of them."""

    def on_train_messages(self, context: RunContext, server_round: int, messages: list[Message]) -> list[Message]:
        """The round's train messages before they are sent; an observer may add to what a
        client is told (the attack observer tells attackers their round's examples)."""

    def on_train_replies(
        self, context: RunContext, server_round: int, replies: list[Message], faults: RoundFaults
    ) -> list[MetricRow]:
        """The round's useful train replies (after the fault screen) and what it set aside."""

    def on_train_aggregated(
        self, context: RunContext, server_round: int, strategy: Strategy, replies: list[Message], metrics: MetricRecord
    ) -> list[MetricRow]:
        """After ``aggregate_train``: its train metrics, and the strategy (a defence's verdicts)."""

    def on_evaluate_replies(
        self,
        context: RunContext,
        server_round: int,
        replies: list[Message],
        faults: RoundFaults,
        arrays: ArrayRecord,
    ) -> list[MetricRow]:
        """The round's useful evaluation replies, and the global arrays they evaluated."""

    def on_evaluated(
        self,
        context: RunContext,
        server_round: int,
        arrays: ArrayRecord,
        on_clients: MetricRecord,
        final: dict[str, float],
    ) -> list[MetricRow]:
        """After the round's evaluation: the strategy's aggregate of the clients' figures
        and the run's headline (the global model's, or the clients' own models')."""

    def on_exchanges_done(self, context: RunContext, server_round: int) -> list[MetricRow]:
        """After the round's last exchange with the clients (its query stages, training
        and, in a round that evaluates, evaluation), before its rows are written: every
        round, evaluated or not."""

    def on_rows(self, context: RunContext, server_round: int, rows: list[MetricRow]) -> None:
        """Every metric row the observers returned for round ``server_round`` (0: before
        the first round), in order; the metrics writer appends them to metrics.csv."""

    def on_round_end(
        self,
        context: RunContext,
        server_round: int,
        rows: list[MetricRow],
        strategy: Strategy,
        arrays: ArrayRecord,
        final: dict[str, float],
        trained: int,
    ) -> None:
        """The round's metric rows, the strategy and global arrays it ends with, its
        headline and how many clients trained."""

    def on_run_end(self, context: RunContext, metrics: pd.DataFrame) -> None:
        """After the last round (plots)."""

    def summary(self) -> dict[str, Any]:
        """What the observer adds to summary.json."""

    def on_finish(self, context: RunContext, summary: dict[str, Any]) -> None:
        """The run's end, every plot drawn: ``summary`` is what summary.json is about to
        hold. summary.json is written once every observer has returned, so a run whose
        observer fails here is not finished, and running it again ends it again: this
        hook may be called twice for one run."""


class Observer:
    """A :class:`RoundObserver` whose hooks do nothing: subclass it and override what you
    need. A user's observer, named in an experiment's ``[[observer]]`` table as
    ``name = "package.module:Class"`` (or an entry point in the ``fedsim.observers``
    group), is built with the table's other keys as keyword arguments; the rows it returns
    go to metrics.csv, its summary to summary.json."""

    def on_start(self, context, arrays, final):
        return []

    def restore(self, context, metrics):
        return None

    def on_query_replies(self, context, server_round, replies, faults):
        return []

    def on_query_aggregated(self, context, server_round, metrics):
        return []

    def on_train_messages(self, context, server_round, messages):
        return messages

    def on_train_replies(self, context, server_round, replies, faults):
        return []

    def on_train_aggregated(self, context, server_round, strategy, replies, metrics):
        return []

    def on_evaluate_replies(self, context, server_round, replies, faults, arrays):
        return []

    def on_evaluated(self, context, server_round, arrays, on_clients, final):
        return []

    def on_exchanges_done(self, context, server_round):
        return []

    def on_rows(self, context, server_round, rows):
        return None

    def on_round_end(self, context, server_round, rows, strategy, arrays, final, trained):
        return None

    def on_run_end(self, context, metrics):
        return None

    def summary(self):
        return {}

    def on_finish(self, context, summary):
        return None


def metric_rows(server_round: int, scope: str, ident: str, metrics: Any) -> list[MetricRow]:
    """The numeric entries of ``metrics`` as rows of metrics.csv (the example count, by which
    Flower weights replies, is not a figure of the run)."""
    return [
        MetricRow(server_round, scope, ident, key, float(value))
        for key, value in dict(metrics).items()
        if isinstance(value, (int, float)) and key != NUM_EXAMPLES
    ]
