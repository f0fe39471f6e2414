"""FedCCFA (Chen et al., NeurIPS 2024): classifier clustering and feature alignment under
distributed concept drift.

Read from the authors' code, github.com/wenwenwenwenti/FedCCFA at commit
647d8b097509e05278b7a68f116d2e84e106c72c (``entities/FedCCFA.py``, ``methods/FedCCFA.py``,
``configs/FedCCFA.yaml``, ``utils/drift.py``), for facts only.

The model splits into a shared feature extractor (every entry but the linear ``head``) and a
classifier (``head.weight``, ``head.bias``) of each client's own. A round, for each sampled
client:

1. It loads the global feature extractor and the server's classifier, which the server never
   updates (every round starts from the initial one, as in the code).
2. **Balanced classifier.** With the extractor frozen, it trains that classifier for
   ``balanced_epochs`` (lr ``balanced_lr``) on a class-balanced subset of its data:
   m = min(``balanced_samples``, its smallest class count) samples of each class it holds.
   The result is only used for clustering.
3. It takes its own classifier (its cluster's rows from the last round it trained; on its
   first round it keeps the one it has: the balanced one, or the server's without balanced
   training) and trains it for ``classifier_epochs`` (lr ``classifier_lr``) on all its
   data, extractor frozen.
4. With the classifier frozen, it trains the extractor for ``[client] local_epochs`` at
   ``[client] lr`` on cross-entropy + w * alignment, from round ``align_from_round`` on and
   once it has prototypes to align to. ``alignment = "contrastive"``: cross-entropy of
   cos(f(x), P_c) / ``temperature`` over the classes c, with the label as target;
   ``"l2"``: mean squared error between f(x) and P_y. w = H(y) / ``gamma``, the entropy of
   its label distribution (``gamma = 0``: w = ``alignment_weight``).
5. It sends the trained model, the balanced classifier (the trained one without balanced
   training), its local prototypes (the mean feature of each class it holds, after
   training) and its label counts.

The server averages the feature extractor over the sampled clients, weighted by examples.
For each class c it compares the clients' balanced classifier rows (weight row and bias,
concatenated) by MADD: d(i, j) = mean over the other clients z of
|cos(v_i, v_z) - cos(v_j, v_z)|, and clusters them with DBSCAN (``eps``, min_samples = 1,
the distances precomputed). In every cluster of two or more clients, row c of their
trained classifiers is averaged (``weighting = "uniform"``, or by their counts of class c
with ``"labels"``) and so are their class-c prototypes; each member gets both back: the row
as its classifier's row c, the prototype as its alignment target for c. A client alone in
its cluster keeps its own row and its own prototype. Each client evaluates the current
feature extractor with its own classifier (``personalized``). ``clustered_prototypes =
false`` aligns every client to the mean prototypes of the last round's clients instead.

The code's settings (``configs/FedCCFA.yaml``): eps 0.1, gamma 20, temperature 0.1,
contrastive alignment, uniform weights, balanced training 5 epochs at lr 0.1 (at most 5
samples a class), classifier 1 epoch at lr 0.1, extractor 5 epochs at lr 0.01, SGD with
momentum 0.9 and weight decay 1e-5 in all three, batch 64, 200 rounds, alignment from the
21st round, 100 clients sampled at 20% (or 20, all sampled); drift at round 100
(``partitioners.drift``, preset "fedccfa").

Where fedsim departs from the code, and why:

- The clients' classifiers and alignment targets are kept by the server (in its
  checkpointed state, keyed by client id), which sends each client its own with every train
  and evaluate message: the code's server writes them into its client objects. A client
  that was not sampled in the last round is evaluated with the current feature extractor;
  the code's keeps the extractor of the last round it trained. With every client sampled
  (the code's 20-client runs, fedsim's drift experiments) the two agree.
- With ``weighting = "uniform"`` the code sums prototypes in place into the first sampled
  client's tensors (``aggregate_protos``), so that client's prototypes become the sum over
  all sampled clients: its own alignment targets, and the prototype of any cluster it is
  in, are then computed from that sum. fedsim averages each cluster's own prototypes.
- The code needs every class at every client (its partition gives each 5 samples of
  each): a missing class makes the entropy NaN and its prototype a KeyError. fedsim takes
  0 log 0 = 0, balances over the classes a client holds, averages a cluster's prototype over
  the members that hold the class, falls back to the last round's mean prototype for a
  class for which a client has neither its own nor its cluster's, and leaves a class with
  no prototype at all out of the alignment. It also counts labels afresh every round (the
  code keeps the count of a label a client no longer holds).
- With fewer than three clients in a round MADD is undefined (the code divides by zero);
  fedsim merges nothing that round.
- The extractor's average covers every entry of the state dict but the head, buffers
  included; local prototypes are computed in eval mode. The code's models have neither
  buffers nor dropout, so this changes nothing there.
- ``align_from_round`` is the code's fixed ``_round >= 20``; the ``[client]`` table's
  optimizer, momentum, weight decay and batch size serve all three stages. The code's
  oracle merging and its (commented-out) final fine-tuning are not offered.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn
from torch.nn import functional as F

from fedsim.checks import check_bool, check_choice, check_integer, check_number
from fedsim.trainer import NUM_EXAMPLES, ClientCall, ClientTrainer, RoundConfig, TrainResult
from fedsim.training import batches
from strategies.fedavg import FedAvg

PREFIX = "fedccfa."  # FedCCFA's own arrays inside a message's ArrayRecord
OWN_WEIGHT, OWN_BIAS = PREFIX + "head.weight", PREFIX + "head.bias"  # the client's classifier
BALANCED_WEIGHT, BALANCED_BIAS = PREFIX + "balanced.weight", PREFIX + "balanced.bias"
PROTOTYPES, PRESENT = PREFIX + "prototypes", PREFIX + "prototype-present"
LABEL_COUNTS = PREFIX + "label-counts"
HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"  # a fedsim model's classifier
CONFIG = "fedccfa-"  # prefix of FedCCFA's keys in a train config


# -- the rule's pieces, plain functions ------------------------------------------------------
def entropy_weight(counts: np.ndarray, gamma: float, fixed: float) -> float:
    """The alignment weight: H(label distribution) / gamma, or ``fixed`` when gamma is 0."""
    if gamma == 0:
        return float(fixed)
    p = np.asarray(counts, np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum() / gamma)


def balanced_indices(y: np.ndarray, per_class: int, generator: torch.Generator | None) -> np.ndarray:
    """m = min(per_class, smallest class count) indices of each class present in ``y``."""
    classes, counts = np.unique(y, return_counts=True)
    m = min(int(per_class), int(counts.min()))
    chosen = []
    for c in classes:
        members = np.flatnonzero(y == c)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:m].numpy()])
    return np.concatenate(chosen)


def madd(vectors: np.ndarray) -> np.ndarray:
    """MADD between rows: d(i, j) = mean over z != i, j of |cos(v_i, v_z) - cos(v_j, v_z)|."""
    v = np.asarray(vectors, np.float64)
    n = len(v)
    if n < 3:
        raise ValueError(f"MADD needs at least 3 vectors, got {n}")
    unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.finfo(np.float64).tiny)  # 0 stays 0
    cos = unit @ unit.T
    z = np.arange(n)
    distances = np.zeros((n, n))
    for i in range(n):  # row i: gaps[j, z] = |cos(v_i, v_z) - cos(v_j, v_z)| over z != i, j
        others = (z != i)[None, :] & (z[None, :] != z[:, None])
        distances[i] = (np.abs(cos[i][None, :] - cos) * others).sum(axis=1) / (n - 2)
    distances[z, z] = 0.0
    return distances


def merge_classifiers(rows: np.ndarray, eps: float) -> dict[int, list[list[int]]]:
    """Per class c, the groups (two or more indices) that DBSCAN(eps, min_samples=1) finds
    among the clients' rows ``rows[:, c]`` under MADD. ``rows``: (clients, classes, p)."""
    from sklearn.cluster import DBSCAN  # lazy: scikit-learn loads in about a second

    rows = np.asarray(rows, np.float64)
    merged: dict[int, list[list[int]]] = {}
    for c in range(rows.shape[1]):
        if len(rows) < 3:
            merged[c] = []
            continue
        labels = DBSCAN(eps=eps, min_samples=1, metric="precomputed").fit(madd(rows[:, c])).labels_
        groups = [np.flatnonzero(labels == k).tolist() for k in sorted(set(labels))]
        merged[c] = [group for group in groups if len(group) > 1]
    return merged


def alignment_loss(
    features: torch.Tensor,
    y: torch.Tensor,
    prototypes: torch.Tensor,
    present: torch.Tensor,
    kind: str,
    temperature: float,
) -> torch.Tensor:
    """Contrastive: cross-entropy of cos(f, P_c) / temperature with the label as target;
    "l2": mean squared error between f and P_y. Samples of a class without a prototype are
    left out, and so is such a class as a contrast."""
    rows = present[y]
    if not bool(rows.any()):
        return features.sum() * 0.0
    if not bool(rows.all()):
        features, y = features[rows], y[rows]
    if kind == "l2":
        return F.mse_loss(features, prototypes[y])
    logits = F.cosine_similarity(features.unsqueeze(1), prototypes.unsqueeze(0), dim=2) / temperature
    if not bool(present.all()):
        logits = logits.masked_fill(~present.unsqueeze(0), float("-inf"))
    return F.cross_entropy(logits, y)


# -- the client ----------------------------------------------------------------------------------
class FedCCFATrainer(ClientTrainer):
    """FedCCFA's client: balanced classifier, classifier, then aligned feature extractor."""

    can_vectorize = False  # three stages, each with its own frozen part

    @staticmethod
    def _optimizer(params: list[nn.Parameter], lr: float, config: RoundConfig) -> torch.optim.Optimizer:
        if config.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)

    def stage(
        self,
        model: nn.Module,
        head: bool,
        x: torch.Tensor,
        y: torch.Tensor,
        epochs: int,
        lr: float,
        config: RoundConfig,
        generator: torch.Generator | None,
        align: tuple | None = None,
        weight: float = 0.0,
    ) -> tuple[float, float]:
        """Train the head (``head``) or the feature extractor, the other part frozen, on
        cross-entropy (+ ``weight`` x the alignment loss, ``align`` = its prototypes,
        presence, kind and temperature); the mean loss and alignment loss per sample."""
        trained = [p for name, p in model.named_parameters() if name.startswith("head.") == head]
        frozen = [p for name, p in model.named_parameters() if name.startswith("head.") != head]
        if epochs == 0 or not trained or len(y) == 0:
            return 0.0, 0.0
        flags = [p.requires_grad for p in frozen]
        for p in frozen:
            p.requires_grad_(False)
        optimizer = self._optimizer(trained, lr, config)
        model.train()
        total, aligned, seen = 0.0, 0.0, 0
        try:
            for _ in range(epochs):
                for xb, yb in batches(x, y, config.batch_size, generator):
                    features = model.features(xb)
                    loss = F.cross_entropy(model.head(features), yb)
                    if align is not None:
                        term = alignment_loss(features, yb, *align)
                        aligned += float(term.detach()) * len(yb)
                        loss = loss + weight * term
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(yb)
                    seen += len(yb)
        finally:
            for p, flag in zip(frozen, flags):
                p.requires_grad_(flag)
        return total / max(seen, 1), aligned / max(seen, 1)

    def train(self, call: ClientCall) -> TrainResult:
        model, data, config, generator, device = call.model, call.data, call.config, call.generator, call.device
        extra, arrays = config.extra, call.arrays
        keys = list(arrays.keys())
        self.receive(model, ArrayRecord({key: arrays[key] for key in keys if not key.startswith(PREFIX)}), call.state)
        model.to(device)
        head = model.head
        classes = int(head.out_features)
        labels = np.asarray(data.y_train, np.int64)
        counts = np.bincount(labels, minlength=classes)[:classes]
        x = torch.as_tensor(data.x_train).to(device)
        y = torch.as_tensor(labels).to(device)
        weight = entropy_weight(counts, float(extra[CONFIG + "gamma"]), float(extra[CONFIG + "alignment-weight"]))

        def classifier() -> list[np.ndarray]:
            return [head.weight.detach().cpu().numpy().copy(), head.bias.detach().cpu().numpy().copy()]

        # 1. the balanced classifier, from the server's, for clustering only
        balanced = None
        balanced_epochs = int(extra[CONFIG + "balanced-epochs"])
        if balanced_epochs > 0 and len(labels):
            index = torch.as_tensor(balanced_indices(labels, int(extra[CONFIG + "balanced-samples"]), generator))
            index = index.to(device)
            lr = float(extra[CONFIG + "balanced-lr"])
            self.stage(model, True, x[index], y[index], balanced_epochs, lr, config, generator)
            balanced = classifier()
        # 2. its own classifier (on its first round: the balanced one), trained on all its data
        if OWN_WEIGHT in keys:
            with torch.no_grad():
                head.weight.copy_(torch.as_tensor(arrays[OWN_WEIGHT].numpy()))
                head.bias.copy_(torch.as_tensor(arrays[OWN_BIAS].numpy()))
        epochs, lr = int(extra[CONFIG + "classifier-epochs"]), float(extra[CONFIG + "classifier-lr"])
        self.stage(model, True, x, y, epochs, lr, config, generator)
        # 3. the feature extractor, aligned to its prototypes once it has some
        align = None
        if bool(extra[CONFIG + "align"]) and PROTOTYPES in keys and weight != 0:
            align = (
                torch.as_tensor(arrays[PROTOTYPES].numpy()).to(device),
                torch.as_tensor(arrays[PRESENT].numpy()).to(device).bool(),
                str(extra[CONFIG + "alignment"]),
                float(extra[CONFIG + "temperature"]),
            )
        loss, aligned = self.stage(model, False, x, y, config.local_epochs, config.lr, config, generator, align, weight)
        if balanced is None:
            balanced = classifier()

        reply = {key: Array(value.detach().cpu().numpy()) for key, value in model.state_dict().items()}
        reply[BALANCED_WEIGHT], reply[BALANCED_BIAS] = Array(balanced[0]), Array(balanced[1])
        reply[PROTOTYPES] = Array(local_prototypes(model, x, y, classes))
        reply[LABEL_COUNTS] = Array(counts.astype(np.int64))
        metrics = {"train_loss": loss, "alignment_loss": aligned, "alignment_weight": weight}
        return TrainResult(ArrayRecord(reply), metrics, call.state)


@torch.no_grad()
def local_prototypes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int) -> np.ndarray:
    """Each class's mean feature (zeros for a class not in ``y``), in eval mode: (classes, d)."""
    model.eval()
    out = np.zeros((classes, int(model.head.in_features)), np.float32)
    if len(y) == 0:
        return out
    features = torch.cat([model.features(x[i : i + 1024]) for i in range(0, len(x), 1024)])
    for c in range(classes):
        rows = y == c
        if bool(rows.any()):
            out[c] = features[rows].mean(dim=0).cpu().numpy()
    return out


# -- the server ----------------------------------------------------------------------------------
class FedCCFA(FedAvg):
    """FedCCFA (Chen et al., NeurIPS 2024): see the module docstring.

    Parameters beyond Flower's FedAvg (the code's names in brackets): ``eps`` [eps], the
    DBSCAN radius on MADD; ``balanced_epochs``, ``balanced_lr`` [balanced_epochs,
    balanced_clf_lr] and ``balanced_samples`` (the code's fixed 5 a class);
    ``classifier_epochs``, ``classifier_lr`` [clf_epochs, clf_lr]; ``gamma`` [gamma] and
    ``alignment_weight`` [lambda, used when gamma is 0]; ``alignment``: "contrastive" or
    "l2" [penalize: CL or L2]; ``temperature`` [temperature]; ``align_from_round`` (the
    code: 21); ``weighting``: "uniform" or "labels" [weights]; ``clustered_prototypes``
    [clustered_protos]. The feature extractor trains with the ``[client]`` table's
    ``local_epochs`` and ``lr`` [rep_epochs, rep_lr].
    """

    client_trainer = FedCCFATrainer
    personalized = True  # each client evaluates the shared extractor with its own classifier

    @staticmethod
    def validate_model(model: nn.Module) -> None:
        """FedCCFA splits the model into ``features`` and a linear ``head`` with a bias."""
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear) or head.bias is None or not hasattr(model, "features"):
            raise ValueError("FedCCFA needs a model with `features` and a linear `head` with a bias")

    def __init__(
        self,
        *,
        eps: float = 0.1,
        balanced_epochs: int = 5,
        balanced_lr: float = 0.1,
        balanced_samples: int = 5,
        classifier_epochs: int = 1,
        classifier_lr: float = 0.1,
        gamma: float = 20.0,
        alignment_weight: float = 0.0,
        alignment: Literal["contrastive", "l2"] = "contrastive",
        temperature: float = 0.1,
        align_from_round: int = 21,
        weighting: Literal["uniform", "labels"] = "uniform",
        clustered_prototypes: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.eps = check_number("eps", eps, above=0)
        self.balanced_epochs = check_integer("balanced_epochs", balanced_epochs, minimum=0)
        self.balanced_lr = check_number("balanced_lr", balanced_lr, above=0)
        self.balanced_samples = check_integer("balanced_samples", balanced_samples, minimum=1)
        self.classifier_epochs = check_integer("classifier_epochs", classifier_epochs, minimum=0)
        self.classifier_lr = check_number("classifier_lr", classifier_lr, above=0)
        self.gamma = check_number("gamma", gamma, at_least=0)
        self.alignment_weight = check_number("alignment_weight", alignment_weight, at_least=0)
        self.alignment = check_choice("alignment", alignment, ("contrastive", "l2"))
        self.temperature = check_number("temperature", temperature, above=0)
        self.align_from_round = check_integer("align_from_round", align_from_round, minimum=1)
        self.weighting = check_choice("weighting", weighting, ("uniform", "labels"))
        self.clustered_prototypes = check_bool("clustered_prototypes", clustered_prototypes)
        self.reset_state()

    def reset_state(self) -> None:
        self.heads: dict[int, np.ndarray] = {}  # client -> its classifier, (classes, d + 1): weight | bias
        self.targets: dict[int, np.ndarray] = {}  # client -> its alignment prototypes, (classes, d)
        self.present: dict[int, np.ndarray] = {}  # client -> which of them it has, (classes,)
        self.mean_prototypes: np.ndarray | None = None  # the last round's mean prototype of each class
        self.mean_present: np.ndarray | None = None
        self.clusters: dict[str, list[list[int]]] = {}  # the last round's merged clients, by class
        self.node_clients: dict[int, int] = {}
        self.sent: ArrayRecord | None = None  # the global arrays of the round's train messages

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "heads": ArrayRecord({str(k): Array(v) for k, v in sorted(self.heads.items())}),
            "targets": ArrayRecord({str(k): Array(v) for k, v in sorted(self.targets.items())}),
            "present": ArrayRecord({str(k): Array(v) for k, v in sorted(self.present.items())}),
            "clusters": self.clusters,
            "node_clients": {str(node): client for node, client in self.node_clients.items()},
        }
        if self.mean_prototypes is not None:
            state["mean_prototypes"], state["mean_present"] = self.mean_prototypes, self.mean_present
        return state

    def load_state_dict(self, state: dict) -> None:
        self.reset_state()
        for name in ("heads", "targets", "present"):
            record = state.get(name) or ArrayRecord()
            setattr(self, name, {int(key): record[key].numpy() for key in record.keys()})
        self.clusters = {str(k): [list(map(int, g)) for g in v] for k, v in state.get("clusters", {}).items()}
        self.node_clients = {int(node): int(client) for node, client in state.get("node_clients", {}).items()}
        if state.get("mean_prototypes") is not None:
            self.mean_prototypes = np.asarray(state["mean_prototypes"])
            self.mean_present = np.asarray(state["mean_present"]).astype(bool)

    # -- messages ----------------------------------------------------------------------------------
    def _client(self, node: int, grid: Grid) -> int:
        """The client a node is: fedsim's grid knows (``clients``); any other, the node id."""
        client = int(getattr(grid, "clients", {}).get(node, node))
        self.node_clients[node] = client
        return client

    def _config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        settings = {
            "balanced-epochs": self.balanced_epochs,
            "balanced-lr": self.balanced_lr,
            "balanced-samples": self.balanced_samples,
            "classifier-epochs": self.classifier_epochs,
            "classifier-lr": self.classifier_lr,
            "gamma": self.gamma,
            "alignment-weight": self.alignment_weight,
            "alignment": self.alignment,
            "temperature": self.temperature,
            "align": server_round >= self.align_from_round,
        }
        return ConfigRecord({**config, **{CONFIG + key: value for key, value in settings.items()}})

    def _alignment_targets(self, client: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The prototypes ``client`` aligns to, and which classes have one; None before it has any."""
        mean = self.mean_prototypes
        if not self.clustered_prototypes:
            return None if mean is None else (mean, self.mean_present)
        if client not in self.targets:
            return None
        prototypes, present = self.targets[client].copy(), self.present[client].copy()
        if mean is not None:  # a class it has no prototype for: the last round's mean
            missing = ~present & self.mean_present
            prototypes[missing], present[missing] = mean[missing], True
        return prototypes, present

    def _train_arrays(self, arrays: ArrayRecord, client: int) -> ArrayRecord:
        out = dict(arrays.items())
        if client in self.heads:
            head = self.heads[client]
            out[OWN_WEIGHT], out[OWN_BIAS] = Array(np.ascontiguousarray(head[:, :-1])), Array(head[:, -1].copy())
        targets = self._alignment_targets(client)
        if targets is not None:
            out[PROTOTYPES], out[PRESENT] = Array(targets[0]), Array(targets[1].astype(np.float32))
        return ArrayRecord(out)

    def _evaluate_arrays(self, arrays: ArrayRecord, client: int) -> ArrayRecord:
        if client not in self.heads:
            return arrays
        head = self.heads[client]
        own = {HEAD_WEIGHT: Array(np.ascontiguousarray(head[:, :-1])), HEAD_BIAS: Array(head[:, -1].copy())}
        return ArrayRecord({key: own.get(key, value) for key, value in arrays.items()})

    def _per_client(self, messages: Iterable[Message], grid: Grid, arrays_for) -> list[Message]:
        out = []
        for message in messages:
            client = self._client(message.metadata.dst_node_id, grid)
            content = RecordDict(
                {
                    self.arrayrecord_key: arrays_for(client),
                    self.configrecord_key: message.content[self.configrecord_key],
                }
            )
            out.append(Message(content=content, metadata=message.metadata))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        messages = super().configure_train(server_round, arrays, self._config(server_round, config), grid)
        return self._per_client(messages, grid, lambda client: self._train_arrays(arrays, client))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._per_client(messages, grid, lambda client: self._evaluate_arrays(arrays, client))

    # -- aggregation -------------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid or self.sent is None:
            return None, None
        records = [next(iter(reply.content.array_records.values())) for reply in valid]
        if BALANCED_WEIGHT not in records[0]:
            raise ValueError(
                f"FedCCFA: the reply of node {valid[0].metadata.src_node_id} carries no balanced classifier "
                f"({BALANCED_WEIGHT}); its ClientApp does not run FedCCFA's client (strategies.fedccfa.FedCCFATrainer)"
            )
        clients = [self.node_clients.get(r.metadata.src_node_id, r.metadata.src_node_id) for r in valid]
        examples = [float(reply.content["metrics"][NUM_EXAMPLES]) for reply in valid]

        # the feature extractor: averaged over every client, by examples
        shared = [key for key in self.sent.keys() if key not in (HEAD_WEIGHT, HEAD_BIAS)]
        averaged = aggregate_arrayrecords(
            [
                RecordDict({"a": ArrayRecord({k: record[k] for k in shared}), "w": MetricRecord({"w": n})})
                for record, n in zip(records, examples)
            ],
            "w",
        )
        arrays = ArrayRecord({key: averaged[key] if key in shared else self.sent[key] for key in self.sent.keys()})

        def rows(weight: str, bias: str) -> np.ndarray:
            return np.stack([np.concatenate([r[weight].numpy(), r[bias].numpy()[:, None]], axis=1) for r in records])

        trained, balanced = rows(HEAD_WEIGHT, HEAD_BIAS), rows(BALANCED_WEIGHT, BALANCED_BIAS)
        prototypes = np.stack([r[PROTOTYPES].numpy() for r in records])
        counts = np.stack([r[LABEL_COUNTS].numpy() for r in records]).astype(np.float64)
        holds = counts > 0
        merged = merge_classifiers(balanced, self.eps)

        heads, targets, present = trained.copy(), prototypes.copy(), holds.copy()
        for c, groups in merged.items():
            for group in groups:
                heads[group, c] = self._average(trained[group, c], counts[group, c], np.ones(len(group), bool))
                if holds[group, c].any():
                    targets[group, c] = self._average(prototypes[group, c], counts[group, c], holds[group, c])
                    present[group, c] = True
        for k, client in enumerate(clients):
            self.heads[client] = heads[k].astype(trained.dtype)
            self.targets[client], self.present[client] = targets[k].astype(prototypes.dtype), present[k]
        # every class's mean prototype over this round's clients (clustered_prototypes = false,
        # and a class a client has no prototype for)
        self.mean_present = holds.any(axis=0)
        self.mean_prototypes = np.stack(
            [
                self._average(prototypes[:, c], counts[:, c], holds[:, c])
                if self.mean_present[c]
                else np.zeros(prototypes.shape[2])
                for c in range(prototypes.shape[1])
            ]
        ).astype(prototypes.dtype)
        self.clusters = {str(c): [[clients[k] for k in group] for group in groups] for c, groups in merged.items()}

        metrics = self.train_metrics_aggr_fn([reply.content for reply in valid], self.weighted_by_key)
        singles = [len(clients) - sum(len(g) for g in groups) for groups in merged.values()]
        metrics["clusters-per-class"] = float(np.mean([len(g) + s for g, s in zip(merged.values(), singles)]))
        return arrays, metrics

    def _average(self, values: np.ndarray, counts: np.ndarray, holds: np.ndarray) -> np.ndarray:
        """The mean of ``values`` (one row per client) over the clients that ``holds``:
        uniform, or weighted by ``counts`` (``weighting = "labels"``; uniform if all are 0)."""
        weights = holds.astype(np.float64)
        if self.weighting == "labels" and (counts * weights).sum() > 0:
            weights = counts * weights
        return (weights[:, None] * values.astype(np.float64)).sum(axis=0) / weights.sum()
