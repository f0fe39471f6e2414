"""Vectorised clients: K clients' local training at once on one device (issue 16).

The K clients' parameters and buffers are stacked along a new leading dimension, and
every step runs every client's forward and backward on its own minibatch, in one of two
engines:

* "stacked" (:mod:`fedsim.stacked`, the default where the model allows it): the model
  traced with torch.fx and run layer by layer on stacked weights with plain autograd,
  one backward for all clients, then torch.optim's fused SGD or Adam kernel on the
  stacks (their single-tensor update written out when settings differ per client);
* "vmap" (any model): PyTorch's model-ensembling recipe, one ``vmap`` of
  ``functional_call`` under ``torch.func.grad_and_value``, with functional optimisers.

Either way each client takes exactly the steps :meth:`fedsim.trainer.ClientTrainer.fit`
would take alone (up to floating-point rounding: the tests pin 1e-5):

* each client's batches are :func:`fedsim.training.batches` drawn from its own
  generator, epoch after epoch, as the sequential loop draws them (so the generators end
  in the same state); a BatchNorm1d model skips a batch of one sample, as ``fit`` does;
* SGD is ``torch.optim.SGD`` (weight decay added to the gradient, momentum buffer equal
  to the first gradient, no dampening, no Nesterov), Adam is ``torch.optim.Adam``'s
  default (betas 0.9, 0.999, eps 1e-8, L2 weight decay added to the gradient, no
  amsgrad), with per-client step counts;
* FedProx adds (mu / 2) * ||w - w_start||^2 with each client's own start and mu;
* FedWon (:class:`strategies.fedwon.FedWonTrainer`) clips each client's gradients with
  adaptive gradient clipping, unit-wise, on every parameter but the classifier's
  (:func:`strategies.fedwon.classifier`), before the optimiser step;
* BatchNorm in train mode updates each client's own running statistics: the buffers
  are passed to ``functional_call`` as fresh per-client copies that BatchNorm updates in
  place, and come back as the auxiliary output of ``grad_and_value``.

Clients with fewer steps (fewer samples, fewer epochs, larger batches) stop when their
batches run out: a step involves only the clients that still have a batch, and the
others' parameters, buffers and optimiser state are not touched. Minibatches of unequal
size at one step (a client's last, short batch) are handled in one of two ways:

* models without BatchNorm: padded to the largest batch with a per-sample mask; the
  loss is the masked mean, so its gradient is the unpadded mean's. This assumes that
  samples do not interact in the forward pass, which holds for every layer but
  BatchNorm among fedsim's models (GroupNorm and LayerNorm normalise per sample);
* models with BatchNorm: a padded sample would enter the batch statistics, so the
  clients of a step are grouped by batch size and each group takes its own vmapped step
  (no padding at all). A step where every client has a full batch, most of them, is one
  call; a step with short batches costs one more call per distinct size.

Not covered: models whose forward draws random numbers (dropout: the sequential trainer
draws from the global generator, which cannot be reproduced per client), BatchNorm with
``momentum=None`` (a cumulative average that reads ``num_batches_tracked`` as a Python
number), a parameter the loss does not use (``torch.optim`` skips a parameter whose
gradient is None, so it gets no weight decay there; here its gradient is zero and weight
decay and momentum still apply), trainers that change the loss, the step or the loop in
ways this module does not know (:func:`vectorizable`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.func import grad_and_value, vmap
from torch.nn import functional as F

from fedsim.data import ClientData
from fedsim.errors import UserError
from fedsim.stacked import Plan, Unsupported, call, client_norm, client_view, module_paths, plan_for
from fedsim.trainer import ClientState, ClientTrainer, RoundConfig, TrainResult
from fedsim.training import batches
from strategies.fedwon import AGC_EPS, AGC_LAMBDA, FedWonTrainer, classifier, unitwise_norm

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which ClientTrainer.make_optimizer keeps
ADAM_EPS = 1e-8

# The methods of ClientTrainer that shape local training, and the classes whose versions
# of them this module reproduces. A trainer whose class (or instance) takes any of them
# from elsewhere is not vectorisable. ``train`` is here because a caller that replaces
# ``trainer.train`` by :func:`train_clients` would skip an override of it; ``receive``
# and ``send`` are not, as :func:`train_clients` calls the trainer's own.
KNOWN_METHODS: dict[str, tuple[type, ...]] = {
    "fit": (ClientTrainer, FedWonTrainer),  # FedWon's fit only adds the agc-lambda metric
    "batch_loss": (ClientTrainer,),
    "before_step": (ClientTrainer, FedWonTrainer),  # FedWon's: adaptive gradient clipping
    "make_optimizer": (ClientTrainer,),
    "train": (ClientTrainer,),
}

# Memory estimate: per client, the parameters are held this many times over (parameters,
# FedProx's anchor, gradients, two optimiser slots for Adam, the new parameters and one
# temporary while the step is computed), buffers twice (theirs and the updated copy).
PARAMETER_COPIES = 7
BUFFER_COPIES = 2
# On top of the measured activations: activation gradients, vmap's batched kernels, the
# allocator's slack. Measured on the CPU (peak RSS of fit_clients, Adam, batch 32), LeNet
# at 28x28 took 0.9 of the estimate at factor 1.5, DigitCNN 0.7; hence 2.
SAFETY_FACTOR = 2.0
CPU_MEMORY_FRACTION = 0.5  # of MemAvailable: the host also runs the other clients, the server, Ray
CUDA_MEMORY_FRACTION = 0.9  # of the free device memory


def vectorizable(trainer: ClientTrainer) -> tuple[bool, str]:
    """Whether :func:`fit_clients` trains the clients of ``trainer`` exactly as its own
    ``fit`` would, and if not, why. Decided by which class each method that shapes local
    training comes from (:data:`KNOWN_METHODS`): ClientTrainer (FedAvg, FedProx),
    FedWonTrainer and FedBNTrainer (which overrides only receive and send) are; a class
    that overrides ``fit``, ``batch_loss``, ``before_step``, ``make_optimizer`` or
    ``train`` with code of its own is not."""
    cls = type(trainer)
    if not isinstance(trainer, ClientTrainer):
        return False, f"{cls.__name__} is not a ClientTrainer"
    if getattr(trainer, "takes_several_models", False):
        return False, f"{cls.__name__} trains several models per client"
    for name, known in KNOWN_METHODS.items():
        if name in vars(trainer):
            return False, f"{cls.__name__} instance sets its own {name}"
        owner = next(klass for klass in cls.__mro__ if name in vars(klass))
        if owner not in known:
            return False, f"{owner.__qualname__} overrides {name}, which vectorised training cannot reproduce"
    return True, ""


@dataclass
class ClientFit:
    """One client's outcome of :func:`fit_clients`: its trained state dict (parameters and
    buffers, every key of ``model.state_dict()``, on the CPU) and what ``fit`` returns."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Group:
    """The clients that take one vmapped step together, and their batches."""

    clients: list[int]
    indices: list[torch.Tensor]  # rows of the concatenated data, one tensor per client

    @property
    def sizes(self) -> list[int]:
        return [len(index) for index in self.indices]


def _as_list(configs: RoundConfig | Sequence[RoundConfig], count: int) -> list[RoundConfig]:
    if isinstance(configs, RoundConfig):
        return [configs] * count
    configs = list(configs)
    if len(configs) != count:
        raise ValueError(f"got {len(configs)} round configs for {count} clients")
    return configs


def _aliases(model: nn.Module) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    """Trainable parameter names, frozen parameter names, buffer names (each tensor once),
    and every state-dict key mapped to the name its tensor has there (tied weights)."""
    trainable, frozen, buffer_names = [], [], []
    canonical: dict[int, str] = {}
    for name, parameter in model.named_parameters():
        canonical[id(parameter)] = name
        (trainable if parameter.requires_grad else frozen).append(name)
    for name, buffer in model.named_buffers():
        canonical[id(buffer)] = name
        buffer_names.append(name)
    alias = {}
    every = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in every:
        alias[name] = canonical[id(tensor)]
    return trainable, frozen, buffer_names, alias


def _stack_states(
    model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], names: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """The clients' values of each named tensor, stacked on a leading client dimension,
    with the model's dtype (as ``load_state_dict`` copies). A state must have every key of
    the model's state dict and no other (a strict load); a non-persistent buffer, which a
    state dict lacks, starts from the model's own value."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    expected = set(model.state_dict().keys())
    for number, state in enumerate(states):
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"client {number}'s starting state does not fit the model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
    _, _, _, alias = _aliases(model)
    keys_of = {name: [key for key in expected if alias.get(key) == name] for name in names}
    stacked = {}
    for name in names:
        reference = own[name]
        values = []
        for state in states:
            key = name if name in state else next(iter(keys_of[name]), None)
            value = state[key] if key is not None else reference.detach()
            values.append(torch.as_tensor(value).to(device=device, dtype=reference.dtype))
        stacked[name] = torch.stack(values)
    return stacked


def _check_model(model: nn.Module, configs: list[RoundConfig]) -> tuple[bool, bool]:
    """(has BatchNorm, has BatchNorm1d); refuses what the vmapped step cannot reproduce."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        if module.training and module.track_running_stats and module.momentum is None:
            raise ValueError("vectorised training does not support BatchNorm with momentum=None (cumulative average)")
    has_bn1d = any(isinstance(module, nn.BatchNorm1d) for module in norms)
    if has_bn1d and any(config.batch_size == 1 for config in configs):
        raise UserError(
            "[client] batch_size = 1 cannot train the model's BatchNorm1d layers; "
            "use a larger batch_size or [model] norm = 'gn', 'ln' or 'none'"
        )
    return bool(norms), has_bn1d


def _schedules(
    data: Sequence[ClientData],
    configs: list[RoundConfig],
    generators: Sequence[torch.Generator],
    offsets: list[int],
    skip_single: bool,
) -> list[list[torch.Tensor]]:
    """Each client's batches, as rows of the concatenated data, over all its local epochs:
    exactly what ClientTrainer.fit iterates, drawn from the client's generator."""
    schedules = []
    for client, config, generator, offset in zip(data, configs, generators, offsets, strict=True):
        rows = torch.arange(client.num_train)
        steps = []
        for _ in range(config.local_epochs):
            for index, _ in batches(rows, rows, config.batch_size, generator):
                if skip_single and len(index) == 1:
                    continue
                steps.append(index + offset)
        schedules.append(steps)
    return schedules


def _groups(schedules: list[list[torch.Tensor]], step: int, by_size: bool) -> list[_Group]:
    """The clients that have a batch at ``step``: one group, or one per batch size."""
    active = [client for client, steps in enumerate(schedules) if len(steps) > step]
    if not by_size:
        return [_Group(active, [schedules[client][step] for client in active])]
    sizes: dict[int, list[int]] = {}
    for client in active:
        sizes.setdefault(len(schedules[client][step]), []).append(client)
    return [_Group(clients, [schedules[client][step] for client in clients]) for clients in sizes.values()]


class _Step:
    """One optimiser step of one client, written for ``vmap`` over clients."""

    def __init__(
        self,
        model: nn.Module,
        trainable: list[str],
        optimizer: str,
        momentum: bool,
        proximal: bool,
        clipped: list[str] | None,
    ) -> None:
        self.model = model
        self.paths = module_paths(model)
        self.trainable = trainable
        self.optimizer = optimizer
        self.momentum = momentum
        self.proximal = proximal
        self.clipped = clipped

    def loss(self, params, others, anchor, hyper, x, y, mask):
        # fresh copies: BatchNorm updates its running statistics in place, per client
        others = {name: value.clone() for name, value in others.items()}
        logits = call(self.model, {**params, **others}, x, self.paths)
        if mask is None:
            loss = F.cross_entropy(logits, y)
        else:
            weights = mask.to(logits.dtype)
            loss = (F.cross_entropy(logits, y, reduction="none") * weights).sum() / weights.sum()
        if self.proximal:
            drift = sum((params[name] - anchor[name]).pow(2).sum() for name in self.trainable)
            loss = loss + hyper["mu"] / 2 * drift
        return loss, others

    def clip(self, params, grads, clip_lambda):
        """strategies.fedwon.adaptive_clip_, on one client's gradients."""
        clipped = dict(grads)
        for name in self.clipped or ():
            max_norm = clip_lambda * unitwise_norm(params[name]).clamp_min(AGC_EPS)
            grad_norm = unitwise_norm(grads[name])
            scale = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-12), torch.ones_like(grad_norm))
            clipped[name] = grads[name] * scale
        return clipped

    def __call__(self, params, others, slots, anchor, hyper, x, y, mask):
        grads, (loss, others) = grad_and_value(self.loss, has_aux=True)(params, others, anchor, hyper, x, y, mask)
        if self.clipped is not None:
            grads = self.clip(params, grads, hyper["clip_lambda"])
        new_params, new_slots = {}, {}
        lr, weight_decay = hyper["lr"], hyper["weight_decay"]
        if self.optimizer == "adam":
            beta1, beta2 = ADAM_BETAS
            for name in self.trainable:
                param, grad = params[name], grads[name]
                grad = grad + weight_decay * param
                exp_avg = torch.lerp(slots["exp_avg"][name], grad, 1 - beta1)
                exp_avg_sq = slots["exp_avg_sq"][name] * beta2 + (1 - beta2) * grad * grad
                denom = exp_avg_sq.sqrt() / hyper["bias_correction2_sqrt"] + ADAM_EPS
                new_params[name] = param + (-hyper["step_size"]) * exp_avg / denom
                new_slots.setdefault("exp_avg", {})[name] = exp_avg
                new_slots.setdefault("exp_avg_sq", {})[name] = exp_avg_sq
        else:
            for name in self.trainable:
                param, grad = params[name], grads[name]
                grad = grad + weight_decay * param
                if self.momentum:
                    # the buffer starts at zero, so the first step sets it to the gradient
                    # exactly, as torch.optim.SGD's first step does (and momentum 0 gives
                    # the gradient, as SGD without momentum)
                    grad = slots["momentum_buffer"][name] * hyper["momentum"] + grad
                    new_slots.setdefault("momentum_buffer", {})[name] = grad
                new_params[name] = param - lr * grad
        return new_params, others, new_slots, loss


def _select(tree, index: torch.Tensor | None):
    """The group's rows of every stacked tensor (all of them when ``index`` is None)."""
    if index is None:
        return tree
    return {
        key: _select(value, index) if isinstance(value, dict) else value.index_select(0, index)
        for key, value in tree.items()
    }


def _scatter(full, part, index: torch.Tensor) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _scatter(full[key], value, index)
        else:
            full[key].index_copy_(0, index, value)


def fit_clients(
    model: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    data: Sequence[ClientData],
    configs: RoundConfig | Sequence[RoundConfig],
    generators: Sequence[torch.Generator],
    device: torch.device | str,
    trainer: ClientTrainer | None = None,
    *,
    engine: str = "auto",
) -> list[ClientFit]:
    """Train K clients at once: client k starts from ``states[k]`` (a full state dict of
    ``model``, which only gives the architecture), trains on ``data[k]`` with
    ``configs[k]`` (or one shared config) and ``generators[k]``, as
    ``trainer.fit(model, data[k], configs[k], generators[k], device)`` would after loading
    ``states[k]`` (``trainer`` defaults to FedAvg's :class:`ClientTrainer`), and ends in
    ``ClientFit(state, metrics)``. All clients must use the same optimiser kind; learning
    rate, momentum, weight decay, local epochs, batch size, FedProx's mu and FedWon's AGC
    threshold may differ per client. Raises ValueError for a trainer that
    :func:`vectorizable` refuses. The model is left in train mode, as ``fit`` leaves it;
    its own parameters are not changed.

    ``engine``: "stacked" runs :mod:`fedsim.stacked`'s forward with plain autograd (a
    ValueError for a model it does not support), "vmap" vmaps ``functional_call``
    (any model), "auto" (the default) the first where the model allows it.
    """
    if engine not in ("auto", "stacked", "vmap"):
        raise ValueError(f"engine must be 'auto', 'stacked' or 'vmap', not {engine!r}")
    trainer = ClientTrainer() if trainer is None else trainer
    ok, reason = vectorizable(trainer)
    if not ok:
        raise ValueError(f"cannot vectorise {type(trainer).__name__}: {reason}")
    count = len(states)
    if not len(data) == len(generators) == count:
        raise ValueError(f"got {count} states, {len(data)} datasets and {len(generators)} generators")
    if count == 0:
        return []
    configs = _as_list(configs, count)
    kinds = {"adam" if config.optimizer == "adam" else "sgd" for config in configs}
    if len(kinds) > 1:
        raise ValueError("vectorised clients must all use the same optimizer (sgd or adam)")
    optimizer = kinds.pop()
    fedwon = isinstance(trainer, FedWonTrainer)
    clip_lambdas = [trainer.clip_lambda(config) for config in configs] if fedwon else None
    device = torch.device(device)
    model.train()
    has_bn, has_bn1d = _check_model(model, configs)

    trainable, frozen, buffer_names, alias = _aliases(model)
    params = _stack_states(model, states, trainable, device)
    others = _stack_states(model, states, frozen + buffer_names, device)
    head = {id(parameter) for parameter in classifier(model).parameters()}
    named = dict(model.named_parameters())
    clipped = [name for name in trainable if id(named[name]) not in head] if fedwon else None

    xs = [torch.as_tensor(client.x_train) for client in data]
    ys = [torch.as_tensor(client.y_train) for client in data]
    offsets = [0]
    for y in ys[:-1]:
        offsets.append(offsets[-1] + len(y))
    x_all = torch.cat(xs).to(device)
    y_all = torch.cat(ys).to(device)
    schedules = _schedules(data, configs, generators, offsets, skip_single=has_bn1d)

    plan = None
    if engine != "vmap":
        try:
            batch = max(min(config.batch_size, client.num_train) for config, client in zip(configs, data))
            plan = plan_for(model, tuple(x_all.shape[1:]), x_all.dtype, device, max(batch, 1))
        except Unsupported as error:
            if engine == "stacked":
                raise ValueError(f"cannot stack {type(model).__name__}'s layers: {error}") from error
    run = _run_stacked if plan is not None else _run_vmap
    params, others, records = run(
        model if plan is None else plan,
        params,
        others,
        configs,
        optimizer,
        trainable,
        clipped,
        clip_lambdas,
        schedules,
        has_bn,
        x_all,
        y_all,
    )

    total = [0.0] * count
    seen = [0] * count
    for clients, sizes, losses in records:
        for client, size, loss in zip(clients, sizes, losses.cpu().tolist(), strict=True):
            total[client] += float(loss) * size
            seen[client] += size

    stacked = {name: value.detach().cpu().unbind(0) for name, value in {**params, **others}.items()}
    keys = list(model.state_dict().keys())
    results = []
    for client in range(count):
        state = {key: stacked[alias[key]][client].clone() for key in keys}
        metrics = {"train_loss": total[client] / max(seen[client], 1)}
        if fedwon:
            metrics[AGC_LAMBDA] = clip_lambdas[client]
        results.append(ClientFit(state, metrics))
    return results


Records = list[tuple[list[int], list[int], torch.Tensor]]  # per step and group: clients, batch sizes, losses


def _rows(group: _Group, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The group's batches as rows of the concatenated data, (clients, width), padded with
    row 0 to the largest batch, and the mask of real samples (None when none is padded)."""
    sizes = group.sizes
    width = max(sizes)
    if min(sizes) == width:
        return torch.stack(group.indices).to(device), None
    rows = torch.zeros(len(group.clients), width, dtype=torch.long)
    for row, index in enumerate(group.indices):
        rows[row, : len(index)] = index
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    return rows.to(device), mask.to(device)


def _run_vmap(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    configs: list[RoundConfig],
    optimizer: str,
    trainable: list[str],
    clipped: list[str] | None,
    clip_lambdas: list[float] | None,
    schedules: list[list[torch.Tensor]],
    has_bn: bool,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Records]:
    """Every step one vmap of :class:`_Step` over the clients (per batch-size group)."""
    count = len(configs)
    device = x_all.device
    mus = [config.proximal_mu for config in configs]
    proximal = any(mu > 0 for mu in mus)
    anchor = {name: value.clone() for name, value in params.items()} if proximal else {}
    momentum = optimizer == "sgd" and any(config.momentum != 0 for config in configs)
    slots: dict[str, dict[str, torch.Tensor]] = {}
    if optimizer == "adam":
        slots = {"exp_avg": {}, "exp_avg_sq": {}}
        for name, value in params.items():
            slots["exp_avg"][name] = torch.zeros_like(value)
            slots["exp_avg_sq"][name] = torch.zeros_like(value)
    elif momentum:
        slots = {"momentum_buffer": {name: torch.zeros_like(value) for name, value in params.items()}}

    dtype = next((value.dtype for value in params.values() if value.is_floating_point()), torch.float32)
    hyper = {
        "lr": torch.tensor([config.lr for config in configs], dtype=dtype, device=device),
        "momentum": torch.tensor([config.momentum for config in configs], dtype=dtype, device=device),
        "weight_decay": torch.tensor([config.weight_decay for config in configs], dtype=dtype, device=device),
        "mu": torch.tensor(mus, dtype=dtype, device=device),
        "clip_lambda": torch.tensor(clip_lambdas or [0.0] * count, dtype=dtype, device=device),
    }
    # Adam's step counts, and its learning rates in float64: torch.optim.Adam computes
    # lr / (1 - beta1 ** step) in Python floats
    steps_taken = torch.zeros(count, dtype=torch.float64, device=device)
    adam_lr = torch.tensor([config.lr for config in configs], dtype=torch.float64, device=device)

    step_fn = _Step(model, trainable, optimizer, momentum, proximal, clipped)
    batched = vmap(step_fn, in_dims=(0, 0, 0, 0, 0, 0, 0, 0), randomness="different")
    batched_unmasked = vmap(step_fn, in_dims=(0, 0, 0, 0, 0, 0, 0, None), randomness="different")

    records: Records = []
    for step in range(max(len(steps) for steps in schedules)):
        for group in _groups(schedules, step, by_size=has_bn):
            rows, mask = _rows(group, device)
            xb, yb = x_all[rows], y_all[rows]
            if len(group.clients) == count:
                index = None
            else:
                index = torch.tensor(group.clients, dtype=torch.long, device=device)
            part_hyper = dict(_select(hyper, index))
            if optimizer == "adam":
                taken = _select({"s": steps_taken}, index)["s"] + 1
                lr64 = _select({"lr": adam_lr}, index)["lr"]
                part_hyper["step_size"] = (lr64 / (1 - ADAM_BETAS[0] ** taken)).to(dtype)
                part_hyper["bias_correction2_sqrt"] = ((1 - ADAM_BETAS[1] ** taken) ** 0.5).to(dtype)
            state = (_select(params, index), _select(others, index), _select(slots, index), _select(anchor, index))
            if mask is None:
                new_params, new_others, new_slots, loss = batched_unmasked(*state, part_hyper, xb, yb, None)
            else:
                new_params, new_others, new_slots, loss = batched(*state, part_hyper, xb, yb, mask)
            if index is None:
                params, others, slots = new_params, new_others, new_slots
                steps_taken = steps_taken + 1
            else:
                _scatter(params, new_params, index)
                _scatter(others, new_others, index)
                _scatter(slots, new_slots, index)
                steps_taken.index_add_(0, index, torch.ones(len(group.clients), dtype=torch.float64, device=device))
            records.append((group.clients, group.sizes, loss.detach()))
    return params, others, records


def _setting(values: list[float], dtype: torch.dtype, device: torch.device) -> float | torch.Tensor:
    """A setting every client shares as a Python number (so that the update is
    torch.optim's, operation for operation), else one value per client, (K,)."""
    if all(value == values[0] for value in values):
        return float(values[0])
    return torch.tensor(values, dtype=dtype, device=device)


def _part(value: float | torch.Tensor, index: torch.Tensor | None) -> float | torch.Tensor:
    if index is None or not isinstance(value, torch.Tensor):
        return value
    return value.index_select(0, index)


def _run_stacked(
    plan: Plan,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    configs: list[RoundConfig],
    optimizer: str,
    trainable: list[str],
    clipped: list[str] | None,
    clip_lambdas: list[float] | None,
    schedules: list[list[torch.Tensor]],
    has_bn: bool,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Records]:
    """Every step one stacked forward (:class:`fedsim.stacked.Plan`) and one backward for
    all clients of a group, then torch.optim's SGD or Adam update on the stacks, in
    place (:func:`_sgd`, :func:`_adam`). A step that involves only some clients works on
    copies of their rows and writes them back."""
    count = len(configs)
    device = x_all.device
    dtype = next((value.dtype for value in params.values() if value.is_floating_point()), torch.float32)
    lr = _setting([config.lr for config in configs], dtype, device)
    lr64 = torch.tensor([config.lr for config in configs], dtype=torch.float64, device=device)
    weight_decay = _setting([config.weight_decay for config in configs], dtype, device)
    momentum = _setting([config.momentum for config in configs], dtype, device)
    uses_momentum = optimizer == "sgd" and any(config.momentum != 0 for config in configs)
    mus = [config.proximal_mu for config in configs]
    proximal = any(mu > 0 for mu in mus)
    mu = torch.tensor(mus, dtype=dtype, device=device)
    clip = torch.tensor(clip_lambdas, dtype=dtype, device=device) if clipped is not None else None
    anchor = {name: params[name].clone() for name in trainable} if proximal else {}
    if optimizer == "adam":
        slots = {
            "exp_avg": {name: torch.zeros_like(params[name]) for name in trainable},
            "exp_avg_sq": {name: torch.zeros_like(params[name]) for name in trainable},
        }
    elif uses_momentum:  # every client's first step is step 0, which sets the buffer
        slots = {"momentum_buffer": {name: torch.empty_like(params[name]) for name in trainable}}
    else:
        slots = {}
    for name in trainable:
        params[name].requires_grad_(True)

    workspace: dict = {}  # gradient buffers of large layers, reused every step
    records: Records = []
    for step in range(max(len(steps) for steps in schedules)):
        for group in _groups(schedules, step, by_size=has_bn):
            clients = len(group.clients)
            rows, mask = _rows(group, device)
            flat = rows.reshape(-1)
            xb, yb = x_all.index_select(0, flat), y_all.index_select(0, flat)
            if clients == count:
                index = None
                own, values, own_slots, own_anchor = params, {**params, **others}, slots, anchor
            else:
                index = torch.tensor(group.clients, dtype=torch.long, device=device)
                own = {name: params[name].detach().index_select(0, index).requires_grad_(True) for name in trainable}
                part_others = _select(others, index)
                values = {**own, **part_others}
                own_slots, own_anchor = _select(slots, index), _select(anchor, index)
            with torch.enable_grad():
                logits = plan(values, xb, clients, workspace=workspace)
                losses = F.cross_entropy(logits, yb, reduction="none").view(clients, -1)
                if mask is None:
                    loss = losses.mean(dim=1)
                else:
                    weights = mask.to(losses.dtype)
                    loss = (losses * weights).sum(dim=1) / weights.sum(dim=1)
                if proximal:
                    drift = sum((own[name] - own_anchor[name]).pow(2).flatten(1).sum(dim=1) for name in trainable)
                    loss = loss + _part(mu, index) / 2 * drift
                leaves = [own[name] for name in trainable]
                grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True) if leaves else []
            with torch.no_grad():
                grads = _own_gradients(leaves, grads)
                if clipped is not None:
                    grads = _clip(trainable, clipped, leaves, grads, _part(clip, index))
                settings = (_part(lr, index), _part(weight_decay, index))
                if optimizer == "adam":
                    _adam(leaves, grads, own_slots, trainable, step + 1, *settings, _part(lr64, index))
                else:
                    first = step == 0
                    _sgd(leaves, grads, own_slots, trainable, *settings, _part(momentum, index), uses_momentum, first)
                if index is not None:
                    _scatter(params, {name: own[name] for name in trainable}, index)
                    _scatter(others, part_others, index)
                    _scatter(slots, own_slots, index)
            records.append((group.clients, group.sizes, loss.detach()))
    for name in trainable:
        params[name] = params[name].detach()
    return params, others, records


def _own_gradients(leaves: list[torch.Tensor], grads) -> list[torch.Tensor]:
    """Each leaf's gradient as a contiguous tensor of its own (autograd may hand two
    leaves one tensor, and the fused optimisers may write into gradients); zeros for a
    leaf the loss does not use."""
    out, seen = [], set()
    for leaf, grad in zip(leaves, grads, strict=True):
        if grad is None:
            grad = torch.zeros_like(leaf)
        elif id(grad) in seen:
            grad = grad.clone()
        grad = grad.contiguous()
        seen.add(id(grad))
        out.append(grad)
    return out


def _times(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return value if not isinstance(value, torch.Tensor) else client_view(value, like)


def _clip(trainable, clipped, leaves, grads, clip_lambda: torch.Tensor) -> list[torch.Tensor]:
    """strategies.fedwon.adaptive_clip_, per client, on the stacked gradients."""
    chosen = set(clipped)
    out = []
    for name, param, grad in zip(trainable, leaves, grads, strict=True):
        if name in chosen:
            max_norm = client_view(clip_lambda, param) * client_norm(param).clamp_min(AGC_EPS)
            grad_norm = client_norm(grad)
            scale = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-12), torch.ones_like(grad_norm))
            grad = grad * scale
        out.append(grad)
    return out


# Device types with torch's fused optimiser kernels (one pass over each stack instead of
# four or five): used when every client of a step shares the settings.
FUSED_OPTIMIZER_DEVICES = frozenset({"cpu", "cuda"})


def _fused(leaves, *settings) -> bool:
    return (
        hasattr(torch, "_fused_sgd_")  # private ops (torch 2.x): without them, the written-out update
        and hasattr(torch, "_fused_adam_")
        and all(not isinstance(value, torch.Tensor) for value in settings)
        and all(leaf.device.type in FUSED_OPTIMIZER_DEVICES and leaf.is_floating_point() for leaf in leaves)
        and len({leaf.device for leaf in leaves}) <= 1
    )


def _sgd(leaves, grads, slots, trainable, lr, weight_decay, momentum, uses_momentum: bool, first: bool) -> None:
    """torch.optim.SGD's step (no dampening, no Nesterov), on stacks: its fused kernel, or
    its single-tensor one written out when the settings differ per client. The first
    step (``first``) sets the momentum buffer to the gradient, as SGD's first step does."""
    if _fused(leaves, lr, weight_decay, momentum):
        torch._fused_sgd_(
            leaves,
            list(grads),
            [slots["momentum_buffer"][name] for name in trainable] if uses_momentum else [],
            weight_decay=weight_decay,
            momentum=momentum if uses_momentum else 0.0,
            lr=lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=first,
        )
        return
    for name, param, grad in zip(trainable, leaves, grads, strict=True):
        if isinstance(weight_decay, torch.Tensor):
            grad = torch.addcmul(grad, param, client_view(weight_decay, param))
        elif weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if uses_momentum:
            buffer = slots["momentum_buffer"][name]
            # a client without momentum: buffer = 0 * gradient + gradient, the gradient
            grad = buffer.copy_(grad) if first else buffer.mul_(_times(momentum, param)).add_(grad)
        if isinstance(lr, torch.Tensor):
            param.addcmul_(grad, client_view(lr, param), value=-1)
        else:
            param.add_(grad, alpha=-lr)


def _adam(leaves, grads, slots, trainable, step: int, lr, weight_decay, lr64: torch.Tensor) -> None:
    """torch.optim.Adam's step (betas 0.9, 0.999, eps 1e-8, L2 weight decay, no amsgrad),
    on stacks: its fused kernel, or its single-tensor one written out when the settings
    differ per client. Every client of a step has taken as many steps before."""
    beta1, beta2 = ADAM_BETAS
    if _fused(leaves, lr, weight_decay):
        count = torch.tensor(float(step), device=leaves[0].device) if leaves else None
        torch._fused_adam_(
            leaves,
            list(grads),
            [slots["exp_avg"][name] for name in trainable],
            [slots["exp_avg_sq"][name] for name in trainable],
            [],
            [count] * len(leaves),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=ADAM_EPS,
            amsgrad=False,
            maximize=False,
        )
        return
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    for name, param, grad in zip(trainable, leaves, grads, strict=True):
        if isinstance(weight_decay, torch.Tensor):
            grad = torch.addcmul(grad, param, client_view(weight_decay, param))
        elif weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        exp_avg, exp_avg_sq = slots["exp_avg"][name], slots["exp_avg_sq"][name]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
        if isinstance(lr, torch.Tensor):
            step_size = (lr64 / bias_correction1).to(param.dtype)
            param.addcmul_(exp_avg / denom, client_view(step_size, param), value=-1)
        else:
            param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def train_clients(
    trainer: ClientTrainer,
    model: nn.Module,
    arrays: Sequence[ArrayRecord],
    data: Sequence[ClientData],
    configs: RoundConfig | Sequence[RoundConfig],
    states: Sequence[ClientState],
    generators: Sequence[torch.Generator],
    device: torch.device | str,
) -> list[TrainResult]:
    """:meth:`ClientTrainer.train` for K clients at once: each client's ``receive`` (its
    arrays and state loaded into ``model``, FedBN's own BatchNorm layers included), one
    :func:`fit_clients`, then each client's ``send``. Same result as calling
    ``trainer.train`` client after client, for a trainer :func:`vectorizable` accepts."""
    starts = []
    for client_arrays, state in zip(arrays, states, strict=True):
        trainer.receive(model, client_arrays, state)
        starts.append({key: value.detach().clone() for key, value in model.state_dict().items()})
    fits = fit_clients(model, starts, data, configs, generators, device, trainer)
    results = []
    for fit, state in zip(fits, states, strict=True):
        model.load_state_dict(fit.state, strict=True)
        reply, new_state = trainer.send(model, state)
        results.append(TrainResult(reply, fit.metrics, new_state))
    return results


def _activation_bytes(model: nn.Module, batch_size: int, input_shape: tuple[int, ...]) -> int:
    """Bytes of the tensors a training forward keeps for backward, plus the output,
    measured on the meta device (no computation, no memory); on the CPU with a batch of
    two, scaled up, for a model the meta device cannot run."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    def measure(copy_of_model: nn.Module, size: int, device: str) -> int:
        nonlocal saved
        saved = 0
        copy_of_model.train()
        x = torch.zeros(size, *input_shape, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = copy_of_model(x)
        return saved + out.numel() * out.element_size()

    try:
        return measure(copy.deepcopy(model).to("meta"), batch_size, "meta")
    except (RuntimeError, NotImplementedError):
        small = min(batch_size, 2)
        return measure(copy.deepcopy(model).to("cpu"), small, "cpu") * batch_size // small


def estimate_bytes_per_client(model: nn.Module, batch_size: int, input_shape: tuple[int, ...]) -> int:
    """Device memory one more vectorised client needs, in bytes: its parameters
    :data:`PARAMETER_COPIES` times (parameters, FedProx anchor, gradients, two Adam slots,
    the new parameters, a temporary), its buffers :data:`BUFFER_COPIES` times, its input
    batch and the activations a forward keeps for backward (measured), all times
    :data:`SAFETY_FACTOR`. The clients' data themselves are not counted."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    input_bytes = batch_size * int(torch.Size(input_shape).numel()) * 4
    activations = _activation_bytes(model, batch_size, tuple(input_shape))
    total = PARAMETER_COPIES * parameter_bytes + BUFFER_COPIES * buffer_bytes + input_bytes + activations
    return int(total * SAFETY_FACTOR)


def available_bytes(device: torch.device | str) -> int:
    """Memory vectorised clients may take on ``device``: :data:`CUDA_MEMORY_FRACTION` of
    the GPU's free memory, or :data:`CPU_MEMORY_FRACTION` of the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_MEMORY_FRACTION)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * CPU_MEMORY_FRACTION)
    return 2**30  # no /proc (not Linux): assume 1 GiB


def choose_k(
    model: nn.Module,
    batch_size: int,
    input_shape: tuple[int, ...],
    device: torch.device | str,
    limit: int | None = None,
    max_k: int | None = None,
) -> int:
    """The largest number of clients to vectorise at once on ``device``: how many times
    :func:`estimate_bytes_per_client` fits in ``limit`` bytes (default:
    :func:`available_bytes`), at least 1 (one client is sequential training, which needs
    the memory anyway) and at most ``max_k``."""
    budget = available_bytes(device) if limit is None else int(limit)
    k = max(1, budget // estimate_bytes_per_client(model, batch_size, input_shape))
    return min(k, max_k) if max_k is not None else k
