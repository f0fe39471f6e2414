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
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import PARTITION_ID_KEY
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from fedsim.checkpoint import Checkpoint, restore_strategy, strategy_state
from fedsim.clientapp import CONFIG_KEY, DOMAIN_CORRECT, DOMAIN_COUNT, METRICS_KEY, NUM_EXAMPLES
from fedsim.components import make_strategy
from fedsim.config import Experiment
from fedsim.environment import RunEnvironment
from fedsim.errors import ClientFailure
from fedsim.faults import FaultPlan, RoundFaults, Screen, failure_line, raise_user_error
from fedsim.results import CLIENT_HOLDOUT, GLOBAL_TEST, MetricRow, RunDirectory
from fedsim.seeding import derive_seed
from fedsim.state import ClientStateStore
from fedsim.trainer import SERVER_ROUND, RoundConfig
from fedsim.training import classification_metrics, predict

REPLY_TIMEOUT_S = 24 * 3600.0  # a simulated client never drops out; waiting is correct
CLIENT_MEASURES = ("accuracy", "loss")  # what the summary follows on each client's held-out data


def discover_clients(grid: Grid, num_clients: int, timeout_s: float = 300.0) -> dict[int, int]:
    """Ask every node which client (partition id) it is: node id -> client id.

    Engines number nodes their own way (Flower's draws them at random); the client id is
    what data, seeds and results are keyed by. fedsim's own grids know the answer
    (``partition_ids``); any other Grid is asked, one query message per node.
    """
    known = getattr(grid, "partition_ids", None)
    if known is not None:
        return known()
    deadline = time.monotonic() + timeout_s
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {num_clients} simulated clients came online")
        time.sleep(0.05)
    queries = [Message(RecordDict(), node, MessageType.QUERY) for node in node_ids]
    replies = list(grid.send_and_receive(queries, timeout=timeout_s))
    _raise_on_errors(replies, {}, "start-up")
    return {reply.metadata.src_node_id: int(reply.content[CONFIG_KEY][PARTITION_ID_KEY]) for reply in replies}


def _raise_on_errors(replies: Iterable[Message], clients: dict[int, int], when: str) -> None:
    """Stop at the first client error, with the client's own message (a UserError raised
    on a client stays one)."""
    for reply in replies:
        if reply.has_error():
            raise_user_error(reply)
            node = reply.metadata.src_node_id
            line = failure_line(reply)
            raise ClientFailure(
                f"client {clients.get(node, node)} failed in {when}: {line}", details=reply.error.reason
            )


class OrderedGrid(Grid):
    """A Grid seen in client-id order: nodes are listed, and replies returned, by client.

    Flower's strategies sample with ``random.sample(list(grid.get_node_ids()), k)`` and
    aggregate replies in the order they come. With a fixed order here and ``random``
    reseeded each round, every engine picks the same clients and sums in the same order.
    """

    def __init__(self, grid: Grid, clients: dict[int, int]) -> None:
        self._grid = grid
        self.clients = clients
        self._nodes = sorted(clients, key=clients.__getitem__)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if len(replies) != len(messages):
            raise ClientFailure(f"{len(messages) - len(replies)} of {len(messages)} clients did not reply")
        return sorted(replies, key=lambda reply: self.clients[reply.metadata.src_node_id])


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
        num_clients: int,
        resume: Checkpoint | None = None,
        on_round: RoundCallback | None = None,
        started: float | None = None,
    ) -> None:
        self.env = env
        self.experiment = env.experiment
        self.run = run
        self.dataset = env.dataset()
        self.num_clients = num_clients
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
    def initial_arrays(self) -> ArrayRecord:
        torch.manual_seed(derive_seed(self.experiment.seed, "init"))
        return ArrayRecord(self.env.new_model().state_dict())

    def evaluate_global(self, arrays: ArrayRecord) -> dict[str, float]:
        """Centralised evaluation of the global model on the dataset's test split.

        Keys a strategy keeps on the clients (FedBN's BN layers) stay at initial values.
        """
        model = self.env.new_model()
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        device = self.env.enter(server=True)
        model.to(device)
        return classification_metrics(predict(model, self.dataset.x_test, device), self.dataset.y_test)

    def elapsed(self) -> float:
        """Wall time of the whole run, over every command that worked on it."""
        offset = self.resume.elapsed_s if self.resume else 0.0
        return offset + time.monotonic() - self._started

    # -- the run --------------------------------------------------------------------
    def __call__(self, grid: Grid, context: Context) -> None:
        grid = OrderedGrid(grid, discover_clients(grid, self.num_clients))
        strategy = make_strategy(self.experiment, self.num_clients)
        if self.resume is not None:
            restore_strategy(strategy, self.resume.strategy_state, str(self.run.checkpoint))
            arrays, first = self.resume.arrays, self.resume.round + 1
        else:
            arrays, first = self.initial_arrays(), 1
        self.evaluated_on = CLIENT_HOLDOUT if is_personalized(strategy) else GLOBAL_TEST
        if self.resume is not None:
            self._restore_from_metrics()
        elif self.evaluated_on == GLOBAL_TEST and self.experiment.evaluate_every > 0:
            self.final = self.evaluate_global(arrays)
            self.run.append_metrics(self._rows(0, "server", "global", self.final))
        for server_round in range(first, self.experiment.rounds + 1):
            started = time.perf_counter()
            arrays = self.play_round(server_round, strategy, arrays, grid, started)

    def play_round(
        self, server_round: int, strategy: Strategy, arrays: ArrayRecord, grid: OrderedGrid, started: float
    ) -> ArrayRecord:
        rows: list[MetricRow] = []
        # Flower samples clients with the module-level `random`: seed it per round, so
        # the choice depends on (seed, round) only, on every engine and after a resume.
        random.seed(derive_seed(self.experiment.seed, "sample", server_round))

        messages = strategy.configure_train(server_round, arrays, train_config(self.experiment, server_round), grid)
        messages = self.screen.plan.inject(messages, server_round, grid.clients)
        replies = grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S)
        replies, faults = self.screen.train(replies, server_round, grid.clients, arrays)
        trained = len(replies)  # useful replies: what the strategy aggregates
        rows += self._fault_rows(server_round, "train", faults)
        rows += self._client_rows(server_round, replies, grid)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        rows += self._rows(server_round, "federated", "train", train_metrics or {})

        if self.evaluates_after(server_round):
            rows += self.evaluate(server_round, strategy, arrays, grid)
        self.run.append_metrics(rows)
        self.rounds_time_s += time.perf_counter() - started
        if self.checkpoints_after(server_round):
            self.save_checkpoint(server_round, strategy, arrays)
        self.on_round(server_round, self.final, trained=trained)
        return arrays

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
            strategy.configure_evaluate(server_round, arrays, ConfigRecord({SERVER_ROUND: server_round}), grid),
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
        on_clients = strategy.aggregate_evaluate(server_round, replies) or {}
        rows += self._rows(server_round, "federated", "evaluate", on_clients)

        if self.evaluated_on == CLIENT_HOLDOUT:
            # Each client's own model on its own held-out data is the result to report.
            self.final = {key: float(on_clients[key]) for key in ("accuracy", "loss") if key in on_clients}
        else:
            self.final = self.evaluate_global(arrays)
            rows += self._rows(server_round, "server", "global", self.final)
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


def _clients(clients: list[int] | None) -> frozenset[int] | None:
    return None if clients is None else frozenset(clients)


def is_personalized(strategy: Strategy) -> bool:
    """Whether clients use models of their own, so the global arrays are not evaluated."""
    return bool(getattr(strategy, "personalized", False))
