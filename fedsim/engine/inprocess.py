"""The in-process engine: a Flower Grid that calls the ClientApp directly.

No actors, no serialisation, no polling: each pushed message is handled at once by the
ClientApp in this process, one client after another. This is the fast default for runs
on one machine; the messages are the same Flower messages the Ray engine carries.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Iterable
from typing import Annotated
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from pydantic import Field, StringConstraints

from fedsim.engine.base import ServerMain

Device = Annotated[str, StringConstraints(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")]

NODE_ID_OFFSET = 1000  # Flower reserves small node ids for the server side


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one Context per node."""

    def __init__(self, client_app: ClientApp, num_clients: int) -> None:
        self._client_app = client_app
        self._run = Run.create_empty(run_id=0)
        self._contexts = {
            NODE_ID_OFFSET + client: Context(
                run_id=0,
                node_id=NODE_ID_OFFSET + client,
                node_config={PARTITION_ID_KEY: client, NUM_PARTITIONS_KEY: num_clients},
                state=RecordDict(),
                run_config={},
            )
            for client in range(num_clients)
        }
        self._replies: dict[str, Message] = {}
        # Messages stamp their sender from this process-wide identity; this process is
        # the server's, as under Flower's own runtimes (see flwr.server.compat.app).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            # Each client gets its own copy, as it would over a network: a client that
            # changes its config must not change what the next client receives.
            delivered = copy.deepcopy(message)
            context = self._contexts[message.metadata.dst_node_id]
            try:
                reply = self._client_app(delivered, context)
            except Exception:  # as Flower's engines do: the failure travels back as a reply
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=traceback.format_exc())
                reply = Message(error, reply_to=delivered)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


class InProcessEngine:
    """Runs every client in this process, one after another: the fast default on one machine.

    ``num_threads`` is torch's thread count. It is part of the experiment because float
    sums depend on it: with the same count as the Ray engine's ``num_cpus`` (1 by default
    on both) the two engines give bit-identical results. Raise it for large models.
    """

    def __init__(self, device: Device = "auto", num_threads: Annotated[int, Field(ge=1)] = 1) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device = {device!r}, but this machine has no usable GPU; use 'auto' or 'cpu'")
        self.device = device
        self.num_threads = num_threads

    @property
    def client_threads(self) -> int:
        """Torch threads for each client and the server's evaluation."""
        return self.num_threads

    def execute(self, server_main: ServerMain, client_app: ClientApp, num_clients: int) -> None:
        grid = InProcessGrid(client_app, num_clients)
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        server_main(grid, context)
