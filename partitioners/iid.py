"""IID split: a random permutation cut into near-equal parts."""

from __future__ import annotations

import numpy as np

from partitioners.base import Partition, Partitioner, check_labels, check_min_size


class IID(Partitioner):
    """IID: shuffle the samples and deal them out in near-equal parts."""

    def split(self, y, *, domains=None, embeddings=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        check_min_size(1, self.num_clients, len(y))
        order = np.random.default_rng(seed).permutation(len(y))
        return Partition(np.array_split(order, self.num_clients), y)
