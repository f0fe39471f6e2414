"""Each client's batches, the groups of clients that take a step together, and the
stacked clients that the engines train."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedsim.data import ClientData
from fedsim.trainer import RoundConfig
from fedsim.training import batches


@dataclass
class StepGroup:
    """The clients that take one vmapped step together, and their batches."""

    clients: list[int]
    indices: list[torch.Tensor]  # rows of the concatenated data, one tensor per client

    @property
    def sizes(self) -> list[int]:
        return [len(index) for index in self.indices]


def batch_schedules(
    data: Sequence[ClientData],
    configs: list[RoundConfig],
    generators: Sequence[torch.Generator],
    offsets: list[int],
    skip_single: bool,
) -> list[list[torch.Tensor]]:
    """Each client's batches, as rows of the concatenated data, over all its local epochs:
    exactly what ClientTrainer.fit iterates, drawn from the client's generator."""
    schedules = []
    for client, config, generator, offset in zip(data, configs, generators, offsets, strict=True):
        rows = torch.arange(client.num_train)
        steps = []
        for _ in range(config.local_epochs):
            for index, _ in batches(rows, rows, config.batch_size, generator):
                if skip_single and len(index) == 1:
                    continue
                steps.append(index + offset)
        schedules.append(steps)
    return schedules


def groups_at(schedules: list[list[torch.Tensor]], step: int, by_size: bool) -> list[StepGroup]:
    """The clients that have a batch at ``step``: one group, or one per batch size."""
    active = [client for client, steps in enumerate(schedules) if len(steps) > step]
    if not by_size:
        return [StepGroup(active, [schedules[client][step] for client in active])]
    sizes: dict[int, list[int]] = {}
    for client in active:
        sizes.setdefault(len(schedules[client][step]), []).append(client)
    return [StepGroup(clients, [schedules[client][step] for client in clients]) for clients in sizes.values()]


def select_clients(tree, index: torch.Tensor | None):
    """The group's rows of every stacked tensor (all of them when ``index`` is None)."""
    if index is None:
        return tree
    return {
        key: select_clients(value, index) if isinstance(value, dict) else value.index_select(0, index)
        for key, value in tree.items()
    }


def scatter_clients(full, part, index: torch.Tensor) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            scatter_clients(full[key], value, index)
        else:
            full[key].index_copy_(0, index, value)


Records = list[tuple[list[int], list[int], torch.Tensor]]  # per step and group: clients, batch sizes, losses


def padded_rows(group: StepGroup, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The group's batches as rows of the concatenated data, (clients, width), padded with
    row 0 to the largest batch, and the mask of real samples (None when none is padded)."""
    sizes = group.sizes
    width = max(sizes)
    if min(sizes) == width:
        return torch.stack(group.indices).to(device), None
    rows = torch.zeros(len(group.clients), width, dtype=torch.long)
    for row, index in enumerate(group.indices):
        rows[row, : len(index)] = index
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    return rows.to(device), mask.to(device)


@dataclass
class StackedClients:
    """K clients ready to train together: their parameters and their other tensors
    (frozen parameters, buffers) as (K, ...) stacks by name, their round configs, their
    batches, and the data those batches index."""

    params: dict[str, torch.Tensor]  # trainable
    others: dict[str, torch.Tensor]
    configs: list[RoundConfig]
    optimizer: str  # "sgd" or "adam", the same for all
    trainable: list[str]
    clipped: list[str] | None  # FedWon: the parameters adaptive gradient clipping applies to
    clip_lambdas: list[float] | None  # FedWon: each client's clipping threshold
    schedules: list[list[torch.Tensor]]  # batch_schedules
    has_bn: bool  # BatchNorm: group a step's clients by batch size instead of padding
    x_all: torch.Tensor  # every client's samples, concatenated
    y_all: torch.Tensor

    @property
    def count(self) -> int:
        return len(self.configs)

    @property
    def steps(self) -> int:
        return max(len(steps) for steps in self.schedules)
