"""The "stacked" engine: every step one stacked forward (:class:`fedsim.vectorize.plan.Plan`),
one backward for all clients, and torch.optim's update on the stacks."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedsim.vectorize.batches import Records, StackedClients, groups_at, padded_rows, scatter_clients, select_clients
from fedsim.vectorize.optimizers import adam_step, clip_stacked, own_gradients, sgd_step
from fedsim.vectorize.plan import Plan


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


def run_stacked(
    plan: Plan, clients: StackedClients
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Records]:
    """Every step one stacked forward (:class:`fedsim.vectorize.plan.Plan`) and one backward for
    all clients of a group, then torch.optim's SGD or Adam update on the stacks, in
    place (:func:`sgd_step`, :func:`adam_step`). A step that involves only some clients works on
    copies of their rows and writes them back."""
    params, others, configs, optimizer = clients.params, clients.others, clients.configs, clients.optimizer
    trainable, clipped, clip_lambdas = clients.trainable, clients.clipped, clients.clip_lambdas
    schedules, has_bn, x_all, y_all = clients.schedules, clients.has_bn, clients.x_all, clients.y_all
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
        for group in groups_at(schedules, step, by_size=has_bn):
            clients = len(group.clients)
            rows, mask = padded_rows(group, device)
            flat = rows.reshape(-1)
            xb, yb = x_all.index_select(0, flat), y_all.index_select(0, flat)
            if clients == count:
                index = None
                own, values, own_slots, own_anchor = params, {**params, **others}, slots, anchor
            else:
                index = torch.tensor(group.clients, dtype=torch.long, device=device)
                own = {name: params[name].detach().index_select(0, index).requires_grad_(True) for name in trainable}
                part_others = select_clients(others, index)
                values = {**own, **part_others}
                own_slots, own_anchor = select_clients(slots, index), select_clients(anchor, index)
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
                grads = own_gradients(leaves, grads)
                if clipped is not None:
                    grads = clip_stacked(trainable, clipped, leaves, grads, _part(clip, index))
                settings = (_part(lr, index), _part(weight_decay, index))
                if optimizer == "adam":
                    adam_step(leaves, grads, own_slots, trainable, step + 1, *settings, _part(lr64, index))
                else:
                    first = step == 0
                    sgd_step(
                        leaves, grads, own_slots, trainable, *settings, _part(momentum, index), uses_momentum, first
                    )
                if index is not None:
                    scatter_clients(params, {name: own[name] for name in trainable}, index)
                    scatter_clients(others, part_others, index)
                    scatter_clients(slots, own_slots, index)
            records.append((group.clients, group.sizes, loss.detach()))
    for name in trainable:
        params[name] = params[name].detach()
    return params, others, records
