"""The ServerApp main: drive a Flower strategy, round by round, against any Grid.

The loop is Flower's ``Strategy.start`` (configure_train -> aggregate_train ->
configure_evaluate -> aggregate_evaluate -> centralised evaluation), written out here
because a simulator also needs to: resume from a checkpoint, screen faulty replies, ask
a strategy's query rounds, and make client sampling independent of the engine. What a
run records (metrics, checkpoints, progress, a drift stream's and an attack's figures) is
its observers' (:mod:`fedsim.observers`), which the loop calls at each moment of a round
without knowing any by name. Strategies stay plain Flower strategies that run under
``start`` too.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import multimodel
from fedsim.checkpoint import Checkpoint, restore_strategy
from fedsim.config import Experiment
from fedsim.environment import RunEnvironment
from fedsim.faults import FaultPlan, Screen
from fedsim.observers.base import RoundObserver, RunContext
from fedsim.ordered_grid import OrderedGrid, discover_clients
from fedsim.protocols import Querying, SeveralModels
from fedsim.results import CLIENT_HOLDOUT, GLOBAL_TEST, MetricRow, RunDirectory
from fedsim.seeding import derive_seed
from fedsim.trainer import SERVER_ROUND, TIME_SLOT, RoundConfig
from fedsim.training import classification_metrics, predict
from partitioners import Partition

MAX_QUERY_STAGES = 16  # a strategy that keeps asking is a bug, not a long study
REPLY_TIMEOUT_S = 24 * 3600.0  # a simulated client never drops out; waiting is correct
HEADLINE = ("accuracy", "loss")  # the run's figures: the global model's, or the clients' own models'


def train_config(experiment: Experiment, server_round: int) -> ConfigRecord:
    """The experiment's ``[client]`` table and the round, as the ConfigRecord sent with every
    train message (Flower's FedAvg family stamps ``server-round`` too; other strategies may not)."""
    settings = experiment.client.model_dump(exclude={"local_test_fraction"})
    return RoundConfig(server_round=server_round, **settings).to_config()


class Federation:
    """One experiment's federated run: the ServerApp main for any engine.

    ``make_strategy()`` builds the experiment's strategy when the run starts; ``observers``
    record the run (:func:`fedsim.observers.run_observers` makes a run's list), called in
    their order at each moment of every round. ``final`` is the run's headline after the
    last evaluation: the global model's accuracy and loss on the test split, or, where
    clients use models of their own (``evaluated_on``), their mean on the clients'
    held-out data.
    """

    def __init__(
        self,
        env: RunEnvironment,
        run: RunDirectory,
        partition: Partition,
        make_strategy: Callable[[], Strategy],
        observers: Sequence[RoundObserver],
        resume: Checkpoint | None = None,
        started: float | None = None,
    ) -> None:
        self.env = env
        self.experiment = env.experiment
        self.run = run
        self.dataset = env.dataset()
        self.partition = partition
        self.make_strategy = make_strategy
        self.observers = list(observers)
        self.num_clients = partition.num_clients
        self.resume = resume
        self.final: dict[str, float] = {}
        faults = self.experiment.faults
        plan = FaultPlan(self.experiment.seed, faults.probabilities(), _clients(faults.clients), faults.scale_factor)
        self.screen = Screen(plan, faults.min_replies, self.experiment.guards.max_update_norm)
        self.evaluated_on = GLOBAL_TEST  # where `final` comes from; see is_personalized
        self._started = time.monotonic() if started is None else started  # when the command began
        self.context: RunContext | None = None
        # seconds spent in rounds (training, evaluation, metrics), over every command that
        # worked on the run: the run's cost without start-up
        self.rounds_time_s = resume.rounds_time_s if resume else 0.0

    # -- building blocks ------------------------------------------------------------
    def new_model_arrays(self, index: int = 0) -> ArrayRecord:
        """A freshly initialised model; model ``index`` of a strategy with several gets its own draw."""
        torch.manual_seed(derive_seed(self.experiment.seed, "init", *([index] if index else [])))
        return ArrayRecord(self.env.new_model().state_dict())

    def initial_arrays(self, strategy: Strategy) -> ArrayRecord:
        """The global arrays before round 1: one new model, or what the strategy's
        ``initial_arrays(new_model)`` makes of new models (several, :mod:`fedsim.multimodel`)."""
        if isinstance(strategy, SeveralModels):
            return strategy.initial_arrays(self.new_model_arrays)
        return self.new_model_arrays()

    def evaluate_global(
        self, arrays: ArrayRecord, x: np.ndarray | None = None, y: np.ndarray | None = None
    ) -> dict[str, float]:
        """Centralised evaluation of the global model on the dataset's test split (or ``x``, ``y``).

        Keys a strategy keeps on the clients (FedBN's BN layers) stay at initial values.
        """
        model = self.env.new_model()
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        device = self.env.enter(server=True)
        model.to(device)
        x, y = (self.dataset.x_test, self.dataset.y_test) if x is None else (x, y)
        return classification_metrics(predict(model, x, device), y)

    def elapsed(self) -> float:
        """Wall time of the whole run, over every command that worked on it."""
        offset = self.resume.elapsed_s if self.resume else 0.0
        return offset + time.monotonic() - self._started

    def tell(self, hook: str, *args) -> list[MetricRow]:
        """Call ``hook`` on every observer, in order; the rows they return, concatenated."""
        rows: list[MetricRow] = []
        for observer in self.observers:
            rows += getattr(observer, hook)(self.context, *args) or []
        return rows

    # -- the run --------------------------------------------------------------------
    def __call__(self, grid: Grid, context: Context) -> None:
        grid = OrderedGrid(grid, discover_clients(grid, self.num_clients))
        strategy = self.make_strategy()
        if self.resume is not None:
            restore_strategy(strategy, self.resume.strategy_state, str(self.run.checkpoint))
            arrays, first = self.resume.arrays, self.resume.round + 1
        else:
            arrays, first = self.initial_arrays(strategy), 1
        # under drift, each client's current data is the test that matters; with several
        # global models, so is the model each client picks
        personal = is_personalized(strategy) or self.partition.is_stream or multimodel.is_packed(arrays)
        self.evaluated_on = CLIENT_HOLDOUT if personal else GLOBAL_TEST
        self.context = RunContext(
            self.experiment,
            self.dataset,
            self.partition,
            self.run,
            self.evaluate_global,
            self.evaluated_on,
            grid.clients,
            self.elapsed,
            self.rounds_time_s,
            grid.traffic,
        )
        if self.resume is not None:
            metrics = self.run.read_metrics()
            self.final = headline(metrics, self.evaluated_on)
            for observer in self.observers:
                observer.restore(self.context, metrics)
        elif self.experiment.evaluate_every > 0:
            self.final = self.evaluate_global(arrays) if self.evaluated_on == GLOBAL_TEST else {}
            self.tell("on_rows", 0, self.tell("on_start", arrays, self.final))
        for server_round in range(first, self.experiment.rounds + 1):
            started = time.perf_counter()
            arrays = self.play_round(server_round, strategy, arrays, grid, started)
        metrics = self.run.read_metrics()
        self.tell("on_run_end", metrics)

    def play_round(
        self, server_round: int, strategy: Strategy, arrays: ArrayRecord, grid: OrderedGrid, started: float
    ) -> ArrayRecord:
        random.seed(derive_seed(self.experiment.seed, "query", server_round))
        rows = self.query(server_round, strategy, arrays, grid)
        # Flower samples clients with the module-level `random`: seed it per round, so
        # the choice depends on (seed, round) only, on every engine and after a resume.
        random.seed(derive_seed(self.experiment.seed, "sample", server_round))
        config = ConfigRecord({**train_config(self.experiment, server_round), **self.slot_config(server_round)})
        messages = strategy.configure_train(server_round, arrays, config, grid)
        messages = self.screen.plan.inject(messages, server_round, grid.clients)
        for observer in self.observers:
            messages = observer.on_train_messages(self.context, server_round, list(messages))
        replies = grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S)
        replies, faults = self.screen.train(replies, server_round, grid.clients, arrays)
        trained = len(replies)  # useful replies: what the strategy aggregates
        rows += self.tell("on_train_replies", server_round, replies, faults)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        rows += self.tell("on_train_aggregated", server_round, strategy, replies, train_metrics or MetricRecord())
        if self.evaluates_after(server_round):
            rows += self.evaluate(server_round, strategy, arrays, grid)
        rows += self.tell("on_exchanges_done", server_round)  # the round sends nothing more
        self.tell("on_rows", server_round, rows)
        self.rounds_time_s += time.perf_counter() - started
        self.context.rounds_time_s = self.rounds_time_s
        for observer in self.observers:
            observer.on_round_end(self.context, server_round, rows, strategy, arrays, self.final, trained)
        return arrays

    def slot_config(self, server_round: int) -> dict[str, int]:
        return {TIME_SLOT: self.partition.slot_of(server_round)}

    def query(self, server_round: int, strategy: Strategy, arrays: ArrayRecord, grid: OrderedGrid) -> list[MetricRow]:
        """Rounds that do not train: before training, a strategy with ``configure_query``
        (same arguments as ``configure_train``) may ask clients for statistics; the replies
        go to its ``aggregate_query(server_round, replies) -> MetricRecord | None``. It is
        asked again after each, until it sends nothing (several stages: FedDAA's
        prototypes, then drift detection against the centres they gave)."""
        if not isinstance(strategy, Querying):
            return []
        rows: list[MetricRow] = []
        for _stage in range(MAX_QUERY_STAGES):
            config = ConfigRecord({SERVER_ROUND: server_round, **self.slot_config(server_round)})
            messages = list(strategy.configure_query(server_round, arrays, config, grid))
            if not messages:
                return rows
            replies = grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S)
            replies, faults = self.screen.evaluate(replies, server_round, grid.clients)
            rows += self.tell("on_query_replies", server_round, replies, faults)
            metrics = strategy.aggregate_query(server_round, replies) or MetricRecord()
            rows += self.tell("on_query_aggregated", server_round, metrics)
        raise RuntimeError(
            f"{type(strategy).__name__}.configure_query asked more than {MAX_QUERY_STAGES} times in a round"
        )

    def evaluates_after(self, server_round: int) -> bool:
        """Every ``evaluate_every`` rounds, and always after the last; never if it is 0."""
        every = self.experiment.evaluate_every
        return every > 0 and (server_round % every == 0 or server_round == self.experiment.rounds)

    def evaluate(
        self, server_round: int, strategy: Strategy, arrays: ArrayRecord, grid: OrderedGrid
    ) -> list[MetricRow]:
        """Client-side evaluation on the clients' held-out data, then the global model's on
        the test split (unless the clients use models of their own)."""
        replies = grid.send_and_receive(
            strategy.configure_evaluate(
                server_round, arrays, ConfigRecord({SERVER_ROUND: server_round, **self.slot_config(server_round)}), grid
            ),
            timeout=REPLY_TIMEOUT_S,
        )
        replies, faults = self.screen.evaluate(replies, server_round, grid.clients)
        rows = self.tell("on_evaluate_replies", server_round, replies, faults, arrays)
        on_clients = strategy.aggregate_evaluate(server_round, replies) or MetricRecord()
        if self.evaluated_on == CLIENT_HOLDOUT:
            # Each client's own model on its own held-out data is the result to report.
            self.final = {key: float(on_clients[key]) for key in HEADLINE if key in on_clients}
        else:
            self.final = self.evaluate_global(arrays)
        return rows + self.tell("on_evaluated", server_round, arrays, on_clients, self.final)

    def summary(self) -> dict:
        """What the observers add to summary.json, in their order."""
        out: dict = {}
        for observer in self.observers:
            out.update(observer.summary())
        return out


def headline(metrics, evaluated_on: str) -> dict[str, float]:
    """A resumed run's headline, from its metrics.csv: the last evaluation's figures."""
    evaluated = metrics[metrics.scope.isin(["server", "domain"]) | (metrics.id == "evaluate")]
    last = evaluated[evaluated["round"] == evaluated["round"].max()] if len(evaluated) else evaluated
    if evaluated_on == CLIENT_HOLDOUT:
        found = last[(last.scope == "federated") & (last.id == "evaluate")]
    else:
        found = last[last.scope == "server"]
    return {key: value for key, value in zip(found.metric, found.value) if key in HEADLINE}


def _clients(clients: list[int] | None) -> frozenset[int] | None:
    return None if clients is None else frozenset(clients)


def is_personalized(strategy: Strategy) -> bool:
    """Whether clients use models of their own, so the global arrays are not evaluated
    (:class:`fedsim.protocols.StrategyClass`'s ``personalized``)."""
    return bool(getattr(strategy, "personalized", False))
