"""FedDrift and FedDrift-Eager (Jothimurugesan, Hsieh, Wang, Joshi & Gibbons, "Federated
Learning under Distributed Concept Drift", AISTATS 2023), as the authors' code runs them:
microsoft/FedDrift at commit e4ac32fe17edf8de23579678a12fb4d7b5f45746 (``SoftClusterState``
in fedml_api/distributed/fedavg_ens/FedAvgEnsDataLoader.py, FedAvgEnsAggregatorSoftCluster.py,
FedAvgEnsTrainerSoftCluster.py; its README runs FedDrift as ``softcluster H_A_F_1_06_0`` and
FedDrift-Eager as ``softcluster mmacc_06``).

What is clustered is data, not clients: each client's data of each time slot belongs to
one global model (a cluster), and a model trains on every (client, slot) it holds. At the
start of every slot t >= 1 of a drift stream (query rounds, every client asked):

1. **Scores.** Each client scores every model *in use* on its slot-t training data: its
   accuracy, as in the code (``measure = "loss"``: minus the mean cross-entropy, the same
   rule stated with the loss). In use: holding data of an earlier slot (FedDrift: and not
   isolated).
2. **Detection.** With b the client's best model and s_b its score, the client has drifted
   iff previous - s_b > ``delta``, previous being s_b at its last check. At slot 1 that is
   the untrained model's accuracy on slot-0 data, which the code records at slot 0's
   start, so a drift into slot 1 is seen only where the trained model scores ``delta``
   below that (below chance, in effect); fedsim's ``first_reference = "trained"`` compares
   instead with the slot-0 model after slot 0 on slot-0 data (data it trained on: an
   optimistic reference). Every client checked keeps s_b as its previous; its slot-t data
   joins b unless it drifted. The verdict is the query metric ``real-drift``, with
   ``drift-from-slot`` the slot of the previous score, which fedsim scores against the
   stream's truth.
3. **New clusters.** FedDrift: each drifted client gets a model of its own, a copy of its
   b, isolated for ``window`` slots (it alone trains it, no other client sees it, the
   client is not checked). FedDrift-Eager: all drifted clients of the slot share one new
   model, a copy of the first one's b. A new model takes the next index never handed out
   below the cap ``max_models`` (0: as many as clients); past it, the least recently used
   model (its data of every slot leaves training), or none if every model holds data of
   slot t (the drifted clients then stay on b).
4. **Merging** (FedDrift only, with two models in use or more). Cluster j's data is every
   (client, slot <= t) it holds; A_ij is model i's score on cluster j's pooled data and
   D_ij = max(A_ii - A_ij, A_jj - A_ji, 0). Hierarchical clustering (``linkage``; the code:
   complete) is cut at ``delta_merge`` (0: ``delta``, as the code reads 0); in each group
   the lowest-index model absorbs the others one by one: parameters averaged, weighted by
   how many (client, slot) cells each holds, and the cells move.

In every round of slot t a model trains iff it holds data of slot t: a sampled client
receives each such model it holds data of, trains it from the global weights on the union
of its data of those slots (FedAvg's local training) and reports ``weight-k``, those
samples; the server averages each model by them. A client predicts with the model holding
its slot-t data. ``start = "local"`` (the README's FedDrift, ``F``) gives each client a model
of its own in slot 0, which slot 1's merging clusters (``max_models`` must then be 0 or at
least the clients); ``"shared"`` (``C``, the README's example command) starts everyone on
model 0, and FedDrift-Eager always does. On a static partition (one slot) the shared start
is FedAvg.

Departures from the code:

- Local training is fedsim's ``[client]`` one (optimizer, learning rate, ``local_epochs``
  over the union of the slots); the code uses Adam (amsgrad, weight decay 1e-3) whose
  state lives through a slot, and ``epochs`` steps of one random batch each, which
  ``local_steps > 0`` reproduces (that many steps, each on a random batch of
  ``batch_size``). Averaging weights count samples (the code: batches).
- A_ij pools all of cluster j's data (the code: at most 21 shuffled batches of 32).
- Past the cap, ties for least recently used go to the lowest index (the code draws one at
  random). Below it, a new model skips indices that hold data (the code hands out 1, 2, ...
  regardless, which after the local start can put a new cluster on a client's model).
- An isolated client whose model is merged away follows its data to the absorbing model
  (the code leaves it on the re-initialised one); a client that does not answer a query is
  not checked and stays with its previous slot's model (the code knows no failures).
- Only models holding data travel and are stored; all start from one initialisation (the
  code's ``reinitialize`` seeds every model alike) and a new model is a copy, so a freed
  model's parameters are never read before they are overwritten.
- fedsim samples ``fraction_train`` of the clients per round (the code: every client);
  the queries go to all. Accuracy is fedsim's, on each client's held-out data of the
  current slot (the code tests on the next slot's data).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

from fedsim import multimodel
from fedsim.checks import check, check_choice, check_integer, check_number
from fedsim.data import ClientData
from fedsim.trainer import DRIFT_FROM_SLOT, REAL_DRIFT, TIME_SLOT, ClientCall, QueryResult, TrainResult
from strategies.clustered import SeveralModelsTrainer, average_numbers, weight_key
from strategies.fedavg import FedAvg

STAGE = "feddrift-stage"  # which query: "initial" (slot 0), "scores", then "distances"
MEASURE = "feddrift-measure"  # "accuracy" or "loss"
DELTA = "feddrift-delta"
CHECK = "feddrift-check"  # 1: the client checks for drift in this query
PREVIOUS = "feddrift-previous"  # the client's score at its last check (sent, and echoed back)
REFERENCE = "feddrift-reference-model"  # first_reference = "trained": the model whose slot-0 score is the previous
ASSIGNMENT = "feddrift-assignment"  # the model holding the client's data of each slot 0..t (-1: none)
LOCAL_STEPS = "feddrift-local-steps"
SCORE = "feddrift-score"  # reply to "initial": one score
SCORES = "feddrift-scores"  # reply to "scores": a score per model sent, by index
SUMS = "feddrift-sums"  # reply to "distances": summed goodness of model i on cluster j (flattened)
COUNTS = "feddrift-counts"  # reply to "distances": the client's samples in each cluster


# -- the rule, on numbers -----------------------------------------------------------------------
def drifted(previous: float, best: float, delta: float) -> bool:
    """The code's test: the best score fell by more than ``delta`` since the last check."""
    return math.isfinite(previous) and previous - best > delta


def distances(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """D_ij = max(A_ii - A_ij, A_jj - A_ji, 0) with A_ij = sums_ij / counts_j (0 where
    cluster j holds no data, as in the code)."""
    counts = np.asarray(counts, np.float64)
    scores = np.divide(sums, counts[None, :], out=np.zeros_like(sums, dtype=np.float64), where=counts[None, :] > 0)
    own = np.diag(scores)
    return np.maximum(np.maximum(own[:, None] - scores, (own[:, None] - scores).T), 0.0)


def merge_groups(sums: np.ndarray, counts: np.ndarray, threshold: float, linkage: str) -> list[list[int]]:
    """Positions of the models in use grouped by hierarchical clustering of
    :func:`distances` cut at ``threshold``, each group in order, groups by first member."""
    from scipy.cluster.hierarchy import fcluster  # lazy: scipy only where merging runs
    from scipy.cluster.hierarchy import linkage as tree
    from scipy.spatial.distance import squareform

    matrix = distances(np.asarray(sums, np.float64), counts)
    if len(matrix) < 2:
        return [[0]] if len(matrix) else []
    labels = fcluster(tree(squareform(matrix), method=linkage), t=threshold, criterion="distance")
    groups: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        groups.setdefault(int(label), []).append(position)
    return list(groups.values())


class Clustering:
    """The time-varying clustering: which model holds each client's data of each slot,
    each client's last score, the isolated (marked) clients and the next model index.

    ``assignment[s, c]``: the model holding client c's data of slot s (-1: none);
    ``previous[c]``, ``previous_slot[c]``: its best score at its last check and that slot;
    ``marked_model[c]``, ``marked_until[c]``: its own model and the slot it rejoins at
    (-1: not isolated). Its methods are the code's decisions on given numbers, so that
    tests can hold them against the reference's.
    """

    def __init__(self, clients: int, capacity: int, start: str = "shared") -> None:
        self.capacity = capacity
        first = np.arange(clients) if start == "local" else np.zeros(clients)
        self.assignment = first.astype(np.int64)[None, :]
        self.previous = np.full(clients, np.nan)
        self.previous_slot = np.zeros(clients, np.int64)
        self.marked_model = np.full(clients, -1, np.int64)
        self.marked_until = np.full(clients, -1, np.int64)
        self.next_free = 1

    @property
    def clients(self) -> int:
        return self.assignment.shape[1]

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "assignment": self.assignment.copy(),
            "previous": self.previous.copy(),
            "previous_slot": self.previous_slot.copy(),
            "marked_model": self.marked_model.copy(),
            "marked_until": self.marked_until.copy(),
            "next_free": self.next_free,
        }

    @classmethod
    def from_state(cls, state: dict) -> Clustering:
        out = cls.__new__(cls)
        out.capacity = int(state["capacity"])
        out.assignment = np.asarray(state["assignment"], np.int64)
        out.previous = np.asarray(state["previous"], np.float64)
        out.previous_slot = np.asarray(state["previous_slot"], np.int64)
        out.marked_model = np.asarray(state["marked_model"], np.int64)
        out.marked_until = np.asarray(state["marked_until"], np.int64)
        out.next_free = int(state["next_free"])
        return out

    # -- the start of a slot ----------------------------------------------------------------
    def begin(self, slot: int) -> None:
        """Open slot ``slot``'s row; isolated clients whose window ends rejoin."""
        if slot != len(self.assignment):
            raise ValueError(f"slot {slot} follows slot {len(self.assignment) - 1}: slots must come in order")
        self.assignment = np.vstack([self.assignment, np.full((1, self.clients), -1, np.int64)])
        ending = self.marked_until == slot
        self.marked_model[ending], self.marked_until[ending] = -1, -1

    def in_use(self, slot: int, isolate: bool) -> list[int]:
        """Models holding data of a slot before ``slot``, less isolated ones (``isolate``)."""
        held = {int(m) for m in np.unique(self.assignment[:slot]) if m >= 0}
        if isolate:
            held -= {int(m) for m in self.marked_model if m >= 0}
        return sorted(held)

    def holds(self, model: int) -> int:
        """How many (client, slot) cells ``model`` holds."""
        return int((self.assignment == model).sum())

    def allocate(self, slot: int) -> int:
        """A model for a new cluster: the next index that holds no data below the cap,
        else the least recently used (lowest index among ties), its cells dropped; -1 if
        every model holds data of ``slot``."""
        while self.next_free < self.capacity and self.holds(self.next_free):
            self.next_free += 1
        if self.next_free < self.capacity:
            self.next_free += 1
            return self.next_free - 1
        last = np.full(self.capacity, -1, np.int64)
        for s, row in enumerate(self.assignment[: slot + 1]):
            last[row[row >= 0]] = s
        model = int(np.argmin(last))
        if last[model] == slot:
            return -1
        self.assignment[self.assignment == model] = -1
        return model

    def decide(
        self, slot: int, in_use: list[int], scores: np.ndarray, delta: float, eager: bool, window: int = 1
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Slot ``slot``'s assignments from ``scores`` (models in use x clients; NaN in the
        column of a client that did not answer). Returns each client's verdict (1 or 0;
        NaN: not checked, isolated or silent) and the new models as (new, copied from).
        A silent client's data stays with its previous slot's model where it is in use."""
        row = self.assignment[slot]
        scores = np.asarray(scores, np.float64).reshape(len(in_use), self.clients)
        marked = self.marked_model >= 0
        answered = np.isfinite(scores).all(axis=0) & (len(in_use) > 0)
        checked = ~marked & answered
        row[marked] = self.marked_model[marked]
        for client in np.flatnonzero(~marked & ~answered):
            before = int(self.assignment[slot - 1, client]) if slot else -1
            row[client] = before if before in in_use or not in_use else in_use[0]
        best = np.argmax(np.where(np.isfinite(scores), scores, -np.inf), axis=0) if in_use else None
        for client in np.flatnonzero(checked):
            row[client] = in_use[best[client]]
        verdicts = np.where(checked, 0.0, np.nan)
        copies: list[tuple[int, int]] = []
        shared: int | None = None  # Eager: the slot's one new model, once some client drifted
        for client in np.flatnonzero(checked):
            original = in_use[best[client]]
            newest = float(scores[best[client], client])
            if drifted(self.previous[client], newest, delta):
                verdicts[client] = 1.0
                if eager:
                    if shared is None:
                        shared = self.allocate(slot)
                        if shared >= 0:
                            copies.append((shared, original))
                    new = shared
                else:
                    new = self.allocate(slot)
                    if new >= 0:
                        copies.append((new, original))
                        self.marked_model[client], self.marked_until[client] = new, slot + window
                if new >= 0:
                    row[client] = new
            self.previous[client], self.previous_slot[client] = newest, slot
        return verdicts, copies

    def merge(self, slot: int, in_use: list[int], groups: list[list[int]]) -> list[tuple[int, int, float]]:
        """Fold each group (positions in ``in_use``) into its first model, one by one:
        returns (base, absorbed, the absorbed model's share of the average)."""
        merges = []
        for group in groups:
            base = in_use[group[0]]
            for position in group[1:]:
                second = in_use[position]
                kept, absorbed = self.holds(base), self.holds(second)
                merges.append((base, second, absorbed / (kept + absorbed) if kept + absorbed else 0.0))
                self.assignment[self.assignment == second] = base
                self.marked_model[self.marked_model == second] = base  # an isolated client follows its data
        return merges


def average_pair(base: ArrayRecord, other: ArrayRecord, share: float) -> ArrayRecord:
    """(1 - share) * base + share * other, array by array (integer buffers rounded back)."""
    out = {}
    for key, array in base.items():
        a, b = array.numpy(), other[key].numpy()
        mixed = (1.0 - share) * a.astype(np.float64) + share * b.astype(np.float64)
        mixed = mixed.round() if np.issubdtype(a.dtype, np.integer) else mixed
        out[key] = Array(np.ascontiguousarray(mixed.astype(a.dtype)))
    return ArrayRecord(out)


# -- the client ----------------------------------------------------------------------------------
def goodness(logits: torch.Tensor, y: np.ndarray, measure: str) -> np.ndarray:
    """Per sample: 1 if right else 0 (``accuracy``), or minus the cross-entropy (``loss``)."""
    target = torch.as_tensor(y)
    if measure == "loss":
        return -nn.functional.cross_entropy(logits, target, reduction="none").double().numpy()
    return (logits.argmax(dim=1) == target).double().numpy()


def pooled(data: ClientData, slots: Iterable[int]) -> ClientData:
    """The client's training data of ``slots`` (its current slot's held-out data kept)."""
    parts = [data.at_slot(s) for s in sorted(slots)]
    if len(parts) == 1 and parts[0] is data:
        return data
    x = np.concatenate([p.x_train for p in parts]) if parts else data.x_train[:0]
    y = np.concatenate([p.y_train for p in parts]) if parts else data.y_train[:0]
    return ClientData(
        x,
        y,
        data.x_test,
        data.y_test,
        data.domain_test,
        slot=data.slot,
        concept=data.concept,
        transform=data.transform,
        earlier=data.earlier,
    )


def named(arrays: dict[str, ArrayRecord]) -> list[tuple[int, ArrayRecord]]:
    """The message's models with their global indices, in index order."""
    return sorted((int(name[len(multimodel.PREFIX) :]), record) for name, record in arrays.items())


class FedDriftTrainer(SeveralModelsTrainer):
    """FedDrift's client: scores for the server's decisions, training on its data by cluster."""

    def _score(self, model, record, x, y, measure, device) -> float:
        values = goodness(self.logits_of(model, record, x, device), y, measure)
        return float(values.mean()) if len(values) else 0.0

    def query(self, call: ClientCall) -> QueryResult:
        model, data, device, extra = call.model, call.data, call.device, call.config.extra
        measure = str(extra.get(MEASURE, "accuracy"))
        models = named(call.arrays)
        stage = extra[STAGE]
        if stage == "initial":
            return QueryResult(
                metrics={SCORE: self._score(model, models[0][1], data.x_train, data.y_train, measure, device)}
            )
        if stage == "scores":
            scores = [self._score(model, record, data.x_train, data.y_train, measure, device) for _, record in models]
            metrics: dict = {SCORES: scores}
            if int(extra.get(CHECK, 0)):
                from_slot = int(extra[DRIFT_FROM_SLOT])
                if REFERENCE in extra:  # the first check against the slot-0 model after slot 0
                    before = data.at_slot(from_slot)
                    record = dict(models)[int(extra[REFERENCE])]
                    previous = self._score(model, record, before.x_train, before.y_train, measure, device)
                else:
                    previous = float(extra[PREVIOUS])
                verdict = drifted(previous, max(scores), float(extra[DELTA]))
                metrics.update({PREVIOUS: previous, DRIFT_FROM_SLOT: float(from_slot), REAL_DRIFT: float(verdict)})
            return QueryResult(metrics=metrics)
        # "distances": this client's share of every model's score on every cluster's data
        assignment = list(extra[ASSIGNMENT])
        sums = np.zeros((len(models), len(models)))
        counts = np.zeros(len(models))
        for j, (index, _) in enumerate(models):
            slots = [s for s, held in enumerate(assignment) if held == index]
            if not slots:
                continue
            cluster = pooled(data, slots)
            counts[j] = cluster.num_train
            for i, (_, record) in enumerate(models):
                sums[i, j] = goodness(
                    self.logits_of(model, record, cluster.x_train, device), cluster.y_train, measure
                ).sum()
        return QueryResult(metrics={SUMS: sums.ravel().tolist(), COUNTS: counts.tolist()})

    def train(self, call: ClientCall) -> TrainResult:
        """Each model sent, trained on the client's data of the slots it holds; the reply
        weights each by those samples (``weight-k``, for the models trained only)."""
        assignment = list(call.config.extra[ASSIGNMENT])
        replies, weights, losses = {}, {}, []
        for index, record in named(call.arrays):
            slots = [s for s, held in enumerate(assignment) if held == index]
            data = pooled(call.data, slots)
            trained, metrics = self.train_one(call.model, record, data, call.config, call.generator, call.device)
            replies[multimodel.model_name(index)] = trained
            weights[weight_key(index)] = float(data.num_train)
            losses.append(metrics["train_loss"])
        metrics = {
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "cluster": float(assignment[-1]),
            **weights,
        }
        return TrainResult(replies, metrics, call.state)

    def fit(self, model, data, config, generator, device) -> dict[str, float]:
        """FedAvg's local epochs, or (``local_steps`` > 0) the code's local steps: each
        one SGD step on a random batch of the client's data."""
        steps = int(config.extra.get(LOCAL_STEPS, 0))
        if steps <= 0:
            return super().fit(model, data, config, generator, device)
        x = torch.as_tensor(data.x_train).to(device)
        y = torch.as_tensor(data.y_train).to(device)
        optimizer = self.make_optimizer(model, config)
        model.train()
        total = 0.0
        for _ in range(steps):
            index = torch.randperm(len(y), generator=generator)[: config.batch_size].to(device)
            optimizer.zero_grad()
            loss = self.batch_loss(model, x[index], y[index])
            loss.backward()
            self.before_step(model, config)
            optimizer.step()
            total += float(loss.detach())
        return {"train_loss": total / steps}

    def predict(self, call: ClientCall) -> torch.Tensor:
        """The model holding the client's data of this slot: the one the server sent."""
        models = named(call.arrays)
        current = int(list(call.config.extra.get(ASSIGNMENT, [models[0][0]]))[-1])
        record = dict(models).get(current, models[0][1])
        return self.logits_of(call.model, record, call.data.x_test, call.device)


# -- the server ----------------------------------------------------------------------------------
class _Drift(FedAvg):
    """The server half both variants share (see the module docstring): a FedAvg whose
    global arrays pack the models that hold data (:mod:`fedsim.multimodel`)."""

    client_trainer = FedDriftTrainer
    personalized = True  # each client predicts with the model holding its data
    eager = False

    def _setup(
        self,
        delta: float,
        max_models: int,
        measure: str,
        first_reference: str,
        local_steps: int,
        window: int = 1,
        delta_merge: float = 0.0,
        linkage: str = "complete",
        start: str = "shared",
    ) -> None:
        self.delta = check_number("delta", delta, at_least=0)
        self.max_models = check_integer("max_models", max_models, minimum=0)
        check(max_models != 1, "max_models must be 0 (as many as clients) or >= 2: one model cannot react to drift")
        self.measure = check_choice("measure", measure, ("accuracy", "loss"))
        self.first_reference = check_choice("first_reference", first_reference, ("initial", "trained"))
        self.local_steps = check_integer("local_steps", local_steps, minimum=0)
        self.window = check_integer("window", window, minimum=1)
        self.delta_merge = check_number("delta_merge", delta_merge, at_least=0) or self.delta
        self.linkage = check_choice("linkage", linkage, ("complete", "average"))
        self.start = check_choice("start", start, ("local", "shared"))
        self.clustering: Clustering | None = None
        self.slot = -1  # the slot whose start has been decided
        self._index: dict[int, int] = {}  # node id -> client (position in client-id order)
        self._stage = "done"
        self._in_use: list[int] = []
        self._edited: tuple[int, dict[int, ArrayRecord]] | None = None  # (round, models) after this round's decisions

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"slot": self.slot}
        if self.clustering is not None:
            state.update({f"clustering/{key}": value for key, value in self.clustering.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.slot = int(state["slot"])
        prefix = "clustering/"
        inner = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        self.clustering = Clustering.from_state(inner) if inner else None

    # -- models --------------------------------------------------------------------------------
    def initial_arrays(self, new_model) -> ArrayRecord:
        """One model; every other model is a copy (the code initialises them all alike)."""
        return multimodel.pack({multimodel.model_name(0): new_model(0)})

    def _models_of(self, arrays: ArrayRecord) -> dict[int, ArrayRecord]:
        """The packed models by index; a single model's arrays are a mistake, said plainly."""
        if not multimodel.is_packed(arrays):
            raise ValueError(
                f"{type(self).__name__} keeps its models packed in one ArrayRecord (fedsim.multimodel.pack); "
                "start it from initial_arrays(new_model), not from one model's arrays"
            )
        return dict(named(multimodel.unpack(arrays)))

    def _current(self, server_round: int, arrays: ArrayRecord) -> dict[int, ArrayRecord]:
        if self._edited is not None and self._edited[0] == server_round:
            return self._edited[1]
        return self._models_of(arrays)

    def _held(self, models: dict[int, ArrayRecord]) -> dict[int, ArrayRecord]:
        """The models that hold data (the others are never read again before a copy)."""
        held = {int(m) for m in np.unique(self.clustering.assignment) if m >= 0}
        return {index: record for index, record in sorted(models.items()) if index in held}

    def _held_now(self) -> set[int]:
        """The models holding data of the current slot."""
        return {int(m) for m in self.clustering.assignment[self.slot] if m >= 0}

    # -- queries: the start of a slot ------------------------------------------------------------
    def configure_query(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        nodes = list(grid.get_node_ids())
        self._index = {node: position for position, node in enumerate(nodes)}
        slot = int(config.get(TIME_SLOT, 0))
        models = self._current(server_round, arrays)
        if slot != self.slot:
            self.slot = slot
            if self.clustering is None:
                self._start(len(nodes), models, server_round)
                models = self._edited[1]
                self._stage = "initial" if self.first_reference == "initial" else "done"
            else:
                self.clustering.begin(slot)
                self._in_use = self.clustering.in_use(slot, isolate=not self.eager)
                self._edited = (server_round, models)
                self._stage = "scores"
        if self._stage == "done":
            return []
        clustering = self.clustering
        messages = []
        for node in nodes:
            client = self._index[node]
            extra: dict = {STAGE: self._stage, MEASURE: self.measure}
            if self._stage == "initial":
                sent = {int(clustering.assignment[0, client])}
            else:
                sent = set(self._in_use)
            if self._stage == "scores" and clustering.marked_model[client] < 0:
                extra.update({CHECK: 1, DELTA: self.delta, DRIFT_FROM_SLOT: int(clustering.previous_slot[client])})
                reference = int(clustering.assignment[clustering.previous_slot[client], client])
                if math.isfinite(clustering.previous[client]):
                    extra[PREVIOUS] = float(clustering.previous[client])
                elif reference in self._in_use:
                    extra[REFERENCE] = reference
                else:  # no score to compare with (a fault, then its model went): no check
                    del extra[CHECK], extra[DELTA], extra[DRIFT_FROM_SLOT]
            if self._stage == "distances":
                extra[ASSIGNMENT] = clustering.assignment[:, client].tolist()
            content = RecordDict(
                {
                    **{multimodel.model_name(k): models[k] for k in sorted(sent)},
                    self.configrecord_key: ConfigRecord({**config, **extra}),
                }
            )
            messages.append(Message(content=content, message_type=MessageType.QUERY, dst_node_id=node))
        return messages

    def _start(self, clients: int, models: dict[int, ArrayRecord], server_round: int) -> None:
        capacity = self.max_models or clients
        check(
            self.start != "local" or capacity >= clients,
            f"the local start gives each of the {clients} clients a model of its own: "
            f"max_models must be 0 or >= {clients}, got {self.max_models}",
        )
        self.clustering = Clustering(clients, capacity, self.start)
        first = models[0]
        start = {int(k): first for k in np.unique(self.clustering.assignment[0])}
        self._edited = (server_round, start)

    def aggregate_query(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        replies = [reply for reply in replies if not reply.has_error()]
        metrics = {self._index[reply.metadata.src_node_id]: reply.content["metrics"] for reply in replies}
        clustering = self.clustering
        stage, self._stage = self._stage, "done"
        if stage == "initial":
            for client, values in metrics.items():
                clustering.previous[client] = float(values[SCORE])
            scored = clustering.previous[np.isfinite(clustering.previous)]
            return MetricRecord({"initial-score": float(scored.mean()) if len(scored) else float("nan")})
        models = self._edited[1]
        if stage == "scores":
            scores = np.full((len(self._in_use), clustering.clients), np.nan)
            for client, values in metrics.items():
                scores[:, client] = np.asarray(values[SCORES], np.float64)
                if PREVIOUS in values:
                    clustering.previous[client] = float(values[PREVIOUS])
            verdicts, copies = clustering.decide(
                self.slot, self._in_use, scores, self.delta, eager=self.eager, window=self.window
            )
            for new, original in copies:
                models[new] = models[original]
            self._edited = (server_round, self._held(models))
            if not self.eager and len(self._in_use) > 1:
                self._stage = "distances"
            return MetricRecord(
                {
                    "drift-detected": float(np.nansum(verdicts)),
                    "clients-checked": float(np.isfinite(verdicts).sum()),
                    "new-models": float(len(copies)),
                    "models": float(len(self._held_now())),
                }
            )
        n = len(self._in_use)
        sums, counts = np.zeros((n, n)), np.zeros(n)
        for values in metrics.values():
            sums += np.asarray(values[SUMS], np.float64).reshape(n, n)
            counts += np.asarray(values[COUNTS], np.float64)
        groups = merge_groups(sums, counts, self.delta_merge, self.linkage)
        merges = clustering.merge(self.slot, self._in_use, groups)
        for base, second, share in merges:
            models[base] = average_pair(models[base], models[second], share)
        self._edited = (server_round, self._held(models))
        return MetricRecord({"merges": float(len(merges)), "models-after-merges": float(len(self._held_now()))})

    # -- training and evaluation --------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        models = self._current(server_round, arrays)
        self._edited = (server_round, models)
        self._index = {node: position for position, node in enumerate(grid.get_node_ids())}
        if self.local_steps:
            config[LOCAL_STEPS] = self.local_steps
        messages = super().configure_train(server_round, self._pack(models), config, grid)
        return self._with_models(messages, models, train=True)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        models = self._models_of(arrays)
        self._index = {node: position for position, node in enumerate(grid.get_node_ids())}
        return self._with_models(super().configure_evaluate(server_round, arrays, config, grid), models, train=False)

    @staticmethod
    def _pack(models: dict[int, ArrayRecord]) -> ArrayRecord:
        return multimodel.pack({multimodel.model_name(k): record for k, record in sorted(models.items())})

    def _with_models(self, messages: Iterable[Message], models: dict[int, ArrayRecord], train: bool) -> list[Message]:
        """Each node gets the models it trains (train) or predicts with (evaluate), and the
        models holding its data of every slot so far."""
        assignment = self.clustering.assignment[: self.slot + 1]
        active = {int(m) for m in assignment[self.slot] if m >= 0}
        out = []
        for message in messages:
            client = self._index[message.metadata.dst_node_id]
            row = assignment[:, client]
            config = ConfigRecord({**message.content[self.configrecord_key], ASSIGNMENT: row.tolist()})
            if train:
                sent = sorted(active & {int(m) for m in row if m >= 0})
            else:  # the model holding its data of this slot
                sent = [int(row[-1]) if row[-1] in models else min(models)]
            content = RecordDict({**{multimodel.model_name(k): models[k] for k in sent}, self.configrecord_key: config})
            out.append(Message(content=content, metadata=message.metadata))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = [reply for reply in replies if not reply.has_error()]
        if self._edited is None:  # no configure_train before: nothing of ours to aggregate
            return None, None
        models = dict(self._edited[1])
        for index, previous in models.items():
            name = multimodel.model_name(index)
            contributions = [
                RecordDict({name: reply.content[name], "w": MetricRecord({"w": weight})})
                for reply in replies
                if name in reply.content.array_records
                and (weight := float(reply.content["metrics"].get(weight_key(index), 0.0))) > 0
            ]
            models[index] = aggregate_arrayrecords(contributions, "w") if contributions else previous
        self._edited = None
        return self._pack(models), (average_numbers(replies) if replies else None)


class FedDrift(_Drift):
    """FedDrift (Jothimurugesan et al., 2023): local drift detection, a new isolated
    cluster per drifted client, hierarchical merging of clusters (module docstring).

    Parameters beyond Flower's FedAvg: ``delta`` (0.06: the README's ``H_A_F_1_06_0``),
    ``delta_merge`` (0: ``delta``), ``max_models`` (0: as many as clients), ``window`` (slots
    a new cluster stays isolated, 1), ``start`` ("local" or "shared"), ``linkage``
    ("complete" or "average"), ``measure`` ("accuracy" or "loss"), ``first_reference``
    ("initial" or "trained"), ``local_steps`` (0: ``[client] local_epochs``).
    """

    def __init__(
        self,
        delta: float = 0.06,
        delta_merge: float = 0.0,
        max_models: int = 0,
        window: int = 1,
        start: Literal["local", "shared"] = "local",
        linkage: Literal["complete", "average"] = "complete",
        measure: Literal["accuracy", "loss"] = "accuracy",
        first_reference: Literal["initial", "trained"] = "initial",
        local_steps: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._setup(delta, max_models, measure, first_reference, local_steps, window, delta_merge, linkage, start)


class FedDriftEager(_Drift):
    """FedDrift-Eager (Jothimurugesan et al., 2023): local drift detection, one new cluster
    for all the clients that drift in a slot, no merging (module docstring).

    Parameters beyond Flower's FedAvg: ``delta`` (0.06: the README's ``mmacc_06``),
    ``max_models`` (0: as many as clients), ``measure``, ``first_reference``, ``local_steps``.
    """

    eager = True

    def __init__(
        self,
        delta: float = 0.06,
        max_models: int = 0,
        measure: Literal["accuracy", "loss"] = "accuracy",
        first_reference: Literal["initial", "trained"] = "initial",
        local_steps: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._setup(delta, max_models, measure, first_reference, local_steps)
