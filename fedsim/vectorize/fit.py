"""Train K clients at once: stack their states, run one of the two engines, unstack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedsim.data import ClientData
from fedsim.errors import UserError
from fedsim.trainer import ClientCall, ClientTrainer, RoundConfig, TrainResult
from fedsim.vectorize.batches import StackedClients, batch_schedules
from fedsim.vectorize.layers import Unsupported
from fedsim.vectorize.plan import plan_for
from fedsim.vectorize.stacked_step import run_stacked
from fedsim.vectorize.vmap_step import run_vmap

# The methods of ClientTrainer that shape local training, and the classes whose versions
# of them this package reproduces. A trainer whose class (or instance) takes any of them
# from elsewhere is not vectorisable. ``train`` is here because a caller that replaces
# ``trainer.train`` by :func:`train_clients` would skip an override of it; ``receive``
# and ``send`` are not, as :func:`train_clients` calls the trainer's own.
# A trainer's declared gradient clipping (``gradient_clipping``: FedWon's adaptive
# clipping) is reproduced whatever class declares it.
KNOWN_METHODS: dict[str, tuple[type, ...]] = {
    "fit": (ClientTrainer,),
    "batch_loss": (ClientTrainer,),
    "before_step": (ClientTrainer,),
    "make_optimizer": (ClientTrainer,),
    "train": (ClientTrainer,),
}


def vectorizable(trainer: ClientTrainer) -> tuple[bool, str]:
    """Whether :func:`fit_clients` trains the clients of ``trainer`` exactly as its own
    ``fit`` would, and if not, why. Decided by which class each method that shapes local
    training comes from (:data:`KNOWN_METHODS`): ClientTrainer's (FedAvg, FedProx; FedWon,
    which only declares its gradient clipping; FedBN, which overrides only receive and
    send) are; a class that overrides ``fit``, ``batch_loss``, ``before_step``,
    ``make_optimizer`` or ``train`` with code of its own is not."""
    cls = type(trainer)
    if not isinstance(trainer, ClientTrainer):
        return False, f"{cls.__name__} is not a ClientTrainer"
    if not trainer.can_vectorize:
        return False, f"{cls.__name__} declares can_vectorize = False"
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


def _check_states(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Each state must have every key of the model's state dict and no other, as a strict
    ``load_state_dict`` requires."""
    expected = set(model.state_dict().keys())
    for number, state in enumerate(states):
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"client {number}'s starting state does not fit the model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )


def _stack_states(
    model: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    names: list[str],
    alias: Mapping[str, str],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The clients' values of each named tensor, stacked on a leading client dimension,
    with the model's dtype (as ``load_state_dict`` copies); ``alias`` maps each state-dict
    key to its tensor's name (:func:`_aliases`). A non-persistent buffer, which a state
    dict lacks, starts from the model's own value."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    keys_of = {name: [key for key, target in alias.items() if target == name and key in states[0]] for name in names}
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

    ``engine``: "stacked" runs :mod:`fedsim.vectorize.plan`'s forward with plain autograd (a
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
    clippings = [trainer.gradient_clipping(config) for config in configs]
    clipping = clippings[0]  # one trainer: every client's is of the same kind
    clip_lambdas = [c.threshold for c in clippings] if clipping is not None else None
    device = torch.device(device)
    model.train()
    has_bn, has_bn1d = _check_model(model, configs)

    _check_states(model, states)
    trainable, frozen, buffer_names, alias = _aliases(model)
    params = _stack_states(model, states, trainable, alias, device)
    others = _stack_states(model, states, frozen + buffer_names, alias, device)
    clipped = None
    if clipping is not None:
        kept = {id(parameter) for parameter in clipping.clipped(model)}
        named = dict(model.named_parameters())
        clipped = [name for name in trainable if id(named[name]) in kept]

    xs = [torch.as_tensor(client.x_train) for client in data]
    ys = [torch.as_tensor(client.y_train) for client in data]
    offsets = [0]
    for y in ys[:-1]:
        offsets.append(offsets[-1] + len(y))
    x_all = torch.cat(xs).to(device)
    y_all = torch.cat(ys).to(device)
    schedules = batch_schedules(data, configs, generators, offsets, skip_single=has_bn1d)

    plan = None
    if engine != "vmap":
        try:
            batch = max(min(config.batch_size, client.num_train) for config, client in zip(configs, data))
            plan = plan_for(model, tuple(x_all.shape[1:]), x_all.dtype, device, max(batch, 1))
        except Unsupported as error:
            if engine == "stacked":
                raise ValueError(f"cannot stack {type(model).__name__}'s layers: {error}") from error
    clients = StackedClients(
        params, others, configs, optimizer, trainable, clipped, clip_lambdas, schedules, has_bn, x_all, y_all
    )
    if plan is not None:
        params, others, records = run_stacked(plan, clients)
    else:
        params, others, records = run_vmap(model, clients)

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
        if clipping is not None and clipping.metric is not None:
            metrics[clipping.metric] = clip_lambdas[client]
        results.append(ClientFit(state, metrics))
    return results


def train_clients(trainer: ClientTrainer, calls: Sequence[ClientCall]) -> list[TrainResult]:
    """:meth:`ClientTrainer.train` for K calls at once (one model, one device, the first
    call's): each client's ``receive`` (its arrays and state loaded into the model, FedBN's
    own BatchNorm layers included), one :func:`fit_clients`, then each client's ``send``.
    Same result as calling ``trainer.train`` call after call, for a trainer
    :func:`vectorizable` accepts."""
    if not calls:
        return []
    model, device = calls[0].model, calls[0].device
    arrays = [call.arrays for call in calls]
    states = [call.state for call in calls]
    data = [call.data for call in calls]
    configs = [call.config for call in calls]
    generators = [call.generator for call in calls]
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
