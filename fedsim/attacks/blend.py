"""Blended injection (Chen et al., 2017): x' = (1 - alpha) x + alpha t over the whole image."""

from __future__ import annotations

from fedsim.attacks.base import AttackTrainer
from fedsim.attacks.triggers import Trigger
from fedsim.trainer import ClientTrainer


class Blend(AttackTrainer):
    """Blend: ``poison_fraction`` of each batch is blended with a fixed pattern ``trigger``
    (default: uniform noise from seed 0, alpha 0.2) and relabelled to ``target``."""

    name = "blend"

    def __init__(
        self,
        trainer: ClientTrainer,
        *,
        target: int,
        trigger: Trigger | None = None,
        poison_fraction: float = 0.125,
        window: tuple[int, int] | None = None,
    ) -> None:
        trigger = trigger if trigger is not None else Trigger("blend")
        if trigger.kind == "patch":
            raise ValueError("Blend blends a pattern over the image; a patch trigger is BadNets")
        super().__init__(trainer, target=target, trigger=trigger, poison_fraction=poison_fraction, window=window)
