"""FLTrust (Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy
from torch.nn import functional as F

from fedsim.checks import check, check_callable, check_integer, check_number, check_positive
from fedsim.seeding import derive_seed, torch_generator
from fedsim.training import batches
from strategies.defences.base import Aggregate, Defence, ServerResources, Updates

ROOT_SET_SIZE = 100  # the paper's root set, drawn from the training data

RootUpdate = Callable[[ArrayRecord, int], ArrayRecord]
"""(global arrays, server round) -> the arrays after training a copy of the global model
on the server's root set."""


class FLTrust(Defence):
    """FLTrust (Cao et al., NDSS 2021): trust each update by its agreement with the server's.

    The server trains a copy of the global model on a small clean root set
    (``root_update``) to get its own update g0. Client i's trust score is
    TS_i = ReLU(cos(g_i, g0)); its update is rescaled to ||g0||; the aggregate is
    sum_i TS_i * (||g0|| / ||g_i||) g_i / sum_i TS_i. A client with TS_i = 0 is rejected;
    when every score is 0 the global model stays as it was. ``root_update`` has no
    default: build one with :func:`root_trainer` (the paper's root set is 100 examples,
    trained with the clients' learning rate and local iterations). ``last_trust`` holds the
    last round's scores by node id. Example counts play no part, as in the paper.

    This is the rule of the authors' MXNet code (``fltrust`` in ``nd_aggregation.py``, as
    copied into public repositories). It aggregates gradients and steps the model by -lr
    times the result; the rule is odd and positively homogeneous in (g_1, ..., g_n, g0)
    together, so aggregating model deltas (the clients' learning rate already in them) and
    adding the result is the same step.
    Where every score is 0 the authors' code, too, leaves the model as it was (FLPoison's
    port averages the rescaled updates uniformly instead). One departure: the authors' code
    adds 1e-9 to every norm and to the sum of the scores, which moves its result by about
    1e-9 / ||g|| relative to the formula: nothing for ordinary updates, tens of percent for
    updates of norm near 1e-9. Here zero norms are handled explicitly instead (a zero
    update, or a zero server update, gets score 0), so the aggregate scales exactly with
    the updates.
    """

    name = "fltrust"
    needs = ("root_update",)

    @classmethod
    def from_server(cls, server: ServerResources) -> dict[str, Any]:
        """The server's root set: the paper's 100 examples, drawn with the seed from the
        training data, trained as an average client trains (its learning rate, momentum,
        weight decay and batch size, and its local iterations: the paper's server takes
        as many as a client)."""
        dataset, client = server.dataset, server.client
        if not hasattr(dataset, "y_train"):  # a lazy population holds no training set
            raise ValueError(
                "fltrust draws its root set from the training set, which a lazy population never holds; "
                "set [dataset] lazy = false or choose another defence"
            )
        rng = np.random.default_rng(derive_seed(server.seed, "root-set"))
        root = rng.choice(len(dataset.y_train), min(ROOT_SET_SIZE, len(dataset.y_train)), replace=False)
        per_client = len(dataset.y_train) * (1 - client.local_test_fraction) / max(server.num_clients, 1)
        batches_per_epoch = math.ceil(per_client / client.batch_size)
        root_update = root_trainer(
            server.new_model,
            dataset.x_train[root],
            dataset.y_train[root],
            lr=client.lr,
            epochs=client.local_epochs,
            batch_size=client.batch_size,
            momentum=client.momentum,
            weight_decay=client.weight_decay,
            seed=server.seed,
            steps=client.local_epochs * batches_per_epoch,
        )
        return {"root_update": root_update}

    def __init__(self, strategy: Strategy, *, root_update: RootUpdate, **kwargs) -> None:
        super().__init__(strategy, **kwargs)
        check_callable(
            "root_update",
            root_update,
            "a callable (global arrays, server round) -> arrays trained on the root set "
            "(strategies.defences.fltrust.root_trainer builds one)",
        )
        self.root_update = root_update
        self.last_trust: dict[int, float] = {}

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        server = updates.vector_of(self.root_update(self.global_arrays, server_round)) - updates.global_vector
        server_norm = float(np.linalg.norm(server))
        norms = np.linalg.norm(updates.vectors, axis=1)
        # a zero update (or a zero server update) has no direction: score 0, where the
        # authors' code reaches 0 by adding 1e-9 to each norm
        usable = (norms > 0) & (server_norm > 0)
        safe = np.where(usable, norms, 1.0)
        cosine = np.where(usable, updates.vectors @ server / (safe * (server_norm or 1.0)), 0.0)
        trust = np.maximum(cosine, 0.0)
        self.last_trust = {node: float(score) for node, score in zip(updates.node_ids, trust, strict=True)}
        if trust.sum() <= 0:
            return Aggregate(np.zeros(updates.vectors.shape[1]), [])
        rescaled = updates.vectors * np.where(usable, server_norm / safe, 0.0)[:, None]
        return Aggregate(trust @ rescaled / trust.sum(), [int(i) for i in np.flatnonzero(trust > 0)])


def root_trainer(
    model_fn: Callable[[], Any],
    x: np.ndarray,
    y: np.ndarray,
    *,
    lr: float = 0.01,
    epochs: int = 1,
    batch_size: int = 32,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    steps: int | None = None,
) -> RootUpdate:
    """A :data:`RootUpdate`: SGD with cross-entropy on the root set (``x``, ``y``) from the
    global arrays, ``epochs`` passes in shuffled batches, or with ``steps`` exactly that many
    SGD steps, reshuffling after each pass (FLTrust's server takes as many local iterations
    as a client: a 100-example root set is two batches of 64). ``model_fn()`` builds a fresh
    torch model; keys the global arrays lack (FedBN's BatchNorm) keep its initial values.
    Shuffling and any dropout are seeded by (``seed``, round) without touching torch's
    global generator."""
    check_callable("model_fn", model_fn)
    check(len(x) == len(y), f"x and y must have the same length, got {len(x)} and {len(y)}")
    check(len(y) >= 1, "the root set (x, y) must hold at least one example")
    check_positive("lr", lr)
    check_integer("epochs", epochs, minimum=1)
    if steps is not None:
        check_integer("steps", steps, minimum=1)
    check_integer("batch_size", batch_size, minimum=1)
    check_number("momentum", momentum, at_least=0, below=1)
    check_number("weight_decay", weight_decay, at_least=0)
    x_root = torch.as_tensor(np.asarray(x, np.float32))
    y_root = torch.as_tensor(np.asarray(y), dtype=torch.long)

    def train(arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        round_seed = derive_seed(seed, "fltrust-root", server_round)
        where = torch.device(device)
        with torch.random.fork_rng(devices=[where.index or 0] if where.type == "cuda" else []):
            torch.manual_seed(round_seed)
            model = model_fn()
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            model.to(where).train()
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
            generator = torch_generator(round_seed)
            xs, ys = x_root.to(where), y_root.to(where)
            taken, passes = 0, 0
            while (taken < steps) if steps is not None else (passes < epochs):
                passes += 1
                for xb, yb in batches(xs, ys, batch_size, generator):
                    if steps is not None and taken == steps:
                        break
                    optimizer.zero_grad()
                    F.cross_entropy(model(xb), yb).backward()
                    optimizer.step()
                    taken += 1
        return ArrayRecord({key: value.detach().cpu() for key, value in model.state_dict().items()})

    return train
