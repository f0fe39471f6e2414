"""Neurotoxin (Zhang et al., ICML 2022, "Neurotoxin: Durable Backdoors in Federated
Learning"), as its authors' code runs it (jhcknzzm/Federated-Learning-Backdoor:
``FL_Backdoor_CV/helper.py`` ``grad_mask_cv`` and ``train_funcs.py`` ``train_cv_poison``
and ``apply_grad_mask``).

The attacker trains on poisoned batches, but only in the coordinates the benign clients
change least, so that later benign rounds do not overwrite the backdoor.

**The mask.** At the start of each attacking round, the gradient of the clean loss at the
global model is accumulated over clean data (``loss.backward()`` per batch of mean loss, in
training mode); the ``ratio`` share of coordinates with the smallest ``|gradient|``
(``topk(-|g|, int(n * ratio))``) is kept, the rest masked. ``ratio`` is the code's
``gradmask_ratio``, the share *kept*; its scripts and README run 0.95 (also 0.97 and 0.99
in a CIFAR-10 sweep; 1.0 turns the mask off), so 0.95 is the default here. The
coordinates compete over all parameters together (``per_layer = False``: every script runs
``--aggregate_all_layer 1``; the argument's own default, 0, ranks each parameter tensor
apart, ``per_layer = True``).

**The masked step.** After every backward and before every optimizer step, each gradient
is multiplied by its mask; weight decay and momentum come after, inside the optimizer, so
masked coordinates still decay (and carry the momentum of their decay): the update is not
exactly zero there. ``reset_masked = True`` (fedsim's earlier rule, not the code's) resets
them to the global values after training, so the update is zero on them.

**The benign direction.** The code's mask comes from the clean-data gradient
(``direction = "clean_gradient"``, the default). The paper's Algorithm approximates the
benign direction by the last global update instead: ``direction = "global_update"`` masks
by ``|previous global - this round's global|``, remembered in the attacker's client state
(every round it trains), and falls back to the clean gradient when it has none (its first
round, or the model changed shape).

**Departures, on purpose.** (1) The code takes the clean data of 30 benign clients the
simulator lends the attacker; here the attacker has its own data only, and uses all of it,
in order, in batches of the round's ``batch_size``. (2) The code computes the gradient in
training mode on the server's own model, so its BatchNorm running statistics change as a
side effect; here they are restored after the gradient. (3) The code mixes a batch of its
poisoned set with a clean batch; here ``poison_fraction`` of each batch is poisoned
(fedsim's contract). (4) The attacker trains with the round's ``[client]`` settings; the
code's uses its own (``poison_lr`` 0.02 for CIFAR-10 at ratio 0.95 in its scripts, 0.01 to
0.04 for EMNIST; momentum 0.9, weight decay 0.005 and 10 epochs in
``cifar10_params.yaml``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from fedsim.attacks.base import AttackRound, AttackTrainer, float_entries
from fedsim.attacks.triggers import Trigger
from fedsim.checks import check_choice, check_number
from fedsim.trainer import ClientTrainer, RoundConfig
from fedsim.training import batches

PREVIOUS = "neurotoxin.previous."  # attack-state keys of the last global arrays received
DIRECTIONS = ("clean_gradient", "global_update")


class Neurotoxin(AttackTrainer):
    """Neurotoxin: poisoned training (``trigger``, default a 3x3 patch, as BadNets) whose
    gradient is kept on the ``ratio`` share of coordinates the benign ``direction`` moves
    least (see the module's docstring for the rule and the options)."""

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
        ratio: float = 0.95,
        per_layer: bool = False,
        direction: Literal["clean_gradient", "global_update"] = "clean_gradient",
        reset_masked: bool = False,
    ) -> None:
        self.ratio = check_number("Neurotoxin's ratio (the share of coordinates kept)", ratio, above=0, at_most=1)
        check_choice("Neurotoxin's direction", direction, DIRECTIONS)
        self.per_layer = bool(per_layer)
        self.direction = direction
        self.reset_masked = bool(reset_masked)
        self.kept: dict[str, torch.Tensor] = {}  # float 1/0 per coordinate, as the code's masks
        self.global_values: dict[str, torch.Tensor] = {}
        super().__init__(trainer, target=target, trigger=trigger, poison_fraction=poison_fraction, window=window)

    # -- the benign direction -------------------------------------------------------------
    def benign_direction(self, model: nn.Module, step: AttackRound) -> dict[str, torch.Tensor]:
        """|benign direction| per trainable parameter: the clean gradient, or the last
        global update (falling back to the clean gradient)."""
        if self.direction == "global_update":
            params = trainable(model)
            previous = {key[len(PREVIOUS) :]: value for key, value in step.state.items() if key.startswith(PREVIOUS)}
            current = float_entries(step.received)
            if params and all(
                name in previous and name in current and previous[name].shape == current[name].shape for name in params
            ):
                return {name: torch.as_tensor(np.abs(previous[name] - current[name])) for name in params}
        return self.clean_gradient(model, step)

    def clean_gradient(self, model: nn.Module, step: AttackRound) -> dict[str, torch.Tensor]:
        """|gradient of the clean loss| at the global model, summed over the attacker's
        batches in order (each the wrapped trainer's mean batch loss), in training mode as
        the code does; BatchNorm statistics are restored afterwards, and nothing is drawn
        from the round's generator."""
        was_training = model.training
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        single_sample_breaks = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
        model.train()
        model.zero_grad()
        x = torch.as_tensor(step.data.x_train).to(step.device)
        y = torch.as_tensor(step.data.y_train).to(step.device)
        for xb, yb in batches(x, y, step.config.batch_size):
            if single_sample_breaks and len(yb) == 1:  # as the trainer's fit: BatchNorm1d needs two
                continue
            self.trainer.batch_loss(model, xb, yb).backward()
        grads = {
            name: (p.grad.detach().abs().cpu() if p.grad is not None else torch.zeros_like(p, device="cpu"))
            for name, p in trainable(model).items()
        }
        model.zero_grad()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
        return grads

    def keep_mask(self, direction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """1.0 on the ``ratio`` share (rounded down) of coordinates with the smallest
        magnitude, 0.0 elsewhere: over all parameters together, or per parameter."""
        if self.per_layer:
            return {name: _bottom(values, self.ratio) for name, values in direction.items()}
        names = list(direction)
        flat = _bottom(torch.cat([direction[name].reshape(-1).float() for name in names]), self.ratio)
        out, start = {}, 0
        for name in names:
            size = direction[name].numel()
            out[name] = flat[start : start + size].reshape(direction[name].shape)
            start += size
        return out

    # -- hooks ----------------------------------------------------------------------------
    def before_fit(self, model: nn.Module, step: AttackRound) -> None:
        masks = self.keep_mask(self.benign_direction(model, step))
        params = trainable(model)
        self.kept = {name: m.to(device=params[name].device, dtype=params[name].dtype) for name, m in masks.items()}
        self.global_values = {name: p.detach().clone() for name, p in params.items()} if self.reset_masked else {}

    def shape_gradients(self, model: nn.Module, step: AttackRound) -> None:
        # the code's apply_grad_mask: grad * mask, before the step (and so before the
        # optimizer adds weight decay and momentum)
        for name, p in model.named_parameters():
            if p.grad is not None and name in self.kept:
                p.grad.mul_(self.kept[name])

    @torch.no_grad()
    def after_fit(self, model: nn.Module, step: AttackRound) -> None:
        if self.reset_masked:
            for name, p in model.named_parameters():
                if name in self.kept:
                    masked = self.kept[name] == 0
                    p[masked] = self.global_values[name][masked]
        self.kept, self.global_values = {}, {}

    def remember(self, arrays, own: dict[str, np.ndarray], config: RoundConfig) -> dict[str, np.ndarray]:
        if self.direction != "global_update":  # only the paper's direction needs the last global model
            return own
        kept = {key: value for key, value in own.items() if not key.startswith(PREVIOUS)}
        return {**kept, **{PREVIOUS + key: value.copy() for key, value in float_entries(arrays).items()}}


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by name (the code masks those with ``requires_grad``)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _bottom(values: torch.Tensor, ratio: float) -> torch.Tensor:
    """The code's rule: 1.0 on ``topk(-|v|, int(n * ratio))``, 0.0 elsewhere (``values``
    are magnitudes already)."""
    flat = values.reshape(-1).float()
    keep = torch.zeros(flat.numel())
    count = int(flat.numel() * ratio)
    if count > 0:
        keep[torch.topk(-1 * flat, count).indices] = 1.0
    return keep.reshape(values.shape)
