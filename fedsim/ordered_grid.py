"""The server's view of the clients: which client each node is, in client-id order.

Engines number nodes their own way (Flower's draws them at random); the client id is what
data, seeds and results are keyed by, so the server asks once and then sees the grid in
client order (:class:`OrderedGrid`). Everything the round loop sends and receives passes
through it, so it also counts the array bytes each client is sent and sends back
(:class:`ArrayTraffic`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

from flwr.app import Message, MessageType, RecordDict
from flwr.common.constant import PARTITION_ID_KEY
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsim.errors import ClientFailure
from fedsim.faults import drops_out, failure_line, raise_user_error
from fedsim.trainer import CONFIG_KEY


class NumberedNodes(Mapping[int, int]):
    """Node id -> client id where node ``first_node + i`` is client ``i`` (fedsim's own
    grids): two integers, however many clients, and its nodes a ``range``."""

    def __init__(self, first_node: int, num_clients: int) -> None:
        self.nodes = range(first_node, first_node + num_clients)

    def __getitem__(self, node: int) -> int:
        if node not in self.nodes:
            raise KeyError(node)
        return node - self.nodes.start

    def __contains__(self, node: object) -> bool:
        return node in self.nodes

    def __iter__(self) -> Iterator[int]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)


def discover_clients(grid: Grid, num_clients: int, timeout_s: float = 300.0) -> Mapping[int, int]:
    """Ask every node which client (partition id) it is: node id -> client id.

    Engines number nodes their own way (Flower's draws them at random); the client id is
    what data, seeds and results are keyed by. fedsim's own grids know the answer
    (``partition_ids``, a :class:`NumberedNodes`); any other Grid is asked, one query
    message per node.
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


def array_bytes(message: Message) -> int:
    """The bytes of every Array in every ArrayRecord of a message's content: each array's
    serialized buffer (``Array.data``, NumPy's ``.npy`` bytes, header included). Config and
    metric records and record keys are not counted; a message without content (an error
    reply) counts 0."""
    if not message.has_content():
        return 0
    return sum(len(array.data) for record in message.content.array_records.values() for array in record.values())


class ArrayTraffic:
    """Array bytes (:func:`array_bytes`) the server sent each client (``down``) and
    received from it (``up``), by client id, since they were last taken (:meth:`take`).

    A message counts down when it is sent, whether or not a reply comes. A reply counts up
    when it arrives; an error reply (a client that raised, hung past its timeout or lost its
    worker) carries no arrays, and the reply of a client injected to drop out
    (:mod:`fedsim.faults`) never arrives, so it counts 0 although the engine returns it.
    """

    def __init__(self) -> None:
        self.down: Counter[int] = Counter()
        self.up: Counter[int] = Counter()

    def sent(self, messages: list[Message], clients: Mapping[int, int]) -> None:
        """Messages about to be sent."""
        for message in messages:
            self.down[clients[message.metadata.dst_node_id]] += array_bytes(message)

    def received(self, messages: list[Message], replies: list[Message], clients: Mapping[int, int]) -> None:
        """The replies the engine returned to ``messages``."""
        dropped = {message.metadata.dst_node_id for message in messages if drops_out(message)}
        for reply in replies:
            node = reply.metadata.src_node_id
            self.up[clients[node]] += 0 if node in dropped else array_bytes(reply)

    def take(self) -> tuple[dict[int, int], dict[int, int]]:
        """What was counted since the last call (down, up), by client; the counts start over."""
        down, up = dict(self.down), dict(self.up)
        self.down.clear()
        self.up.clear()
        return down, up


class OrderedGrid(Grid):
    """A Grid seen in client-id order: nodes are listed, and replies returned, by client.

    Flower's strategies sample with ``random.sample(list(grid.get_node_ids()), k)`` and
    aggregate replies in the order they come. With a fixed order here and ``random``
    reseeded each round, every engine picks the same clients and sums in the same order.
    ``traffic`` counts the array bytes of every ``send_and_receive`` (the round loop's only
    way to reach the clients); ``push_messages`` and ``pull_messages`` pass through
    uncounted.
    """

    def __init__(self, grid: Grid, clients: Mapping[int, int]) -> None:
        self._grid = grid
        self.clients = clients
        # numbered nodes are in client order already, and a range lists millions for free
        self._nodes = clients.nodes if isinstance(clients, NumberedNodes) else sorted(clients, key=clients.__getitem__)
        self.traffic = ArrayTraffic()

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Every node, in client order."""
        return self._nodes if isinstance(self._nodes, range) else list(self._nodes)

    @property
    def node_range(self) -> range | None:
        """The nodes as a ``range`` on fedsim's own grids (else None), which fedsim's
        strategies sample without listing them (:mod:`strategies.flower_start`)."""
        return self._nodes if isinstance(self._nodes, range) else None

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.traffic.sent(messages, self.clients)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.traffic.received(messages, replies, self.clients)
        if len(replies) != len(messages):
            raise ClientFailure(f"{len(messages) - len(replies)} of {len(messages)} clients did not reply")
        return sorted(replies, key=lambda reply: self.clients[reply.metadata.src_node_id])
