"""DBA, the distributed backdoor attack (Xie et al., ICLR 2020).

Colluding clients (an ``[[attack]]`` group) share one patch trigger; each trains with its
own part of it (:meth:`fedsim.attacks.triggers.Trigger.split`), and the attack is tested
with the full patch (:attr:`DBA.test_trigger`).
"""

from __future__ import annotations

from fedsim.attacks.base import AttackTrainer
from fedsim.attacks.triggers import Trigger
from fedsim.trainer import ClientTrainer


class DBA(AttackTrainer):
    """DBA: this client is member ``part`` (0-based) of a group of ``parts`` colluding
    clients; it stamps part ``part`` of ``parts`` of the full patch ``trigger`` (default: a
    3x3 patch at the bottom-right) on ``poison_fraction`` of each batch."""

    name = "dba"
    default_trigger = "patch"
    trigger_kinds = ("patch",)

    def __init__(
        self,
        trainer: ClientTrainer,
        *,
        target: int,
        part: int,
        parts: int,
        trigger: Trigger | None = None,
        poison_fraction: float = 0.125,
        window: tuple[int, int] | None = None,
    ) -> None:
        trigger = self.chosen_trigger(trigger)
        self.local_trigger = trigger.split(int(parts))[int(part)]  # checks the trigger and the part
        self.part, self.parts = int(part), int(parts)
        super().__init__(trainer, target=target, trigger=trigger, poison_fraction=poison_fraction, window=window)

    def training_trigger(self) -> Trigger:
        return self.local_trigger
