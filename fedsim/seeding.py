"""One experiment seed, many independent generators.

Every random draw in a run takes its generator from ``derive_seed(seed, purpose, ...)``,
so a (round, client) pair always sees the same numbers, whatever order the engine runs
clients in, and whether or not the run was interrupted and resumed.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 32-bit seed (what every library accepts) for ``purpose`` (e.g. "train") and
    integer keys (e.g. round, client)."""
    words = [int(seed) & 0xFFFFFFFF, zlib.crc32(purpose.encode()), *(int(k) & 0xFFFFFFFF for k in keys)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])


def seed_torch_globally(seed: int, device: torch.device) -> None:
    """Seed torch's global generators that a model may draw from (dropout, say): the
    CPU's, and the device's. ``torch.manual_seed`` does the same but also queues seeds
    for every kind of accelerator, which costs more than a small client's step."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def torch_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
