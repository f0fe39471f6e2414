"""The oracle for drift streams: one global model per concept, and every client trains
and predicts with the model of its true current concept.

An upper bound for clustered methods (FedDAA, IFCA), which must find the concepts
themselves: it is told each client's concept (``ClientData.concept``, from the drift
stream, :mod:`partitioners.drift`). With ``num_models`` smaller than the number of
concepts, concept c uses model c mod ``num_models``. On a static partition every client
holds concept 0: the oracle is FedAvg on model 0.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedsim.trainer import ClientCall
from strategies.clustered import SeveralModels, SeveralModelsTrainer


class OracleTrainer(SeveralModelsTrainer):
    def train_models(self, call: ClientCall, models: list[ArrayRecord]):
        chosen = call.data.concept % len(models)
        trained, metrics = self.train_one(
            call.model, models[chosen], call.data, call.config, call.generator, call.device
        )
        weights = np.zeros(len(models))
        weights[chosen] = call.data.num_train
        return {chosen: trained}, weights, {**metrics, "cluster": float(chosen)}, call.state

    def predict_models(self, call: ClientCall, models: list[ArrayRecord]) -> torch.Tensor:
        return self.logits_of(call.model, models[call.data.concept % len(models)], call.data.x_test, call.device)


class ConceptOracle(SeveralModels):
    """One model per true concept (an upper bound): ``num_models`` = the stream's concepts."""

    client_trainer = OracleTrainer
