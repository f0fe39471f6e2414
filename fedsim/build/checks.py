"""Checks that need the data: the model fits the inputs and the strategy can train it."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.build.experiment import FLAT_INPUTS_MODEL, default_model
from fedsim.config import Experiment
from fedsim.errors import UserError
from fedsim.lookups import resolve_strategy
from fedsim.models import build_model
from fedsim.notices import warn
from fedsim.registry import first_line


def check_model(experiment: Experiment, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Build the model and push a small batch through it, before a run writes anything:
    a model that does not fit the data, or that the strategy cannot train, is a
    one-line error. A strategy may check the model with a ``validate_model(model)``
    class method that raises ValueError.

    A model that runs, but with a convolution or pooling window larger than the feature
    map it slides over (LeNet's second 5x5 convolution on a 4x4 map of the 8x8 digits),
    gets a warning naming a model that fits: such a layer computes mostly from its own
    padding, and the model learns slowly if at all, yet it does run, and small stand-ins
    like it are legitimate in tests and quick checks."""
    name = experiment.model.name
    try:
        model = build_model(name, input_shape, num_classes, **experiment.model.params)
    except (RuntimeError, MemoryError) as error:  # PyTorch cannot allocate a layer of that size
        options = ", ".join(f"{key} = {value!r}" for key, value in experiment.model.params.items()) or "its defaults"
        raise UserError(
            f"[model] {name!r} cannot be built with {options}: {first_line(error)}; choose smaller sizes"
        ) from None
    model.eval()
    try:
        with torch.no_grad():
            logits, cramped = forward_watching_windows(model, torch.zeros(2, *input_shape))
    except RuntimeError as error:
        raise UserError(
            _misfit(experiment, input_shape, num_classes, f"on which it fails ({first_line(error)})")
        ) from None
    if cramped:
        warn(_misfit(experiment, input_shape, num_classes, f"on which its {cramped[0].describe()}, mostly padding"))
    if tuple(logits.shape) != (2, num_classes):
        raise UserError(f"[model] {name!r} gives outputs of shape {tuple(logits.shape)[1:]}, not ({num_classes},)")
    validate_model = getattr(resolve_strategy(experiment.strategy.name), "validate_model", None)
    if validate_model is not None:
        try:
            validate_model(model)
        except ValueError as error:
            raise UserError(f"[strategy] {experiment.strategy.name}: {error}") from None


WINDOW_LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class CrampedWindow:
    """A convolution or pooling layer whose window is larger than the map it slides over."""

    layer: str  # its name in the model, "features.3"
    kind: str  # "convolution" or "pooling"
    window: tuple[int, int]  # rows x columns it covers (dilation included)
    map: tuple[int, int]  # rows x columns of its input

    def describe(self) -> str:
        return (
            f"{'x'.join(map(str, self.window))} {self.kind} {self.layer} slides over a "
            f"{'x'.join(map(str, self.map))} map"
        )


def forward_watching_windows(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, list[CrampedWindow]]:
    """The model's outputs for ``inputs``, and, in order, every convolution or pooling
    window larger than the feature map it slides over on the way."""
    found: list[CrampedWindow] = []

    def watch(name: str, module: nn.Module):
        def hook(_module: nn.Module, args: tuple) -> None:
            rows, columns = args[0].shape[-2:]
            window = _window(module)
            if window[0] > rows or window[1] > columns:
                kind = "convolution" if isinstance(module, nn.Conv2d) else "pooling"
                found.append(CrampedWindow(name, kind, window, (int(rows), int(columns))))

        return module.register_forward_pre_hook(hook)

    handles = [watch(name, module) for name, module in model.named_modules() if isinstance(module, WINDOW_LAYERS)]
    try:
        outputs = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, found


def _window(module: nn.Module) -> tuple[int, int]:
    """The rows and columns one output of a convolution or pooling layer reads."""
    kernel, dilation = module.kernel_size, getattr(module, "dilation", 1)
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))  # type: ignore[return-value]


def fits(name: str, options: dict, input_shape: tuple[int, ...], num_classes: int) -> bool:
    """Whether the model takes inputs of ``input_shape`` with every window inside its map.
    Only shapes matter, so the weights are left uninitialised: built on PyTorch's meta
    device, then given memory with ``torch.empty`` (a forward pass on the meta device, or
    ``Module.to_empty``, would first import seconds of PyTorch's symbolic shape code)."""
    try:
        with torch.device("meta"):
            model = build_model(name, input_shape, num_classes, **options)
        model = model._apply(lambda tensor: torch.empty(tensor.shape, dtype=tensor.dtype)).eval()
        with torch.no_grad():
            return not forward_watching_windows(model, torch.zeros(1, *input_shape))[1]
    except (RuntimeError, ValueError, UserError):
        return False


def smallest_fitting_side(
    name: str, options: dict, input_shape: tuple[int, ...], num_classes: int, limit: int = 1024
) -> int | None:
    """The smallest side ``s`` above the inputs' for which the model :func:`fits`
    ``(channels, s, s)`` images; None for inputs that are not images, or past ``limit``."""
    return _smallest_fitting_side(name, json.dumps(options, sort_keys=True), tuple(input_shape), num_classes, limit)


@functools.lru_cache(maxsize=64)  # a sweep's worker checks the same model on the same data run after run
def _smallest_fitting_side(
    name: str, options_json: str, input_shape: tuple[int, ...], num_classes: int, limit: int
) -> int | None:
    if len(input_shape) != 3:
        return None
    options = json.loads(options_json)

    def fits_side(side: int) -> bool:
        return fits(name, options, (input_shape[0], side, side), num_classes)

    low = max(input_shape[1:])  # the caller found that the inputs' own size does not fit
    high = 2 * low
    while not fits_side(high):
        low, high = high, 2 * high
        if high > limit:
            return None
    while high - low > 1:  # fits_side(high), not fits_side(low)
        middle = (low + high) // 2
        low, high = (low, middle) if fits_side(middle) else (middle, high)
    return high


def _misfit(experiment: Experiment, input_shape: tuple[int, ...], num_classes: int, what: str) -> str:
    """One line: the size the model needs, the inputs it got and ``what`` happens on them,
    and a model that fits them."""
    side = smallest_fitting_side(experiment.model.name, experiment.model.params, input_shape, num_classes)
    needs = f"needs images of at least {side}x{side}" if side else "does not fit these inputs"
    shape = "x".join(map(str, input_shape))
    return (
        f"[model] name = {experiment.model.name!r} {needs}; {experiment.dataset.name} has {shape} inputs, {what}: "
        f"{_instead(experiment, input_shape, num_classes)}"
    )


def _instead(experiment: Experiment, input_shape: tuple[int, ...], num_classes: int) -> str:
    """The model to use instead: the dataset's default where it fits these inputs, else
    the MLP, which takes any."""
    fitting = default_model(experiment)
    if fitting == experiment.model.name or not fits(fitting, {}, input_shape, num_classes):
        fitting = FLAT_INPUTS_MODEL
    return f"use name = {fitting!r}"
