"""Neurotoxin (Zhang et al., ICML 2022, "Neurotoxin: Durable Backdoors in Federated Learning").

The attacker trains on poisoned batches, but only in the coordinates the benign clients
rarely update: its gradient is projected away from the top ``top_k`` fraction of
coordinates (by magnitude) of the benign update direction, so the backdoor is not
overwritten by later benign rounds.

The benign direction is approximated by the last global update, ``previous global - this
round's global``: the attacker remembers the global arrays it received (in its client
state, every round it trains, in the window or not). When it has none (its first round, or
the model changed shape), it uses, as the authors' code does, the gradient of the clean
loss on its own data at the global model.

Default ratio: the authors' code keeps the bottom ``gradmask_ratio`` of coordinates
(``topk(-|g|, ratio * n)``), with ratios of 0.95-0.99 in its configurations; BackFed's
default keeps 99%. Here ``top_k = 0.01`` (the top 1% is masked) by default. The mask is
over all parameters together (``per_layer = False``, BackFed's ``aggregate_all_layers``),
or per parameter tensor (the authors' code's default path).

The projection is exact: the masked gradient coordinates are zeroed before every step,
and after training the masked coordinates are reset to the global values (which also
undoes weight decay there), so the update is zero on them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsim.attacks.base import AttackRound, AttackTrainer, float_entries
from fedsim.attacks.triggers import Trigger
from fedsim.trainer import ClientTrainer, RoundConfig
from fedsim.training import batches

PREVIOUS = "neurotoxin.previous."  # attack-state keys of the last global arrays received


class Neurotoxin(AttackTrainer):
    """Neurotoxin: poisoned training (``trigger``, default a 3x3 patch, as BadNets) with the
    gradient projected off the top ``top_k`` fraction of the benign update's coordinates."""

    name = "neurotoxin"
    default_trigger = "patch"

    def __init__(
        self,
        trainer: ClientTrainer,
        *,
        target: int,
        trigger: Trigger | None = None,
        poison_fraction: float = 0.125,
        window: tuple[int, int] | None = None,
        top_k: float = 0.01,
        per_layer: bool = False,
    ) -> None:
        if not 0.0 <= float(top_k) < 1.0:
            raise ValueError(f"Neurotoxin's top_k must be in [0, 1), got {top_k!r}")
        self.top_k = float(top_k)
        self.per_layer = bool(per_layer)
        self.masks: dict[str, torch.Tensor] = {}
        self.global_values: dict[str, torch.Tensor] = {}
        super().__init__(trainer, target=target, trigger=trigger, poison_fraction=poison_fraction, window=window)

    # -- the benign direction -------------------------------------------------------------
    def benign_direction(self, model: nn.Module, step: AttackRound) -> dict[str, torch.Tensor]:
        """|benign update| per parameter: the last global update, else the clean gradient."""
        params = dict(model.named_parameters())
        previous = {key[len(PREVIOUS) :]: value for key, value in step.state.items() if key.startswith(PREVIOUS)}
        current = float_entries(step.received)
        if params and all(
            name in previous and name in current and previous[name].shape == current[name].shape for name in params
        ):
            return {name: torch.as_tensor(np.abs(previous[name] - current[name])) for name in params}
        return self.clean_gradient(model, step)

    def clean_gradient(self, model: nn.Module, step: AttackRound) -> dict[str, torch.Tensor]:
        """|gradient of the clean loss| over the attacker's data, at the global model (eval
        mode, batches in order: no draws, no change to BatchNorm statistics)."""
        was_training = model.training
        model.eval()
        model.zero_grad()
        x = torch.as_tensor(step.data.x_train).to(step.device)
        y = torch.as_tensor(step.data.y_train).to(step.device)
        for xb, yb in batches(x, y, step.config.batch_size):
            (self.trainer.batch_loss(model, xb, yb) * len(yb)).backward()
        grads = {
            name: (p.grad.detach().abs().cpu() if p.grad is not None else torch.zeros_like(p, device="cpu"))
            for name, p in model.named_parameters()
        }
        model.zero_grad()
        model.train(was_training)
        return grads

    def top_mask(self, direction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """True on the top ``top_k`` fraction (rounded down) of coordinates by magnitude,
        over all parameters or per parameter."""
        if self.per_layer:
            return {name: _top(values, self.top_k) for name, values in direction.items()}
        names = list(direction)
        flat = _top(torch.cat([direction[name].reshape(-1).float() for name in names]), self.top_k)
        out, start = {}, 0
        for name in names:
            size = direction[name].numel()
            out[name] = flat[start : start + size].reshape(direction[name].shape)
            start += size
        return out

    # -- hooks ----------------------------------------------------------------------------
    def before_fit(self, model: nn.Module, step: AttackRound) -> None:
        masks = self.top_mask(self.benign_direction(model, step))
        params = dict(model.named_parameters())
        self.masks = {name: mask.to(params[name].device) for name, mask in masks.items()}
        self.global_values = {name: p.detach().clone() for name, p in params.items()}

    def shape_gradients(self, model: nn.Module, step: AttackRound) -> None:
        for name, p in model.named_parameters():
            if p.grad is not None and name in self.masks:
                p.grad[self.masks[name]] = 0

    @torch.no_grad()
    def after_fit(self, model: nn.Module, step: AttackRound) -> None:
        for name, p in model.named_parameters():
            if name in self.masks:
                p[self.masks[name]] = self.global_values[name][self.masks[name]]
        self.masks, self.global_values = {}, {}

    def remember(self, arrays, own: dict[str, np.ndarray], config: RoundConfig) -> dict[str, np.ndarray]:
        kept = {key: value for key, value in own.items() if not key.startswith(PREVIOUS)}
        return {**kept, **{PREVIOUS + key: value.copy() for key, value in float_entries(arrays).items()}}


def _top(values: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = values.reshape(-1)
    k = int(fraction * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat.float(), k, sorted=False).indices] = True
    return mask.reshape(values.shape)
