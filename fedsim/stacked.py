"""Stacked layers: K clients' forward pass as one plain-autograd computation (issue 16).

:func:`fedsim.vectorize.fit_clients` trains K clients at once. Its generic path vmaps
``functional_call`` over the clients, which works for any model but is slow on the CPU:
vmap turns every convolution into a grouped one (whose backward is slow there) and
max-pooling into a slow batched kernel. This module runs the same forward without vmap.
The model is traced once with ``torch.fx`` (:func:`build_plan`, remembered per model by
:func:`plan_for`); each client's parameters and buffers are stacked on a leading client
dimension, (K, ...), and each activation is either

* folded, (K * B, ...): the clients' minibatches one after another as one batch. A
  layer without parameters (ReLU, pooling, flatten) runs on it once, unchanged; Linear
  is one ``baddbmm`` (:class:`_StackedLinear`); a convolution one grouped convolution;
  BatchNorm one ``batch_norm`` over a (B, K * C, ...) view, client k's channels being
  channels k * C to k * C + C - 1, whose running statistics are views of the stacked
  buffers; GroupNorm and LayerNorm normalise per sample, then apply each client's
  affine; glue (``x + y``, ``x * self.gain``) broadcasts a client's parameter over its
  own samples; or
* split, one (B, ...) tensor per client, on :data:`PER_CLIENT_DEVICES` (the CPU) for
  convolutions and normalisation layers with large enough activations and the layers
  between them: they run client by client (client-major over each run of such layers),
  through the layer's own functional form with the client's own weights, as sequential
  training runs them, on activations small enough to stay in the cache.

ReLU followed by max-pooling becomes max-pooling then ReLU (the same values and
gradients, a quarter of ReLU's work), and on the CPU a 2x2 max-pooling is
:func:`max_pool_2x2` (``max_pool2d``'s values and argmax, so its gradient, about three
times faster than its CPU forward). The loss is the sum over clients of each client's
own mean loss, so one backward gives every client its own gradient.

:func:`build_plan` raises :class:`Unsupported` for anything it does not know (a layer
type, a function or method, an in-place activation, a tensor attribute that is no
parameter or buffer, a forward that ``torch.fx`` cannot trace), and ``fit_clients``
then falls back to vmap.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fedsim.models.norm import WSConv2d

# On these device types the layers with per-client weights other than Linear
# (convolutions, BatchNorm, GroupNorm, LayerNorm) run client by client, each on its own
# samples with its own weights: the kernels sequential training runs, on activations
# small enough to stay in the cache, together with the parameter-free layers between
# them (client-major: a client's whole run of such layers, then the next client's).
# Measured on a 2-core CPU (LeNet, 20 clients of 32 samples): one grouped convolution
# takes 1.6-2.4x as long, forward and backward, and ReLU's backward on the (K * B, ...)
# activations 3-10x as long as on one client's at a time. Elsewhere (a GPU) they run on
# the folded activations: one grouped convolution, one batch_norm for all clients.
PER_CLIENT_DEVICES = frozenset({"cpu"})
# ... where one client's minibatch makes at least this many elements: a convolution's
# output (below, one grouped convolution is faster), another layer's input (below, the
# per-call overhead outweighs the cache: ReLU and 2x2 max-pooling of LeNet on 8x8
# inputs, 20 clients, take 5x as long client by client as on the folded activations).
PER_CLIENT_CONV = 2**14
PER_CLIENT_ACTIVATION = 2**17
# On these device types 2x2 max-pooling is :func:`max_pool_2x2` (``max_pool2d``'s CPU
# forward takes 16 ms for 640 x 6 x 28 x 28 on one thread, this 5 ms).
FAST_POOL_DEVICES = frozenset({"cpu"})


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
class _PerClient:
    """A tensor with one value per client, stacked: (K, *shape) for a per-client shape."""

    tensor: torch.Tensor


class _Split(list):
    """An activation as K tensors, one per client, each (B, ...)."""


def _client_view(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """A (K, *s) stack as (K, 1, ..., *s) of ``rank`` dimensions, so that it broadcasts
    over (K, B, ...): a client's value meets only its own samples."""
    extra = rank - tensor.ndim
    if extra < 0:
        raise Unsupported("a per-client tensor has more dimensions than the activation it meets")
    return tensor.reshape(tensor.shape[0], *([1] * extra), *tensor.shape[1:])


def _binary(op: Callable, left: Any, right: Any, count: int) -> Any:
    """``op`` on folded activations (K * B, ...), per-client stacks and Python numbers."""
    if not (isinstance(left, _PerClient) or isinstance(right, _PerClient)):
        return op(left, right)
    folded = [value for value in (left, right) if isinstance(value, torch.Tensor)]
    if not folded:  # per-client op per-client, or with a number: still per client
        lhs = left.tensor if isinstance(left, _PerClient) else left
        rhs = right.tensor if isinstance(right, _PerClient) else right
        if isinstance(lhs, torch.Tensor) and isinstance(rhs, torch.Tensor):
            rank = max(lhs.ndim, rhs.ndim)
            lhs, rhs = _client_view(lhs, rank), _client_view(rhs, rank)
        return _PerClient(op(lhs, rhs))
    activation = folded[0]
    per_sample = activation.shape[1:]
    unfolded = activation.reshape(count, activation.shape[0] // count, *per_sample)

    def side(value):
        if isinstance(value, _PerClient):
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


_BINARY = {
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
_UNARY = {
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
_RELU = (torch.relu, F.relu, "relu")


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


_CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d, WSConv2d: F.conv2d}


def _conv_one(module: nn.Module, tensors, x: torch.Tensor) -> torch.Tensor:
    conv = _CONV_FUNCTIONS[type(module)]
    return conv(
        x, _conv_weight(module, tensors), tensors["bias"], module.stride, module.padding, module.dilation, module.groups
    )


def _conv(module: nn.Module, tensors, x: torch.Tensor, count: int, workspace=None) -> torch.Tensor:
    """One grouped convolution: (B, K * C, ...) with K * groups groups."""
    conv = _CONV_FUNCTIONS[type(module)]
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


def _is_2x2(module: nn.MaxPool2d) -> bool:
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


_LAYERS: dict[type[nn.Module], _Layer] = {
    **{kind: _Layer(_conv, _conv_one) for kind in _CONV_FUNCTIONS},
    nn.Linear: _Layer(_linear, None),
    nn.BatchNorm1d: _Layer(_batch_norm, _batch_norm_one),
    nn.BatchNorm2d: _Layer(_batch_norm, _batch_norm_one),
    nn.BatchNorm3d: _Layer(_batch_norm, _batch_norm_one),
    nn.GroupNorm: _Layer(_group_norm, _group_norm_one),
    nn.LayerNorm: _Layer(_layer_norm, _layer_norm_one),
    **{kind: _Layer(None, None) for kind in PER_SAMPLE_LAYERS},
}


def _check_layer(module: nn.Module) -> None:
    """Refuse settings of a known layer type that its stacked version does not follow."""
    kind = type(module)
    if kind in _CONV_FUNCTIONS and module.padding_mode != "zeros":
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


# ---------------------------------------------------------------------------------------
# The plan


class _Tracer(torch.fx.Tracer):
    """Every layer type above is a leaf (WSConv2d too, which fx would trace through); so
    is every other torch.nn layer, to be refused by name; a container or a model's own
    module is traced through."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module) in _LAYERS or super().is_leaf_module(module, qualified_name)


@dataclass
class _Step:
    node: torch.fx.Node
    kind: str  # "input", "tensor", "layer", "binary", "unary", "identity", "output"
    function: Callable | None = None
    module: nn.Module | None = None
    tensors: dict[str, str | None] = field(default_factory=dict)  # a layer's own: attribute -> name
    name: str | None = None  # "tensor": the parameter's or buffer's name
    form: str = "folded"  # of the result: "folded", "split" (per client) or "client" (a stack)
    relu: bool = False  # a MaxPool2d that applies the ReLU before it (fused)
    fast_pool: bool = False  # a 2x2 MaxPool2d computed by max_pool_2x2


class Plan:
    """The stacked forward of one model: ``plan(values, x, count)`` gives the logits,
    (K * B, classes), of K clients' minibatches folded in ``x`` (K * B, ...), with each
    parameter and buffer given in ``values`` by its name in ``model.named_parameters()``
    or ``named_buffers()`` as a (K, ...) stack. BatchNorm updates the running statistics
    in ``values`` in place."""

    def __init__(self, program: list[_Step | list[_Step]]) -> None:
        self.program = program  # steps, and runs of steps that go client by client

    def __call__(
        self,
        values: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        count: int,
        shapes: dict | None = None,
        workspace: dict | None = None,
    ) -> torch.Tensor:
        """``shapes``, if given, receives the shape of each folded activation;
        ``workspace``, a dict kept from step to step, holds gradient buffers (the
        gradients returned are then overwritten by the next step's)."""
        env: dict[torch.fx.Node, Any] = {}
        folded: dict[torch.fx.Node, torch.Tensor] = {}
        chunks: dict[Any, tuple] = {}

        def fold(node: torch.fx.Node) -> Any:
            value = env[node]
            if not isinstance(value, _Split):
                return value
            if node not in folded:
                folded[node] = torch.cat(value)
            return folded[node]

        def chunk(node: torch.fx.Node, client: int) -> Any:
            value = env[node]
            if isinstance(value, _Split):
                return value[client]
            if node not in chunks:
                if isinstance(value, _PerClient):  # client k's value
                    chunks[node] = value.tensor.unbind(0)
                elif isinstance(value, torch.Tensor):  # client k's samples
                    chunks[node] = value.reshape(count, -1, *value.shape[1:]).unbind(0)
            if node in chunks:
                return chunks[node][client]
            return value

        def own(name: str | None, client: int) -> torch.Tensor | None:
            if name is None:
                return None
            if name not in chunks:
                chunks[name] = values[name].unbind(0)
            return chunks[name][client]

        for item in self.program:
            if isinstance(item, list):  # client by client
                for step in item:
                    env[step.node] = _Split()
                for client in range(count):
                    for step in item:
                        args = torch.fx.node.map_arg(step.node.args, lambda node, client=client: chunk(node, client))
                        kwargs = torch.fx.node.map_arg(
                            step.node.kwargs, lambda node, client=client: chunk(node, client)
                        )
                        if step.kind == "layer":
                            tensors = {key: own(name, client) for key, name in step.tensors.items()}
                            out = self._layer_one(step, tensors, args[0])
                        elif step.kind == "identity":
                            out = args[0]
                        else:
                            out = step.function(*args, **kwargs)
                        env[step.node].append(out)
                continue
            step, node = item, item.node
            if step.kind == "input":
                env[node] = x
            elif step.kind == "tensor":
                env[node] = _PerClient(values[step.name])
            elif step.kind == "output":
                return fold(node.args[0])
            elif step.kind == "identity":
                env[node] = env[node.args[0]]
            else:
                args = torch.fx.node.map_arg(node.args, fold)
                kwargs = torch.fx.node.map_arg(node.kwargs, fold)
                if step.kind == "layer":
                    tensors = {key: values[name] if name else None for key, name in step.tensors.items()}
                    env[node] = self._layer_folded(step, tensors, args[0], count, workspace)
                elif step.kind == "binary":
                    env[node] = _binary(step.function, *args, count)
                else:
                    env[node] = step.function(*args, **kwargs)
            if shapes is not None and isinstance(env[node], torch.Tensor):
                shapes[node] = tuple(env[node].shape)
        raise Unsupported("the graph has no output")

    @staticmethod
    def _pool(step: _Step, x: torch.Tensor) -> torch.Tensor:
        if step.fast_pool and x.ndim == 4:
            return max_pool_2x2(x, step.relu)
        out = step.module(x)
        return torch.relu(out) if step.relu else out

    def _layer_one(self, step: _Step, tensors, x: torch.Tensor) -> torch.Tensor:
        layer = _LAYERS[type(step.module)]
        if layer.one is not None:
            return layer.one(step.module, tensors, x)
        return self._pool(step, x) if isinstance(step.module, nn.MaxPool2d) else step.module(x)

    def _layer_folded(self, step: _Step, tensors, x: torch.Tensor, count: int, workspace: dict | None) -> torch.Tensor:
        layer = _LAYERS[type(step.module)]
        if layer.folded is not None:  # buffers per call site: a layer called twice needs two
            own = workspace.setdefault(step.node.name, {}) if workspace is not None else None
            return layer.folded(step.module, tensors, x, count, own)
        return self._pool(step, x) if isinstance(step.module, nn.MaxPool2d) else step.module(x)


def _layer_tensors(module: nn.Module, canonical: Mapping[int, str]) -> dict[str, str | None]:
    names: dict[str, str | None] = {}
    for attribute in ("weight", "bias", "gain", "running_mean", "running_var", "num_batches_tracked"):
        if hasattr(module, attribute):
            value = getattr(module, attribute)
            names[attribute] = canonical[id(value)] if isinstance(value, torch.Tensor) else None
    own = {id(tensor) for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]}
    known = {id(getattr(module, key)) for key, name in names.items() if name is not None}
    if own - known:
        raise Unsupported(f"{type(module).__name__} has parameters or buffers of its own kind")
    return names


def _is_relu(node: torch.fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return type(model.get_submodule(node.target)) is nn.ReLU
    return node.op in ("call_function", "call_method") and node.target in _RELU and not node.kwargs


def build_plan(
    model: nn.Module, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, batch_size: int = 32
) -> Plan:
    """The stacked forward of ``model`` (in train mode) for inputs of ``sample_shape`` on
    ``device``, or :class:`Unsupported`. Checked by running it, and the model, on the meta
    device. ``batch_size`` (the clients' largest minibatch) only chooses, on
    :data:`PER_CLIENT_DEVICES`, which layers run client by client."""
    device = torch.device(device)
    canonical: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        canonical[id(tensor)] = name
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # anything fx cannot trace: data-dependent control flow, say
        raise Unsupported(f"torch.fx cannot trace {type(model).__name__}: {error}") from error
    steps: dict[torch.fx.Node, _Step] = {}

    def forms(argument) -> set[str]:
        found: set[str] = set()
        torch.fx.node.map_arg(argument, lambda node: found.add(steps[node].form))
        return found

    # what each value is: an activation ("folded" for now) or a per-client tensor ("client")
    for node in graph.nodes:
        if node.op == "placeholder":
            if any(step.kind == "input" for step in steps.values()):
                raise Unsupported("the model's forward takes more than one input")
            steps[node] = _Step(node, "input")
        elif node.op == "get_attr":
            value = model
            for part in node.target.split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor) or id(value) not in canonical:
                raise Unsupported(f"{node.target} is a tensor but no parameter or buffer")
            steps[node] = _Step(node, "tensor", name=canonical[id(value)], form="client")
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            kind = type(module)
            if kind not in _LAYERS:
                raise Unsupported(f"no stacked version of {kind.__name__} ({node.target})")
            if len(node.args) != 1 or node.kwargs or forms(node.args) != {"folded"}:
                raise Unsupported(f"{node.target} is called with anything but one activation")
            _check_layer(module)
            step = _Step(node, "layer", module=module, tensors=_layer_tensors(module, canonical))
            if kind is nn.MaxPool2d:
                step.fast_pool = device.type in FAST_POOL_DEVICES and _is_2x2(module)
            steps[node] = step
        elif node.op in ("call_function", "call_method"):
            found = forms((node.args, node.kwargs))
            form = "folded" if "folded" in found else "client"
            if node.target in _BINARY and len(node.args) == 2 and not node.kwargs and found:
                steps[node] = _Step(node, "binary", _BINARY[node.target], form=form)
            elif node.target in _UNARY and found == {"folded"} and not node.kwargs:
                steps[node] = _Step(node, "unary", _UNARY[node.target])
            else:
                target = getattr(node.target, "__name__", node.target)
                raise Unsupported(f"no stacked version of {node.op} {target} on these arguments")
        elif node.op == "output":
            steps[node] = _Step(node, "output")
    _fuse_relu_pool(steps, model)
    if device.type in PER_CLIENT_DEVICES:
        _choose_per_client(steps, model, tuple(sample_shape), dtype, batch_size)
    plan = Plan(_program(list(steps.values())))
    _check_on_meta(plan, model, tuple(sample_shape), dtype)
    return plan


_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Plan | str]] = weakref.WeakKeyDictionary()


def plan_for(
    model: nn.Module, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, batch_size: int = 32
) -> Plan:
    """:func:`build_plan`, remembered per model object (a federated run trains the same
    model round after round) for as long as its modules, parameters and buffers are the
    same objects of the same shapes; each layer's settings are checked again."""
    device = torch.device(device)
    signature = (
        tuple(sample_shape),
        dtype,
        device.type,
        batch_size,
        (device.type in PER_CLIENT_DEVICES, device.type in FAST_POOL_DEVICES, PER_CLIENT_CONV, PER_CLIENT_ACTIVATION),
        tuple((name, id(module), type(module), module.training) for name, module in model.named_modules()),
        tuple((name, id(t), t.shape, t.dtype) for name, t in [*model.named_parameters(), *model.named_buffers()]),
    )
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == signature:
        if isinstance(cached[1], str):  # the reason it is unsupported
            raise Unsupported(cached[1])
        for item in cached[1].program:
            for step in item if isinstance(item, list) else [item]:
                if step.module is not None:
                    _check_layer(step.module)
        return cached[1]
    try:
        plan = build_plan(model, sample_shape, dtype, device, batch_size)
    except Unsupported as error:
        _PLANS[model] = (signature, str(error))
        raise
    _PLANS[model] = (signature, plan)
    return plan


def _choose_per_client(
    steps: dict[torch.fx.Node, _Step], model: nn.Module, sample_shape: tuple[int, ...], dtype, batch_size: int
) -> None:
    """Which steps run client by client: a convolution whose output, for one client's
    minibatch, has at least :data:`PER_CLIENT_CONV` elements; a normalisation layer, or a
    parameter-free step fed by per-client activations, whose input has at least
    :data:`PER_CLIENT_ACTIVATION` (smaller ones cost more in per-call overhead than they
    gain in cache locality). The sizes come from a folded run on the meta device."""
    shapes: dict[torch.fx.Node, tuple[int, ...]] = {}
    _on_meta(Plan(list(steps.values())), model, sample_shape, dtype, 1, batch_size, shapes)

    def size(node) -> int:
        shape = shapes.get(node)
        return 0 if shape is None else math.prod(shape)

    for node, step in steps.items():
        if step.kind in ("input", "tensor", "output") or step.form == "client":
            continue
        inputs = {steps[source].form for source in node.all_input_nodes}
        activation = [source for source in node.all_input_nodes if steps[source].form != "client"]
        largest = max((size(source) for source in activation), default=0)
        if step.kind == "identity":
            step.form = steps[node.args[0]].form
        elif step.kind == "layer" and _LAYERS[type(step.module)].folded is not None:
            layer = _LAYERS[type(step.module)]
            if layer.one is None:  # Linear: one batched product
                continue
            if type(step.module) in _CONV_FUNCTIONS:
                step.form = "split" if size(node) >= PER_CLIENT_CONV else "folded"
            else:
                step.form = "split" if largest >= PER_CLIENT_ACTIVATION else "folded"
        elif "split" in inputs and largest >= PER_CLIENT_ACTIVATION:
            step.form = "split"


def _fuse_relu_pool(steps: dict[torch.fx.Node, _Step], model: nn.Module) -> None:
    """ReLU then MaxPool2d becomes MaxPool2d then ReLU, in one step on the pooled values:
    the same values and gradients (see :func:`max_pool_2x2`), a quarter of ReLU's work."""
    for node, step in steps.items():
        if step.kind != "layer" or type(step.module) is not nn.MaxPool2d:
            continue
        source = node.args[0]
        if _is_relu(source, model) and len(source.users) == 1 and len(source.args[0].users) == 1:
            steps[source].kind = "identity"
            steps[source].function = None
            step.relu = True


def _program(steps: list[_Step]) -> list[_Step | list[_Step]]:
    """Inputs and parameters first (they depend on nothing), then the steps in order, with
    each run of consecutive per-client steps gathered in a list."""
    program: list[_Step | list[_Step]] = [step for step in steps if step.kind in ("input", "tensor")]
    for step in steps:
        if step.kind in ("input", "tensor"):
            continue
        if step.form == "split" and step.kind != "output":
            if program and isinstance(program[-1], list):
                program[-1].append(step)
            else:
                program.append([step])
        else:
            program.append(step)
    return program


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


def _on_meta(
    plan: Plan,
    model: nn.Module,
    sample_shape: tuple[int, ...],
    dtype: torch.dtype,
    count: int,
    batch: int,
    shapes: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's output for ``count`` clients of ``batch`` samples, and the model's for
    one, on the meta device (shapes only, no computation)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    try:
        values = {name: torch.empty((count, *t.shape), dtype=t.dtype, device="meta") for name, t in named}
        x = torch.empty((count * batch, *sample_shape), dtype=dtype, device="meta")
        out = plan(values, x, count, shapes)
        single = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in named}
        expected = call(model, single, torch.empty((batch, *sample_shape), dtype=dtype, device="meta"))
    except Unsupported:
        raise
    except Exception as error:
        raise Unsupported(f"the stacked forward does not run: {error}") from error
    return out, expected


def _check_on_meta(plan: Plan, model: nn.Module, sample_shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The plan must run for two clients of three samples and give each the model's
    output shape."""
    count, batch = 2, 3
    out, expected = _on_meta(plan, model, sample_shape, dtype, count, batch)
    if not isinstance(out, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise Unsupported("the model returns something other than one tensor")
    if tuple(out.shape) != (count * batch, *expected.shape[1:]) or expected.shape[0] != batch:
        raise Unsupported(f"the stacked forward gives {tuple(out.shape)}, the model {tuple(expected.shape)} per client")


def client_norm(tensor: torch.Tensor) -> torch.Tensor:
    """strategies.fedwon.unitwise_norm of each client's slice of a (K, ...) stack, kept
    broadcastable against the stack."""
    if tensor.ndim <= 2:  # a scalar or a vector per client: one unit
        norm = torch.linalg.vector_norm(tensor.reshape(tensor.shape[0], -1), dim=1)
        return norm.reshape(tensor.shape[0], *([1] * (tensor.ndim - 1)))
    return torch.linalg.vector_norm(tensor, dim=tuple(range(2, tensor.ndim)), keepdim=True)


def client_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-client vector (K,) shaped to broadcast against a (K, ...) stack."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


__all__ = [
    "FAST_POOL_DEVICES",
    "PER_CLIENT_DEVICES",
    "Plan",
    "Unsupported",
    "build_plan",
    "call",
    "max_pool_2x2",
    "module_paths",
    "plan_for",
]
