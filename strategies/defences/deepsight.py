"""DeepSight (Rieger, Nguyen, Miettinen and Sadeghi, "DeepSight: Mitigating Backdoor Attacks in
Federated Learning Through Deep Model Inspection", NDSS 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy
from sklearn.cluster import HDBSCAN

from fedsim.seeding import derive_seed
from strategies.defences.base import Aggregate, Defence, Updates, check, clip_to, mean_update
from strategies.defences.flame import cosine_distances


def output_layer(updates: Updates, prefix: str | None = None) -> tuple[str, str]:
    """The (weight, bias) keys of the output layer: ``prefix.weight`` and ``prefix.bias``,
    or else the last 2-D ``.weight`` among the parameters that has a matching ``.bias``."""
    if prefix is not None:
        weight, bias = f"{prefix}.weight", f"{prefix}.bias"
        if weight not in updates.layout or bias not in updates.layout:
            raise ValueError(f"DeepSight: output_layer = {prefix!r}, but the replies carry no {weight!r} and {bias!r}")
        return weight, bias
    found = [
        key
        for key, (_, shape) in updates.layout.items()
        if key.endswith(".weight") and len(shape) == 2 and key.removesuffix("weight") + "bias" in updates.layout
    ]
    if not found:
        raise ValueError("DeepSight: the replies have no output layer (a 2-D weight with a bias); set output_layer")
    return found[-1], found[-1].removesuffix("weight") + "bias"


def neups(weight_updates: np.ndarray, bias_updates: np.ndarray) -> np.ndarray:
    """Normalised update energies of the output neurons (n, P): the energy of neuron k is
    |db_k| + sum_j |dW_kj|; NEUP_k = energy_k^2 / sum_k energy_k^2."""
    energy = np.abs(bias_updates) + np.abs(weight_updates).sum(axis=2)
    squared = energy**2
    total = squared.sum(axis=1, keepdims=True)
    uniform = np.full_like(squared, 1.0 / squared.shape[1])
    return np.where(total > 0, squared / np.where(total > 0, total, 1.0), uniform)


def threshold_exceedings(neup: np.ndarray, threshold_factor: float = 0.01) -> np.ndarray:
    """The number of NEUPs above max(threshold_factor, 1 / P) * max NEUP, per client."""
    factor = max(threshold_factor, 1.0 / neup.shape[1])
    return (neup > factor * neup.max(axis=1, keepdims=True)).sum(axis=1)


def suspicious(exceedings: np.ndarray) -> np.ndarray:
    """A client is labelled suspicious when its threshold exceedings are at most half the
    median: a backdoor concentrates the output layer's update on few labels."""
    return exceedings <= np.median(exceedings) / 2


def membership_distances(labels: np.ndarray) -> np.ndarray:
    """0 between members of one cluster, 1 otherwise (noise points are alone)."""
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    distances = np.where(same, 0.0, 1.0)
    np.fill_diagonal(distances, 0.0)
    return distances


def cluster(
    points: np.ndarray, min_cluster_size: int, *, precomputed: bool = False, single: bool = False
) -> np.ndarray:
    """HDBSCAN labels (-1: noise); every point is noise when there are too few to cluster."""
    n = len(points)
    if n < max(2, min_cluster_size):
        return np.full(n, -1)
    return (
        HDBSCAN(
            metric="precomputed" if precomputed else "euclidean",
            min_cluster_size=max(2, min_cluster_size),
            min_samples=1,
            allow_single_cluster=single,
            copy=True,
        )
        .fit(points)
        .labels_
    )


class DeepSight(Defence):
    """DeepSight (Rieger et al., NDSS 2022): cluster the models, drop clusters with too many
    suspicious members, clip the rest.

    Per client: the NEUPs of the output layer (:func:`neups`) and their threshold
    exceedings (TE, :func:`threshold_exceedings` with ``threshold_factor``); a client is
    suspicious when TE <= median(TE) / 2. Three HDBSCAN clusterings, on the cosine distances
    of the output-layer bias updates, on the NEUPs, and on the DDifs of ``num_seeds`` noise
    sets (DDif_k = mean over ``num_samples`` uniform-noise inputs of p_client(k | x) /
    p_global(k | x)), are merged by averaging their cluster-membership distances and
    clustered once more. A cluster is accepted when fewer than ``tau`` of its members are
    suspicious; a noise point is a cluster of its own. Accepted updates are clipped to the
    median L2 norm of all updates and averaged with equal weights.

    Defaults: ``tau = 1/3`` (the paper's); ``threshold_factor = 0.01``, ``num_seeds = 3``
    and ``num_samples = 20000`` as in the FLPoison and BackFed ports; ``min_cluster_size =
    2`` and ``min_samples = 1`` for every HDBSCAN (the ports use the ``hdbscan`` package's
    defaults, 5, under which a round of fewer than 5 clients has no clusters). DDifs need the model: ``model_fn()`` builds it and ``input_shape`` is one
    input's shape; ``num_seeds = 0`` leaves DDifs out and needs neither. The output layer is
    found by name (``output_layer`` overrides). The noise sets are seeded by (``seed``, s).
    """

    name = "deepsight"
    needs = ("model_fn", "input_shape")

    def __init__(
        self,
        strategy: Strategy,
        *,
        tau: float = 1 / 3,
        threshold_factor: float = 0.01,
        num_seeds: int = 3,
        num_samples: int = 20000,
        min_cluster_size: int = 2,
        batch_size: int = 1000,
        output_layer: str | None = None,
        model_fn: Callable[[], Any] | None = None,
        input_shape: tuple[int, ...] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(strategy, **kwargs)
        check(isinstance(tau, (int, float)) and 0 < tau <= 1, f"tau must be in (0, 1], got {tau!r}")
        check(
            isinstance(threshold_factor, (int, float)) and math.isfinite(threshold_factor) and threshold_factor >= 0,
            f"threshold_factor must be a finite number >= 0, got {threshold_factor!r}",
        )
        for key, value, least in (
            ("num_seeds", num_seeds, 0),
            ("num_samples", num_samples, 1),
            ("min_cluster_size", min_cluster_size, 2),
            ("batch_size", batch_size, 1),
        ):
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= least,
                f"{key} must be an integer >= {least}, got {value!r}",
            )
        if num_seeds > 0:
            check(
                callable(model_fn),
                "model_fn must be a callable that builds the model (DeepSight's DDifs run it); "
                "num_seeds = 0 leaves DDifs out",
            )
            check(
                isinstance(input_shape, (tuple, list))
                and len(input_shape) >= 1
                and all(isinstance(size, int) and size >= 1 for size in input_shape),
                f"input_shape must be one input's shape, e.g. (1, 28, 28), got {input_shape!r}",
            )
        self.tau = float(tau)
        self.threshold_factor = float(threshold_factor)
        self.num_seeds = num_seeds
        self.num_samples = num_samples
        self.min_cluster_size = min_cluster_size
        self.batch_size = batch_size
        self.output_layer = output_layer
        self.model_fn = model_fn
        self.input_shape = tuple(int(size) for size in input_shape) if input_shape is not None else None
        self.last_suspicious: dict[int, bool] = {}
        self.last_clusters: dict[int, int] = {}

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        weight_key, bias_key = output_layer(updates, self.output_layer)
        bias = updates.part(updates.vectors, bias_key)
        neup = neups(updates.part(updates.vectors, weight_key), bias)
        flagged = suspicious(threshold_exceedings(neup, self.threshold_factor))
        distances = [
            membership_distances(cluster(cosine_distances(bias), self.min_cluster_size, precomputed=True)),
            membership_distances(cluster(neup, self.min_cluster_size)),
        ]
        if self.num_seeds > 0:
            ddifs = self.ddifs(updates)
            distances.append(np.mean([membership_distances(cluster(d, self.min_cluster_size)) for d in ddifs], axis=0))
        labels = cluster(np.mean(distances, axis=0), self.min_cluster_size, precomputed=True, single=True)
        accepted = []
        for index, label in enumerate(labels):
            members = [index] if label < 0 else np.flatnonzero(labels == label)
            if flagged[members].sum() < self.tau * len(members):
                accepted.append(index)
        self.last_suspicious = {node: bool(flag) for node, flag in zip(updates.node_ids, flagged, strict=True)}
        self.last_clusters = {node: int(label) for node, label in zip(updates.node_ids, labels, strict=True)}
        bound = float(np.median(np.linalg.norm(updates.vectors, axis=1)))
        return Aggregate(mean_update(clip_to(updates.vectors[accepted], bound)), accepted)

    def ddifs(self, updates: Updates) -> list[np.ndarray]:
        """DDifs (num_seeds, n, P): per noise set, each client's mean ratio of its predicted
        probabilities to the global model's."""
        import torch

        def model_of(*records: ArrayRecord) -> torch.nn.Module:
            model = self.model_fn()
            for record in records:
                model.load_state_dict(record.to_torch_state_dict(), strict=False)
            return model.eval()

        reference = model_of(self.global_arrays)
        clients = [model_of(self.global_arrays, record) for record in updates.records]
        out = []
        with torch.no_grad():
            for seed_index in range(self.num_seeds):
                generator = torch.Generator().manual_seed(derive_seed(self.seed, "deepsight-noise", seed_index))
                noise = torch.rand(self.num_samples, *self.input_shape, generator=generator)
                sums = None
                for start in range(0, self.num_samples, self.batch_size):
                    batch = noise[start : start + self.batch_size]
                    base = torch.log_softmax(reference(batch).double(), dim=1)
                    ratios = torch.stack([torch.exp(torch.log_softmax(m(batch).double(), 1) - base) for m in clients])
                    sums = ratios.sum(dim=1) if sums is None else sums + ratios.sum(dim=1)
                out.append((sums / self.num_samples).numpy())
        return out
