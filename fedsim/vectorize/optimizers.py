"""torch.optim's SGD and Adam, and FedWon's adaptive gradient clipping, on stacks of K
clients' parameters: torch's fused kernels where every client shares the settings, the
single-tensor updates written out where they differ."""

from __future__ import annotations

import torch

from fedsim.clipping import AGC_EPS, agc_scale

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which ClientTrainer.make_optimizer keeps
ADAM_EPS = 1e-8


def own_gradients(leaves: list[torch.Tensor], grads) -> list[torch.Tensor]:
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


def clip_stacked(trainable, clipped, leaves, grads, clip_lambda: torch.Tensor) -> list[torch.Tensor]:
    """fedsim.clipping.adaptive_clip_, per client, on the stacked gradients."""
    chosen = set(clipped)
    out = []
    for name, param, grad in zip(trainable, leaves, grads, strict=True):
        if name in chosen:
            max_norm = client_view(clip_lambda, param) * client_norm(param).clamp_min(AGC_EPS)
            grad_norm = client_norm(grad)
            grad = grad * agc_scale(max_norm, grad_norm)
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


def sgd_step(leaves, grads, slots, trainable, lr, weight_decay, momentum, uses_momentum: bool, first: bool) -> None:
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


def adam_step(leaves, grads, slots, trainable, step: int, lr, weight_decay, lr64: torch.Tensor) -> None:
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


def client_norm(tensor: torch.Tensor) -> torch.Tensor:
    """fedsim.clipping.unitwise_norm of each client's slice of a (K, ...) stack, kept
    broadcastable against the stack."""
    if tensor.ndim <= 2:  # a scalar or a vector per client: one unit
        norm = torch.linalg.vector_norm(tensor.reshape(tensor.shape[0], -1), dim=1)
        return norm.reshape(tensor.shape[0], *([1] * (tensor.ndim - 1)))
    return torch.linalg.vector_norm(tensor, dim=tuple(range(2, tensor.ndim)), keepdim=True)


def client_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-client vector (K,) shaped to broadcast against a (K, ...) stack."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))
