"""Label flipping: samples of a source class (or of every class) relabelled to the target;
no trigger."""

from __future__ import annotations

import torch

from fedsim.attacks.base import AttackTrainer
from fedsim.checks import check
from fedsim.trainer import ClientTrainer


class LabelFlip(AttackTrainer):
    """Label flipping: ``poison_fraction`` (default: all) of each batch's samples of class
    ``source`` (``None``: of every class but the target) are relabelled to ``target``;
    the images are unchanged."""

    name = "label_flip"

    def __init__(
        self,
        trainer: ClientTrainer,
        *,
        target: int,
        source: int | None = None,
        poison_fraction: float = 1.0,
        window: tuple[int, int] | None = None,
    ) -> None:
        check(
            source is None or int(source) != int(target),
            f"label flipping needs a source class other than the target ({target})",
        )
        self.source = None if source is None else int(source)
        super().__init__(trainer, target=target, trigger=None, poison_fraction=poison_fraction, window=window)

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        if self.source is None:
            return y != self.target
        return y == self.source
