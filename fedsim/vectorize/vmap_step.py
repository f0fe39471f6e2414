"""The "vmap" engine: PyTorch's model-ensembling recipe, one ``vmap`` of
``functional_call`` under ``torch.func.grad_and_value`` per step, with functional
optimisers. Any model; slower than the stacked engine on the CPU."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import grad_and_value, vmap
from torch.nn import functional as F

from fedsim.clipping import AGC_EPS, agc_scale, unitwise_norm
from fedsim.vectorize.batches import Records, StackedClients, groups_at, padded_rows, scatter_clients, select_clients
from fedsim.vectorize.layers import call, module_paths
from fedsim.vectorize.optimizers import ADAM_BETAS, ADAM_EPS


class ClientStep:
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
        """fedsim.clipping.adaptive_clip_, on one client's gradients."""
        clipped = dict(grads)
        for name in self.clipped or ():
            max_norm = clip_lambda * unitwise_norm(params[name]).clamp_min(AGC_EPS)
            grad_norm = unitwise_norm(grads[name])
            clipped[name] = grads[name] * agc_scale(max_norm, grad_norm)
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


def run_vmap(
    model: nn.Module, clients: StackedClients
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Records]:
    """Every step one vmap of :class:`ClientStep` over the clients (per batch-size group)."""
    params, others, configs, optimizer = clients.params, clients.others, clients.configs, clients.optimizer
    trainable, clipped, clip_lambdas = clients.trainable, clients.clipped, clients.clip_lambdas
    schedules, has_bn, x_all, y_all = clients.schedules, clients.has_bn, clients.x_all, clients.y_all
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

    step_fn = ClientStep(model, trainable, optimizer, momentum, proximal, clipped)
    batched = vmap(step_fn, in_dims=(0, 0, 0, 0, 0, 0, 0, 0), randomness="different")
    batched_unmasked = vmap(step_fn, in_dims=(0, 0, 0, 0, 0, 0, 0, None), randomness="different")

    records: Records = []
    for step in range(max(len(steps) for steps in schedules)):
        for group in groups_at(schedules, step, by_size=has_bn):
            rows, mask = padded_rows(group, device)
            xb, yb = x_all[rows], y_all[rows]
            if len(group.clients) == count:
                index = None
            else:
                index = torch.tensor(group.clients, dtype=torch.long, device=device)
            part_hyper = dict(select_clients(hyper, index))
            if optimizer == "adam":
                taken = select_clients({"s": steps_taken}, index)["s"] + 1
                lr64 = select_clients({"lr": adam_lr}, index)["lr"]
                part_hyper["step_size"] = (lr64 / (1 - ADAM_BETAS[0] ** taken)).to(dtype)
                part_hyper["bias_correction2_sqrt"] = ((1 - ADAM_BETAS[1] ** taken) ** 0.5).to(dtype)
            state = (
                select_clients(params, index),
                select_clients(others, index),
                select_clients(slots, index),
                select_clients(anchor, index),
            )
            if mask is None:
                new_params, new_others, new_slots, loss = batched_unmasked(*state, part_hyper, xb, yb, None)
            else:
                new_params, new_others, new_slots, loss = batched(*state, part_hyper, xb, yb, mask)
            if index is None:
                params, others, slots = new_params, new_others, new_slots
                steps_taken = steps_taken + 1
            else:
                scatter_clients(params, new_params, index)
                scatter_clients(others, new_others, index)
                scatter_clients(slots, new_slots, index)
                steps_taken.index_add_(0, index, torch.ones(len(group.clients), dtype=torch.float64, device=device))
            records.append((group.clients, group.sizes, loss.detach()))
    return params, others, records
