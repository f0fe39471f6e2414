"""How many clients fit on a device at once: a per-client memory estimate and the
memory free there (``[engine] vectorize = "auto"``)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

# Memory estimate: per client, the parameters are held this many times over (parameters,
# FedProx's anchor, gradients, two optimiser slots for Adam, the new parameters and one
# temporary while the step is computed), buffers twice (theirs and the updated copy).
PARAMETER_COPIES = 7
BUFFER_COPIES = 2
# On top of the measured activations: activation gradients, vmap's batched kernels, the
# allocator's slack. Measured on the CPU (peak RSS of fit_clients, Adam, batch 32), LeNet
# at 28x28 took 0.9 of the estimate at factor 1.5, DigitCNN 0.7; hence 2.
SAFETY_FACTOR = 2.0
CPU_MEMORY_FRACTION = 0.5  # of MemAvailable: the host also runs the other clients, the server, Ray
CUDA_MEMORY_FRACTION = 0.9  # of the free device memory


def _activation_bytes(model: nn.Module, batch_size: int, input_shape: tuple[int, ...]) -> int:
    """Bytes of the tensors a training forward keeps for backward, plus the output,
    measured on the meta device (no computation, no memory); on the CPU with a batch of
    two, scaled up, for a model the meta device cannot run."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    def measure(copy_of_model: nn.Module, size: int, device: str) -> int:
        nonlocal saved
        saved = 0
        copy_of_model.train()
        x = torch.zeros(size, *input_shape, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = copy_of_model(x)
        return saved + out.numel() * out.element_size()

    try:
        return measure(copy.deepcopy(model).to("meta"), batch_size, "meta")
    except (RuntimeError, NotImplementedError):
        small = min(batch_size, 2)
        return measure(copy.deepcopy(model).to("cpu"), small, "cpu") * batch_size // small


def estimate_bytes_per_client(model: nn.Module, batch_size: int, input_shape: tuple[int, ...]) -> int:
    """Device memory one more vectorised client needs, in bytes: its parameters
    :data:`PARAMETER_COPIES` times (parameters, FedProx anchor, gradients, two Adam slots,
    the new parameters, a temporary), its buffers :data:`BUFFER_COPIES` times, its input
    batch and the activations a forward keeps for backward (measured), all times
    :data:`SAFETY_FACTOR`. The clients' data themselves are not counted."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    input_bytes = batch_size * int(torch.Size(input_shape).numel()) * 4
    activations = _activation_bytes(model, batch_size, tuple(input_shape))
    total = PARAMETER_COPIES * parameter_bytes + BUFFER_COPIES * buffer_bytes + input_bytes + activations
    return int(total * SAFETY_FACTOR)


def available_bytes(device: torch.device | str) -> int:
    """Memory vectorised clients may take on ``device``: :data:`CUDA_MEMORY_FRACTION` of
    the GPU's free memory, or :data:`CPU_MEMORY_FRACTION` of the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_MEMORY_FRACTION)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * CPU_MEMORY_FRACTION)
    return 2**30  # no /proc (not Linux): assume 1 GiB


def choose_k(
    model: nn.Module,
    batch_size: int,
    input_shape: tuple[int, ...],
    device: torch.device | str,
    limit: int | None = None,
    max_k: int | None = None,
) -> int:
    """The largest number of clients to vectorise at once on ``device``: how many times
    :func:`estimate_bytes_per_client` fits in ``limit`` bytes (default:
    :func:`available_bytes`), at least 1 (one client is sequential training, which needs
    the memory anyway) and at most ``max_k``."""
    budget = available_bytes(device) if limit is None else int(limit)
    k = max(1, budget // estimate_bytes_per_client(model, batch_size, input_shape))
    return min(k, max_k) if max_k is not None else k


# On a CPU, vectorising pays where per-step overhead dominates (small models), not where
# one client's step is already large kernels over large weights: measured on the 2-core
# reference machine, LeNet-5 (0.1M parameters) 1.46x and the MLP 1.35x, but FedBN's digit
# CNN (14M) 0.72-0.95x, its stacked weights streamed through the cache each step.
CPU_MAX_PARAMETERS = 2**20


def auto_k(
    model: nn.Module, batch_size: int, input_shape: tuple[int, ...], device: torch.device | str, max_k: int
) -> tuple[int, str]:
    """``[engine] vectorize = "auto"``: how many clients to train at once on ``device``
    and why, in words. On a CPU, one at a time for a model above
    :data:`CPU_MAX_PARAMETERS`; otherwise :func:`choose_k`, the most that memory allows."""
    device = torch.device(device)
    parameters = sum(p.numel() for p in model.parameters())
    if device.type == "cpu" and parameters > CPU_MAX_PARAMETERS:
        return 1, (
            f"1 client at a time on cpu: the model has {parameters / 1e6:.1f}M parameters, and on a CPU "
            f"vectorising models above {CPU_MAX_PARAMETERS / 1e6:.1f}M was measured slower than one at a time"
        )
    chosen = choose_k(model, batch_size, input_shape, device, max_k=max_k)
    per_client = estimate_bytes_per_client(model, batch_size, input_shape)
    return chosen, (
        f"{chosen} clients at once on {device} ({per_client / 2**20:.1f} MiB each by the memory estimate, "
        f"{available_bytes(device) / 2**20:.0f} MiB available)"
    )
