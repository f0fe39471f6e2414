"""Mirage ("Infighting in the Dark", CVPR 2025): an in-distribution learned blend trigger.

Each attacker, not colluding with the others, learns its own blend pattern ``t`` so that
triggered images look, to the global model, like clean images of its target class; then it
trains on batches poisoned with it. An attack round, as the authors' client runs it
(``MirageClient.search_trigger`` and ``local_train`` in the derived copies of their code,
e.g. fabacha/Mirage, whose yaml gives the defaults), on the global model in eval mode:

repeat ``iterations`` (50) times:

1. **detector set** (:func:`detector_set`): per non-target class, the
   ``detector_samples_per_class`` (50) lowest-loss samples under the global model,
   blended with the current ``t`` and labelled 1; every target-class sample, clean,
   labelled 0;
2. **detector**: the global model's body, frozen, under a new head Linear(features,
   ``detector_hidden`` = 10)-ReLU-Linear(10, 2), the head trained ``detector_epochs`` (30)
   epochs in shuffled batches of ``detector_batch_size`` (64) with SGD (lr 0.01, momentum
   0.9, weight decay 5e-4) (:func:`train_detector_head`);
3. **trigger steps**: one pass over the client's training batches; for every batch that
   holds target-class samples, its first ``poison_fraction`` (8 of 64) non-target samples
   x are blended (x' = 0.7 x + 0.3 t) and
   ``L = CE(D(x'), 0) + CE(f(x'), target) + cos(f(x'), f(x))`` (f the global model's
   logits) gives ``t <- clamp(t - step * sign(grad_t L), -clamp, clamp)`` (0.001, 2):
   one sign step per such batch, so about ``iterations`` x batches steps a round;

then **poisoned training** as BadNets with the learned trigger, with the reference's SGD
(``lr`` 0.01, ``momentum`` 0.9, ``weight_decay`` 5e-4) for ``local_epochs`` (5); ``None``
keeps the round's setting.

The pattern starts at 0.5 (blend alpha 0.3) and persists in the attacker's client state
(``attack:mirage.pattern``) from one attack round to the next; :meth:`Mirage.learned_trigger`
reads it back for measuring the attack.

Equal to the reference, computed more cheaply: the detector's body is frozen and in eval
mode, so the head trains on the body's features computed once per iteration (the
reference runs the whole network for each of its thousands of head steps); the head's
SGD is written out in closed form (:func:`train_detector_head`, equal to torch.optim.SGD);
the sample losses that pick the detector set do not depend on ``t`` and are computed once
a round; a trigger step's loss is taken over the poisoned samples only (the reference
averages over the batch's clean samples too, whose terms do not depend on ``t``: a
positive factor that leaves the sign of the gradient as it is).

Departures: the poisoned samples per batch are fedsim's rule for every attack, the first
``ceil(poison_fraction * n)`` non-target samples of a batch of n (the reference takes the
first 8 samples whatever their class, and 8 in a short last batch too); an attacker
without target-class samples takes no trigger step, as in the reference, and skips the
search altogether; the detector's shuffles and initialisation, and the search's batch
order, draw from the round's generator, never from a global one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.attacks.base import AttackRound, AttackTrainer
from fedsim.attacks.triggers import Trigger
from fedsim.checks import check_integer, check_positive
from fedsim.trainer import ClientState, ClientTrainer, RoundConfig
from fedsim.training import batches

PATTERN = "mirage.pattern"  # attack-state key of the learned pattern
LOSS_BATCH = 512  # samples per forward pass when scoring losses and features


@dataclass
class DetectorHead:
    """The detector's head: Linear(dim, hidden)-ReLU-Linear(hidden, 2), as four tensors."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @classmethod
    def initial(cls, dim: int, hidden: int, generator: torch.Generator | None = None) -> DetectorHead:
        """nn.Linear's initialisation (uniform in +-1/sqrt(fan_in)), weight then bias,
        first layer then second, drawn from ``generator``."""

        def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
            bound = 1 / math.sqrt(fan_in)
            return torch.empty(shape).uniform_(-bound, bound, generator=generator)

        w1, b1 = uniform((hidden, dim), dim), uniform((hidden,), dim)
        w2, b2 = uniform((2, hidden), hidden), uniform((2,), hidden)
        return cls(w1, b1, w2, b2)

    def to(self, device: torch.device) -> DetectorHead:
        return DetectorHead(*(tensor.to(device) for tensor in dataclasses.astuple(self)))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """The detector's logits (differentiable in ``features``)."""
        return F.relu(features @ self.w1.T + self.b1) @ self.w2.T + self.b2


@torch.no_grad()
def train_detector_head(
    head: DetectorHead,
    features: torch.Tensor,
    labels: torch.Tensor,
    orders: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
) -> DetectorHead:
    """``head`` trained with cross-entropy on fixed ``features``: one epoch per order in
    ``orders`` (a permutation of the samples), in batches of ``batch_size``, each step
    torch.optim.SGD's (weight decay added to the gradient, the momentum buffer starting
    at the first gradient). Backpropagation through the two layers is written out:
    autograd and the optimizer cost several times the arithmetic on these tiny steps."""
    params = [tensor.clone() for tensor in dataclasses.astuple(head)]
    buffers: list[torch.Tensor | None] = [None] * 4
    onehot = F.one_hot(labels, 2).to(features.dtype)
    for order in orders:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            f = features[index]
            w1, b1, w2, b2 = params
            hidden_in = f @ w1.T + b1
            hidden = hidden_in.clamp_min(0)
            error = (torch.softmax(hidden @ w2.T + b2, dim=1) - onehot[index]) / len(index)
            back = (error @ w2) * (hidden_in > 0)
            grads = (back.T @ f, back.sum(0), error.T @ hidden, error.sum(0))
            for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
                grad = grad + weight_decay * param
                if buffers[i] is None:
                    buffers[i] = grad.clone()
                else:
                    buffers[i].mul_(momentum).add_(grad)
                param -= lr * buffers[i]
    return DetectorHead(*params)


def detector_set(
    losses: torch.Tensor, y: torch.Tensor, target: int, per_class: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The detector's samples, as the reference picks them: for each non-target class in
    ascending order, its ``per_class`` lowest-loss samples (ascending loss); and every
    target-class sample (ascending loss). Returns (non-target indices, target indices)."""
    chosen, target_indices = [], torch.zeros(0, dtype=torch.long, device=y.device)
    for label in torch.unique(y).tolist():
        members = torch.nonzero(y == label).flatten()
        members = members[torch.argsort(losses[members], stable=True)]
        if label == target:
            target_indices = members
        else:
            chosen.append(members[:per_class])
    others = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long, device=y.device)
    return others, target_indices


class Mirage(AttackTrainer):
    """Mirage: a learned in-distribution blend ``trigger`` (kind ``"learnable"``; default
    0.5 everywhere, alpha 0.3), searched each attack round against a retrained detector
    (see the module docstring), then poisoned training on ``poison_fraction`` of each
    batch (8 of 64)."""

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
        detector_samples_per_class: int = 50,
        detector_epochs: int = 30,
        detector_batch_size: int = 64,
        detector_hidden: int = 10,
        detector_lr: float = 0.01,
        detector_momentum: float = 0.9,
        detector_weight_decay: float = 5e-4,
        lr: float | None = 0.01,
        momentum: float | None = 0.9,
        weight_decay: float | None = 5e-4,
        local_epochs: int | None = 5,
    ) -> None:
        for key, value, least in (
            ("iterations", iterations, 0),
            ("detector_samples_per_class", detector_samples_per_class, 1),
            ("detector_epochs", detector_epochs, 0),
            ("detector_batch_size", detector_batch_size, 1),
            ("detector_hidden", detector_hidden, 1),
        ):
            check_integer(f"Mirage's {key}", value, minimum=least)
        for key, value in (("step", step), ("clamp", clamp), ("detector_lr", detector_lr)):
            check_positive(f"Mirage's {key}", value)
        if local_epochs is not None:
            check_integer("Mirage's local_epochs", local_epochs, minimum=1)
        self.iterations = iterations
        self.step_size = float(step)
        self.clamp = float(clamp)
        self.detector_samples_per_class = detector_samples_per_class
        self.detector_epochs = detector_epochs
        self.detector_batch_size = detector_batch_size
        self.detector_hidden = detector_hidden
        self.detector_lr = float(detector_lr)
        self.detector_momentum = float(detector_momentum)
        self.detector_weight_decay = float(detector_weight_decay)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
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
        changes = {
            key: value
            for key, value in (
                ("lr", self.lr),
                ("momentum", self.momentum),
                ("weight_decay", self.weight_decay),
                ("local_epochs", self.local_epochs),
            )
            if value is not None
        }
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

    def train_detector(
        self, features: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> DetectorHead:
        """A new detector head, initialised and shuffled from ``generator``, trained on
        the detector set's features."""
        head = DetectorHead.initial(features.shape[1], self.detector_hidden, generator).to(features.device)
        orders = [
            torch.randperm(len(labels), generator=generator).to(features.device) for _ in range(self.detector_epochs)
        ]
        return train_detector_head(
            head,
            features,
            labels,
            orders,
            lr=self.detector_lr,
            momentum=self.detector_momentum,
            weight_decay=self.detector_weight_decay,
            batch_size=self.detector_batch_size,
        )

    def trigger_steps(
        self,
        model: nn.Module,
        detector: DetectorHead,
        pattern: torch.Tensor,
        batch_list: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """One pass of sign steps on ``pattern``: one per batch that holds target-class
        samples, on its poisoned samples (the model in eval mode, its parameters frozen)."""
        body, head = self.parts(model)
        for xb, yb in batch_list:
            if not bool((yb == self.target).any()):
                continue
            chosen = self.poison_mask(yb)
            if not bool(chosen.any()):
                continue
            clean = xb[chosen]
            with torch.no_grad():
                clean_logits = model(clean)
            target = torch.full((len(clean),), self.target, dtype=torch.long, device=clean.device)
            t = pattern.clone().requires_grad_(True)
            features = body(self.trigger.apply(clean, pattern=t))
            logits = head(features)
            loss = (
                F.cross_entropy(detector(features), torch.zeros_like(target))
                + F.cross_entropy(logits, target)
                + F.cosine_similarity(logits, clean_logits, dim=1, eps=1e-8).mean()
            )
            (grad,) = torch.autograd.grad(loss, t)
            pattern = (pattern - self.step_size * grad.sign()).clamp(-self.clamp, self.clamp).detach()
        return pattern

    def search(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, pattern: torch.Tensor, step: AttackRound
    ) -> torch.Tensor:
        """The learned pattern after ``iterations`` rounds of detector and trigger steps
        (the model in eval mode, its parameters frozen)."""
        if self.iterations == 0 or not bool((y == self.target).any()) or bool((y == self.target).all()):
            return pattern  # no batch holds both the target class and others to poison: no step
        body, _ = self.parts(model)
        with torch.no_grad():
            losses = torch.cat(
                [
                    F.cross_entropy(model(x[i : i + LOSS_BATCH]), y[i : i + LOSS_BATCH], reduction="none")
                    for i in range(0, len(y), LOSS_BATCH)
                ]
            )
            others, targets = detector_set(losses, y, self.target, self.detector_samples_per_class)
            target_features = features_of(body, x[targets])
        labels = torch.cat([torch.ones(len(others), dtype=torch.long), torch.zeros(len(targets), dtype=torch.long)]).to(
            x.device
        )
        for _ in range(self.iterations):
            with torch.no_grad():
                triggered = features_of(body, self.trigger.apply(x[others], pattern=pattern))
            detector = self.train_detector(torch.cat([triggered, target_features]), labels, step.generator)
            batch_list = list(batches(x, y, step.config.batch_size, step.generator))
            pattern = self.trigger_steps(model, detector, pattern, batch_list)
        return pattern

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
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            pattern = self.search(model, x, y, pattern, step)
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
            model.train(was_training)
        self.pattern = pattern
        step.state[PATTERN] = pattern.detach().cpu().numpy().copy()

    def after_fit(self, model: nn.Module, step: AttackRound) -> None:
        self.pattern = None


def features_of(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The body's features of ``x``, in passes of :data:`LOSS_BATCH` samples."""
    # an empty x still makes one pass, for a (0, features) result
    return torch.cat([body(x[i : i + LOSS_BATCH]) for i in range(0, max(len(x), 1), LOSS_BATCH)])
