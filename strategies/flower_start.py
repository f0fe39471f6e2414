"""What ``Strategy.start`` adds for fedsim's strategies in a Flower app of your own.

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

fedsim's own engines never call ``start`` (:mod:`fedsim.serverapp` runs the rounds, on a
grid that lists every client from the first round), so nothing changes there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO
from typing import Any

from flwr.app import Message
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
    for the strategy's ``min_available_nodes`` (see the module docstring)."""

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Result:
        min_nodes = int(getattr(self, "min_available_nodes", 0) or 0)
        return super().start(NodesOnlineGrid(grid, min_nodes), *args, **kwargs)
