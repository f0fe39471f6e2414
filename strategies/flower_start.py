"""What ``Strategy.start`` adds for fedsim's strategies in a Flower app of your own, and
how they sample a round from millions of registered clients.

Every strategy fedsim ships takes :class:`StartsOnceNodesAreOnline` as its first base, so
that in a ServerApp of your own (``strategy.start(grid=grid, ...)``) it runs its rounds
through a :class:`NodesOnlineGrid`:

- **Every round samples from the nodes that are online.** Flower's simulation
  (``flwr.simulation.run_simulation``, flwr 1.42) starts the ServerApp's thread before it
  registers its SuperNodes, and Flower's ``FedAvg.configure_train`` and
  ``configure_evaluate`` fix their sample size from the nodes online at that moment
  (``max(int(len(grid.get_node_ids()) * fraction), min_nodes)``) before ``sample_nodes``
  waits for ``min_available_nodes``, without computing the size again. A ServerApp that
  starts at once thus trains ``min_train_nodes`` clients in round 1 however many the
  simulation has (``experiments/bench/flower_registration_race.py`` counts it). The grid
  lists nodes only once ``min_available_nodes`` of them are online, so the size, and every
  strategy's own use of the node list, come from the nodes online after the wait.
- **A client's UserError stops the run**, as under ``fedsim run``: a reply that reports
  one (fedsim's client halves raise one when a client's state went back, see
  :class:`fedsim.state.WrittenRounds`) raises it on the server, where Flower's strategies
  would only log the failed reply and go on without the client.

A round on fedsim's own grids, whose nodes are a ``range``, samples from the range without
listing the nodes (:class:`StartsOnceNodesAreOnline`), so a round's cost does not grow with
the clients registered.

fedsim's own engines never call ``start`` (:mod:`fedsim.serverapp` runs the rounds, on a
grid that lists every client from the first round), so nothing changes there.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log
from flwr.supercore.run import Run

from fedsim.errors import UserError, raised_user_error

POLL_S = 0.05  # how often the node list is read while waiting
SAY_AFTER_S = 1.0  # a wait longer than this is logged, once


class NodesOnlineGrid(Grid):
    """A Grid whose node list waits until ``min_nodes`` nodes are online, and whose
    ``send_and_receive`` raises a client's UserError on the server.

    Everything else passes through to the grid it wraps, other attributes included (a
    strategy may ask fedsim's grids for theirs, as FedCCFA asks for ``clients``). Like
    Flower's ``sample_nodes``, it waits as long as it takes.
    """

    def __init__(self, grid: Grid, min_nodes: int) -> None:
        self._grid = grid
        self.min_nodes = min_nodes

    def __getattr__(self, name: str) -> Any:
        grid = self.__dict__.get("_grid")
        if grid is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(grid, name)

    def get_node_ids(self) -> Iterable[int]:
        started, said = time.monotonic(), False
        while len(node_ids := list(self._grid.get_node_ids())) < self.min_nodes:
            if not said and time.monotonic() - started > SAY_AFTER_S:
                log(INFO, "Waiting for nodes to connect: %d of min_available_nodes = %d", len(node_ids), self.min_nodes)
                said = True
            time.sleep(POLL_S)
        return node_ids

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            message = raised_user_error(reply.error.reason) if reply.has_error() else None
            if message is not None:
                raise UserError(message)
        return replies


class StartsOnceNodesAreOnline:
    """A Strategy mixin: ``start`` runs the rounds on a :class:`NodesOnlineGrid` that waits
    for the strategy's ``min_available_nodes`` (see the module docstring); and a round
    on a grid whose nodes are a ``range`` samples without listing them.

    Flower's ``configure_train`` and ``configure_evaluate`` list every node
    (``list(grid.get_node_ids())``, twice a call) before they sample: for 10,000,000
    registered clients, 360 MB and a second per round. fedsim's grids give their nodes as a
    ``range`` (their ``node_range``), from which this samples directly: ``random.sample``
    picks the same nodes from a range as from the list of it, so the clients and the
    messages are Flower's own. Any other grid goes through Flower's code unchanged.
    """

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Result:
        min_nodes = int(getattr(self, "min_available_nodes", 0) or 0)
        return super().start(NodesOnlineGrid(grid, min_nodes), *args, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        nodes = getattr(grid, "node_range", None)
        if nodes is None or self.fraction_train == 0.0:
            return super().configure_train(server_round, arrays, config, grid)
        sampled = self._sample(nodes, self.fraction_train, self.min_train_nodes, "configure_train")
        return self._messages(server_round, arrays, config, sampled, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        nodes = getattr(grid, "node_range", None)
        if nodes is None or self.fraction_evaluate == 0.0:
            return super().configure_evaluate(server_round, arrays, config, grid)
        sampled = self._sample(nodes, self.fraction_evaluate, self.min_evaluate_nodes, "configure_evaluate")
        return self._messages(server_round, arrays, config, sampled, MessageType.EVALUATE)

    def _sample(self, nodes: range, fraction: float, min_nodes: int, caller: str) -> list[int]:
        """Flower's ``sample_nodes`` on a range: the same size rule, the same draw."""
        size = max(int(len(nodes) * fraction), min_nodes)
        if len(nodes) < max(self.min_available_nodes, size):
            raise ValueError(
                f"{caller}: {len(nodes)} nodes can never reach min_available_nodes = {self.min_available_nodes} "
                f"or the sample of {size}; lower them"
            )
        sampled = random.sample(nodes, size)
        log(INFO, "%s: Sampled %s nodes (out of %s)", caller, len(sampled), len(nodes))
        return sampled

    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], message_type: str
    ) -> Iterable[Message]:
        """What Flower's FedAvg sends the sampled nodes: the arrays and the round's config."""
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, message_type)
