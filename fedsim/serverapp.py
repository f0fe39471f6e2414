"""The ServerApp main: drive a Flower strategy, round by round, against any Grid.

The loop is Flower's ``Strategy.start`` (configure_train -> aggregate_train ->
configure_evaluate -> aggregate_evaluate -> centralised evaluation), written out here
because a simulator also needs to: resume from a checkpoint, record every client's
metrics, save a checkpoint after each round, and make client sampling independent of
the engine. Strategies stay plain Flower strategies that run under ``start`` too.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import multimodel
from fedsim.attacks.metrics import AttackMetrics
from fedsim.attacks.plan import AttackPlan, tell_attackers
from fedsim.checkpoint import Checkpoint, restore_strategy, strategy_state
from fedsim.clientapp import DOMAIN_CORRECT, DOMAIN_COUNT
from fedsim.config import Experiment
from fedsim.data.dataset import local_test_size
from fedsim.environment import RunEnvironment
from fedsim.faults import FaultPlan, RoundFaults, Screen
from fedsim.lookups import strategy_trainer
from fedsim.ordered_grid import OrderedGrid, discover_clients
from fedsim.results import CLIENT_HOLDOUT, GLOBAL_TEST, MetricRow, RunDirectory
from fedsim.seeding import derive_seed
from fedsim.state import ClientStateStore
from fedsim.stream_metrics import StreamMetrics, is_stream
from fedsim.trainer import METRICS_KEY, NUM_EXAMPLES, SERVER_ROUND, TIME_SLOT, RoundConfig
from fedsim.training import classification_metrics, predict
from partitioners import Partition

MAX_QUERY_STAGES = 16  # a strategy that keeps asking is a bug, not a long study
REPLY_TIMEOUT_S = 24 * 3600.0  # a simulated client never drops out; waiting is correct
CLIENT_MEASURES = ("accuracy", "loss")  # what the summary follows on each client's held-out data


def train_config(experiment: Experiment, server_round: int) -> ConfigRecord:
    """The experiment's ``[client]`` table and the round, as the ConfigRecord sent with every
    train message (Flower's FedAvg family stamps ``server-round`` too; other strategies may not)."""
    settings = experiment.client.model_dump(exclude={"local_test_fraction"})
    return RoundConfig(server_round=server_round, **settings).to_config()


RoundCallback = Callable[..., None]  # (round, server metrics, *, trained=number of useful train replies)


class Federation:
    """One experiment's federated run: the ServerApp main for any engine.

    Writes metrics after every round and a checkpoint every ``checkpoint_every`` rounds
    (and after the last) to the run directory, and calls
    ``on_round(round, server_metrics, trained=useful_train_replies)`` (for a progress bar
    and its warnings).
    """

    def __init__(
        self,
        env: RunEnvironment,
        run: RunDirectory,
        partition: Partition,
        make_strategy: Callable[[], Strategy],
        resume: Checkpoint | None = None,
        on_round: RoundCallback | None = None,
        started: float | None = None,
    ) -> None:
        self.env = env
        self.experiment = env.experiment
        self.run = run
        self.dataset = env.dataset()
        self.partition = partition
        self.make_strategy = make_strategy  # the experiment's strategy, built when the run starts
        self.num_clients = partition.num_clients
        # a drift stream's per-slot, per-concept and drift-detection figures (fedsim.stream_metrics)
        self.stream = (
            StreamMetrics(partition, self.experiment.rounds, self.experiment.evaluate_every)
            if is_stream(partition)
            else None
        )
        # per-attacker success rates and a defence's verdicts (fedsim.attacks.metrics)
        self.attacks = attack_metrics(env, run, self.dataset, self.num_clients)
        self.resume = resume
        self.on_round = on_round or (lambda _round, _metrics, **_: None)
        self.final: dict[str, float] = {}
        # each client's latest held-out figures, by measure (CLIENT_MEASURES) and client
        self.client_latest: dict[str, dict[int, float]] = {measure: {} for measure in CLIENT_MEASURES}
        self.accuracy_by_domain: dict[str, float] = {}
        self.faults: dict[str, int] = {}  # what the rounds set aside, by kind (fedsim.faults)
        faults = self.experiment.faults
        plan = FaultPlan(self.experiment.seed, faults.probabilities(), _clients(faults.clients), faults.scale_factor)
        self.screen = Screen(plan, faults.min_replies, self.experiment.guards.max_update_norm)
        self.evaluated_on = GLOBAL_TEST  # where `final` comes from; see is_personalized
        self._started = time.monotonic() if started is None else started  # when the command began
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
        make = getattr(strategy, "initial_arrays", None)
        return make(self.new_model_arrays) if callable(make) else self.new_model_arrays()

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
        personal = is_personalized(strategy) or self.stream is not None or multimodel.is_packed(arrays)
        self.evaluated_on = CLIENT_HOLDOUT if personal else GLOBAL_TEST
        if self.resume is not None:
            self._restore_from_metrics()
        elif self.evaluated_on == GLOBAL_TEST and self.experiment.evaluate_every > 0:
            self.final = self.evaluate_global(arrays)
            self.run.append_metrics(self._rows(0, "server", "global", self.final))
        if self.resume is None and self.attacks is not None and self.experiment.evaluate_every > 0:
            clean = self.final if self.evaluated_on == GLOBAL_TEST else None  # the backdoors' chance level
            self.run.append_metrics(self.attacks.evaluation_rows(0, arrays, self.evaluate_global, clean))
        for server_round in range(first, self.experiment.rounds + 1):
            started = time.perf_counter()
            arrays = self.play_round(server_round, strategy, arrays, grid, started)

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
        if self.attacks is not None:  # what an attacker is told of the round (the sampled clients' examples)
            messages = tell_attackers(
                self.attacks.plan, messages, grid.clients, lambda client: self.train_size(client, server_round)
            )
        replies = grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S)
        replies, faults = self.screen.train(replies, server_round, grid.clients, arrays)
        trained = len(replies)  # useful replies: what the strategy aggregates
        rows += self._fault_rows(server_round, "train", faults)
        rows += self._client_rows(server_round, replies, grid)
        if self.stream is not None:
            rows += self.stream.detection_rows(server_round, self._by_client(replies, grid))
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        rows += self._rows(server_round, "federated", "train", train_metrics or {})
        if self.attacks is not None:
            # a filtering defence's verdict; a rule that keeps every reply gives none
            accepted = getattr(strategy, "last_accepted", None) if getattr(strategy, "filters", True) else None
            rows += self.attacks.detection_rows(
                server_round,
                [grid.clients[reply.metadata.src_node_id] for reply in replies],
                None if accepted is None else [grid.clients[node] for node in accepted],
            )

        if self.evaluates_after(server_round):
            rows += self.evaluate(server_round, strategy, arrays, grid)
        self.run.append_metrics(rows)
        self.rounds_time_s += time.perf_counter() - started
        if self.checkpoints_after(server_round):
            self.save_checkpoint(server_round, strategy, arrays)
        self.on_round(server_round, self.final, trained=trained)
        return arrays

    def train_size(self, client: int, server_round: int) -> int:
        """How many training examples ``client`` holds in ``server_round`` (its view of the
        round's slot, less its held-out share), known from the partition without its data."""
        n = len(self.partition.view_at(client, self.partition.slot_of(server_round)).indices)
        return n - local_test_size(n, self.experiment.client.local_test_fraction)

    def slot_config(self, server_round: int) -> dict[str, int]:
        return {TIME_SLOT: self.partition.slot_of(server_round)}

    def query(self, server_round: int, strategy: Strategy, arrays: ArrayRecord, grid: OrderedGrid) -> list[MetricRow]:
        """Rounds that do not train: before training, a strategy with ``configure_query``
        (same arguments as ``configure_train``) may ask clients for statistics; the replies
        go to its ``aggregate_query(server_round, replies) -> MetricRecord | None``. It is
        asked again after each, until it sends nothing (several stages: FedDAA's
        prototypes, then drift detection against the centres they gave)."""
        configure = getattr(strategy, "configure_query", None)
        if not callable(configure):
            return []
        rows: list[MetricRow] = []
        for _stage in range(MAX_QUERY_STAGES):
            config = ConfigRecord({SERVER_ROUND: server_round, **self.slot_config(server_round)})
            messages = list(configure(server_round, arrays, config, grid))
            if not messages:
                return rows
            replies = grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S)
            replies, faults = self.screen.evaluate(replies, server_round, grid.clients)
            rows += self._fault_rows(server_round, "query", faults)
            if self.stream is not None:
                rows += self.stream.detection_rows(server_round, self._by_client(replies, grid))
            metrics = strategy.aggregate_query(server_round, replies) or MetricRecord()
            rows += self._rows(server_round, "federated", "query", metrics)
        raise RuntimeError(
            f"{type(strategy).__name__}.configure_query asked more than {MAX_QUERY_STAGES} times in a round"
        )

    def checkpoints_after(self, server_round: int) -> bool:
        """Every ``checkpoint_every`` rounds, and always after the last."""
        return server_round % self.experiment.checkpoint_every == 0 or server_round == self.experiment.rounds

    def save_checkpoint(self, server_round: int, strategy: Strategy, arrays: ArrayRecord) -> None:
        """The global model, the strategy's state and the run's position, in one atomic
        write; then the client states no resume can need any more go."""
        metrics_bytes, metrics_sha256 = self.run.metrics_digest()
        checkpoint = Checkpoint(
            round=server_round,
            arrays=arrays,
            strategy_state=strategy_state(strategy),
            metrics_bytes=metrics_bytes,
            metrics_sha256=metrics_sha256,
            elapsed_s=self.elapsed(),
            rounds_time_s=self.rounds_time_s,
            fingerprint=self.experiment.fingerprint(),
        )
        self.run.save_checkpoint(checkpoint)
        ClientStateStore(self.run.client_state).prune(server_round)

    def evaluates_after(self, server_round: int) -> bool:
        """Every ``evaluate_every`` rounds, and always after the last; never if it is 0."""
        every = self.experiment.evaluate_every
        return every > 0 and (server_round % every == 0 or server_round == self.experiment.rounds)

    def evaluate(
        self, server_round: int, strategy: Strategy, arrays: ArrayRecord, grid: OrderedGrid
    ) -> list[MetricRow]:
        """Client-side evaluation on the clients' held-out data, then the global model's on
        the test split (unless the strategy is personalised)."""
        replies = grid.send_and_receive(
            strategy.configure_evaluate(
                server_round, arrays, ConfigRecord({SERVER_ROUND: server_round, **self.slot_config(server_round)}), grid
            ),
            timeout=REPLY_TIMEOUT_S,
        )
        replies, faults = self.screen.evaluate(replies, server_round, grid.clients)
        rows = self._fault_rows(server_round, "evaluate", faults)
        rows += self._client_rows(server_round, replies, grid)
        for reply in replies:
            client = grid.clients[reply.metadata.src_node_id]
            for measure in CLIENT_MEASURES:
                self.client_latest[measure][client] = float(reply.content[METRICS_KEY].get(measure, np.nan))
        rows += self._domain_rows(server_round, replies)
        if self.stream is not None:
            rows += self.stream.evaluation_rows(server_round, self._by_client(replies, grid))
            if self.stream.last_evaluated_round(self.partition.slot_of(server_round)) == server_round:
                rows += self.stream.test_set_rows(server_round, arrays, self.dataset, self.evaluate_global)
        on_clients = strategy.aggregate_evaluate(server_round, replies) or {}
        rows += self._rows(server_round, "federated", "evaluate", on_clients)

        if self.evaluated_on == CLIENT_HOLDOUT:
            # Each client's own model on its own held-out data is the result to report.
            self.final = {key: float(on_clients[key]) for key in ("accuracy", "loss") if key in on_clients}
        else:
            self.final = self.evaluate_global(arrays)
            rows += self._rows(server_round, "server", "global", self.final)
        if self.attacks is not None:
            clean = self.final if self.evaluated_on == GLOBAL_TEST else None
            rows += self.attacks.evaluation_rows(server_round, arrays, self.evaluate_global, clean)
        return rows

    # -- metrics --------------------------------------------------------------------
    @staticmethod
    def _rows(server_round: int, scope: str, ident: str, metrics) -> list[MetricRow]:
        return [
            MetricRow(server_round, scope, ident, key, float(value))
            for key, value in dict(metrics).items()
            if isinstance(value, (int, float)) and key != NUM_EXAMPLES
        ]

    def _fault_rows(self, server_round: int, phase: str, faults: RoundFaults) -> list[MetricRow]:
        """Scope ``faults``: what the round set aside, by kind (kinds that happened only)."""
        for kind, count in faults.counts.items():
            self.faults[kind] = self.faults.get(kind, 0) + count
        return [
            MetricRow(server_round, "faults", phase, kind, float(count))
            for kind, count in sorted(faults.counts.items())
        ]

    @staticmethod
    def _by_client(replies: list[Message], grid: OrderedGrid) -> list[tuple[int, dict]]:
        return [(grid.clients[reply.metadata.src_node_id], dict(reply.content[METRICS_KEY])) for reply in replies]

    def _client_rows(self, server_round: int, replies: list[Message], grid: OrderedGrid) -> list[MetricRow]:
        rows = []
        for reply in replies:
            client = str(grid.clients[reply.metadata.src_node_id])
            rows += self._rows(server_round, "client", client, reply.content[METRICS_KEY])
        return rows

    def _domain_rows(self, server_round: int, replies: list[Message]) -> list[MetricRow]:
        """Accuracy per domain over every evaluated client's held-out data."""
        domains = self.dataset.domains
        counted = [reply.content[METRICS_KEY] for reply in replies if DOMAIN_COUNT in reply.content[METRICS_KEY]]
        if not domains or not counted:
            return []
        correct = np.sum([metrics[DOMAIN_CORRECT] for metrics in counted], axis=0)
        total = np.sum([metrics[DOMAIN_COUNT] for metrics in counted], axis=0)
        self.accuracy_by_domain = {name: float(c / n) for name, c, n in zip(domains, correct, total) if n > 0}
        return [
            MetricRow(server_round, "domain", name, "accuracy", acc) for name, acc in self.accuracy_by_domain.items()
        ]

    def _restore_from_metrics(self) -> None:
        """Rebuild the running figures of a resumed run from its metrics.csv."""
        frame = self.run.read_metrics()
        evaluated = frame[frame.scope.isin(["server", "domain"]) | (frame.id == "evaluate")]
        last = evaluated[evaluated["round"] == evaluated["round"].max()] if len(evaluated) else evaluated
        if self.evaluated_on == CLIENT_HOLDOUT:
            headline = last[(last.scope == "federated") & (last.id == "evaluate")]
        else:
            headline = last[last.scope == "server"]
        self.final = {key: value for key, value in zip(headline.metric, headline.value) if key in ("accuracy", "loss")}
        for measure in CLIENT_MEASURES:
            clients = frame[(frame.scope == "client") & (frame.metric == measure)].groupby("id").tail(1)
            self.client_latest[measure] = {int(client): value for client, value in zip(clients.id, clients.value)}
        domains = last[(last.scope == "domain") & (last.metric == "accuracy")]
        self.accuracy_by_domain = dict(zip(domains.id, domains.value))
        set_aside = frame[frame.scope == "faults"].groupby("metric").value.sum()
        self.faults = {kind: int(count) for kind, count in set_aside.items()}
        if self.stream is not None:
            self.stream.restore(frame)
        if self.attacks is not None:
            self.attacks.restore(frame)


def attack_metrics(env: RunEnvironment, run: RunDirectory, dataset, num_clients: int) -> AttackMetrics | None:
    """The run's attack figures, if its experiment has ``[[attack]]`` tables."""
    if not env.experiment.attack:
        return None
    plan = AttackPlan.from_experiment(env.experiment, num_clients)
    return AttackMetrics(plan, dataset, ClientStateStore(run.client_state), strategy_trainer(env.experiment))


def _clients(clients: list[int] | None) -> frozenset[int] | None:
    return None if clients is None else frozenset(clients)


def is_personalized(strategy: Strategy) -> bool:
    """Whether clients use models of their own, so the global arrays are not evaluated."""
    return bool(getattr(strategy, "personalized", False))
