"""IID split: a random permutation cut into near-equal parts."""

from __future__ import annotations

import numpy as np

from partitioners.base import Partition, Partitioner, check_labels


class IID(Partitioner):
    """IID: shuffle the samples and deal them out in near-equal parts."""

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        if self.num_clients > len(y):
            raise ValueError(f"num_clients={self.num_clients} exceeds the {len(y)} samples; lower num_clients")
        order = np.random.default_rng(seed).permutation(len(y))
        return Partition(np.array_split(order, self.num_clients), y)
