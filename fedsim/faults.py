"""Faults and guards: clients that fail as real ones do, and a server that survives them.

**Injection** (``[faults]``): in each round, each sampled client may, with the given
probabilities, drop out before replying, raise an exception, hang past
``[engine] client_timeout_s``, return NaN or infinite weights, or return an update scaled
far beyond its peers'. Which client faults in which round, and how, is drawn from
(seed, round, client) alone, so the same configuration faults the same clients on every
engine and after a resume. The server marks a faulty client's message (a key in its copy
of the train config); fedsim's ClientApp acts it out (:func:`act_out`), and a dropped
client's reply is discarded on arrival.

**Tolerance and guards**: a round goes on with the clients that replied usefully. Error
replies (injected or real exceptions, timeouts, dead workers) are set aside, and so are
updates with a non-finite value (always) or, with ``[guards] max_update_norm``, an update
whose L2 distance from the global model exceeds the bound: no strategy ever aggregates
them. Each kind is counted per round in metrics.csv (scope ``faults``) and in
summary.json. With fewer than ``[faults] min_replies`` useful replies the run stops with a
message naming what went wrong. A client's :class:`~fedsim.errors.UserError` (a mistake in
the experiment, not a fault) still stops the run at once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedsim import multimodel
from fedsim.errors import ClientFailure, UserError, raised_user_error
from fedsim.seeding import derive_seed

FAULT_KEY = "fedsim-fault"  # in a faulty client's train config: what to act out
KINDS = ("drop", "error", "hang", "nan", "inf", "scale")  # injectable, in the order they are drawn
# what the server counts (scope "faults"): error replies by cause, and rejected updates
COUNTED = ("dropped", "raised", "timed_out", "worker_died", "nonfinite", "norm_rejected")
ERROR_CAUSES = {"InjectedFault": "raised", "ClientTimeout": "timed_out", "WorkerDied": "worker_died"}


class InjectedFault(RuntimeError):
    """An exception a client raises because ``[faults]`` told it to."""


@dataclass(frozen=True)
class FaultPlan:
    """Which client fails how, in which round: seeded, independent of the engine."""

    seed: int
    probabilities: dict[str, float]
    clients: frozenset[int] | None = None  # None: any client may fault
    scale_factor: float = 1e6

    def fault(self, server_round: int, client: int) -> str | None:
        if not any(self.probabilities.values()) or (self.clients is not None and client not in self.clients):
            return None
        draw = np.random.default_rng(derive_seed(self.seed, "fault", server_round, client)).random()
        for kind in KINDS:
            draw -= self.probabilities.get(kind, 0.0)
            if draw < 0:
                return kind
        return None

    def inject(self, messages: Iterable[Message], server_round: int, clients: Mapping[int, int]) -> list[Message]:
        """The round's train messages, a faulty client's with the fault in its own config."""
        marked = []
        for message in messages:
            kind = self.fault(server_round, clients[message.metadata.dst_node_id])
            if kind is None:
                marked.append(message)
                continue
            content = RecordDict()
            for key, record in message.content.items():
                if isinstance(record, ConfigRecord):
                    record = ConfigRecord({**record, FAULT_KEY: kind, f"{FAULT_KEY}-scale": self.scale_factor})
                content[key] = record
            marked.append(Message(content=content, metadata=message.metadata))
        return marked


def drops_out(message: Message) -> bool:
    """Whether a train message marks its client to drop out (:meth:`FaultPlan.inject`):
    the server discards that client's reply, as one that never arrived."""
    if not message.has_content():
        return False
    return any(record.get(FAULT_KEY) == "drop" for record in message.content.config_records.values())


def act_out(kind: str | None, config: dict, sent: ArrayRecord | None, reply: ArrayRecord | None) -> ArrayRecord | None:
    """On the client: before training (``reply`` None) raise or hang; after training,
    return the corrupted reply arrays (or ``reply`` itself)."""
    if kind is None:
        return reply
    if reply is None:
        if kind == "error":
            raise InjectedFault("this client raises an exception in this round ([faults] error)")
        if kind == "hang":
            while True:  # until [engine] client_timeout_s interrupts it
                time.sleep(3600)
        return None
    if kind in ("nan", "inf"):
        value = np.nan if kind == "nan" else np.inf
        return ArrayRecord({key: Array(_filled(array.numpy(), value)) for key, array in reply.items()})
    if kind == "scale" and sent is not None:
        factor = float(config.get(f"{FAULT_KEY}-scale", 1e6))
        scaled = {}
        for key, array in reply.items():
            mine = array.numpy()
            if np.issubdtype(mine.dtype, np.floating) and key in sent:
                start = sent[key].numpy()
                mine = (start + factor * (mine - start)).astype(mine.dtype)
            scaled[key] = Array(mine)
        return ArrayRecord(scaled)
    return reply


def _filled(array: np.ndarray, value: float) -> np.ndarray:
    return np.full_like(array, value) if np.issubdtype(array.dtype, np.floating) else array


@dataclass
class RoundFaults:
    """What a round set aside, by kind."""

    counts: Counter = field(default_factory=Counter)
    first_error: str | None = None  # the first failure in one line, for a final message
    details: str | None = None  # ... and in full (a client's traceback), for --verbose

    def add(self, kind: str, line: str | None = None, details: str | None = None) -> None:
        self.counts[kind] += 1
        if line and self.first_error is None:
            self.first_error, self.details = line, details


def failure_line(reply: Message) -> str:
    """An error reply's reason in one line: the client's own message. Engines report a
    client's exception as text (Ray: with its whole traceback, wrapped as <class ...>:<'...'>)."""
    reason = reply.error.reason
    last_line = [line for line in reason.strip().splitlines() if line.strip()][-1]
    return last_line.split("Message: ", 1)[-1].removesuffix("'>")


def raise_user_error(reply: Message) -> None:
    """A UserError raised on a client is a mistake in the experiment, not a fault: stop."""
    message = raised_user_error(reply.error.reason)
    if message is not None:
        raise UserError(message)


@dataclass(frozen=True)
class Screen:
    """What the server sets aside before a strategy sees a round's replies."""

    plan: FaultPlan
    min_replies: int = 1
    max_update_norm: float | None = None

    def train(
        self, replies: list[Message], server_round: int, clients: Mapping[int, int], sent: ArrayRecord
    ) -> tuple[list[Message], RoundFaults]:
        """The useful train replies, and what was set aside; fewer useful replies than
        ``min_replies`` stops the run with the first failure's message."""
        faults = RoundFaults()
        global_arrays = None
        if self.max_update_norm is not None:
            global_arrays = {key: array.numpy().astype(np.float64) for key, array in sent.items()}
        useful = []
        for reply in replies:
            client = clients.get(reply.metadata.src_node_id, reply.metadata.src_node_id)
            if self.plan.fault(server_round, client) == "drop":
                faults.add("dropped")  # its reply never arrived
                continue
            if reply.has_error():
                raise_user_error(reply)
                when = f"client {client} failed in round {server_round} (train)"
                faults.add(error_kind(reply.error.reason), f"{when}: {failure_line(reply)}", reply.error.reason)
                continue
            rejected = useful_update(reply, global_arrays, self.max_update_norm)
            if rejected:
                faults.add(rejected, f"client {client}'s update in round {server_round} was {DESCRIBED[rejected]}")
                continue
            useful.append(reply)
        if replies and len(useful) < self.min_replies:
            raise ClientFailure(
                f"{faults.first_error}; round {server_round} had {len(useful)} useful of {len(replies)} replies, "
                f"fewer than [faults] min_replies = {self.min_replies}",
                details=faults.details or "",
            )
        return useful, faults

    def evaluate(
        self, replies: list[Message], server_round: int, clients: Mapping[int, int]
    ) -> tuple[list[Message], RoundFaults]:
        """The evaluation replies without errors (a failed evaluation only loses its figures)."""
        faults = RoundFaults()
        useful = []
        for reply in replies:
            if reply.has_error():
                raise_user_error(reply)
                client = clients.get(reply.metadata.src_node_id, reply.metadata.src_node_id)
                when = f"client {client} failed in round {server_round} (evaluate)"
                faults.add(error_kind(reply.error.reason), f"{when}: {failure_line(reply)}", reply.error.reason)
            else:
                useful.append(reply)
        return useful, faults


DESCRIBED = {"nonfinite": "not finite (NaN or inf)", "norm_rejected": "beyond [guards] max_update_norm"}


def error_kind(reason: str) -> str:
    """What an error reply's reason says went wrong (``raised`` by default)."""
    for marker, kind in ERROR_CAUSES.items():
        if marker in reason:
            return kind
    return "raised"


def useful_update(reply: Message, global_arrays: dict[str, np.ndarray] | None, max_norm: float | None) -> str | None:
    """Why a train reply's update must not be aggregated (``nonfinite``, ``norm_rejected``),
    or None. Every floating array is checked, whatever the strategy."""
    squared = 0.0
    for name, record in reply.content.array_records.items():
        # several models (fedsim.multimodel): the global record holds them as "model.k/key"
        prefix = f"{name}{multimodel.SEPARATOR}" if name.startswith(multimodel.PREFIX) else ""
        for key, array in record.items():
            values = array.numpy()
            if not np.issubdtype(values.dtype, np.floating):
                continue
            if not np.isfinite(values).all():
                return "nonfinite"
            if max_norm is not None and global_arrays is not None and prefix + key in global_arrays:
                squared += float(np.sum((values.astype(np.float64) - global_arrays[prefix + key]) ** 2))
    if max_norm is not None and squared > max_norm**2:
        return "norm_rejected"
    return None
