"""FedDAA (Peng & Tang, 2025, arXiv 2506.21054): dynamic clustering for concept drift.

Three modules, run at the start of every time slot t >= 1 of a drift stream and then
through the slot's rounds:

1. **Cluster number.** Every client sends a prototype: the class-conditional mean of a
   model's logits on its current training data (C x C, flattened; an absent class is a
   zero row). The server runs scikit-learn's KMeans for k = 2..``max_models`` and keeps
   the k with the best silhouette score, with its centres. That k is the number of
   global models (``num_models = "silhouette"``, the paper's rule); new models start from
   their own random initialisation and none is removed (a concept that leaves may come
   back). ``num_models = [2, 3, 4]`` is the authors' released code instead: a fixed
   schedule by slot (the last entry repeats), k only logged.
2. **Real-drift detection.** Each client computes its prototype on the previous slot's
   data and on its current data, with the same model, and finds the nearest centre of
   each: different centres mean real drift (P(y|x) changed). It reports its verdict
   (``real-drift``, compared with the stream's truth in ``summary.json``), and the
   server sends it back with the client's train config for the rest of the slot.
3. **Adaptation.** A client without real drift trains on its current data merged with a
   bounded history of earlier slots (:mod:`strategies.history`; ``history_size``
   samples, 0 = one slot's worth as in the authors' code); a client with real drift
   discards the history. Training is clustered with soft assignment (FedRC): per sample
   i and model j, w_ij = softmax_j(log pi_j - loss_j(x_i, y_i) - log P_j(y_i)), pi_j =
   mean_i w_ij (the client's mixture, reset each slot), P_j(y) the server's estimate of
   model j's label distribution from the clients' soft label counts in the slot. Each
   model j is trained on the w_ij-weighted loss; the server averages model j weighted by
   each client's total w_ij (``aggregation = "soft"``) or by its sample count
   (``"samples"``, the authors' code). A client predicts with the mixture
   sum_j pi_j softmax(f_j(x)). The E-step, the M-step, P_j(y) and the mixture's
   prediction are FedRC's and FedEM's too (:mod:`strategies.soft_clustering`).

The prototype model is model 0 (``prototype_model = "first"``, the authors' code) or the
mixture of all models with uniform weights (``"mixture"``). Where the code departs from
this (precision and recall swapped, P_j(y) over unsampled clients, test-time pi fitted
on test labels) the README's drift section says what fedsim does.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsim import multimodel
from fedsim.checks import check, check_choice, check_integer
from fedsim.data import ClientData
from fedsim.trainer import DRIFT_FROM_SLOT, REAL_DRIFT, TIME_SLOT, ClientCall, ClientState, QueryResult
from strategies import history
from strategies.clustered import SeveralModels
from strategies.soft_clustering import (
    LABEL_COUNTS,
    SoftClusteringTrainer,
    assignment,
    label_prior,
    prior_or_uniform,
    soft_label_counts,
)

STAGE = "feddaa-stage"  # which query: "prototypes", then "detect"
CENTRES = "feddaa-centres"  # the KMeans centres, flattened, in the detect query
LABEL_PRIOR = "feddaa-label-prior"  # P_j(y), flattened (models x classes), in the train config
PI, PI_SLOT = "feddaa/pi", "feddaa/pi-slot"


# -- the client -------------------------------------------------------------------------
def prototype(logits: torch.Tensor, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Class-conditional mean of ``logits`` (n x C) over labels ``y``: C x C, flattened."""
    out = np.zeros((num_classes, logits.shape[1]), np.float64)
    values = logits.double().numpy()
    for label in np.unique(y):
        out[int(label)] = values[y == label].mean(axis=0)
    return out.ravel()


def nearest(centres: np.ndarray, point: np.ndarray) -> int:
    return int(np.argmin(((centres - point) ** 2).sum(axis=1)))


class FedDAATrainer(SoftClusteringTrainer):
    """FedDAA's client: prototypes and drift verdicts on query, soft-clustered training."""

    def _prototype(self, model, models, x, y, config, device) -> np.ndarray:
        if config.extra.get("prototype-model", "first") == "mixture":
            logits = torch.stack([self.logits_of(model, record, x, device) for record in models]).mean(0)
        else:
            logits = self.logits_of(model, models[0], x, device)
        return prototype(logits, y, logits.shape[1])

    def query(self, call: ClientCall) -> QueryResult:
        model, data, config, device = call.model, call.data, call.config, call.device
        models = multimodel.ordered(call.arrays)
        now = self._prototype(model, models, data.x_train, data.y_train, config, device)
        if config.extra[STAGE] == "prototypes":
            return QueryResult(statistics={"prototype": now})
        centres = np.asarray(config.extra[CENTRES], np.float64).reshape(-1, now.size)
        before = data.at_slot(data.slot - 1)
        then = self._prototype(model, models, before.x_train, before.y_train, config, device)
        drift = nearest(centres, then) != nearest(centres, now)
        return QueryResult(metrics={DRIFT_FROM_SLOT: float(data.slot - 1), REAL_DRIFT: float(drift)})

    @staticmethod
    def mixture(state: ClientState, data: ClientData, num_models: int) -> np.ndarray | None:
        """The client's pi for the current slot, or None (a new slot or a new model count)."""
        pi = state.get(PI)
        if pi is None or int(state.get(PI_SLOT, -1)) != data.slot or len(pi) != num_models:
            return None
        return np.asarray(pi, np.float64)

    def train_models(self, call: ClientCall, models: list[ArrayRecord]):
        model, data, config, state = call.model, call.data, call.config, call.state
        generator, device = call.generator, call.device
        num_models = len(models)
        drift = bool(config.extra.get(REAL_DRIFT, 0.0))
        state = history.update(state, data, keep=not drift, bound=int(config.extra.get("history-size", 0)))
        train = history.merged(state, data)
        losses = self.losses(model, models, train.x_train, train.y_train, device)
        classes = self.num_classes(model, models, train.x_train, device)
        pi = self.mixture(state, data, num_models)
        pi = np.full(num_models, 1.0 / num_models) if pi is None else pi
        # a slot's first round has no estimate yet: uniform
        prior = prior_or_uniform(config.extra.get(LABEL_PRIOR), num_models, classes)
        weights = assignment(losses, train.y_train, pi, prior)
        pi = weights.mean(axis=0)
        counts = soft_label_counts(weights, train.y_train, classes)
        trained, fitted = {}, []
        for j, record in enumerate(models):
            if pi[j] <= 0:
                continue
            self.receive(model, record, {})
            model.to(device)
            fitted.append(self.fit_weighted(model, train, weights[:, j], config, generator, device))
            trained[j] = ArrayRecord(model.state_dict())
        soft = config.extra.get("aggregation", "soft") == "soft"
        per_model = weights.sum(axis=0) if soft else np.where(pi > 0, float(train.num_train), 0.0)
        state = {**state, PI: pi, PI_SLOT: np.array(data.slot, np.int64)}
        metrics = {
            "train_loss": float(np.mean(fitted)) if fitted else float("nan"),
            "history-samples": float(history.history_size(state)),
            "cluster": float(np.argmax(pi)),
            LABEL_COUNTS: counts.ravel().tolist(),
        }
        return trained, per_model, metrics, state

    def predict_models(self, call: ClientCall, models: list[ArrayRecord]) -> torch.Tensor:
        """log sum_j pi_j softmax(f_j(x)): the mixture's log-probabilities as logits. A
        client that has not trained in this slot fits its pi on its training data first
        (one E-step from uniform)."""
        model, data, state, device = call.model, call.data, call.state, call.device
        pi = self.mixture(state, data, len(models))
        if pi is None:
            losses = self.losses(model, models, data.x_train, data.y_train, device)
            classes = self.num_classes(model, models, data.x_train, device)
            uniform = np.full((len(models), classes), 1.0 / classes)
            pi = assignment(losses, data.y_train, np.full(len(models), 1.0 / len(models)), uniform).mean(axis=0)
        return self.mixture_logits(model, models, pi, data.x_test, device)


# -- the server -------------------------------------------------------------------------
class FedDAA(SeveralModels):
    """FedDAA (Peng & Tang, 2025): drift detection, history unless drift is real, soft clusters.

    Parameters beyond Flower's FedAvg: ``num_models`` ("silhouette", or a list: models per
    slot), ``initial_models`` (models in slot 0, 2 as in the authors' code),
    ``max_models`` (the largest k tried, 9 as in the code), ``history_size``,
    ``aggregation`` ("soft" or "samples"), ``prototype_model`` ("first" or "mixture").
    """

    client_trainer = FedDAATrainer

    def __init__(
        self,
        num_models: str | list[int] = "silhouette",
        initial_models: int = 2,
        max_models: int = 9,
        history_size: int = 0,
        aggregation: Literal["soft", "samples"] = "soft",
        prototype_model: Literal["first", "mixture"] = "first",
        **kwargs,
    ) -> None:
        schedule = num_models if isinstance(num_models, list) else None
        check(
            schedule is not None or num_models == "silhouette",
            f"num_models must be 'silhouette' or a list of model counts per slot, got {num_models!r}",
        )
        check(
            schedule is None or (schedule and all(isinstance(k, int) and k >= 1 for k in schedule)),
            f"num_models as a schedule must list integers >= 1, got {num_models!r}",
        )
        check_integer("initial_models", initial_models, minimum=1)
        check_integer("max_models", max_models, minimum=2)
        check_choice("aggregation", aggregation, ("soft", "samples"))
        check_choice("prototype_model", prototype_model, ("first", "mixture"))
        check_integer("history_size", history_size, minimum=0)
        capacity = max(max_models, initial_models, *(schedule or [1]))
        super().__init__(num_models=capacity, **kwargs)
        self.schedule = schedule
        self.initial_models = schedule[0] if schedule else initial_models
        self.max_models = max_models
        self.history_size = history_size
        self.aggregation = aggregation
        self.prototype_model = prototype_model
        self._full = ArrayRecord()  # this round's models, active or not: aggregation replaces the active ones
        self.reset_state()

    def reset_state(self) -> None:
        self.active = self.initial_models  # models in use (the packed record holds `num_models`)
        self.slot = 0
        self.stage = "done"  # where the slot's start is: "prototypes", "detect", "done"
        self.centres = np.zeros((0, 0))
        self.chosen_k = 0
        self.verdicts: dict[str, float] = {}  # node id -> real drift this slot (1.0 / 0.0)
        self.label_counts: dict[str, np.ndarray] = {}  # node id -> soft label counts this slot

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "active": self.active,
            "slot": self.slot,
            "stage": self.stage,
            "centres": self.centres,
            "chosen_k": self.chosen_k,
            "verdicts": dict(self.verdicts),
            "label_counts": {node: counts.tolist() for node, counts in self.label_counts.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.active = int(state["active"])
        self.slot = int(state["slot"])
        self.stage = str(state["stage"])
        self.centres = np.asarray(state["centres"], np.float64)
        self.chosen_k = int(state["chosen_k"])
        self.verdicts = {str(k): float(v) for k, v in state["verdicts"].items()}
        self.label_counts = {str(k): np.asarray(v, np.float64) for k, v in state["label_counts"].items()}

    # -- the slot's start: queries ----------------------------------------------------------
    def _active_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        models = list(self.packed_models(arrays).values())
        return multimodel.pack(models[: self.active])

    def configure_query(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        slot = int(config.get(TIME_SLOT, 0))
        if slot != self.slot:  # a new slot: its start runs the modules 1 and 2
            self.slot, self.stage = slot, "prototypes"
            self.verdicts, self.label_counts = {}, {}
        if self.stage == "done" or slot == 0:
            return []
        if self.schedule is not None:  # the code's fixed schedule sets the models; k is only logged
            self.active = max(self.active, self.schedule[min(slot, len(self.schedule) - 1)])
        models = multimodel.unpack(self._active_arrays(arrays))
        extra = {STAGE: self.stage, "prototype-model": self.prototype_model}
        if self.stage == "detect":
            extra[CENTRES] = self.centres.ravel().tolist()
        content = RecordDict({**models, self.configrecord_key: ConfigRecord({**config, **extra})})
        return self._construct_messages(content, list(grid.get_node_ids()), MessageType.QUERY)

    def aggregate_query(self, server_round: int, replies: list[Message]) -> MetricRecord:
        if self.stage == "prototypes":
            points = np.stack([reply.content["statistics"]["prototype"].numpy() for reply in replies])
            self.chosen_k, self.centres, score = choose_clusters(points, self.max_models)
            if self.schedule is None:
                self.active = max(self.active, self.chosen_k)
            self.stage = "detect"
            return MetricRecord({"clusters": float(self.chosen_k), "silhouette": score, "models": float(self.active)})
        self.verdicts = {
            str(reply.metadata.src_node_id): float(reply.content["metrics"][REAL_DRIFT]) for reply in replies
        }
        self.stage = "done"
        drifted = sum(self.verdicts.values())
        return MetricRecord({"real-drift-detected": drifted, "clients-checked": float(len(self.verdicts))})

    # -- training ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["history-size"] = self.history_size
        config["aggregation"] = self.aggregation
        if self.label_counts:
            config[LABEL_PRIOR] = label_prior(self.label_counts.values(), self.active).ravel().tolist()
        self._full = arrays
        return super().configure_train(server_round, self._active_arrays(arrays), config, grid)

    def client_config(self, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """Each client's own real-drift verdict for the slot."""
        return ConfigRecord({**config, REAL_DRIFT: self.verdicts.get(str(node_id), 0.0)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return super().configure_evaluate(server_round, self._active_arrays(arrays), config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        active, metrics = super().aggregate_train(server_round, replies)
        if active is None:
            return None, None
        for reply in replies:
            counts = reply.content["metrics"].get(LABEL_COUNTS)
            if counts is not None and len(counts) % self.active == 0:
                self.label_counts[str(reply.metadata.src_node_id)] = np.asarray(counts, np.float64)
        models = list(multimodel.unpack(self._full).values())
        models[: self.active] = list(multimodel.unpack(active).values())
        return multimodel.pack(models), metrics


def choose_clusters(points: np.ndarray, max_k: int, seed: int = 0) -> tuple[int, np.ndarray, float]:
    """KMeans for k = 2..max_k (at most one fewer than the points), keeping the k with the
    best silhouette score: (k, centres, score). Fewer than 3 distinct points: one cluster."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    distinct = len(np.unique(points.round(12), axis=0))
    if distinct < 3:
        return 1, points.mean(axis=0, keepdims=True), float("nan")
    best = (1, points.mean(axis=0, keepdims=True), -math.inf)
    for k in range(2, min(max_k, distinct - 1) + 1):
        kmeans = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(points)
        score = float(silhouette_score(points, kmeans.labels_))
        if score > best[2]:
            best = (k, kmeans.cluster_centers_, score)
    return best
