"""Label skew by construction: a fixed number of classes per client, or sorted shards."""

from __future__ import annotations

import numpy as np

from fedsim.checks import check_integer
from partitioners.allocation import cut_counts, deal, equal_sizes, group_order
from partitioners.base import Partition, Partitioner, check_labels, indices_by_owner


class Pathological(Partitioner):
    """Pathological label skew (McMahan et al. 2017; NIID-Bench's "#C=k"): k classes per client.

    Every client holds ``classes_per_client`` classes, and each class is shared equally
    among the clients that hold it. Classes are handed round-robin over a random class order
    (client i takes the next k classes), so each class is held by as many clients as
    possible, give or take one; a class with fewer samples than holders is an error. Every
    sample is dealt when ``num_clients * classes_per_client >= classes``; otherwise the
    classes that no client draws stay unassigned.

    Parameters
    ----------
    num_clients : int
    classes_per_client : int
        Number of distinct classes on each client, at most the number of classes.
    """

    def __init__(self, num_clients: int, classes_per_client: int = 2) -> None:
        super().__init__(num_clients)
        check_integer("classes_per_client", classes_per_client, minimum=1)
        self.classes_per_client = classes_per_client

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        classes = np.flatnonzero(np.bincount(y))
        if self.classes_per_client > len(classes):
            raise ValueError(
                f"classes_per_client={self.classes_per_client} exceeds the {len(classes)} classes "
                "present in y; lower classes_per_client"
            )
        rng = np.random.default_rng(seed)
        slots = np.arange(self.num_clients * self.classes_per_client)
        held_class = rng.permutation(classes)[slots % len(classes)]
        holders = np.zeros((y.max() + 1, self.num_clients))
        holders[held_class, slots // self.classes_per_client] = 1.0
        holder_count = holders.sum(axis=1, keepdims=True)
        class_sizes = np.bincount(y, minlength=len(holders))
        short = np.flatnonzero(class_sizes < holder_count[:, 0])
        if len(short):
            # A class with fewer samples than holders would leave some holder without it,
            # breaking the promise of exactly k classes on every client.
            c = short[0]
            raise ValueError(
                f"class {c} has {class_sizes[c]} samples but num_clients x classes_per_client gives it "
                f"{int(holder_count[c, 0])} holders; lower num_clients or classes_per_client"
            )
        shares = np.divide(holders, holder_count, out=np.zeros_like(holders), where=holder_count > 0)
        counts = cut_counts(shares, class_sizes * (holder_count[:, 0] > 0))
        return Partition(deal(y, counts, rng), y)


class Shards(Partitioner):
    """Shards (McMahan et al. 2017, FedAvg's non-IID MNIST): sorted by label, cut, dealt out.

    The samples, sorted by label, are cut into ``num_clients * shards_per_client`` equal
    shards, and every client is dealt ``shards_per_client`` shards at random. A client
    therefore sees at most ``shards_per_client`` classes (more where a shard straddles a
    class boundary). Every sample is dealt.

    Parameters
    ----------
    num_clients : int
    shards_per_client : int
        Shards per client; each shard holds about ``n / (num_clients * shards_per_client)`` samples.
    """

    def __init__(self, num_clients: int, shards_per_client: int = 2) -> None:
        super().__init__(num_clients)
        check_integer("shards_per_client", shards_per_client, minimum=1)
        self.shards_per_client = shards_per_client

    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> Partition:
        y = check_labels(y)
        num_shards = self.num_clients * self.shards_per_client
        if num_shards > len(y):
            raise ValueError(
                f"num_clients x shards_per_client = {num_shards} shards exceeds the {len(y)} samples; "
                "lower shards_per_client or num_clients"
            )
        rng = np.random.default_rng(seed)
        by_label, _ = group_order(y, rng)  # sorted by label, random order within a label
        shard_at = np.repeat(np.arange(num_shards), equal_sizes(len(y), num_shards))
        client_of_shard = np.empty(num_shards, dtype=np.int64)
        client_of_shard[rng.permutation(num_shards)] = np.repeat(np.arange(self.num_clients), self.shards_per_client)
        owner = np.empty(len(y), dtype=np.int64)
        owner[by_label] = client_of_shard[shard_at]
        return Partition(indices_by_owner(owner, self.num_clients), y)
