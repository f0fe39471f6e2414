"""What every engine offers: run a ServerApp main against a run's simulated ClientApps."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

if TYPE_CHECKING:
    from fedsim.environment import RunEnvironment
    from partitioners import Partition

ServerMain = Callable[[Grid, Context], None]
"""The signature of a Flower ``ServerApp`` main function."""


class Engine(Protocol):
    device: str  # "auto", "cpu" or "cuda[:N]", for the clients and the server's evaluation
    client_threads: int | None  # torch threads per client (None: torch's default)

    def execute(
        self, server_main: ServerMain, client_app: ClientApp, env: RunEnvironment, partition: Partition
    ) -> None:
        """Run ``server_main`` with a Grid whose nodes run ``client_app``, one per client
        of ``partition``; ``env`` describes the run to the processes that host clients."""
