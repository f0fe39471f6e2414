"""CFL (Sattler, Müller & Samek, "Clustered Federated Learning: Model-Agnostic Distributed
Multitask Optimization Under Privacy Constraints", IEEE TNNLS 32(8), 2021, online 2020;
arXiv 1910.01991).

The rule read in the authors' code, felisat/clustered-federated-learning at commit
23a1c3887ed151a9c6340370337804766d11c69c (``fl_devices.py`` and the notebook
``clustered_federated_learning.ipynb``), checked against the copies that run CFL as a
baseline: microsoft/FedDrift e4ac32fe17edf8de23579678a12fb4d7b5f45746
(``SoftClusterState.cluster_cfl`` in ``fedml_api/distributed/fedavg_ens/FedAvgEnsDataLoader.py``)
and LINs-lab/FedRC ce792292655688c99206d4b5f126ec63934d1b1a (``ClusteredAggregator``).

Clients start in one cluster; each cluster has its own model and its clients train it.
After every round, for each cluster, from its clients' updates dW_i (trained minus sent
weights): when ``round > warmup_rounds``, ``||mean_i dW_i|| < eps1``, ``max_i ||dW_i|| >
eps2`` and at least 3 of its clients trained, the cluster is bi-partitioned by the cosine
similarities of the updates, a_ij = <dW_i, dW_j> / (||dW_i|| ||dW_j|| + 1e-12), with the
authors' "optimal bipartition" as their code computes it: scikit-learn's complete-linkage
agglomerative clustering into two clusters on the distances -a. Splits recur within the
new clusters in later rounds. Each cluster's model is then the average of its clients'
trained models, weighted by their training examples; the first part of a split keeps the
cluster's index (and model slot), the second gets the next free index. A client keeps its
cluster (the server's state, saved with ``state_dict``) and predicts with its model.

fedsim runs it as a several-model strategy (:mod:`strategies.clustered`): the packed
record holds one model per cluster and grows by one at every split; the server tells
each client which model to train and predict with (``cfl-model`` in its config).

Options beyond the code's rule: ``gamma`` > 0 also requires the split's separation
sqrt((1 - max cross-cluster similarity) / 2) > gamma (FedDrift's copy; 0 = no check, as
in the authors' code); ``num_models`` > 0 caps the clusters (FedDrift's copy stops
splitting when its models run out); ``adaptive_eps`` = true replaces eps1 and eps2 with
FedDrift's thresholds: eps1 = (largest mean-update norm seen so far) / 10, eps2 = 6 eps1, and no
split in a cluster whose mean-update norm has just raised that maximum (``eps1`` and
``eps2`` are then unused).

Departures:

- Partial participation. The three codes train every client every round (FedRC's asserts
  it). Here only the round's sampled clients are split; a member of the split cluster
  that did not train in that round is placed when it next trains, by fedsim's own rule:
  it is sent the cluster's model as it was at the split, and joins the side whose mean
  update at the split its own update is closer to in cosine similarity, descending one
  level per round where that side has split again; that round's update is not
  aggregated. Until then it predicts with the pre-split model. With ``fraction_train = 1``
  no client is ever pending.
- Aggregation is weighted by the clients' training examples (Flower's FedAvg, FedRC and
  FedDrift); the authors' code averages the updates with equal weights. Both norms are of
  unweighted means, as in all three codes.
- The updates are every floating-point array the model sends (its state dict; FedDrift's
  choice), not only its parameters (the authors' code): they differ only for models with
  BatchNorm buffers.
- FedDrift's copy skips aggregation in a round with a split and re-initialises both
  models; here, as in the authors' code, both parts continue from the aggregate of their
  own clients' models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsim import multimodel
from fedsim.checks import check_bool, check_integer, check_number
from fedsim.trainer import ClientCall
from strategies.clustered import SeveralModels, SeveralModelsTrainer, average_numbers, weight_key

MODEL = "cfl-model"  # the index of the model a client trains and predicts with, in its config
PROBE = "cfl-probe"  # 1.0: the client trains a split's pre-split model, to be placed (not aggregated)
MIN_CLIENTS_TO_SPLIT = 3  # the authors' `len(idc) > 2`


# -- the rule -------------------------------------------------------------------------------
def flat_update(trained: ArrayRecord, sent: ArrayRecord) -> np.ndarray:
    """trained - sent over the floating-point arrays, flattened (float64), in ``sent``'s key order."""
    parts = []
    for key, array in sent.items():
        before = array.numpy()
        if np.issubdtype(before.dtype, np.floating):
            parts.append((trained[key].numpy().astype(np.float64) - before.astype(np.float64)).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def pairwise_cosine(updates: np.ndarray) -> np.ndarray:
    """a_ij = <u_i, u_j> / (||u_i|| ||u_j|| + 1e-12), the authors' ``pairwise_angles``."""
    norms = np.linalg.norm(updates, axis=1)
    return (updates @ updates.T) / (norms[:, None] * norms[None, :] + 1e-12)


def update_norms(updates: np.ndarray) -> tuple[float, float]:
    """(||mean_i u_i||, max_i ||u_i||): the authors' ``compute_mean_update_norm`` and
    ``compute_max_update_norm`` (equal weights)."""
    return float(np.linalg.norm(updates.mean(axis=0))), float(np.linalg.norm(updates, axis=1).max())


def bipartition(similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The authors' ``cluster_clients``: complete-linkage agglomerative clustering of the
    distances -similarity into two clusters; (indices labelled 0, indices labelled 1)."""
    # lazy: scikit-learn takes a second to import, paid only when a cluster splits
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(n_clusters=2, metric="precomputed", linkage="complete").fit(-similarity).labels_
    return np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)


def separation(similarity: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
    """sqrt((1 - max cross-cluster similarity) / 2), FedDrift's gamma check."""
    cross = float(similarity[np.ix_(first, second)].max())
    return math.sqrt(max(0.0, (1.0 - cross) / 2.0))


# -- the client -----------------------------------------------------------------------------
class CFLTrainer(SeveralModelsTrainer):
    """Train, and predict with, the model the server names in the config."""

    def train_models(self, call: ClientCall, models: list[ArrayRecord]):
        chosen = int(call.config.extra[MODEL])
        trained, metrics = self.train_one(
            call.model, models[chosen], call.data, call.config, call.generator, call.device
        )
        probe = bool(call.config.extra.get(PROBE, 0.0))
        weights = np.zeros(len(models))
        if not probe:
            weights[chosen] = call.data.num_train
        return {chosen: trained}, weights, {**metrics, "cluster": -1.0 if probe else float(chosen)}, call.state

    def predict_models(self, call: ClientCall, models: list[ArrayRecord]) -> torch.Tensor:
        chosen = int(call.config.extra[MODEL])
        return self.logits_of(call.model, models[chosen], call.data.x_test, call.device)


# -- the server -----------------------------------------------------------------------------
class CFL(SeveralModels):
    """CFL (Sattler et al., 2021): recursive bi-partitioning of clusters by the cosine
    similarity of their clients' updates, once the cluster's federated training is near a
    stationary point (small mean update) that some clients do not share (a large one).

    Parameters beyond Flower's FedAvg: ``eps1`` (mean-update norm below which a cluster may
    split; the notebook's 0.4), ``eps2`` (largest client-update norm above which it may;
    1.6), ``warmup_rounds`` (no split up to this round; 20), ``gamma`` (0: no separation
    check), ``adaptive_eps`` (FedDrift's thresholds instead of eps1 and eps2),
    ``num_models`` (the most clusters it may form; 0, the default: no limit, as in the
    authors' code; FedDrift's copy stops splitting when its models run out).
    """

    client_trainer = CFLTrainer

    def __init__(
        self,
        eps1: float = 0.4,
        eps2: float = 1.6,
        warmup_rounds: int = 20,
        gamma: float = 0.0,
        adaptive_eps: bool = False,
        num_models: int = 0,
        **kwargs,
    ) -> None:
        self.eps1 = check_number("eps1", eps1, above=0)
        self.eps2 = check_number("eps2", eps2, above=0)
        self.warmup_rounds = check_integer("warmup_rounds", warmup_rounds, minimum=0)
        self.gamma = check_number("gamma", gamma, at_least=0, below=1)
        self.adaptive_eps = check_bool("adaptive_eps", adaptive_eps)
        self.max_models = check_integer("num_models", num_models, minimum=0)
        super().__init__(num_models=1, **kwargs)  # one cluster to start with
        self.reset_state()

    def reset_state(self) -> None:
        self.assignment: dict[str, int] = {}  # node id -> its cluster (= model index)
        self.pending: dict[str, int] = {}  # node id -> the split it is to be placed in
        self.splits: list[dict] = []  # {"cluster", "children", "round"} per split, in order
        self.parents: dict[int, ArrayRecord] = {}  # split -> the cluster's model before it
        self.means: dict[int, np.ndarray] = {}  # split -> each side's mean update (2 x d)
        self.largest_mean_norm = 0.0  # adaptive_eps: the largest mean-update norm seen
        self._probing: dict[str, int] = {}  # this round's pending nodes that train

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        state: dict = {
            "assignment": dict(self.assignment),
            "pending": dict(self.pending),
            "splits": [dict(split) for split in self.splits],
            "largest_mean_norm": self.largest_mean_norm,
        }
        for index, parent in self.parents.items():
            state[f"parent-{index}"] = parent
            state[f"means-{index}"] = self.means[index]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.reset_state()
        self.assignment = {str(node): int(k) for node, k in state["assignment"].items()}
        self.pending = {str(node): int(s) for node, s in state["pending"].items()}
        self.splits = [
            {"cluster": int(s["cluster"]), "children": [int(c) for c in s["children"]], "round": int(s["round"])}
            for s in state["splits"]
        ]
        self.largest_mean_norm = float(state["largest_mean_norm"])
        for name, value in state.items():
            if name.startswith("parent-"):
                index = int(name.removeprefix("parent-"))
                self.parents[index] = value
                self.means[index] = np.asarray(state[f"means-{index}"], np.float64)

    # -- what each client is sent -----------------------------------------------------------
    def _personal(self, messages: Iterable[Message], probe: bool) -> list[Message]:
        """Each message with its node's model index; a pending node also gets the pre-split
        model of its split, as one more model after the clusters' (``probe``: in a train
        round, to be placed by its update)."""
        extra_index = len(self.current)
        out = []
        for message in messages:
            node = str(message.metadata.dst_node_id)
            content = message.content
            records = dict(content.array_records)
            config = ConfigRecord(dict(content[self.configrecord_key]))
            if node in self.pending:
                split = self.pending[node]
                records[multimodel.model_name(extra_index)] = self.parents[split]
                config[MODEL] = extra_index
                if probe:
                    config[PROBE] = 1.0
                    self._probing[node] = split
            else:
                config[MODEL] = self.assignment.setdefault(node, 0)
            out.append(
                Message(content=RecordDict({**records, self.configrecord_key: config}), metadata=message.metadata)
            )
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        for node in grid.get_node_ids():  # every client starts in the one cluster
            self.assignment.setdefault(str(node), 0)
        self._probing = {}
        return self._personal(super().configure_train(server_round, arrays, config, grid), probe=True)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self._personal(super().configure_evaluate(server_round, arrays, config, grid), probe=False)

    # -- aggregation ------------------------------------------------------------------------
    def thresholds(self, mean_norm: float) -> tuple[float, float, bool]:
        """(eps1, eps2, whether this cluster may split now): fixed, or FedDrift's adaptive ones."""
        if not self.adaptive_eps:
            return self.eps1, self.eps2, True
        if mean_norm > self.largest_mean_norm:
            self.largest_mean_norm = mean_norm
            return self.largest_mean_norm / 10.0, 0.6 * self.largest_mean_norm, False
        return self.largest_mean_norm / 10.0, 0.6 * self.largest_mean_norm, True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [reply for reply in replies if not reply.has_error()]
        if not replies or not self.current:
            return None, None
        trained: dict[int, list[tuple[str, Message]]] = {}  # cluster -> its clients' replies
        probes = []
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            if node in self._probing:
                probes.append((node, reply))
            else:
                trained.setdefault(self.assignment[node], []).append((node, reply))
        metrics: dict[str, float] = {}
        models = list(self.current)  # one more per split, starting from its cluster's model
        for k in sorted(trained):
            members = trained[k]
            updates = np.stack(
                [flat_update(reply.content[multimodel.model_name(k)], self.current[k]) for _, reply in members]
            )
            mean_norm, max_norm = update_norms(updates)
            metrics[f"mean-update-norm-{k}"] = mean_norm
            metrics[f"max-update-norm-{k}"] = max_norm
            eps1, eps2, may_split = self.thresholds(mean_norm)
            if not (
                may_split
                and server_round > self.warmup_rounds
                and len(members) >= MIN_CLIENTS_TO_SPLIT
                and mean_norm < eps1
                and max_norm > eps2
            ):
                continue
            if 0 < self.max_models <= len(models):
                continue
            similarity = pairwise_cosine(updates)
            first, second = bipartition(similarity)
            if self.gamma > 0 and separation(similarity, first, second) <= self.gamma:
                continue
            new = len(models)
            models.append(self.current[k])
            self._split(server_round, k, new, [members[i][0] for i in second], updates, first, second, members)
        for k, members in trained.items():  # each cluster's model: its clients' models, by examples
            for target in sorted({self.assignment[node] for node, _ in members}):
                records = [
                    RecordDict({"arrays": reply.content[multimodel.model_name(k)], "w": MetricRecord({"w": weight})})
                    for node, reply in members
                    if self.assignment[node] == target
                    and (weight := float(reply.content["metrics"].get(weight_key(k), 0.0))) > 0
                ]
                if records:
                    models[target] = aggregate_arrayrecords(records, "w")
        for node, reply in probes:
            self._place(node, reply)
        self._forget_splits()
        metrics.update(
            {
                "clusters": float(len(models)),
                "splits": float(len(models) - len(self.current)),
                "pending": float(len(self.pending)),
            }
        )
        if self.adaptive_eps:
            metrics.update({"eps1": self.largest_mean_norm / 10.0, "eps2": 0.6 * self.largest_mean_norm})
        self.current = models
        return multimodel.pack(models), MetricRecord({**average_numbers(replies), **metrics})

    def _split(self, server_round, cluster, new, moving, updates, first, second, members) -> None:
        """Split ``cluster``: the ``moving`` nodes go to cluster ``new``; its members that
        did not train this round wait to be placed."""
        for node in moving:
            self.assignment[node] = new
        trained = {node for node, _ in members}
        absent = [
            node
            for node, k in self.assignment.items()
            if k == cluster and node not in trained and node not in self.pending
        ]
        index = len(self.splits)
        self.splits.append({"cluster": cluster, "children": [cluster, new], "round": server_round})
        self.parents[index] = self.current[cluster]
        self.means[index] = np.stack([updates[first].mean(axis=0), updates[second].mean(axis=0)])
        for node in absent:
            self.pending[node] = index

    def _place(self, node: str, reply: Message) -> None:
        """A pending node's update on its split's pre-split model places it on the side
        whose mean update it is closer to; a later split of that side waits for it too."""
        index = self._probing[node]
        record = reply.content[multimodel.model_name(len(self.current))]
        update = flat_update(record, self.parents[index])
        closeness = pairwise_cosine(np.vstack([update[None, :], self.means[index]]))[0, 1:]
        side = self.splits[index]["children"][int(np.argmax(closeness))]
        later = [s for s in range(index + 1, len(self.splits)) if self.splits[s]["cluster"] == side]
        if later:
            self.pending[node] = later[0]
        else:
            self.pending.pop(node, None)
            self.assignment[node] = side

    def _forget_splits(self) -> None:
        """Keep a split's pre-split model and means while a pending node may still reach it."""
        oldest = min(self.pending.values(), default=len(self.splits))
        for index in [s for s in self.parents if s < oldest]:
            del self.parents[index]
            del self.means[index]
