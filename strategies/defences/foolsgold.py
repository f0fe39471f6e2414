"""FoolsGold (Fung, Yoon and Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from strategies.defences.base import Aggregate, Defence, Updates, check, cosine_similarities, mean_update


def foolsgold_weights(histories: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """FoolsGold's learning rates for clients with these aggregate histories (rows).

    cs = pairwise cosine similarity, v_i = max_j cs_ij; pardoning: cs_ij *= v_i / v_j where
    v_i < v_j; alpha_i = 1 - max_j cs_ij, clipped to [0, 1] and rescaled to a maximum of 1
    (0.99 in place of 1); then alpha_i = kappa * (ln(alpha_i / (1 - alpha_i)) + 0.5),
    clipped to [0, 1].
    """
    n = len(histories)
    cs = cosine_similarities(histories) - np.eye(n)
    maxcs = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j] and maxcs[j] != 0:  # (the reference divides by 0 here)
                cs[i, j] *= maxcs[i] / maxcs[j]
    alpha = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
    if alpha.max() <= 0:  # every client a perfect copy of another
        return np.zeros(n)
    alpha = alpha / alpha.max()
    alpha[alpha == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        logit = kappa * (np.log(alpha / (1.0 - alpha)) + 0.5)
    return np.clip(np.nan_to_num(logit, nan=0.0, neginf=0.0, posinf=1.0), 0.0, 1.0)


class FoolsGold(Defence):
    """FoolsGold (Fung et al., RAID 2020): down-weight clients whose histories look alike.

    Each client's history is the sum of all its updates so far; the clients of a round get
    :func:`foolsgold_weights` of their histories (pairwise cosine similarity, pardoning,
    logit with confidence ``kappa``), and the aggregate is the mean of this round's updates
    weighted by them. Default ``kappa = 1``, the paper's. Sybils that push the same
    direction round after round get weight 0; a client is accepted when its weight is > 0.

    Departures: the weights are normalised to sum to 1 (the paper adds sum_i alpha_i *
    update_i, a learning-rate schedule on top of FedSGD); the optional "indicative
    features" filter on the output layer is left out. Histories are kept by Flower node id
    (fedsim's engines give each client a fixed one) and saved in ``state_dict()``.
    """

    name = "foolsgold"

    def __init__(self, strategy: Strategy, *, kappa: float = 1.0, **kwargs) -> None:
        super().__init__(strategy, **kwargs)
        check(
            isinstance(kappa, (int, float)) and math.isfinite(kappa) and kappa > 0,
            f"kappa must be a finite number > 0, got {kappa!r}",
        )
        self.kappa = float(kappa)
        self.history: dict[int, np.ndarray] = {}  # node id -> the sum of its updates

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        for node, vector in zip(updates.node_ids, updates.vectors, strict=True):
            past = self.history.get(node)
            if past is not None and past.shape != vector.shape:
                raise ValueError(
                    f"FoolsGold: node {node}'s update has {vector.size} parameters, its history {past.size}"
                )
            self.history[node] = vector.copy() if past is None else past + vector
        weights = foolsgold_weights(np.stack([self.history[node] for node in updates.node_ids]), self.kappa)
        accepted = [int(i) for i in np.flatnonzero(weights > 0)]
        return Aggregate(mean_update(updates.vectors, weights), accepted)

    def defence_state(self) -> dict[str, Any]:
        nodes = sorted(self.history)
        if not nodes:
            return {"history_nodes": []}
        return {"history_nodes": nodes, "history": np.stack([self.history[node] for node in nodes])}

    def load_defence_state(self, state: dict[str, Any]) -> None:
        nodes = [int(node) for node in state.get("history_nodes", [])]
        rows = np.asarray(state["history"], np.float64) if nodes else np.zeros((0, 0))
        self.history = {node: rows[index].copy() for index, node in enumerate(nodes)}
