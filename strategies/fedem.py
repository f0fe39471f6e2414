"""FedEM (Marfoq et al., "Federated Multi-Task Learning under a Mixture of Distributions",
NeurIPS 2021): every client's data is a mixture of K shared components; the federation
learns one model per component, and each client its own mixture weights, by federated EM.

Read: omarfoq/FedEM at commit 996faddf865fd03c6852b7ffe64410e31b339e94 (``client.py``
MixtureClient; ``learners/learners_ensemble.py``; ``learners/learner.py``; ``aggregator.py``
CentralizedAggregator; ``utils/utils.py``; ``utils/optim.py``; ``utils/args.py``;
``paper_experiments/*/run_*.sh``), and its re-implementation in LINs-lab/FedRC at commit
ce792292655688c99206d4b5f126ec63934d1b1a (``client.py`` MixtureClient, ``aggregator.py``).

Every round, each sampled client, with the K global models:

1. **E-step**: every training sample's cross-entropy under every model, and
   ``w_ij = softmax_j(log pi_j - loss_j(x_i, y_i))``, i.e. ``w_ij ∝ pi_j p_j(y_i | x_i)``,
   with pi the client's mixture (uniform before its first round);
2. ``pi_j = mean_i w_ij``, kept in the client's state for the rest of the run (never reset,
   on a drift stream too: FedEM knows no slots);
3. **M-step**: every model j, from the global weights, trained for the ``[client]`` local
   epochs on ``sum_i w_ij * CE_j(x_i, y_i) / batch size``; all K go back.

The server averages each model over the sampled clients, weighted by their training
examples (``aggregation = "samples"``, the code's rule), or by their total weight
``sum_i w_ij`` (``"soft"``). A client predicts with the mixture
``sum_j pi_j softmax(f_j(x))``: with the pi it kept (``prediction = "stored"``, as the
code's training clients are evaluated; uniform before its first round), or with pi
refitted by one E-step on its current training data (``"refit"``, what the code does to
its unseen test clients before every evaluation). The shared steps are in
:mod:`strategies.soft_clustering`.

The authors' settings (``paper_experiments/*/run_*.sh``): K = 3 on every dataset; 200
rounds (201 on CIFAR-10); batch 128; one local epoch (``--local_steps`` 1); SGD with
momentum 0.9 and weight decay 5e-4 (``utils/optim.py``); lr 0.03 (CIFAR-10, FEMNIST), 0.01
(CIFAR-100), 0.05 (EMNIST, Shakespeare), divided by 10 at half and three quarters of the
rounds (``multi_step``); every client in every round (``--sampling_rate`` 1).

Departures from the code:

- partial participation: the code averages each model over *all* clients by n_t / n, an
  unsampled client contributing the unchanged global model (a damped step); fedsim averages
  over the sampled clients, as FedRC's re-implementation does. Both are the same when every
  client takes part (the authors' scripts);
- the optimiser is built afresh each round, as for every fedsim client; the code keeps each
  client's SGD optimiser, momentum buffer included, from round to round, and decays the lr
  (fedsim's ``[client] lr`` is constant);
- the E-step and pi are computed in float64 (the code: float32);
- a last partial batch is trained on (the code drops it on CIFAR, for BatchNorm);
- the reported loss is that of log(mixture) floored at 1e-12 (the code clamps the mixture to
  [0, 1]); accuracy is the mixture's argmax in both.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedsim.checks import check_choice
from fedsim.trainer import ClientCall, ClientState, RoundConfig
from strategies.clustered import SeveralModels
from strategies.soft_clustering import SoftClusteringTrainer, assignment

AGGREGATION = "aggregation"  # "samples" or "soft", in the train config
PREDICTION = "prediction"  # "stored" or "refit", in the evaluate config
PI = "fedem/pi"  # the client's mixture, in its state


class FedEMTrainer(SoftClusteringTrainer):
    """FedEM's client: one EM step on its training data, then every model's weighted M-step."""

    pi_key = PI
    trains_unweighted = True  # the code trains every model, even one of mixture weight 0

    def mixture(self, state: ClientState, num_models: int) -> np.ndarray:
        """The client's kept pi, or uniform before its first round."""
        pi = state.get(self.pi_key)
        if pi is None or len(pi) != num_models:
            return np.full(num_models, 1.0 / num_models)
        return np.asarray(pi, np.float64)

    def label_prior(self, config: RoundConfig, num_models: int, classes: int) -> np.ndarray | None:
        """The label marginals P_j(y) of the E-step: none in FedEM."""
        return None

    def extra_metrics(self, weights: np.ndarray, y: np.ndarray, classes: int) -> dict:
        """What the client reports besides its loss and cluster (FedRC: its soft label counts)."""
        return {}

    def train_models(self, call: ClientCall, models: list[ArrayRecord]):
        model, data, config, state = call.model, call.data, call.config, call.state
        generator, device = call.generator, call.device
        num_models = len(models)
        losses = self.losses(model, models, data.x_train, data.y_train, device)
        classes = self.num_classes(model, models, data.x_train, device)
        prior = self.label_prior(config, num_models, classes)
        weights = assignment(losses, data.y_train, self.mixture(state, num_models), prior)
        pi = weights.mean(axis=0)
        trained, fitted = {}, []
        for j, record in enumerate(models):
            self.receive(model, record, {})
            model.to(device)
            if pi[j] > 0 or self.trains_unweighted:
                fitted.append(self.fit_weighted(model, data, weights[:, j], config, generator, device))
            trained[j] = ArrayRecord(model.state_dict())  # untrained (FedRC, weight 0): still averaged
        if config.extra.get(AGGREGATION, "samples") == "soft":
            per_model = weights.sum(axis=0)
        else:
            per_model = np.full(num_models, float(data.num_train))
        metrics = {
            "train_loss": float(np.mean(fitted)) if fitted else float("nan"),
            "cluster": float(np.argmax(pi)),
            **self.extra_metrics(weights, data.y_train, classes),
        }
        return trained, per_model, metrics, {**state, self.pi_key: pi}

    def predict_models(self, call: ClientCall, models: list[ArrayRecord]) -> torch.Tensor:
        """log sum_j pi_j softmax(f_j(x)) on the held-out data, with the kept pi or a refitted one."""
        model, data, device = call.model, call.data, call.device
        pi = self.mixture(call.state, len(models))
        if call.config.extra.get(PREDICTION, "stored") == "refit":
            losses = self.losses(model, models, data.x_train, data.y_train, device)
            pi = assignment(losses, data.y_train, pi).mean(axis=0)
        return self.mixture_logits(model, models, pi, data.x_test, device)


class FedEM(SeveralModels):
    """FedEM (Marfoq et al., 2021): K shared components, a mixture per client, federated EM.

    Parameters beyond Flower's FedAvg: ``num_models`` (K, 3 as in the authors' scripts),
    ``aggregation`` ("samples": by training examples, the code; "soft": by each client's
    total weight on the model), ``prediction`` ("stored": the client's kept mixture;
    "refit": one E-step on its current training data first).
    """

    client_trainer = FedEMTrainer

    def __init__(
        self,
        num_models: int = 3,
        aggregation: Literal["samples", "soft"] = "samples",
        prediction: Literal["stored", "refit"] = "stored",
        **kwargs,
    ) -> None:
        check_choice("aggregation", aggregation, ("samples", "soft"))
        check_choice("prediction", prediction, ("stored", "refit"))
        super().__init__(num_models=num_models, **kwargs)
        self.aggregation = aggregation
        self.prediction = prediction

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config = ConfigRecord({**config, AGGREGATION: self.aggregation})
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if config is not None:
            config = ConfigRecord({**config, PREDICTION: self.prediction})
        return super().configure_evaluate(server_round, arrays, config, grid)
