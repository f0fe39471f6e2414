"""Model replacement (Bagdasaryan et al., AISTATS 2020, "How to backdoor federated learning").

The attacker trains on poisoned batches (when it has a trigger) and scales its update so
that it survives averaging: it sends ``w_global + gamma (w_local - w_global)``. The paper's
gamma is n / eta (clients per round over the server's learning rate, 1 for FedAvg), exact
when every client holds as many examples. Under FedAvg weighted by examples the attacker's
update enters the average with weight n_attacker / sum(n_k), so the factor that makes the
aggregate its own model (if the benign updates cancel) is ``sum(n_k) / n_attacker``: the
default ``gamma = "exact"``, computed from what the round tells an attacker, the training
examples of every client sampled in it (config key ``round-examples``, which fedsim's
server sends to attackers). A number gives a fixed factor.
"""

from __future__ import annotations

from typing import Literal

import torch
from flwr.app import ArrayRecord

from fedsim.attacks.base import ROUND_EXAMPLES, AttackRound, AttackTrainer, float_entries, replace_entries
from fedsim.attacks.triggers import Trigger
from fedsim.checks import check
from fedsim.trainer import ClientTrainer

EXACT = "exact"


class ModelReplacement(AttackTrainer):
    """Model replacement: every floating-point array the wrapped trainer sends is replaced by
    ``w_global + gamma (w_local - w_global)`` (integer buffers, and arrays the server did
    not send, are left as they are); ``gamma = "exact"`` (default) is the round's training
    examples over the attacker's, a number a fixed factor. With a ``trigger`` (any kind) it
    first trains on poisoned batches as BadNets or Blend do; without one it scales a benign
    update."""

    name = "model_replacement"

    def __init__(
        self,
        trainer: ClientTrainer,
        *,
        target: int,
        gamma: float | Literal["exact"] = EXACT,
        trigger: Trigger | None = None,
        poison_fraction: float = 0.125,
        window: tuple[int, int] | None = None,
    ) -> None:
        check(
            gamma == EXACT or (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma > 0),
            f"model replacement's gamma must be 'exact' or a number > 0, got {gamma!r}",
        )
        self.gamma = gamma if gamma == EXACT else float(gamma)
        super().__init__(trainer, target=target, trigger=trigger, poison_fraction=poison_fraction, window=window)

    def poison_mask(self, y: torch.Tensor) -> torch.Tensor:
        if self.trigger is None:  # no trigger: a scaled benign update, nothing relabelled
            return torch.zeros_like(y, dtype=torch.bool)
        return super().poison_mask(y)

    @property
    def poisons_data(self) -> bool:
        return self.trigger is not None and self.poison_fraction > 0

    def boost(self, step: AttackRound) -> float:
        """This round's factor: ``gamma``, or the round's examples over the attacker's."""
        if self.gamma != EXACT:
            return self.gamma
        total = step.config.extra.get(ROUND_EXAMPLES)
        if total is None:
            raise ValueError(
                f"model replacement's gamma = 'exact' needs the round's training examples in the config key "
                f"{ROUND_EXAMPLES!r} (fedsim's server sends it to attackers); give gamma as a number"
            )
        return float(total) / max(step.data.num_train, 1)

    def craft_reply(self, reply: ArrayRecord, step: AttackRound) -> ArrayRecord:
        gamma = self.boost(step)
        local = float_entries(reply)
        received = float_entries(step.received)
        scaled = {}
        for key, value in local.items():
            if key in received and received[key].shape == value.shape:
                g = received[key]
                scaled[key] = (g + gamma * (value - g)).astype(value.dtype, copy=False)
        return replace_entries(reply, scaled)


__all__ = ["ModelReplacement"]
