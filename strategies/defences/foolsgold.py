"""FoolsGold (Fung, Yoon and Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020)."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedsim.checks import check_bool, check_positive
from strategies.defences.base import Aggregate, Defence, Updates, clip_to, cosine_similarities, mean_update

# the reference code's guard, added to each client's maximum similarity (so that pardoning
# never divides by 0) and inside the logit's log (so that alpha = 0 gives a finite, negative
# logit, then weight 0)
EPSILON = 1e-5
# the reference clips every update to this L2 norm before it enters a history or the aggregate
UNIT_NORM = 1.0


def foolsgold_weights(histories: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """FoolsGold's learning rates for clients with these aggregate histories (rows).

    cs = pairwise cosine similarity minus the identity, v_i = max_j cs_ij + 1e-5;
    pardoning: cs_ij *= v_i / v_j where v_i < v_j; alpha_i = 1 - max_j cs_ij, clipped to
    [0, 1] and rescaled to a maximum of 1 (0.99 in place of 1); then
    alpha_i = kappa * (ln(alpha_i / (1 - alpha_i) + 1e-5) + 0.5), clipped to [0, 1].
    When every alpha is 0 (each client a perfect copy of another) the weights are all 0.
    """
    n = len(histories)
    cs = cosine_similarities(histories) - np.eye(n)
    maxcs = cs.max(axis=1) + EPSILON
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i, j] *= maxcs[i] / maxcs[j]
    alpha = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
    if alpha.max() <= 0:  # the reference divides 0 by 0 here and aggregates NaN
        return np.zeros(n)
    alpha = alpha / alpha.max()
    alpha[alpha == 1.0] = 0.99
    logit = kappa * (np.log(alpha / (1.0 - alpha) + EPSILON) + 0.5)
    return np.clip(logit, 0.0, 1.0)


class FoolsGold(Defence):
    """FoolsGold (Fung et al., RAID 2020): down-weight clients whose histories look alike.

    As the authors' code does, each update is first clipped to an L2 norm of at most 1
    (``clip_updates``); a client's history is the sum of its clipped updates so far; the
    clients of a round get :func:`foolsgold_weights` of their histories (pairwise cosine
    similarity, pardoning, logit with confidence ``kappa``); the aggregate is this round's
    clipped updates weighted by them. Example counts play no part, as in the reference.
    Default ``kappa = 1``, the paper's (the reference has none: kappa = 1). Sybils that push
    the same direction round after round get weight 0; a client is accepted when its weight
    is > 0. ``clip_updates=False`` keeps the updates as they came, in the history and the
    aggregate (a client with a large update then dominates its own history's direction and
    the aggregate's size, which the reference's clipping bounds).

    Departures from the reference (the authors' ML code, ``foolsgold`` in
    ``model_aggregator.py`` with the clipping and history of ``ML_main.py``):

    - the aggregate is divided by the sum of the weights. The reference adds
      sum_i alpha_i * update_i to the model: it runs FedSGD, where an update is one small
      gradient step; fedsim's updates are whole rounds of local training, and a sum would
      multiply the step by the number of clients given weight 1. A round whose weights are
      all 0 keeps the global model (the reference divides 0 by 0 and aggregates NaN);
    - the optional "importance" weighting of the features of a softmax model's output layer
      (off by default in the reference; FLPoison applies a top-k output-layer mask always)
      and the optional Krum filter (the reference's ``clip`` argument, 0 by default) are
      left out;
    - the reference sees every client every round; here a round compares the histories of
      the clients it sampled. Histories are kept by Flower node id (fedsim's engines give
      each client a fixed one) and saved in ``state_dict()``.
    """

    name = "foolsgold"

    def __init__(self, strategy: Strategy, *, kappa: float = 1.0, clip_updates: bool = True, **kwargs) -> None:
        super().__init__(strategy, **kwargs)
        self.kappa = check_positive("kappa", kappa)
        self.clip_updates = check_bool("clip_updates", clip_updates)
        self.history: dict[int, np.ndarray] = {}  # node id -> the sum of its (clipped) updates

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        vectors = clip_to(updates.vectors, UNIT_NORM) if self.clip_updates else updates.vectors
        for node, vector in zip(updates.node_ids, vectors, strict=True):
            past = self.history.get(node)
            if past is not None and past.shape != vector.shape:
                raise ValueError(
                    f"FoolsGold: node {node}'s update has {vector.size} parameters, its history {past.size}"
                )
            self.history[node] = vector.copy() if past is None else past + vector
        weights = foolsgold_weights(np.stack([self.history[node] for node in updates.node_ids]), self.kappa)
        accepted = [int(i) for i in np.flatnonzero(weights > 0)]
        return Aggregate(mean_update(vectors, weights), accepted)

    def defence_state(self) -> dict[str, Any]:
        nodes = sorted(self.history)
        if not nodes:
            return {"history_nodes": []}
        return {"history_nodes": nodes, "history": np.stack([self.history[node] for node in nodes])}

    def load_defence_state(self, state: dict[str, Any]) -> None:
        nodes = [int(node) for node in state.get("history_nodes", [])]
        rows = np.asarray(state["history"], np.float64) if nodes else np.zeros((0, 0))
        self.history = {node: rows[index].copy() for index, node in enumerate(nodes)}
