"""Mirage ("Infighting in the Dark", CVPR 2025): an in-distribution learned blend trigger.

Each attacker, not colluding with the others, learns its own blend pattern ``t`` so that
triggered images look, to the global model, like clean images of its target class; then it
trains on batches poisoned with it. Each attack round (recipe of /work/shared/ALGORITHMS.md):

1. detector data: per class the ``detector_samples`` (50) lowest-loss training samples under
   the global model; triggered non-target samples are labelled 1, clean target-class ones 0;
2. detector D: the global model's body (frozen) with a new 2-way head, the head trained
   ``detector_epochs`` (30) epochs, SGD lr 0.01, momentum 0.9, weight decay 5e-4;
3. trigger step on the selected non-target samples x, with x' = (1 - a) x + a t:
   ``L = CE(D(x'), 0) + CE(f(x'), target) + cos(f(x'), f(x))``, f the global model's logits,
   ``t <- clip(t - step sign(grad_t L), -clamp, clamp)`` (0.001, 2);
   steps 1-3 repeated ``iterations`` (50) times (the detector retrained each time);
4. poisoned training as BadNets, with the learned trigger, at ``lr`` 0.01 for
   ``local_epochs`` 5 (``None`` keeps the round's settings).

The pattern starts at 0.5 (blend alpha 0.3) and persists in the attacker's client state
(``attack:mirage.pattern``) from one attack round to the next; :meth:`Mirage.learned_trigger`
reads it back for measuring the attack (the trigger it was trained with).

Choices where the recipe is silent: the detector's body is frozen (only the new head
trains, as the recipe says "head trained"), its features are computed once per iteration,
in the same forward pass as the loss (fedsim's models compute ``head(features(x))``, which
:meth:`Mirage.parts` requires);
the detector's mini-batches (the round's ``batch_size``) and its head's initialisation draw
from the round's generator; the cosine term is on logits, the same f as the target term;
the trigger gradient is over all selected non-target samples at once.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.attacks.base import AttackRound, AttackTrainer
from fedsim.attacks.triggers import Trigger
from fedsim.trainer import ClientState, ClientTrainer, RoundConfig

PATTERN = "mirage.pattern"  # attack-state key of the learned pattern


class Mirage(AttackTrainer):
    """Mirage: a learned in-distribution blend ``trigger`` (kind ``"learnable"``; default
    0.5 everywhere, alpha 0.3), optimised each attack round against a detector head, then
    poisoned training on ``poison_fraction`` of each batch (8 of 64)."""

    name = "mirage"
    default_trigger = "learnable"
    trigger_kinds = ("learnable",)

    def __init__(
        self,
        trainer: ClientTrainer,
        *,
        target: int,
        trigger: Trigger | None = None,
        poison_fraction: float = 0.125,
        window: tuple[int, int] | None = None,
        iterations: int = 50,
        step: float = 0.001,
        clamp: float = 2.0,
        detector_samples: int = 50,
        detector_epochs: int = 30,
        detector_lr: float = 0.01,
        detector_momentum: float = 0.9,
        detector_weight_decay: float = 5e-4,
        lr: float | None = 0.01,
        local_epochs: int | None = 5,
    ) -> None:
        if int(iterations) < 0 or int(detector_samples) < 1 or int(detector_epochs) < 0:
            raise ValueError("Mirage needs iterations >= 0, detector_samples >= 1 and detector_epochs >= 0")
        self.iterations = int(iterations)
        self.step_size = float(step)
        self.clamp = float(clamp)
        self.detector_samples = int(detector_samples)
        self.detector_epochs = int(detector_epochs)
        self.detector_lr = float(detector_lr)
        self.detector_momentum = float(detector_momentum)
        self.detector_weight_decay = float(detector_weight_decay)
        self.lr = lr
        self.local_epochs = local_epochs
        self.pattern: torch.Tensor | None = None
        super().__init__(trainer, target=target, trigger=trigger, poison_fraction=poison_fraction, window=window)

    def learned_trigger(self, state: ClientState | None = None) -> Trigger:
        """The trigger as learned so far: from an attacker's client state (its
        ``attack:mirage.pattern``), else the initial one."""
        key = "attack:" + PATTERN
        if state and key in state:
            return self.trigger.with_pattern(state[key])
        return self.trigger

    def measured_trigger(self, state: ClientState | None = None) -> Trigger:
        return self.learned_trigger(state)

    def training_config(self, config: RoundConfig) -> RoundConfig:
        changes = {}
        if self.lr is not None:
            changes["lr"] = float(self.lr)
        if self.local_epochs is not None:
            changes["local_epochs"] = int(self.local_epochs)
        return dataclasses.replace(config, **changes)

    def stamp(self, trigger: Trigger, x: torch.Tensor) -> torch.Tensor:
        return trigger.apply(x, pattern=self.pattern)

    # -- the trigger search ---------------------------------------------------------------
    @staticmethod
    def parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
        features, head = getattr(model, "features", None), getattr(model, "head", None)
        if not isinstance(features, nn.Module) or not isinstance(head, nn.Linear):
            raise ValueError("Mirage's detector needs a model with `features` and a linear `head` (fedsim's models)")
        return features, head

    @torch.no_grad()
    def lowest_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Indices of the ``detector_samples`` lowest-loss samples of each class."""
        losses = torch.cat(
            [F.cross_entropy(model(x[i : i + 512]), y[i : i + 512], reduction="none") for i in range(0, len(y), 512)]
        )
        chosen = []
        for label in torch.unique(y):
            members = torch.nonzero(y == label).flatten()
            order = torch.argsort(losses[members], stable=True)
            chosen.append(members[order[: self.detector_samples]])
        return torch.sort(torch.cat(chosen)).values

    def train_detector(self, features: torch.Tensor, labels: torch.Tensor, step: AttackRound) -> nn.Linear:
        """A fresh 2-way head on frozen features, trained with the detector's SGD settings.

        The head is linear on fixed features, so its cross-entropy gradient has a closed
        form, ``(softmax(z) - onehot)^T f / n``; the update is torch.optim.SGD's (weight
        decay added to the gradient, momentum buffer starting at the first gradient),
        written out because autograd and the optimizer cost ten times the arithmetic on
        thousands of tiny steps (50 iterations x 30 epochs per attack round)."""
        generator = step.generator
        dim = features.shape[1]
        bound = 1 / math.sqrt(dim)
        weight = ((torch.rand((2, dim), generator=generator) * 2 - 1) * bound).to(features.device)
        bias = ((torch.rand((2,), generator=generator) * 2 - 1) * bound).to(features.device)
        onehot = F.one_hot(labels, 2).to(features.dtype)
        momentum_w = momentum_b = None
        lr, momentum, decay = self.detector_lr, self.detector_momentum, self.detector_weight_decay
        size = step.config.batch_size
        with torch.no_grad():
            for _ in range(self.detector_epochs):
                order = torch.randperm(len(labels), generator=generator).to(features.device)
                for start in range(0, len(labels), size):
                    index = order[start : start + size]
                    f = features[index]
                    error = (torch.softmax(f @ weight.T + bias, dim=1) - onehot[index]) / len(index)
                    grad_w = error.T @ f + decay * weight
                    grad_b = error.sum(0) + decay * bias
                    if momentum_w is None:
                        momentum_w, momentum_b = grad_w.clone(), grad_b.clone()
                    else:
                        momentum_w.mul_(momentum).add_(grad_w)
                        momentum_b.mul_(momentum).add_(grad_b)
                    weight -= lr * momentum_w
                    bias -= lr * momentum_b
        head = nn.Linear(dim, 2).to(features.device)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        head.requires_grad_(False)
        return head

    def before_fit(self, model: nn.Module, step: AttackRound) -> None:
        x = torch.as_tensor(step.data.x_train).to(step.device)
        y = torch.as_tensor(step.data.y_train).to(step.device)
        shape = tuple(x.shape[1:])
        saved = step.state.get(PATTERN)
        if saved is not None and tuple(saved.shape) == shape:
            pattern = torch.as_tensor(np.array(saved, dtype=np.float32))
        else:
            pattern = torch.as_tensor(self.trigger.blend_pattern(shape))
        pattern = pattern.to(step.device)
        was_training = model.training
        model.eval()
        features_net, head = self.parts(model)
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            selected = self.lowest_loss(model, x, y)
            xs, ys = x[selected], y[selected]
            attack_x = xs[ys != self.target]
            clean_target = xs[ys == self.target]
            if len(attack_x) > 0:
                with torch.no_grad():
                    clean_logits = model(attack_x)
                    target_features = features_net(clean_target) if len(clean_target) else None
                target = torch.full((len(attack_x),), self.target, dtype=torch.long, device=step.device)
                zeros = torch.zeros(len(attack_x), dtype=torch.long, device=step.device)
                for _ in range(self.iterations):
                    # one forward serves the detector's data and the loss (forward = head(features))
                    t = pattern.clone().requires_grad_(True)
                    triggered = features_net(self.trigger.apply(attack_x, pattern=t))
                    logits = head(triggered)
                    ones = torch.ones(len(triggered), dtype=torch.long, device=step.device)
                    if target_features is None:
                        det_x, det_y = triggered.detach(), ones
                    else:
                        det_x = torch.cat([triggered.detach(), target_features])
                        det_y = torch.cat(
                            [ones, torch.zeros(len(target_features), dtype=torch.long, device=step.device)]
                        )
                    detector = self.train_detector(det_x, det_y, step)
                    loss = (
                        F.cross_entropy(detector(triggered), zeros)
                        + F.cross_entropy(logits, target)
                        + F.cosine_similarity(logits, clean_logits, dim=1).mean()
                    )
                    (grad,) = torch.autograd.grad(loss, t)
                    pattern = (pattern - self.step_size * grad.sign()).clamp(-self.clamp, self.clamp).detach()
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            model.train(was_training)
        self.pattern = pattern
        step.state[PATTERN] = pattern.detach().cpu().numpy().copy()

    def after_fit(self, model: nn.Module, step: AttackRound) -> None:
        self.pattern = None
