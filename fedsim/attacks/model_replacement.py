"""Model replacement (Bagdasaryan et al., AISTATS 2020, "How to backdoor federated learning").

The attacker trains on poisoned batches (when it has a trigger) and scales its update so
that it survives averaging: it sends ``w_global + gamma (w_local - w_global)``. The paper's
gamma is n / eta (clients per round over the server's learning rate, 1 for FedAvg); it is
given here as a number, ``gamma``.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from fedsim.attacks.base import AttackRound, AttackTrainer, float_entries, replace_entries
from fedsim.attacks.triggers import Trigger
from fedsim.trainer import ClientTrainer


class ModelReplacement(AttackTrainer):
    """Model replacement: every floating-point array the wrapped trainer sends is replaced by
    ``w_global + gamma (w_local - w_global)`` (integer buffers, and arrays the server did
    not send, are left as they are). With a ``trigger`` (any kind) it first trains on
    poisoned batches as BadNets or Blend do; without one it scales a benign update."""

    name = "model_replacement"

    def __init__(
        self,
        trainer: ClientTrainer,
        *,
        target: int,
        gamma: float,
        trigger: Trigger | None = None,
        poison_fraction: float = 0.125,
        window: tuple[int, int] | None = None,
    ) -> None:
        if not float(gamma) > 0:
            raise ValueError(f"model replacement's gamma must be > 0, got {gamma!r}")
        self.gamma = float(gamma)
        super().__init__(trainer, target=target, trigger=trigger, poison_fraction=poison_fraction, window=window)

    def poison_mask(self, y: torch.Tensor) -> torch.Tensor:
        if self.trigger is None:  # no trigger: a scaled benign update, nothing relabelled
            return torch.zeros_like(y, dtype=torch.bool)
        return super().poison_mask(y)

    @property
    def poisons_data(self) -> bool:
        return self.trigger is not None and self.poison_fraction > 0

    def craft_reply(self, reply: ArrayRecord, step: AttackRound) -> ArrayRecord:
        local = float_entries(reply)
        received = float_entries(step.received)
        scaled = {}
        for key, value in local.items():
            if key in received and received[key].shape == value.shape:
                g = received[key]
                scaled[key] = (g + self.gamma * (value - g)).astype(value.dtype, copy=False)
        return replace_entries(reply, scaled)


__all__ = ["ModelReplacement"]
