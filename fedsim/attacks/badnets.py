"""BadNets (Gu et al., 2017): a fixed pixel patch, poisoned samples relabelled to the target."""

from __future__ import annotations

from fedsim.attacks.base import AttackTrainer
from fedsim.attacks.triggers import Trigger
from fedsim.trainer import ClientTrainer


class BadNets(AttackTrainer):
    """BadNets: ``poison_fraction`` of each batch gets a patch ``trigger`` (default: a 3x3
    patch of value 1 at the bottom-right corner) and the ``target`` label."""

    name = "badnets"

    def __init__(
        self,
        trainer: ClientTrainer,
        *,
        target: int,
        trigger: Trigger | None = None,
        poison_fraction: float = 0.125,
        window: tuple[int, int] | None = None,
    ) -> None:
        trigger = trigger if trigger is not None else Trigger("patch")
        if trigger.kind != "patch":
            raise ValueError(f"BadNets stamps a patch trigger; got a {trigger.kind!r} one (use 'blend')")
        super().__init__(trainer, target=target, trigger=trigger, poison_fraction=poison_fraction, window=window)
