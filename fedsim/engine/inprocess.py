"""The in-process engine: the driver is the one worker, and runs every client itself.

No actors, no serialisation, no polling: each pushed message is handled at once by the
ClientApp in this process, one client after another, with the process's worker
(:mod:`fedsim.worker`): one model, loaded in place for each client. The messages are the
same Flower messages the Ray engine carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.clientapp import ClientApp
from pydantic import Field, PlainValidator, StringConstraints

from fedsim.engine.base import ServerMain
from fedsim.engine.grid import SimulatedGrid
from fedsim.engine.tasks import ClientTask, TaskResult, run_tasks
from fedsim.environment import RunEnvironment
from fedsim.worker import settle_garbage_collector, worker_for
from partitioners import Partition

Device = Annotated[str, StringConstraints(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")]
MAX_VECTORIZE = 100_000


def _vectorize(value: object) -> int | str:
    """``[engine] vectorize``: a whole number of clients or "auto" (one message for both)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_VECTORIZE):
        return value
    raise ValueError(f"use a whole number of clients from 1 to {MAX_VECTORIZE:,}, or 'auto'")


Vectorize = Annotated[int | Literal["auto"], PlainValidator(_vectorize)]
"""``[engine] vectorize``: how many of a round's clients a worker trains at once
(:mod:`fedsim.vectorize`; 1, the default, trains them one after another), or ``"auto"``:
the most that fit the device's free memory (the RAM on a CPU), by a memory estimate of the
model and the batch, except on a CPU for a model above a million parameters, where one at
a time was measured faster (:func:`fedsim.vectorize.auto_k`). Clients whose trainer or
model the vectorised loop does not reproduce (said once), attackers, and clients with a
time limit train one at a time."""


class InProcessGrid(SimulatedGrid):
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(self, client_app: ClientApp, num_clients: int, client_timeout_s: float | None = None) -> None:
        super().__init__(num_clients)
        self._client_app = client_app
        self.client_timeout_s = client_timeout_s

    def execute(self, shared: Sequence[ArrayRecord], tasks: Sequence[ClientTask]) -> list[TaskResult]:
        return run_tasks(self._client_app, shared, tasks, self.client_timeout_s)


class InProcessEngine:
    """Runs every client in this process, one after another: the fast default on one machine.

    ``num_threads`` is torch's thread count. It is part of the experiment because float
    sums depend on it: with the same count as the Ray engine's ``num_cpus`` (1 by default
    on both) the two engines give bit-identical results. Raise it for large models.
    ``client_timeout_s`` ends a client still busy after that many seconds: it counts as
    timed out, and the round goes on without it. ``vectorize``: :data:`Vectorize`.
    """

    def __init__(
        self,
        device: Device = "auto",
        num_threads: Annotated[int, Field(ge=1, le=1024)] = 1,
        client_timeout_s: Annotated[float, Field(gt=0)] | None = None,
        vectorize: Vectorize = 1,
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device = {device!r}, but this machine has no usable GPU; use 'auto' or 'cpu'")
        self.device = device
        self.num_threads = num_threads
        self.client_timeout_s = client_timeout_s
        self.vectorize = vectorize  # read by the worker from the experiment (fedsim.worker)

    @property
    def client_threads(self) -> int:
        """Torch threads for each client and the server's evaluation."""
        return self.num_threads

    def execute(
        self, server_main: ServerMain, client_app: ClientApp, env: RunEnvironment, partition: Partition
    ) -> None:
        worker_for(env)  # the data, the model and PyTorch's lazy imports, before the first round
        settle_garbage_collector()
        grid = InProcessGrid(client_app, partition.num_clients, self.client_timeout_s)
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        server_main(grid, context)
