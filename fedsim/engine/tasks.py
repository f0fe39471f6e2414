"""Client tasks: the server's messages as they travel to a worker, and the loop that runs them.

A round's messages usually carry one ArrayRecord object (the global model) to every
client. :func:`pack` sends each distinct ArrayRecord once (the Ray engine puts it once in
the object store) and each message as a small :class:`ClientTask` that refers to it.
:func:`run_tasks`, the worker's loop, rebuilds every client's message and calls the
ClientApp: the client gets read-only views of the shared arrays (:class:`SharedArrays`)
and its own copies of the other records, never a deep copy of the whole message.
"""

from __future__ import annotations

import copy
import signal
import threading
import traceback
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.app.metadata import Metadata
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, ErrorCode

NODE_ID_OFFSET = 1000  # node id = NODE_ID_OFFSET + client id (Flower reserves small ids)


@dataclass
class ClientTask:
    """One message for one client, without the ArrayRecords it shares with other tasks."""

    client: int
    num_clients: int
    metadata: Metadata
    records: RecordDict  # the message's records other than ArrayRecords
    arrays: dict[str, int]  # record key -> index into the round's shared ArrayRecords
    keys: list[str]  # every record key, in the message's order
    state: RecordDict | None = None  # the node's Context.state, when it holds anything


@dataclass
class TaskResult:
    reply: Message
    state: RecordDict | None  # the node's Context.state after the call, when not empty


def pack(messages: Iterable[Message], num_clients: int) -> tuple[list[ArrayRecord], list[ClientTask]]:
    """Split messages into the distinct ArrayRecords they carry and one task per message."""
    shared: list[ArrayRecord] = []
    position: dict[int, int] = {}
    tasks = []
    for message in messages:
        records, arrays = RecordDict(), {}
        for key, record in message.content.items():
            if isinstance(record, ArrayRecord):
                if id(record) not in position:
                    position[id(record)] = len(shared)
                    shared.append(record)
                arrays[key] = position[id(record)]
            else:
                records[key] = record
        client = message.metadata.dst_node_id - NODE_ID_OFFSET
        tasks.append(ClientTask(client, num_clients, message.metadata, records, arrays, list(message.content)))
    return shared, tasks


def unpack(task: ClientTask, shared: Sequence[ArrayRecord]) -> Message:
    """The message one client receives: read-only shared arrays, its own copy of the rest."""
    content = RecordDict()
    for key in task.keys:
        if key in task.arrays:
            content[key] = SharedArrays(shared[task.arrays[key]])
        else:
            content[key] = copy.deepcopy(task.records[key])
    return Message(content=content, metadata=copy.copy(task.metadata))


def run_tasks(
    client_app: ClientApp, shared: Sequence[ArrayRecord], tasks: Sequence[ClientTask], timeout_s: float | None = None
) -> list[TaskResult]:
    """Run each task through the ClientApp, in order; an exception, or a client still busy
    after ``timeout_s``, becomes an error reply, as under Flower's own engines.

    fedsim's ClientApp also offers ``train_many`` (several clients trained at once,
    ``[engine] vectorize``): the train tasks go to it together, unless clients have a time
    limit (which is per client); if it raises, they run one by one, so that the error is
    the failing client's alone."""
    messages = [unpack(task, shared) for task in tasks]
    contexts = [_context(task) for task in tasks]
    results: list[TaskResult | None] = [None] * len(tasks)
    train_many = getattr(client_app, "train_many", None)
    training = [i for i, message in enumerate(messages) if message.metadata.message_type == MessageType.TRAIN]
    if train_many is not None and timeout_s is None and len(training) > 1:
        try:
            replies = train_many([messages[i] for i in training], [contexts[i] for i in training])
        except Exception:
            messages = [unpack(task, shared) for task in tasks]  # as sent: the failed call may have read them
            contexts = [_context(task) for task in tasks]
        else:
            for i, reply in zip(training, replies, strict=True):
                results[i] = TaskResult(reply, contexts[i].state if len(contexts[i].state) else None)
    for i, (message, context) in enumerate(zip(messages, contexts)):
        if results[i] is not None:
            continue
        try:
            with time_limit(timeout_s):
                reply = client_app(message, context)
        except ClientTimeout as timeout:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(timeout)), reply_to=message)
        except Exception:
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=traceback.format_exc())
            reply = Message(error, reply_to=message)
        results[i] = TaskResult(reply, context.state if len(context.state) else None)
    return results


def _context(task: ClientTask) -> Context:
    return Context(
        run_id=task.metadata.run_id,
        node_id=task.metadata.dst_node_id,
        node_config={PARTITION_ID_KEY: task.client, NUM_PARTITIONS_KEY: task.num_clients},
        state=task.state if task.state is not None else RecordDict(),
        run_config={},
    )


class ClientTimeout(BaseException):
    """Raised inside a client still busy after ``[engine] client_timeout_s``: a
    BaseException, so that the client's own ``except Exception`` does not swallow it."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the block after ``seconds`` with :class:`ClientTimeout` (SIGALRM: Python
    code and sleeps are interrupted, a running native kernel finishes first). Signals reach
    only a process's main thread, where engines run their clients; elsewhere no limit."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum, _frame):
        raise ClientTimeout(f"ClientTimeout: no reply within [engine] client_timeout_s = {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class SharedArrays(ArrayRecord):
    """A read-only view of an ArrayRecord that the server and other clients also hold.

    It reads like the record it views. Changing it raises, since the change would reach
    every other client of the round. ``to_torch_state_dict`` decodes the arrays once per
    process for all the clients that read them; the tensors are shared, so copy one
    before changing it in place (``load_state_dict`` copies).
    """

    def __init__(self, record: ArrayRecord) -> None:
        self.__dict__.update(record.__dict__)  # the same entries, not copies of them
        self.__dict__["_source"] = record.__dict__.get("_source", record)

    def __setitem__(self, key, value) -> None:
        raise TypeError(
            "the server's arrays are shared with every client of the round and are read-only; "
            "build a new ArrayRecord to send something else"
        )

    def __delitem__(self, key) -> None:
        self.__setitem__(key, None)

    def to_torch_state_dict(self, *, keep_input: bool = True) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(_decoded(self.__dict__["_source"]))

    def __reduce__(self):
        # Sent on (a client that echoes it back), it travels as a plain ArrayRecord.
        return ArrayRecord, (dict(self.items()),)


_DECODED: list[tuple[ArrayRecord, dict[str, torch.Tensor]]] = []  # newest last
_DECODED_KEEP = 4  # a round's distinct records: one, or one per model of a clustered method


def _decoded(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The record's arrays as tensors, decoded once for every client that reads them."""
    for source, tensors in _DECODED:
        if source is record:
            return tensors
    tensors = {key: torch.from_numpy(array.numpy()) for key, array in record.items()}
    _DECODED.append((record, tensors))
    del _DECODED[:-_DECODED_KEEP]
    return tensors
