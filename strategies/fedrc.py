"""FedRC (Guo, Tang & Lin, "FedRC: Tackling Diverse Distribution Shifts Challenge in
Federated Learning by Robust Clustering", ICML 2024): FedEM's soft clustering made robust
to label and feature shift, so that clients are split by concept (P(y|x)) only.

Read: LINs-lab/FedRC at commit ce792292655688c99206d4b5f126ec63934d1b1a (``client.py``
classes Client and FedRC; ``learners/learners_ensemble.py``; ``learners/learner.py``;
``aggregator.py`` CentralizedAggregator, the aggregator of method ``fedrc`` in
``utils/constants.py``; ``run_experiment.py``, the label marginals after every round;
``utils/utils.py``; ``utils/optim.py``; ``utils/args.py``; ``README.md``).

FedRC is :mod:`strategies.fedem` with one more term. Every round, each sampled client:

1. **E-step**: ``w_ij = softmax_j(log pi_j - loss_j(x_i, y_i) - log P_j(y_i))``, where
   P_j(y) is model j's label marginal, estimated by the server: a sample is credited to
   a model for predicting its label well *beyond* how common that label is under the
   model, so that clients that differ only in their label mix (or inputs) stay together;
2. ``pi_j = mean_i w_ij``, kept in the client's state for the whole run (uniform at first);
   it reports its soft label counts ``sum_{i: y_i = c} w_ij`` (K x C);
3. **M-step**: every model with ``pi_j > 0`` trained on ``sum_i w_ij * CE_j / batch size``
   from the global weights; a model of weight 0 is not trained, and its unchanged copy is
   sent back and averaged all the same (the code's ``fit_epochs`` and aggregator).

The server averages each model over the sampled clients by their training examples
(``aggregation = "samples"``, the code's CentralizedAggregator) or by their total weight on
it (``"soft"``), and after every round sets P_j(y) from the latest soft label counts of
every client heard from so far: summed, floored at 1e-8, normalised per model (the code's
``run_experiment.py``); it sends them with the next train config. Before the first counts
P is uniform, a constant in the E-step (the code starts from 1 / K everywhere). A client
predicts with ``sum_j pi_j softmax(f_j(x))``, with its kept pi (``prediction = "stored"``,
the code's training clients) or with pi refitted by one E-step on its current training
data (``"refit"``: the code's unseen test clients, whose label marginals it never updates,
so their E-step is FedEM's). The shared steps are in :mod:`strategies.soft_clustering`.

The authors' settings (``README.md``; ``utils/args.py`` for what it leaves at default): K =
3 (``--n_learners 3``; the three concepts of their data, y, C-1-y and (y+1) mod C, in
``create_c/make_cifar_c.py``), 200 rounds, batch 128, lr 0.06 constant, SGD with momentum
0.9 and weight decay 5e-4 (``utils/optim.py``), one local epoch (``--local_steps`` 1), every
client in every round (``--sampling_rate`` 1); each client's E-step runs on its training
split.

Departures from the code:

- P_j(y) sums the counts of the clients that have trained at least once; the code also
  adds, for a client never sampled, its initial counts (1 / C for every model and class):
  the same when every client takes part;
- as in FedEM: the optimiser is built afresh each round (the code keeps each client's, with
  its momentum, across rounds); the E-step in float64 (the code: float32); the loss of the
  mixture floored at 1e-12; a last partial batch trained on (the code's CIFAR loaders drop it);
- not implemented: the code's options off by default (``--hard_cluster`` prediction with
  the largest pi only, ``--split`` shared feature extractor, ``--domain_disc``), its
  variants (``fedrc_SW``, ``fedrc_Adam``, ``fedrc_DP``) and the removal of small clusters,
  which its ``run_experiment.py`` has commented out.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedsim.trainer import RoundConfig
from strategies.fedem import FedEM, FedEMTrainer
from strategies.soft_clustering import LABEL_COUNTS, label_prior, prior_or_uniform, soft_label_counts

LABEL_PRIOR = "fedrc-label-prior"  # P_j(y), flattened (models x classes), in the train config
PI = "fedrc/pi"  # the client's mixture, in its state


class FedRCTrainer(FedEMTrainer):
    """FedRC's client: FedEM's, with the label marginals in the E-step and its soft label counts reported."""

    pi_key = PI
    trains_unweighted = False  # the code skips a model of mixture weight 0

    def label_prior(self, config: RoundConfig, num_models: int, classes: int) -> np.ndarray:
        return prior_or_uniform(config.extra.get(LABEL_PRIOR), num_models, classes)

    def extra_metrics(self, weights: np.ndarray, y: np.ndarray, classes: int) -> dict:
        return {LABEL_COUNTS: soft_label_counts(weights, y, classes).ravel().tolist()}


class FedRC(FedEM):
    """FedRC (Guo et al., 2024): FedEM's EM with each model's label marginal divided out.

    Parameters beyond Flower's FedAvg: ``num_models`` (K, 3 as in the authors' script),
    ``aggregation`` ("samples": by training examples, the code; "soft": by each client's
    total weight on the model), ``prediction`` ("stored": the client's kept mixture;
    "refit": one E-step on its current training data first).
    """

    client_trainer = FedRCTrainer

    def __init__(
        self,
        num_models: int = 3,
        aggregation: Literal["samples", "soft"] = "samples",
        prediction: Literal["stored", "refit"] = "stored",
        **kwargs,
    ) -> None:
        super().__init__(num_models=num_models, aggregation=aggregation, prediction=prediction, **kwargs)
        self.label_counts: dict[str, list[float]] = {}  # node id -> its latest soft label counts

    def state_dict(self) -> dict:
        return {"label_counts": dict(self.label_counts)}

    def load_state_dict(self, state: dict) -> None:
        self.label_counts = {str(node): [float(v) for v in counts] for node, counts in state["label_counts"].items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.label_counts:
            prior = label_prior([np.asarray(c, np.float64) for c in self.label_counts.values()], self.num_models)
            config = ConfigRecord({**config, LABEL_PRIOR: prior.ravel().tolist()})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        replies: list[Message] = list(replies)
        aggregated = super().aggregate_train(server_round, replies)
        if aggregated[0] is None:
            return aggregated
        for reply in replies:
            if reply.has_error():
                continue
            counts = reply.content["metrics"].get(LABEL_COUNTS)
            if counts is not None and len(counts) % self.num_models == 0:
                self.label_counts[str(reply.metadata.src_node_id)] = [float(v) for v in counts]
        return aggregated
