"""Checks that need the data: the model fits the inputs and the strategy can train it."""

from __future__ import annotations

import torch

from fedsim.config import Experiment
from fedsim.errors import UserError
from fedsim.lookups import resolve_strategy
from fedsim.models import build_model
from fedsim.registry import first_line


def check_model(experiment: Experiment, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Build the model and push a small batch through it, before a run writes anything:
    a model that does not fit the data, or that the strategy cannot train, is a
    one-line error. A strategy may check the model with a ``validate_model(model)``
    class method that raises ValueError."""
    try:
        model = build_model(experiment.model.name, input_shape, num_classes, **experiment.model.params)
    except (RuntimeError, MemoryError) as error:  # PyTorch cannot allocate a layer of that size
        options = ", ".join(f"{key} = {value!r}" for key, value in experiment.model.params.items()) or "its defaults"
        raise UserError(
            f"[model] {experiment.model.name!r} cannot be built with {options}: {first_line(error)}; "
            "choose smaller sizes"
        ) from None
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, *input_shape))
    except RuntimeError as error:
        shape = "x".join(map(str, input_shape))
        message = str(error).strip().splitlines()[0]
        raise UserError(f"[model] {experiment.model.name!r} does not fit inputs of shape {shape}: {message}") from None
    if tuple(logits.shape) != (2, num_classes):
        raise UserError(
            f"[model] {experiment.model.name!r} gives outputs of shape {tuple(logits.shape)[1:]}, not ({num_classes},)"
        )
    validate_model = getattr(resolve_strategy(experiment.strategy.name), "validate_model", None)
    if validate_model is not None:
        try:
            validate_model(model)
        except ValueError as error:
            raise UserError(f"[strategy] {experiment.strategy.name}: {error}") from None
