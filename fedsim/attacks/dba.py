"""DBA, the distributed backdoor attack (Xie et al., ICLR 2020, "DBA: Distributed Backdoor
Attacks against Federated Learning"), as its reference code runs it (AI-secure/DBA:
``utils/*_params.yaml``, ``image_helper.py`` and ``image_train.py``).

Colluding clients (an ``[[attack]]`` group) share one global trigger made of local
triggers; each client trains with its own local trigger, and the attack is tested with the
global one, their union (the yamls' ``centralized_test_trigger``).

**Geometry.** By default the local triggers are the reference's bars (a ``"bars"``
:class:`~fedsim.attacks.triggers.Trigger`: one bar per colluding client, the bar and gap
by image size, 1 x 4 bars 2 apart on 28 x 28 images, 1 x 6 bars 3 apart on 32 x 32, 2 x 10
bars 2 apart on 64 x 64; the rule for other sizes and for more than 4 bars is in
:mod:`fedsim.attacks.triggers`). ``bar`` and ``gap`` replace the rule; a ``patch`` trigger
instead splits that square into row-major chunks (fedsim's own layout).

**Scaling.** The reference scales the poisoned model before sending it
(``scale_weights_poison``): ``w_global + scale (w_local - w_global)`` on every array. Its
yamls give 100 (MNIST, CIFAR-10, Tiny-ImageNet; 30 for LOAN) and apply it in their
single-shot setting only (``baseline: false``, each adversary attacks in one round, with
the server's learning rate ``eta`` 0.1 and 10 clients a round, so that the scaled update
enters the global model at full weight: 100 x 0.1 / 10 = 1); their multi-shot setting
(``baseline: true``, every adversary attacks every round of a range, ``eta`` 1) does not
scale. An attacker here attacks every round of its window (every round by default, as
multi-shot), so ``scale`` defaults to 1, the reference's multi-shot. Its single-shot is one
``[[attack]]`` table per client in one ``group``, each with a one-round ``window`` (the
yamls stagger them: rounds 12, 14, 16 and 18 for MNIST), and a ``scale`` that gives the
update full weight under the experiment's aggregation: FedAvg averages by samples at server
learning rate 1, so about the round's samples over the attacker's (the number of clients a
round when they hold equal data), not the yamls' 100.

**Poisoned share.** The reference poisons the first ``poisoning_per_batch`` samples of
every batch of 64: 20 for MNIST and Tiny-ImageNet, 5 for CIFAR-10. ``poison_fraction``
left out is that share by image size (20/64, 5/64 or 20/64, with the bars' size rule), and
fedsim's contract picks the samples: the first ``ceil(fraction * n)`` samples in batch
order that are not of the target class.

**Departures, on purpose.** (1) The reference also poisons samples already of the target
class and, in a last short batch, up to the full count; fedsim's share counts only samples
whose label it changes (every attack's contract, so that attacks compare) and scales with
the batch. (2) Integer buffers
(BatchNorm's ``num_batches_tracked``) are sent as trained: the reference scales them too,
which only corrupts a counter. (3) The attacker trains with the round's ``[client]``
settings; the reference's use their own (``poison_lr`` 0.05 for MNIST and CIFAR-10, 0.001
for Tiny-ImageNet, ``internal_poison_epochs`` 10, 6 and 10, a step decay of the learning
rate at 20% and 80% of them, momentum 0.9 and weight decay 5e-4). (4) The reference makes
sure its adversaries are among the round's clients in their poison rounds; here an attacker
attacks when the strategy samples it. (5) LOAN's triggers are feature values of tabular
data; fedsim's DBA stamps images only.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord

from fedsim.attacks.base import AttackRound, AttackTrainer, float_entries, replace_entries
from fedsim.attacks.triggers import Trigger, reference_size
from fedsim.checks import check, check_integer, check_positive
from fedsim.trainer import ClientTrainer

# samples poisoned per batch of 64 in the reference's yamls, by image size (reference_size)
REFERENCE_POISONED_PER_64 = {
    28: 20,  # mnist_params.yaml poisoning_per_batch
    32: 5,  # cifar_params.yaml
    64: 20,  # tiny_params.yaml
}


def reference_poison_fraction(height: int, width: int) -> float:
    """The reference's share of each batch poisoned, for images of this size."""
    return REFERENCE_POISONED_PER_64[reference_size(height, width)] / 64


class DBA(AttackTrainer):
    """DBA: this client is member ``part`` (0-based) of a group of ``parts`` colluding
    clients and stamps its local trigger, part ``part`` of the global trigger, on
    ``poison_fraction`` of each batch (the reference's share by image size when left out),
    then sends ``w_global + scale (w_local - w_global)``.

    The global trigger has ``local_triggers`` parts (default: one per colluding client,
    as the yamls' 4 adversaries and ``trigger_num`` 4); with more parts than clients, the
    extra ones are in the test trigger only, and a group of one client trains with the
    whole global trigger (the reference's centralized attacker). The default trigger is the
    reference's bars (``bar`` and ``gap`` override their size rule); a ``patch`` trigger
    is split into row-major chunks instead.
    """

    name = "dba"
    default_trigger = "bars"
    trigger_kinds = ("bars", "patch")

    def __init__(
        self,
        trainer: ClientTrainer,
        *,
        target: int,
        part: int,
        parts: int,
        trigger: Trigger | None = None,
        poison_fraction: float | None = None,
        window: tuple[int, int] | None = None,
        scale: float = 1.0,
        local_triggers: int | None = None,
        bar: tuple[int, int] | None = None,
        gap: int | None = None,
    ) -> None:
        part, parts = int(part), int(parts)
        check(0 <= part < parts, f"DBA's part must be in [0, parts), got part = {part}, parts = {parts}")
        scale = check_positive("DBA's scale", scale)
        if local_triggers is not None:
            local_triggers = check_integer("DBA's local_triggers", local_triggers, minimum=1)
        if trigger is None:
            count = local_triggers if local_triggers is not None else parts
            trigger = Trigger("bars", bars=count, bar=bar, gap=gap)  # checks bar and gap
        else:
            trigger = self.chosen_trigger(trigger)
            check(
                bar is None and gap is None,
                "DBA's bar and gap shape its default bars; give them on the trigger instead",
            )
            if trigger.kind == "bars":
                check(
                    local_triggers is None or local_triggers == trigger.bars,
                    f"DBA's local_triggers = {local_triggers} disagrees with its trigger's {trigger.bars} bars",
                )
                count = trigger.bars
            else:
                count = local_triggers if local_triggers is not None else parts
        check(
            parts <= 1 or count >= parts,
            f"DBA's {parts} colluding clients need a local trigger each, got {count}; raise local_triggers",
        )
        # a lone attacker trains with the global trigger, as the reference's centralized one
        self.local_trigger = trigger if parts == 1 else trigger.split(count)[part]
        self.part, self.parts, self.local_triggers = part, parts, count
        self.scale = scale
        super().__init__(
            trainer,
            target=target,
            trigger=trigger,
            poison_fraction=0.0 if poison_fraction is None else poison_fraction,
            window=window,
        )
        self.poison_fraction = None if poison_fraction is None else self.poison_fraction  # None: by image size
        self.batch_fraction = self.poison_fraction

    def training_trigger(self) -> Trigger:
        return self.local_trigger

    @property
    def poisons_data(self) -> bool:
        return self.poison_fraction is None or self.poison_fraction > 0

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.poison_fraction is None:
            self.batch_fraction = reference_poison_fraction(x.shape[-2], x.shape[-1])
        return super().poison(x, y)

    def poison_mask(self, y: torch.Tensor) -> torch.Tensor:
        # the base rule with the fraction resolved for this batch's images
        budget = math.ceil(self.batch_fraction * len(y))
        eligible = self.eligible(y)
        return eligible & (torch.cumsum(eligible.long(), 0) <= budget)

    def craft_reply(self, reply: ArrayRecord, step: AttackRound) -> ArrayRecord:
        """The reference's ``scale_weights_poison``: ``w_global + scale (w_local -
        w_global)`` on every floating-point array the server sent (the reply unchanged at
        scale 1, bit for bit)."""
        if self.scale == 1.0:
            return reply
        local = float_entries(reply)
        received = float_entries(step.received)
        scaled = {}
        for key, value in local.items():
            if key in received and received[key].shape == value.shape:
                g = received[key]
                # the reference's order of operations: target + (value - target) * rate
                scaled[key] = (g + (value - g) * self.scale).astype(value.dtype, copy=False)
        return replace_entries(reply, scaled)


__all__ = ["DBA", "reference_poison_fraction"]
