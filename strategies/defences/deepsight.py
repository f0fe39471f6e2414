"""DeepSight (Rieger, Nguyen, Miettinen and Sadeghi, "DeepSight: Mitigating Backdoor Attacks in
Federated Learning Through Deep Model Inspection", NDSS 2022)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy
from sklearn.cluster import HDBSCAN

from fedsim.checks import check, check_callable, check_integer, check_number
from fedsim.seeding import derive_seed
from strategies.defences.base import Aggregate, Defence, ServerResources, Updates, clip_to, mean_update
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
    |db_k| + sum_j |dW_kj|; NEUP_k = energy_k^2 / sum_k energy_k^2 (uniform for a zero update)."""
    weight_updates = np.asarray(weight_updates, np.float64)
    energy = np.abs(np.asarray(bias_updates, np.float64)) + np.abs(weight_updates).sum(axis=2)
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
    points: np.ndarray,
    min_cluster_size: int,
    min_samples: int = 1,
    *,
    precomputed: bool = False,
    single: bool = False,
) -> np.ndarray:
    """HDBSCAN labels (-1: noise); every point is noise when there are too few to cluster.
    ``min_samples`` counts the point itself (scikit-learn's convention; the ``hdbscan``
    package's m is m + 1 here) and is capped at the number of points, as that package does."""
    n = len(points)
    if n < max(2, min_cluster_size):
        return np.full(n, -1)
    return (
        HDBSCAN(
            metric="precomputed" if precomputed else "euclidean",
            min_cluster_size=max(2, min_cluster_size),
            min_samples=min(min_samples, n),
            allow_single_cluster=single,
            copy=True,
        )
        .fit(np.asarray(points, np.float64))
        .labels_
    )


def division_differences(reference: Any, clients: Sequence[Any], noise: Any, batch_size: int = 1000) -> np.ndarray:
    """DDifs (n, P) of one noise set: DDif_ik = mean over the inputs x of
    p_i(k | x) / p_G(k | x), the softmax probabilities of client model i and of the global
    model ``reference`` (torch modules that return logits). Everything runs in float64."""
    noise = torch.as_tensor(noise, dtype=torch.float64)
    sums = None
    with torch.no_grad():
        for start in range(0, len(noise), batch_size):
            batch = noise[start : start + batch_size]
            base = torch.log_softmax(reference(batch).double(), dim=1)
            # the ratio of probabilities as exp of a difference of log-probabilities: no
            # overflow, and no epsilon where a probability underflows
            ratios = torch.stack([torch.exp(torch.log_softmax(m(batch).double(), dim=1) - base) for m in clients])
            sums = ratios.sum(dim=1) if sums is None else sums + ratios.sum(dim=1)
    return (sums / len(noise)).numpy()


class DeepSight(Defence):
    """DeepSight (Rieger et al., NDSS 2022): cluster the models, drop clusters with too many
    suspicious members, clip the rest.

    The rule, on the n replies of a round (updates u_i, global model G):

    1. per client, the NEUPs of the output layer (:func:`neups`) and their threshold
       exceedings TE (:func:`threshold_exceedings`: NEUPs above ``max(threshold_factor,
       1/P)`` times the largest); a client is suspicious when TE <= median(TE) / 2;
    2. three HDBSCAN clusterings: of the cosine distances of the output-layer bias updates
       (precomputed), of the NEUPs, and of the DDifs of each of ``num_seeds`` noise sets
       (Euclidean; :func:`division_differences`: the mean over ``num_samples`` uniform [0, 1)
       inputs of p_i(k | x) / p_G(k | x)). Each gives cluster-membership distances (0 within
       a cluster, 1 otherwise, a noise point alone); the DDif ones are averaged over the
       seeds, the three are averaged, and the result is clustered once more (precomputed,
       one cluster allowed);
    3. a final cluster is accepted when fewer than ``tau`` of its members are suspicious; a
       noise point is a cluster of its own (accepted when it is not suspicious);
    4. the accepted updates are clipped to the median L2 norm of all n updates and averaged
       with equal weights.

    Defaults: ``tau = 1/3`` (the paper's); ``threshold_factor = 0.01``, ``num_seeds = 3``
    and ``num_samples = 20000`` as in both ports; ``min_cluster_size = 2`` and
    ``min_samples = 1`` for every HDBSCAN (``min_samples`` counts the point itself, as in
    scikit-learn: the ``hdbscan`` package's m is m + 1 here). DDifs need the model:
    ``model_fn()`` builds it (it must return logits) and ``input_shape`` is one input's
    shape; ``num_seeds = 0`` leaves DDifs out and needs neither. The output layer is found
    by name (``output_layer`` overrides). The noise sets are seeded by (``seed``, s).
    ``last_suspicious``, ``last_clusters`` (the final labels) and ``last_bound`` describe the
    last round. Vectors are the trainable floating-point parameters in float64, and the DDifs
    run the models in float64.

    Where the two public ports (BackFed, FLPoison) and the paper part, fedsim follows the
    paper, or a port where the paper is silent:

    - DDifs are ratios of softmax probabilities, as the paper defines them. Both ports divide
      the models' raw outputs (logits, or FLPoison's LeNet's log-probabilities) with an
      epsilon in the denominator (BackFed 1e-30, FLPoison 1e-6). BackFed also draws fresh
      noise inputs for every client; fedsim scores every model on the same sets;
    - HDBSCAN's parameters, which the paper does not give: both ports keep the ``hdbscan``
      package's ``min_cluster_size = 5`` (``min_samples`` 3 in FLPoison, 5 in BackFed).
      HDBSCAN without a single cluster then needs two groups of at least 5: with 10
      clients a round every point tends to be noise (so on the parity tests' input), and
      FLPoison then makes all one cluster, accepted whole while fewer than tau of the
      replies are suspicious, the attackers with it. fedsim's 2 and 1 let small groups of
      alike models, a few colluding attackers say, form clusters of their own.
      ``min_cluster_size = 5, min_samples = 4`` is FLPoison's setting;
    - noise points stay alone in the membership distances and are judged as clusters of one,
      as BackFed does. FLPoison counts all noise points as one cluster in the distances and
      rejects every final noise point, suspicious or not;
    - the acceptance test counts suspicious members, as FLPoison does. BackFed's compares
      the fraction of *benign* members with tau, which accepts clusters of attackers and
      rejects clean ones: fedsim does not follow it;
    - the final clustering is of the merged distances as a precomputed matrix (FLPoison);
      BackFed clusters the matrix's rows as Euclidean points, without a single cluster;
    - TE counts NEUPs strictly above max(0.01, 1/P) times the largest (FLPoison). BackFed
      uses 1/P alone (a lower threshold when P > 100) and counts ties;
    - the clipping bound is ``numpy.median`` (BackFed's ``torch.median`` takes the lower
      middle norm for even n), without FLPoison's epsilon, over the trainable parameters
      (BackFed: tensors named ``weight`` or ``bias``; FLPoison: the whole state, BatchNorm
      statistics included); the aggregate is not scaled by BackFed's ``eta = 0.1``;
    - a zero output-layer update has uniform NEUPs (the ports divide by zero).

    The HDBSCAN is scikit-learn's, the ports use the ``hdbscan`` package. On the parity
    tests' inputs both give the same clusters with fedsim's settings and with FLPoison's
    (the two may number them differently, which the membership distances ignore).
    """

    name = "deepsight"
    needs = ("model_fn", "input_shape")

    @classmethod
    def from_server(cls, server: ServerResources) -> dict[str, Any]:
        """The model to run the DDifs on, and one input's shape."""
        return {"model_fn": server.new_model, "input_shape": server.dataset.input_shape}

    def __init__(
        self,
        strategy: Strategy,
        *,
        tau: float = 1 / 3,
        threshold_factor: float = 0.01,
        num_seeds: int = 3,
        num_samples: int = 20000,
        min_cluster_size: int = 2,
        min_samples: int = 1,
        batch_size: int = 1000,
        output_layer: str | None = None,
        model_fn: Callable[[], Any] | None = None,
        input_shape: tuple[int, ...] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(strategy, **kwargs)
        check_number("tau", tau, above=0, at_most=1)
        check_number("threshold_factor", threshold_factor, at_least=0)
        for key, value, least in (
            ("num_seeds", num_seeds, 0),
            ("num_samples", num_samples, 1),
            ("min_cluster_size", min_cluster_size, 2),
            ("min_samples", min_samples, 1),
            ("batch_size", batch_size, 1),
        ):
            check_integer(key, value, minimum=least)
        if num_seeds > 0:
            check_callable(
                "model_fn",
                model_fn,
                "a callable that builds the model (DeepSight's DDifs run it; num_seeds = 0 leaves them out)",
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
        self.min_samples = min_samples
        self.batch_size = batch_size
        self.output_layer = output_layer
        self.model_fn = model_fn
        self.input_shape = tuple(int(size) for size in input_shape) if input_shape is not None else None
        self.last_suspicious: dict[int, bool] = {}
        self.last_clusters: dict[int, int] = {}
        self.last_bound = 0.0  # the last round's clipping bound

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        weight_key, bias_key = output_layer(updates, self.output_layer)
        bias = updates.part(updates.vectors, bias_key)
        neup = neups(updates.part(updates.vectors, weight_key), bias)
        flagged = suspicious(threshold_exceedings(neup, self.threshold_factor))
        sizes = (self.min_cluster_size, self.min_samples)
        distances = [
            membership_distances(cluster(cosine_distances(bias), *sizes, precomputed=True)),
            membership_distances(cluster(neup, *sizes)),
        ]
        if self.num_seeds > 0:
            ddifs = self.ddifs(updates)
            distances.append(np.mean([membership_distances(cluster(d, *sizes)) for d in ddifs], axis=0))
        labels = cluster(np.mean(distances, axis=0), *sizes, precomputed=True, single=True)
        accepted = []
        for index, label in enumerate(labels):
            members = [index] if label < 0 else np.flatnonzero(labels == label)
            # the suspicious members, not the benign ones, are held against tau
            if flagged[members].sum() < self.tau * len(members):
                accepted.append(index)
        self.last_suspicious = {node: bool(flag) for node, flag in zip(updates.node_ids, flagged, strict=True)}
        self.last_clusters = {node: int(label) for node, label in zip(updates.node_ids, labels, strict=True)}
        self.last_bound = bound = float(np.median(np.linalg.norm(updates.vectors, axis=1)))
        return Aggregate(mean_update(clip_to(updates.vectors[accepted], bound)), accepted)

    def noise(self, seed_index: int) -> Any:
        """Noise set ``seed_index``: ``num_samples`` inputs uniform in [0, 1), float64."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "deepsight-noise", seed_index))
        return torch.rand(self.num_samples, *self.input_shape, generator=generator, dtype=torch.float64)

    def ddifs(self, updates: Updates) -> list[np.ndarray]:
        """DDifs (num_seeds, n, P): per noise set, each client's mean ratio of its predicted
        probabilities to the global model's."""

        def model_of(*records: ArrayRecord) -> Any:
            # float64 parameters (the replies' float32 values are exact in float64), so the
            # outputs are never rounded to float32
            model = self.model_fn().double()
            for record in records:
                model.load_state_dict(record.to_torch_state_dict(), strict=False)
            return model.eval()

        reference = model_of(self.global_arrays)
        clients = [model_of(self.global_arrays, record) for record in updates.records]
        return [
            division_differences(reference, clients, self.noise(seed_index), self.batch_size)
            for seed_index in range(self.num_seeds)
        ]
