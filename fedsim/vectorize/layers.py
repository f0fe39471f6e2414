"""The stacked versions of the layers and operations a traced model may use (see
:mod:`fedsim.vectorize.plan`): each layer on K clients' folded activations with their
stacked weights, or on one client's with its own; 2x2 max-pooling; the glue between
per-client tensors and activations; and the model's own forward with substituted tensors
(``call``), which the vmap engine runs."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fedsim.models.norm import WSConv2d


class Unsupported(Exception):
    """The model has something the stacked forward does not reproduce."""


# ---------------------------------------------------------------------------------------
# 2x2 max-pooling


@functools.lru_cache(maxsize=64)
def _corner(rows: int, cols: int, width: int, device: torch.device) -> torch.Tensor:
    """The flat index of each 2x2 window's top-left element, (rows, cols), int32."""
    corner = torch.arange(rows, device=device, dtype=torch.int32).mul_(2 * width).unsqueeze(1)
    return corner + torch.arange(cols, device=device, dtype=torch.int32).mul_(2)


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, relu: bool) -> torch.Tensor:
        height, width = x.shape[-2:]
        rows, cols = height // 2, width // 2
        a = x[..., 0 : 2 * rows : 2, 0 : 2 * cols : 2]
        b = x[..., 0 : 2 * rows : 2, 1 : 2 * cols : 2]
        c = x[..., 1 : 2 * rows : 2, 0 : 2 * cols : 2]
        d = x[..., 1 : 2 * rows : 2, 1 : 2 * cols : 2]
        out = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
        # the first maximum in the window's row-major order, as max_pool2d takes it:
        # offset 0 (a), 1 (b), width (c) or width + 1 (d) from the window's corner,
        # which is na * (1 + nb * (width - 1 + nc)) with n* = "not the maximum"
        not_a, not_b, not_c = a != out, b != out, c != out
        corner = _corner(rows, cols, width, x.device)
        offset = not_c.to(torch.int32).add_(width - 1).mul_(not_b).add_(1).mul_(not_a)
        indices = offset.add_(corner).long()
        if relu:
            out = torch.relu(out)
        ctx.relu = relu
        ctx.save_for_backward(x, indices, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, indices, out = ctx.saved_tensors
        if ctx.relu:  # ReLU's backward, on the pooled values
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        window = [2, 2]
        grad = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, window, window, [0, 0], [1, 1], False, indices)
        return grad, None


def max_pool_2x2(x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` on (N, C, H, W) or (C, H, W): the same values, the same
    argmax (the first maximum of each window; NaN aside) and hence the same gradient,
    from four strided views instead of max_pool2d's slow CPU forward. With ``relu``,
    ``F.max_pool2d(torch.relu(x), 2)``, computed as ReLU of the pooled values: the same
    values, and the same gradient (a window whose maximum is positive has the same first
    maximum after ReLU; one whose maximum is not passes no gradient either way)."""
    return _MaxPool2x2.apply(x, relu)


# ---------------------------------------------------------------------------------------
# Values of the traced graph: an activation is folded, (K * B, ...), or split, one tensor
# per client (on PER_CLIENT_DEVICES, between layers that run per client); a parameter or
# buffer is a (K, ...) stack; anything else (a Python number) is the same for all.


@dataclass(frozen=True)
class PerClient:
    """A tensor with one value per client, stacked: (K, *shape) for a per-client shape."""

    tensor: torch.Tensor


class Split(list):
    """An activation as K tensors, one per client, each (B, ...)."""


def _client_view(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """A (K, *s) stack as (K, 1, ..., *s) of ``rank`` dimensions, so that it broadcasts
    over (K, B, ...): a client's value meets only its own samples."""
    extra = rank - tensor.ndim
    if extra < 0:
        raise Unsupported("a per-client tensor has more dimensions than the activation it meets")
    return tensor.reshape(tensor.shape[0], *([1] * extra), *tensor.shape[1:])


def binary(op: Callable, left: Any, right: Any, count: int) -> Any:
    """``op`` on folded activations (K * B, ...), per-client stacks and Python numbers."""
    if not (isinstance(left, PerClient) or isinstance(right, PerClient)):
        return op(left, right)
    folded = [value for value in (left, right) if isinstance(value, torch.Tensor)]
    if not folded:  # per-client op per-client, or with a number: still per client
        lhs = left.tensor if isinstance(left, PerClient) else left
        rhs = right.tensor if isinstance(right, PerClient) else right
        if isinstance(lhs, torch.Tensor) and isinstance(rhs, torch.Tensor):
            rank = max(lhs.ndim, rhs.ndim)
            lhs, rhs = _client_view(lhs, rank), _client_view(rhs, rank)
        return PerClient(op(lhs, rhs))
    activation = folded[0]
    per_sample = activation.shape[1:]
    unfolded = activation.reshape(count, activation.shape[0] // count, *per_sample)

    def side(value):
        if isinstance(value, PerClient):
            if value.tensor.ndim - 1 > len(per_sample) + 1:
                raise Unsupported("a per-client tensor has more dimensions than the activation it meets")
            return _client_view(value.tensor, len(per_sample) + 2)
        return unfolded if value is activation else value

    out = op(side(left), side(right))
    if out.shape[:2] != unfolded.shape[:2]:
        raise Unsupported("a per-client tensor broadcasts over the batch dimension")
    return out.reshape(-1, *out.shape[2:])


def _flatten(x: Any, start_dim: int = 1, end_dim: int = -1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or start_dim < 1 or (0 <= end_dim < start_dim):
        raise Unsupported("flatten of anything but the per-sample dimensions")
    return torch.flatten(x, start_dim, end_dim)


BINARY = {
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.truediv: operator.truediv,
    torch.add: operator.add,
    torch.sub: operator.sub,
    torch.mul: operator.mul,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
}
UNARY = {
    torch.relu: torch.relu,
    F.relu: torch.relu,
    torch.sigmoid: torch.sigmoid,
    torch.tanh: torch.tanh,
    torch.flatten: _flatten,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "flatten": _flatten,
}
RELU = (torch.relu, F.relu, "relu")


# ---------------------------------------------------------------------------------------
# Layers. Each has a folded version, (module, stacked tensors, x (K * B, ...), K) -> the
# same, and, if it can run per client, a per-client one, (module, that client's tensors,
# x (B, ...)) -> (B, ...), which is what the layer itself computes.


def _conv_weight(module: nn.Module, tensors: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
    """The weight a convolution uses: its own, or WSConv2d's standardised one (of one
    client, or of each client of a stack)."""
    weight = tensors["weight"]
    if type(module) is WSConv2d:  # WSConv2d.standardized_weight
        fan_in = module.weight[0].numel()
        dims = tuple(range(weight.ndim - module.weight.ndim + 1, weight.ndim))
        mean = weight.mean(dim=dims, keepdim=True)
        var = weight.var(dim=dims, keepdim=True, unbiased=False)
        weight = tensors["gain"] * module.gamma * (weight - mean) / torch.sqrt(var * fan_in + module.eps)
    return weight


CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d, WSConv2d: F.conv2d}


def _conv_one(module: nn.Module, tensors, x: torch.Tensor) -> torch.Tensor:
    conv = CONV_FUNCTIONS[type(module)]
    return conv(
        x, _conv_weight(module, tensors), tensors["bias"], module.stride, module.padding, module.dilation, module.groups
    )


def _conv(module: nn.Module, tensors, x: torch.Tensor, count: int, workspace=None) -> torch.Tensor:
    """One grouped convolution: (B, K * C, ...) with K * groups groups."""
    conv = CONV_FUNCTIONS[type(module)]
    weight, bias = _conv_weight(module, tensors), tensors["bias"]
    batch = x.shape[0] // count
    grouped = x.reshape(count, batch, *x.shape[1:]).transpose(0, 1).reshape(batch, -1, *x.shape[2:])
    out = conv(
        grouped,
        weight.reshape(-1, *weight.shape[2:]),
        bias.reshape(-1) if bias is not None else None,
        module.stride,
        module.padding,
        module.dilation,
        module.groups * count,
    )
    out = out.reshape(batch, count, -1, *out.shape[2:]).transpose(0, 1)
    return out.reshape(count * batch, *out.shape[2:])


class _StackedLinear(torch.autograd.Function):
    """x (K, R, I) times each client's weight (K, O, I) transposed, plus its bias (K, O):
    one baddbmm. Its own backward so that the weight's gradient comes out contiguous,
    (K, O, I) = g^T x as F.linear's backward computes it (not the transpose of x^T g,
    whose strided layout slows every optimiser operation on it), and, given a buffer of
    that shape, written into the buffer: a large fresh tensor costs page faults on every
    step (on the CPU, 24 ms to allocate and fill 51 MB, 3 ms to fill it again)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        ctx.buffer = buffer
        if bias is None:
            return torch.bmm(rows, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, weight = ctx.saved_tensors
        grad_rows = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            buffer = ctx.buffer
            if buffer is not None and buffer.shape == weight.shape and buffer.dtype == weight.dtype:
                grad_weight = torch.bmm(grad.transpose(1, 2), rows, out=buffer)
            else:
                grad_weight = torch.bmm(grad.transpose(1, 2), rows)
        grad_bias = grad.sum(dim=1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_rows, grad_weight, grad_bias, None


# Linear weights of at least this many elements (all clients together) get their
# gradient written into a buffer kept for the whole fit (see _StackedLinear).
GRADIENT_BUFFER_ELEMENTS = 2**22


def _linear(module: nn.Module, tensors, x: torch.Tensor, count: int, workspace: dict | None) -> torch.Tensor:
    """One batched matrix product: client k's rows times its own weight."""
    weight = tensors["weight"]
    buffer = None
    if workspace is not None and weight.requires_grad and weight.numel() >= GRADIENT_BUFFER_ELEMENTS:
        key = (tuple(weight.shape), weight.dtype, weight.device)
        if key not in workspace:
            workspace[key] = torch.empty_like(weight, requires_grad=False)
        buffer = workspace[key]
    out = _StackedLinear.apply(x.reshape(count, -1, x.shape[-1]), weight, tensors["bias"], buffer)
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _batch_norm_one(module: nn.Module, tensors, x: torch.Tensor) -> torch.Tensor:
    """nn.BatchNorm*d's training forward: batch statistics, the running statistics (views
    of the client's rows of the stacked buffers) updated in place."""
    if tensors["num_batches_tracked"] is not None:
        tensors["num_batches_tracked"].add_(1)
    return F.batch_norm(
        x,
        tensors["running_mean"],
        tensors["running_var"],
        tensors["weight"],
        tensors["bias"],
        True,
        module.momentum,
        module.eps,
    )


def _batch_norm(module: nn.Module, tensors, x: torch.Tensor, count: int, workspace=None) -> torch.Tensor:
    """Every client over its own samples: client k's channel c is channel k * C + c of one
    batch_norm over (B, K * C, ...), whose running statistics are views of the stacked
    buffers, updated in place as nn.BatchNorm*d updates them."""
    batch = x.shape[0] // count
    rest = x.shape[1:]
    grouped = x.reshape(count, batch, *rest).transpose(0, 1).reshape(batch, -1, *rest[1:])
    flat = {key: value.reshape(-1) if value is not None and value.ndim > 1 else value for key, value in tensors.items()}
    flat["num_batches_tracked"] = tensors["num_batches_tracked"]
    for key in ("running_mean", "running_var"):
        if tensors[key] is not None:
            flat[key] = tensors[key].view(-1)  # a view: batch_norm's update must reach the stack
    out = _batch_norm_one(module, flat, grouped)
    out = out.reshape(batch, count, *rest).transpose(0, 1)
    return out.reshape(count * batch, *rest)


def _affine(x: torch.Tensor, weight, bias, count: int, trailing: int) -> torch.Tensor:
    """x * weight + bias with each client's affine on its own samples; the affine's
    per-client shape is followed by ``trailing`` dimensions of x (GroupNorm's spatial)."""
    if weight is None and bias is None:
        return x
    unfolded = x.reshape(count, x.shape[0] // count, *x.shape[1:])

    def view(tensor):  # (K, 1, ..., *per-client shape, 1, ...), of unfolded's rank
        ones = unfolded.ndim - tensor.ndim - trailing
        return tensor.reshape(tensor.shape[0], *([1] * ones), *tensor.shape[1:], *([1] * trailing))

    if weight is not None and bias is not None:
        out = torch.addcmul(view(bias), unfolded, view(weight))
    elif weight is not None:
        out = unfolded * view(weight)
    else:
        out = unfolded + view(bias)
    return out.reshape(x.shape)


def _group_norm_one(module: nn.Module, tensors, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, module.num_groups, tensors["weight"], tensors["bias"], module.eps)


def _group_norm(module: nn.Module, tensors, x: torch.Tensor, count: int, workspace=None) -> torch.Tensor:
    out = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine(out, tensors["weight"], tensors["bias"], count, trailing=x.ndim - 2)


def _layer_norm_one(module: nn.Module, tensors, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, tensors["weight"], tensors["bias"], module.eps)


def _layer_norm(module: nn.Module, tensors, x: torch.Tensor, count: int, workspace=None) -> torch.Tensor:
    out = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _affine(out, tensors["weight"], tensors["bias"], count, trailing=0)


def is_2x2(module: nn.MaxPool2d) -> bool:
    def pair(value):
        return tuple(value) if isinstance(value, tuple | list) else (value, value)

    stride = module.stride if module.stride is not None else module.kernel_size
    return (
        pair(module.kernel_size) == (2, 2)
        and pair(stride) == (2, 2)
        and pair(module.padding) == (0, 0)
        and pair(module.dilation) == (1, 1)
        and not module.ceil_mode
    )


# Layers without parameters or buffers that act on each sample alone: they run on
# activations as they are, folded or per client.
PER_SAMPLE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Flatten,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


@dataclass(frozen=True)
class _Layer:
    folded: Callable | None  # (module, stacked tensors, x, K): None for a per-sample layer
    one: Callable | None  # (module, one client's tensors, x): None for Linear


LAYERS: dict[type[nn.Module], _Layer] = {
    **{kind: _Layer(_conv, _conv_one) for kind in CONV_FUNCTIONS},
    nn.Linear: _Layer(_linear, None),
    nn.BatchNorm1d: _Layer(_batch_norm, _batch_norm_one),
    nn.BatchNorm2d: _Layer(_batch_norm, _batch_norm_one),
    nn.BatchNorm3d: _Layer(_batch_norm, _batch_norm_one),
    nn.GroupNorm: _Layer(_group_norm, _group_norm_one),
    nn.LayerNorm: _Layer(_layer_norm, _layer_norm_one),
    **{kind: _Layer(None, None) for kind in PER_SAMPLE_LAYERS},
}


def check_layer(module: nn.Module) -> None:
    """Refuse settings of a known layer type that its stacked version does not follow."""
    kind = type(module)
    if kind in CONV_FUNCTIONS and module.padding_mode != "zeros":
        raise Unsupported(f"{kind.__name__} with padding_mode={module.padding_mode!r}")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.training:
            raise Unsupported("BatchNorm in eval mode")
        if module.track_running_stats and module.momentum is None:
            raise Unsupported("BatchNorm with momentum=None")
    if kind in PER_SAMPLE_LAYERS:
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise Unsupported(f"{kind.__name__} with parameters or buffers")
        if getattr(module, "inplace", False):
            raise Unsupported(f"{kind.__name__}(inplace=True)")
        if kind is nn.Flatten and module.start_dim < 1:
            raise Unsupported("Flatten over the batch dimension")
        if getattr(module, "return_indices", False):
            raise Unsupported(f"{kind.__name__}(return_indices=True)")


def module_paths(model: nn.Module) -> dict[str, str]:
    """Every parameter and buffer attribute of every distinct module, as the path
    ``functional_call`` takes, mapped to the tensor's name in ``named_parameters()`` or
    ``named_buffers()``. A module used twice (under two names) appears once: given both
    paths, or one path with ``tie_weights=True``, ``functional_call`` (torch 2.x) leaves
    the module holding the substituted tensors; a tensor shared by two distinct modules
    appears under both of their paths. Hence ``call(model, values, x)``."""
    canonical: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        canonical[id(tensor)] = name
    paths = {}
    for prefix, module in model.named_modules():
        for attribute, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is not None and id(tensor) in canonical:
                paths[f"{prefix}.{attribute}" if prefix else attribute] = canonical[id(tensor)]
    return paths


def call(model: nn.Module, values: Mapping[str, torch.Tensor], x: torch.Tensor, paths: dict[str, str] | None = None):
    """``model(x)`` with its parameters and buffers replaced by ``values`` (by their
    names in ``named_parameters()`` / ``named_buffers()``), safely for shared modules
    and tied weights (see :func:`module_paths`)."""
    paths = module_paths(model) if paths is None else paths
    substitutes = {path: values[name] for path, name in paths.items() if name in values}
    return functional_call(model, substitutes, (x,), tie_weights=False, strict=False)
