"""The Grid of fedsim's own engines: nodes are simulated clients, numbered by client id.

Node ``NODE_ID_OFFSET + i`` is client ``i``, so the server learns every node's client id
without asking (:meth:`SimulatedGrid.partition_ids`), and nothing is kept per registered
client except the Flower Context state of clients that stored something in it. Engines
differ only in where a round's tasks run (:meth:`SimulatedGrid.execute`): in this process
or on a pool of Ray actors.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from uuid import uuid4

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsim.engine.tasks import NODE_ID_OFFSET, ClientTask, TaskResult, pack
from fedsim.ordered_grid import NumberedNodes


class SimulatedGrid(Grid):
    """A Grid of ``num_clients`` simulated nodes whose messages run as client tasks.

    ``push_messages`` runs the tasks before it returns; ``pull_messages`` hands out the
    replies. Subclasses implement :meth:`execute`.
    """

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self._run = Run.create_empty(run_id=0)
        self._states: dict[int, RecordDict] = {}  # client -> its Context.state, if not empty
        self._replies: dict[str, Message] = {}
        # Messages stamp their sender from this process-wide identity; this process is
        # the server's, as under Flower's own runtimes (see flwr.server.compat.app).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    @abstractmethod
    def execute(self, shared: Sequence[ArrayRecord], tasks: Sequence[ClientTask]) -> list[TaskResult]:
        """Run the tasks (their ArrayRecords are ``shared[task.arrays[key]]``); one result
        per task, in order."""

    # -- Grid ---------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(NODE_ID_OFFSET, NODE_ID_OFFSET + self.num_clients)

    def partition_ids(self) -> NumberedNodes:
        """Node id -> client id, for every node (computed, not stored)."""
        return NumberedNodes(NODE_ID_OFFSET, self.num_clients)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            if not NODE_ID_OFFSET <= message.metadata.dst_node_id < NODE_ID_OFFSET + self.num_clients:
                raise ValueError(f"message to unknown node {message.metadata.dst_node_id}")
            message.metadata.__dict__["_message_id"] = str(uuid4())
        shared, tasks = pack(messages, self.num_clients)
        for task in tasks:
            task.state = self._states.get(task.client)
        results = self.execute(shared, tasks)
        for message, task, result in zip(messages, tasks, results, strict=True):
            result.reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[message.metadata.message_id] = result.reply
            if result.state is not None:
                self._states[task.client] = result.state
            else:
                self._states.pop(task.client, None)
        return [message.metadata.message_id for message in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
