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

from fedsim.trainer import ClientState, RoundConfig
from strategies.clustered import SeveralModels, SeveralModelsTrainer


class OracleTrainer(SeveralModelsTrainer):
    def train_models(self, model, models, data, config: RoundConfig, state: ClientState, generator, device):
        chosen = data.concept % len(models)
        trained, metrics = self.train_one(model, models[chosen], data, config, generator, device)
        weights = np.zeros(len(models))
        weights[chosen] = data.num_train
        return {chosen: trained}, weights, {**metrics, "cluster": float(chosen)}, state

    def predict_models(self, model, models, data, config, state, device) -> torch.Tensor:
        return self.logits_of(model, models[data.concept % len(models)], data.x_test, device)


class ConceptOracle(SeveralModels):
    """One model per true concept (an upper bound): ``num_models`` = the stream's concepts."""

    client_trainer = OracleTrainer
