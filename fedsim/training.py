"""Plain PyTorch loops over in-memory arrays, shared by clients and the server."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.errors import UserError


def resolve_device(device: str, fall_back_to_cpu: bool = False) -> torch.device:
    """``"auto"`` picks CUDA when this process can see a GPU, else the CPU.

    A CUDA device this process cannot see is an error, or the CPU with
    ``fall_back_to_cpu`` (the server's evaluation on a Ray head node without a GPU).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        if fall_back_to_cpu:
            return torch.device("cpu")
        raise UserError(f"[engine] device = {device!r}, but this process sees no GPU; use 'auto' or 'cpu'")
    return torch.device(device)


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches when a generator is given, else in order."""
    n = len(y)
    order = torch.randperm(n, generator=generator).to(x.device) if generator is not None else None
    for start in range(0, n, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            yield x[index], y[index]


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Logits for every row of ``x`` (model in eval mode), on the CPU."""
    model.eval()
    outputs = [
        model(torch.as_tensor(x[start : start + batch_size]).to(device)).float().cpu()
        for start in range(0, len(x), batch_size)
    ]
    return torch.cat(outputs) if outputs else torch.zeros(0)


def classification_metrics(logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
    """Mean cross-entropy and accuracy of logits against labels."""
    if len(y) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    target = torch.as_tensor(y)
    return {
        "loss": float(F.cross_entropy(logits, target)),
        "accuracy": float((logits.argmax(1) == target).float().mean()),
    }
