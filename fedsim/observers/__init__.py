"""Round observers: everything a run records, each a class the round loop calls without
knowing it by name (:mod:`fedsim.observers.base`).

A run's observers, in the order the loop calls them (:func:`run_observers`): the fault
counts, the clients' and the federation's metrics, the spread of the clients' accuracy
(fairness), the array bytes exchanged with each client, a drift stream's figures (when the
partition is a stream), the attackers' success (when the experiment has ``[[attack]]``
tables), the user's own (``[[observer]]`` tables), then the metrics writer, the
checkpoints, the experiment trackers (``[tracking]``, :mod:`fedsim.observers.tracking`) and
the round callback (the progress line). A user's observer subclasses
:class:`Observer` and is named in an experiment file::

    [[observer]]
    name = "my_package.tracking:LossLogger"   # or an entry point of group "fedsim.observers"
    every = 5                                 # its constructor's keyword arguments
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedsim.attack_plan import AttackPlan
from fedsim.config import Experiment
from fedsim.data import Dataset
from fedsim.observers.attacks import AttackMetrics
from fedsim.observers.base import Observer, RoundObserver, RunContext, metric_rows
from fedsim.observers.fairness import ClientFairness
from fedsim.observers.faults import FaultCounts
from fedsim.observers.metrics import RoundMetrics
from fedsim.observers.records import Checkpoints, MetricsWriter, RoundCallback
from fedsim.observers.stream import StreamMetrics
from fedsim.observers.tracking import MLflowTracker, TensorBoardTracker, trackers
from fedsim.observers.traffic import Traffic
from fedsim.results import RunDirectory
from fedsim.state import ClientStateStore
from fedsim.trainer import ClientTrainer
from partitioners import Partition

OBSERVER_PLUGINS = "fedsim.observers"  # the entry-point group of users' own observers


def run_observers(
    experiment: Experiment,
    dataset: Dataset,
    partition: Partition,
    run: RunDirectory,
    trainer: ClientTrainer,
    on_round: Callable[..., None],
    extra: Sequence[RoundObserver] = (),
) -> list[RoundObserver]:
    """A run's observers, in the order the round loop calls them (see the module
    docstring); ``extra`` are the user's, ``on_round`` the round callback."""
    observers: list[RoundObserver] = [FaultCounts(), RoundMetrics(dataset.domains), ClientFairness(), Traffic()]
    if partition.is_stream:
        observers.append(StreamMetrics(partition, experiment.rounds, experiment.evaluate_every))
    if experiment.attack:
        plan = AttackPlan.from_experiment(experiment, partition.num_clients)
        observers.append(AttackMetrics(plan, dataset, ClientStateStore(run.client_state), trainer))
    # The trackers come after the writer and the checkpoints: every on_rows precedes every
    # on_round_end, so TensorBoard's events of a round are on disk before its checkpoint,
    # and MLflow is sent a round's rows once the checkpoint covering them is written (a
    # resumed run never plays that round again); before the progress line, which then
    # reports a round that is recorded everywhere.
    tracking = trackers(experiment.tracking)
    return [*observers, *extra, MetricsWriter(), Checkpoints(), *tracking, RoundCallback(on_round)]


__all__ = [
    "OBSERVER_PLUGINS",
    "AttackMetrics",
    "Checkpoints",
    "ClientFairness",
    "FaultCounts",
    "MLflowTracker",
    "MetricsWriter",
    "Observer",
    "RoundCallback",
    "RoundMetrics",
    "RoundObserver",
    "RunContext",
    "StreamMetrics",
    "TensorBoardTracker",
    "Traffic",
    "metric_rows",
    "run_observers",
]
