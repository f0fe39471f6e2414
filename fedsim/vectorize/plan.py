"""Stacked layers: K clients' forward pass as one plain-autograd computation.

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

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from fedsim.vectorize.layers import (
    BINARY,
    CONV_FUNCTIONS,
    LAYERS,
    RELU,
    UNARY,
    PerClient,
    Split,
    Unsupported,
    binary,
    call,
    check_layer,
    is_2x2,
    max_pool_2x2,
)

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


# ---------------------------------------------------------------------------------------
# The plan


class _Tracer(torch.fx.Tracer):
    """Every layer type above is a leaf (WSConv2d too, which fx would trace through); so
    is every other torch.nn layer, to be refused by name; a container or a model's own
    module is traced through."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module) in LAYERS or super().is_leaf_module(module, qualified_name)


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
            if not isinstance(value, Split):
                return value
            if node not in folded:
                folded[node] = torch.cat(value)
            return folded[node]

        def chunk(node: torch.fx.Node, client: int) -> Any:
            value = env[node]
            if isinstance(value, Split):
                return value[client]
            if node not in chunks:
                if isinstance(value, PerClient):  # client k's value
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
                    env[step.node] = Split()
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
                env[node] = PerClient(values[step.name])
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
                    env[node] = binary(step.function, *args, count)
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
        layer = LAYERS[type(step.module)]
        if layer.one is not None:
            return layer.one(step.module, tensors, x)
        return self._pool(step, x) if isinstance(step.module, nn.MaxPool2d) else step.module(x)

    def _layer_folded(self, step: _Step, tensors, x: torch.Tensor, count: int, workspace: dict | None) -> torch.Tensor:
        layer = LAYERS[type(step.module)]
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
    return node.op in ("call_function", "call_method") and node.target in RELU and not node.kwargs


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
            if kind not in LAYERS:
                raise Unsupported(f"no stacked version of {kind.__name__} ({node.target})")
            if len(node.args) != 1 or node.kwargs or forms(node.args) != {"folded"}:
                raise Unsupported(f"{node.target} is called with anything but one activation")
            check_layer(module)
            step = _Step(node, "layer", module=module, tensors=_layer_tensors(module, canonical))
            if kind is nn.MaxPool2d:
                step.fast_pool = device.type in FAST_POOL_DEVICES and is_2x2(module)
            steps[node] = step
        elif node.op in ("call_function", "call_method"):
            found = forms((node.args, node.kwargs))
            form = "folded" if "folded" in found else "client"
            if node.target in BINARY and len(node.args) == 2 and not node.kwargs and found:
                steps[node] = _Step(node, "binary", BINARY[node.target], form=form)
            elif node.target in UNARY and found == {"folded"} and not node.kwargs:
                steps[node] = _Step(node, "unary", UNARY[node.target])
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
                    check_layer(step.module)
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
        elif step.kind == "layer" and LAYERS[type(step.module)].folded is not None:
            layer = LAYERS[type(step.module)]
            if layer.one is None:  # Linear: one batched product
                continue
            if type(step.module) in CONV_FUNCTIONS:
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
