"""Who attacks: an experiment's ``[[attack]]`` tables, resolved against its clients.

Each table is one attacker: a method, a target label, a trigger, a poison fraction, a
window and the clients it controls (ids, or a ``count`` drawn with the experiment's seed
from the clients no table names). Attackers are disjoint and do not collude; tables that
share a ``group`` do (they must agree on method, target, trigger and options), and a method that
splits its trigger (DBA: it takes ``part`` and ``parts``) gives each of the group's
clients, in table then id order, its own part.

:class:`AttackPlan` is what every process derives from the experiment alone, the same on
the server and in every worker: which attacker, if any, a client is, and the trainer it
runs (:meth:`AttackPlan.trainer_for`): the strategy's own trainer, unchanged, for a benign
client; the attack wrapped around it for an attacker.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsim.attacks.base import ROUND_EXAMPLES, AttackTrainer
from fedsim.attacks.triggers import Trigger
from fedsim.errors import UserError
from fedsim.lookups import attack_class
from fedsim.seeding import derive_seed
from fedsim.trainer import ClientTrainer

# what the plan passes to an attack itself; the rest of a table's keys are not the method's
PLAN_ARGUMENTS = ("trainer", "target", "trigger", "poison_fraction", "window", "part", "parts")


@dataclass(frozen=True)
class Attacker:
    """One ``[[attack]]`` table, resolved: its clients are known."""

    name: str
    method: str
    clients: tuple[int, ...]
    target: int
    trigger: Trigger | None  # None: the method's default trigger
    poison_fraction: float | None  # None: the method's default
    window: tuple[int, int] | None  # None: every round
    options: dict[str, Any] = field(default_factory=dict)
    group: str | None = None

    def attacks_in(self, server_round: int) -> bool:
        return self.window is None or self.window[0] <= server_round <= self.window[1]


class AttackPlan:
    """The experiment's attackers and the clients they control (see the module docstring)."""

    def __init__(self, attackers: list[Attacker], parts: dict[int, tuple[int, int]] | None = None) -> None:
        self.attackers = attackers
        self.parts = parts or {}  # client -> (part, parts) for methods that split a trigger
        self._by_client = {client: attacker for attacker in attackers for client in attacker.clients}
        self._trainers: dict[int, ClientTrainer] = {}

    def __bool__(self) -> bool:
        return bool(self.attackers)

    @classmethod
    def from_experiment(cls, experiment, num_clients: int) -> AttackPlan:
        """Resolve the ``[[attack]]`` tables for ``num_clients`` clients (one-line errors)."""
        tables = experiment.attack
        named = [client for table in tables for client in table.clients or ()]
        for number, table in enumerate(tables, start=1):
            outside = [client for client in table.clients or () if client >= num_clients]
            if outside:
                raise UserError(
                    f"[[attack]] #{number} clients {outside} do not exist: the partition has {num_clients} clients "
                    f"(ids 0 to {num_clients - 1})"
                )
        twice = sorted({client for client in named if named.count(client) > 1})
        if twice:
            raise UserError(f"[[attack]] clients {twice} are named by two attackers; an attacker's clients are its own")
        wanted = sum(table.count or 0 for table in tables)
        free = num_clients - len(named)
        if wanted > free:
            raise UserError(
                f"[[attack]] counts ask for {wanted} clients but only {free} of {num_clients} are not named; "
                "lower count or use more clients"
            )
        drawn = []
        if wanted:  # from the clients no table names, in id order (a mask: a population has millions)
            unnamed = np.ones(num_clients, dtype=bool)
            unnamed[named] = False
            rng = np.random.default_rng(derive_seed(experiment.seed, "attackers"))
            drawn = list(rng.permutation(np.flatnonzero(unnamed))[:wanted])
        attackers = []
        for index, table in enumerate(tables):
            if table.clients is not None:
                clients = tuple(table.clients)
            else:
                clients = tuple(sorted(int(c) for c in drawn[: table.count]))
                drawn = drawn[table.count :]
            attackers.append(
                Attacker(
                    name=table.name or str(index),
                    method=table.method,
                    clients=clients,
                    target=table.target,
                    trigger=trigger_of(table.trigger),
                    poison_fraction=table.poison_fraction,
                    window=tuple(table.window) if table.window else None,
                    options=dict(table.options),
                    group=table.group,
                )
            )
        names = [attacker.name for attacker in attackers]
        if len(set(names)) != len(names):
            raise UserError(f"[[attack]] names {names} repeat; give each attacker its own name")
        return cls(attackers, split_among_groups(attackers))

    # -- who is who ------------------------------------------------------------------
    def attacker_of(self, client: int) -> Attacker | None:
        return self._by_client.get(int(client))

    @property
    def clients(self) -> frozenset[int]:
        """Every client an attacker controls."""
        return frozenset(self._by_client)

    def trainer_for(self, client: int, trainer: ClientTrainer) -> ClientTrainer:
        """What ``client`` runs: ``trainer`` itself (benign), or the attack around it;
        one attack instance per attacking client, kept for the plan's life."""
        attacker = self.attacker_of(client)
        if attacker is None:
            return trainer
        if client not in self._trainers:
            self._trainers[client] = self.build(attacker, trainer, client)
        return self._trainers[client]

    def build(self, attacker: Attacker, trainer: ClientTrainer, client: int | None = None) -> AttackTrainer:
        """The attack of ``attacker`` around ``trainer``, as run by ``client`` (default:
        its first client)."""
        cls = attack_class(attacker.method)
        client = attacker.clients[0] if client is None else client
        kwargs: dict[str, Any] = {"target": attacker.target, **attacker.options}
        if attacker.trigger is not None:
            kwargs["trigger"] = attacker.trigger
        if attacker.poison_fraction is not None:
            kwargs["poison_fraction"] = attacker.poison_fraction
        if attacker.window is not None:
            kwargs["window"] = attacker.window
        if splits_trigger(cls):
            kwargs["part"], kwargs["parts"] = self.parts.get(client, (0, 1))
        return cls(trainer, **kwargs)


def tell_attackers(plan: AttackPlan, messages: list, clients: dict[int, int], train_size) -> list:
    """The round's train messages, an attacker's with :data:`ROUND_EXAMPLES` added to its
    config: the training examples of all the round's sampled clients (``train_size(client)``),
    what model replacement's exact boosting factor needs. Other clients' messages are left
    as they are."""
    from flwr.app import ConfigRecord, Message, RecordDict

    sampled = [clients[message.metadata.dst_node_id] for message in messages]
    if not any(plan.attacker_of(client) is not None for client in sampled):
        return messages
    total = int(sum(train_size(client) for client in sampled))
    told = []
    for message, client in zip(messages, sampled, strict=True):
        if plan.attacker_of(client) is None:
            told.append(message)
            continue
        content = RecordDict(
            {
                key: ConfigRecord({**record, ROUND_EXAMPLES: total}) if isinstance(record, ConfigRecord) else record
                for key, record in message.content.items()
            }
        )
        told.append(Message(content=content, metadata=message.metadata))
    return told


def trigger_of(table) -> Trigger | None:
    """A ``[[attack]] trigger`` table as a :class:`Trigger` (None when the table has none)."""
    if table is None:
        return None
    location = table.location if isinstance(table.location, str) else tuple(table.location)
    return Trigger(
        kind=table.kind,
        size=table.size,
        location=location,
        value=table.value,
        alpha=table.alpha,
        seed=table.seed,
        init=table.init,
    )


def splits_trigger(cls: type[AttackTrainer]) -> bool:
    """Whether an attack takes ``part`` and ``parts`` of a trigger split among colluders (DBA)."""
    params = inspect.signature(cls).parameters
    return "part" in params and "parts" in params


def split_among_groups(attackers: list[Attacker]) -> dict[int, tuple[int, int]]:
    """(part, parts) for each client of an attack that splits its trigger: across the
    clients of its group, or of its own table when it has no group. Tables in one group
    must agree on what they collude on."""
    groups: dict[str, list[Attacker]] = {}
    for attacker in attackers:
        groups.setdefault(attacker.group or f"\0{attacker.name}", []).append(attacker)
    parts = {}
    for key, members in groups.items():
        first = members[0]
        for other in members[1:]:
            agreed = (first.method, first.target, first.trigger, first.options)
            if (other.method, other.target, other.trigger, other.options) != agreed:
                raise UserError(
                    f"[[attack]] group {key!r}: attackers {first.name!r} and {other.name!r} collude, so they must "
                    "have the same method, target, trigger and options"
                )
        if not splits_trigger(attack_class(first.method)):
            continue
        clients = [client for member in members for client in member.clients]
        parts.update({client: (index, len(clients)) for index, client in enumerate(clients)})
    return parts
