"""The attacker's client: a :class:`ClientTrainer` wrapped around the strategy's own trainer.

An attack is a client behaviour, not a strategy: :class:`AttackTrainer` takes the trainer
the strategy gives every client (FedAvg's, FedBN's, FedWon's, ...) and delegates to it
everything it does not change, so an attack composes with any strategy whose trainer
trains through :meth:`ClientTrainer.batch_loss` (FedAvg's ``fit`` and those built on it).

**Window.** Outside ``window`` (first and last round, inclusive; ``None`` is every round)
the attacker is the wrapped trainer: same arrays, metrics and state, bit for bit. (An attack
that remembers something between rounds, Neurotoxin's last global model, adds it to the
state under :data:`STATE_PREFIX`; the arrays and metrics stay the wrapped trainer's.)

**Poisoning a batch.** In a batch of n samples, the first ``ceil(poison_fraction * n)``
samples, in batch order, that are *eligible* (by default: not already of the target class;
label flipping: of the source class) get the trigger and the target label; when fewer are
eligible, all of them are poisoned. Batches are shuffled by the round's torch generator, so
the poisoned samples are a random subset, and poisoning itself draws nothing: a data
poisoning attacker consumes the round's generator exactly as the wrapped trainer does (an
attack that needs draws, Mirage's detector, takes them from that generator too, never from a
global RNG). Poisoning happens inside the wrapped trainer's ``batch_loss`` (on the batch
already on the device), so the trainer's loss, hooks (FedWon's AGC) and optimiser apply.

**Stealth.** An attacker's reply has the wrapped trainer's metric keys, no more (Flower
refuses to aggregate replies whose metrics differ, and a defence could read them): the
number of samples it poisoned in its last round is kept in its state instead
(:func:`poisoned_count`).

**State.** The wrapped trainer sees its own state only: keys starting with
:data:`STATE_PREFIX` belong to the attack, are removed before delegating and merged back
into the state the wrapped trainer returns (FedBN replaces its state wholesale).

A new attack subclasses :class:`AttackTrainer` and overrides any of: :meth:`eligible`
(which samples may be poisoned), :meth:`poison` (what happens to them), :meth:`before_fit`
(after the global model is loaded), :meth:`training_config` (the local-training settings
of the poisoned training), :meth:`shape_gradients` (after backward, before the
wrapped trainer's own hook and the step), :meth:`after_fit` (the trained model, before it is
sent) and :meth:`craft_reply` (the arrays that go back).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedsim.attacks.triggers import Trigger
from fedsim.checks import check, check_number
from fedsim.data import ClientData
from fedsim.trainer import ClientCall, ClientState, ClientTrainer, QueryResult, RoundConfig, TrainResult

STATE_PREFIX = "attack:"  # client-state keys that belong to the attack, never to the wrapped trainer
POISONED = "poisoned"  # attack-state key: how many samples the attacker poisoned in its last round
ROUND_EXAMPLES = "round-examples"  # config key: the training examples of every client sampled in the round


@dataclass
class AttackRound:
    """What an active round of an attack knows: the global arrays it received, the round's
    config and the attack's own state (keys without :data:`STATE_PREFIX`)."""

    received: ArrayRecord
    config: RoundConfig
    state: dict[str, np.ndarray]
    data: ClientData
    device: torch.device
    generator: torch.Generator | None = None  # the round's: any draw an attack makes comes from it
    poisoned: int = 0  # samples poisoned so far this round
    batches: int = 0  # batches that went through batch_loss


class AttackTrainer(ClientTrainer):
    """An attacker: the wrapped ``trainer``'s local training on poisoned batches.

    ``target``: the label poisoned samples get. ``trigger``: stamped on them (``None``: the
    samples are only relabelled). ``poison_fraction``: the share of each batch poisoned
    (Mirage: 8 of 64 = 0.125). ``window``: ``(first, last)`` round of the attack,
    inclusive; ``None`` attacks every round it trains. Which clients run an attacker is
    decided outside (the experiment's ``[[attack]]`` tables).
    """

    can_vectorize = False  # poisons its own batches; an attacker always trains alone
    name = "attack"
    default_trigger: ClassVar[str | None] = None  # the kind of trigger made when none is given
    trigger_kinds: ClassVar[tuple[str, ...] | None] = None  # the kinds the attack can use (None: any)

    @classmethod
    def chosen_trigger(cls, trigger: Trigger | None) -> Trigger | None:
        """``trigger``, or the attack's default kind; one the attack cannot use is refused."""
        if trigger is None and cls.default_trigger is not None:
            trigger = Trigger(cls.default_trigger)
        if trigger is not None and cls.trigger_kinds is not None:
            kinds = " or ".join(map(repr, cls.trigger_kinds))
            check(
                trigger.kind in cls.trigger_kinds, f"{cls.__name__} takes a {kinds} trigger, got a {trigger.kind!r} one"
            )
        return trigger

    def __init__(
        self,
        trainer: ClientTrainer,
        *,
        target: int,
        trigger: Trigger | None = None,
        poison_fraction: float = 0.125,
        window: tuple[int, int] | None = None,
    ) -> None:
        trigger = self.chosen_trigger(trigger)
        check(
            not isinstance(trainer, AttackTrainer), "an attacker wraps the strategy's own trainer, not another attacker"
        )
        check(
            not getattr(trainer, "takes_several_models", False),
            f"attacks wrap trainers of one model; {type(trainer).__name__} takes several",
        )
        self.poison_fraction = check_number("poison_fraction", poison_fraction, at_least=0, at_most=1)
        if window is not None:
            first, last = (int(r) for r in window)
            check(first <= last, f"an attack window (first, last) needs first <= last, got {window!r}")
            window = (first, last)
        self.trainer = trainer
        self.target = int(target)
        self.trigger = trigger
        self.window = window
        self._round: AttackRound | None = None

    # -- when ---------------------------------------------------------------------------
    def active(self, server_round: int) -> bool:
        """Whether the attack runs in this round."""
        return self.window is None or self.window[0] <= server_round <= self.window[1]

    @property
    def test_trigger(self) -> Trigger | None:
        """The trigger the attack's success is measured with (DBA: the global trigger, all its parts)."""
        return self.trigger

    def measured_trigger(self, state: ClientState | None = None) -> Trigger | None:
        """The trigger the attack is measured with, given an attacking client's state
        (Mirage: the pattern it learned); by default :attr:`test_trigger`."""
        return self.test_trigger

    # -- which samples, and what happens to them ---------------------------------------
    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the samples that may be poisoned: those not of the target class."""
        return y != self.target

    def training_trigger(self) -> Trigger | None:
        """The trigger stamped on training samples (DBA: this client's local trigger)."""
        return self.trigger

    def poison_mask(self, y: torch.Tensor) -> torch.Tensor:
        """The samples of a batch that are poisoned: the first ``ceil(fraction * n)``
        eligible ones in batch order (see the module's docstring)."""
        budget = math.ceil(self.poison_fraction * len(y))
        eligible = self.eligible(y)
        return eligible & (torch.cumsum(eligible.long(), 0) <= budget)

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The batch with its poisoned samples triggered and relabelled (new tensors;
        the inputs are unchanged), and how many were poisoned."""
        chosen = self.poison_mask(y)
        count = int(chosen.sum())
        if count == 0:
            return x, y, 0
        x, y = x.clone(), y.clone()
        trigger = self.training_trigger()
        if trigger is not None:
            x[chosen] = self.stamp(trigger, x[chosen])
        y[chosen] = self.target
        return x, y, count

    def stamp(self, trigger: Trigger, x: torch.Tensor) -> torch.Tensor:
        """The trigger on samples ``x`` (Mirage stamps its current learned pattern)."""
        return trigger.apply(x)

    # -- hooks of an active round -------------------------------------------------------
    def before_fit(self, model: nn.Module, step: AttackRound) -> None:
        """After the global model is loaded, before local training."""

    def shape_gradients(self, model: nn.Module, step: AttackRound) -> None:
        """After backward, before the wrapped trainer's ``before_step`` and the step."""

    def after_fit(self, model: nn.Module, step: AttackRound) -> None:
        """After local training, before the model is sent."""

    def training_config(self, config: RoundConfig) -> RoundConfig:
        """The config the poisoned training runs with (Mirage: its own lr and epochs)."""
        return config

    def craft_reply(self, reply: ArrayRecord, step: AttackRound) -> ArrayRecord:
        """The arrays that go back to the server (model replacement scales them)."""
        return reply

    def fit_poisoned(
        self, model: nn.Module, data: ClientData, config: RoundConfig, generator: torch.Generator, device
    ) -> dict[str, float]:
        """The wrapped trainer's ``fit``, with this attack's ``batch_loss`` and
        ``before_step`` in place of its own (on a shallow copy: the wrapped trainer is
        not changed)."""
        inner = self.trainer
        step = self._round
        proxy = copy.copy(inner)
        inner_loss, inner_hook = inner.batch_loss, inner.before_step

        def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            x, y, count = self.poison(x, y)
            step.poisoned += count
            step.batches += 1
            return inner_loss(model, x, y)

        def before_step(model: nn.Module, config: RoundConfig) -> None:
            self.shape_gradients(model, step)
            inner_hook(model, config)

        proxy.batch_loss = batch_loss
        proxy.before_step = before_step
        metrics = proxy.fit(model, data, config, generator, device)
        if step.batches == 0 and data.num_train > 0 and self.poisons_data:
            raise ValueError(
                f"{type(inner).__name__} does not train through batch_loss, so the attack "
                f"{type(self).__name__} cannot poison its batches"
            )
        return metrics

    @property
    def poisons_data(self) -> bool:
        """Whether this attack changes training batches (all but model replacement without
        a trigger); such an attack refuses a trainer that never calls ``batch_loss``."""
        return self.poison_fraction > 0

    # -- the round ----------------------------------------------------------------------
    @staticmethod
    def split_state(state: ClientState) -> tuple[ClientState, dict[str, np.ndarray]]:
        inner = {key: value for key, value in state.items() if not key.startswith(STATE_PREFIX)}
        own = {key[len(STATE_PREFIX) :]: value for key, value in state.items() if key.startswith(STATE_PREFIX)}
        return inner, own

    def train(self, call: ClientCall) -> TrainResult:
        model, arrays, data, config = call.model, call.arrays, call.data, call.config
        generator, device = call.generator, call.device
        inner_state, own = self.split_state(call.state)
        if not self.active(config.server_round):  # the wrapped trainer, exactly
            result = self.trainer.train(call.replace(state=inner_state))
            own = {**self.remember(arrays, own, config), POISONED: np.array(0)}
            return TrainResult(result.arrays, result.metrics, self.merge_state(result.state, own))
        self._round = step = AttackRound(arrays, config, dict(own), data, device, generator)
        try:
            self.trainer.receive(model, arrays, inner_state)
            model.to(device)
            self.before_fit(model, step)
            metrics = self.fit_poisoned(model, data, self.training_config(config), generator, device)
            self.after_fit(model, step)
            reply, inner_state = self.trainer.send(model, inner_state)
            reply = self.craft_reply(reply, step)
        finally:
            self._round = None
        step.state = {**self.remember(arrays, step.state, config), POISONED: np.array(step.poisoned)}
        return TrainResult(reply, metrics, self.merge_state(inner_state, step.state))

    def remember(self, arrays: ArrayRecord, own: dict[str, np.ndarray], config: RoundConfig) -> dict[str, np.ndarray]:
        """What the attack keeps for its next round (called every round it trains, in the
        window or not); by default what it had."""
        return own

    @staticmethod
    def merge_state(inner: ClientState, own: dict[str, np.ndarray]) -> ClientState:
        if not own:
            return inner
        return {**inner, **{STATE_PREFIX + key: value for key, value in own.items()}}

    # -- everything else is the wrapped trainer's --------------------------------------
    @property
    def takes_several_models(self) -> bool:  # type: ignore[override]
        return self.trainer.takes_several_models

    def receive(self, model, arrays, state):
        return self.trainer.receive(model, arrays, self.split_state(state)[0])

    def make_optimizer(self, model, config):
        return self.trainer.make_optimizer(model, config)

    def batch_loss(self, model, x, y):
        return self.trainer.batch_loss(model, x, y)

    def gradient_clipping(self, config):
        return self.trainer.gradient_clipping(config)

    def before_step(self, model, config):
        return self.trainer.before_step(model, config)

    def fit(self, model, data, config, generator, device):
        return self.trainer.fit(model, data, config, generator, device)

    def send(self, model, state):
        return self.trainer.send(model, state)

    def query(self, call: ClientCall) -> QueryResult:
        return self.trainer.query(call.replace(state=self.split_state(call.state)[0]))

    def predict(self, call: ClientCall) -> torch.Tensor:
        return self.trainer.predict(call.replace(state=self.split_state(call.state)[0]))

    def __getattr__(self, name: str):
        # a trainer's own attributes and helpers (FedWon's clip_lambda, ...) stay reachable;
        # only called for names this class does not have
        if name == "trainer" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.trainer, name)


def poisoned_count(state: ClientState) -> int:
    """How many samples an attacker poisoned in its last round, from its client state."""
    return int(state.get(STATE_PREFIX + POISONED, 0))


def float_entries(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The floating-point arrays of a record, by key, as numpy."""
    out = {}
    for key in record.keys():
        array = record[key].numpy()
        if np.issubdtype(array.dtype, np.floating):
            out[key] = array
    return out


def replace_entries(record: ArrayRecord, new: dict[str, np.ndarray]) -> ArrayRecord:
    """A copy of ``record`` (same key order) with some entries replaced."""
    return ArrayRecord({key: Array(np.ascontiguousarray(new[key])) if key in new else record[key] for key in record})
