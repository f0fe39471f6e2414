"""Soft clustering over K global models: the EM steps that FedEM, FedRC and FedDAA share.

A client keeps a mixture ``pi`` over the K models. One round of its EM:

- **E-step** (:func:`assignment`): per training sample i and model j,
  ``w_ij = softmax_j(log pi_j - loss_j(x_i, y_i) - log P_j(y_i))``, with loss_j the
  model's cross-entropy. Without ``P`` it is FedEM's (Marfoq et al., 2021):
  ``w_ij ∝ pi_j p_j(y_i | x_i)`` with ``p_j = exp(-loss_j)``; with ``P_j(y)``, model j's
  label marginal, it is FedRC's robust variant (Guo et al., 2024), which divides the
  likelihood by how common the label is under that model, so that clients that differ
  only in their label mix are not split. Then ``pi_j = mean_i w_ij``.
- **M-step** (:meth:`SoftClusteringTrainer.fit_weighted`): each model j is trained on
  ``sum_i w_ij * CE_j(x_i, y_i) / batch size`` (a sample's weight multiplies its loss; the
  mean is over the batch, not over the weights, as in both authors' learners).
- **Label marginal** (:func:`label_prior`): each client reports its soft label counts
  ``sum_{i: y_i = c} w_ij`` (:func:`soft_label_counts`); the server sums them over the
  clients, floors every entry at 1e-8 and normalises each model's row.
- **Prediction** (:meth:`SoftClusteringTrainer.mixture_logits`): the mixture
  ``sum_j pi_j softmax(f_j(x))``, whose log is returned as logits.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.data import ClientData
from fedsim.trainer import RoundConfig
from fedsim.training import batches
from strategies.clustered import SeveralModelsTrainer

LABEL_COUNTS = "label-counts"  # a client's soft label counts (models x classes, flattened), a train metric


def assignment(losses: torch.Tensor, y: np.ndarray, pi: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """w (n x K): softmax_j(log pi_j - loss_j(x_i, y_i) - log P_j(y_i)), the E-step.

    ``losses`` is n x K (float64), ``pi`` the K mixture weights, ``prior`` the K x C label
    marginals P_j(y) (FedRC) or None (FedEM: no label term)."""
    log_pi = torch.log(torch.as_tensor(pi, dtype=torch.float64).clamp_min(1e-300)).unsqueeze(0)
    if prior is None:
        return torch.softmax(log_pi - losses, dim=1).numpy()
    log_prior = torch.log(torch.as_tensor(prior[:, y].T, dtype=torch.float64))
    return torch.softmax(log_pi - losses - log_prior, dim=1).numpy()


def soft_label_counts(weights: np.ndarray, y: np.ndarray, classes: int) -> np.ndarray:
    """K x C: ``sum_{i: y_i = c} w_ij``, the soft label counts a client reports."""
    return np.stack([weights[y == label].sum(axis=0) for label in range(classes)], axis=1)


def label_prior(counts: Iterable[np.ndarray], num_models: int) -> np.ndarray:
    """K x C: each model's label marginal from the clients' soft label counts (flattened or
    K x C), summed, floored at 1e-8 and normalised per model."""
    totals = np.sum(list(counts), axis=0).reshape(num_models, -1)
    totals = np.maximum(totals, 1e-8)
    return totals / totals.sum(axis=1, keepdims=True)


def prior_or_uniform(values, num_models: int, classes: int) -> np.ndarray:
    """The K x C label marginals the server sent (flattened), or uniform ones where it sent
    none yet (or of another shape: a new model count): a uniform P_j(y) is a constant in
    the E-step's softmax, which then is FedEM's."""
    prior = np.asarray(values if values is not None else [], np.float64)
    if prior.size != num_models * classes:
        prior = np.full(num_models * classes, 1.0 / classes)
    return prior.reshape(num_models, classes)


class SoftClusteringTrainer(SeveralModelsTrainer):
    """A client of a soft-clustering strategy: the per-model losses, the weighted M-step and
    the mixture's prediction."""

    def losses(self, model: nn.Module, models: list[ArrayRecord], x: np.ndarray, y: np.ndarray, device) -> torch.Tensor:
        """Per-sample cross-entropy of every model (n x K), in eval mode."""
        target = torch.as_tensor(y)
        per_model = [
            nn.functional.cross_entropy(self.logits_of(model, record, x, device), target, reduction="none")
            for record in models
        ]
        return torch.stack(per_model, dim=1).double()

    def num_classes(self, model: nn.Module, models: list[ArrayRecord], x: np.ndarray, device) -> int:
        """The models' number of outputs (one forward pass on one sample)."""
        return self.logits_of(model, models[0], x[:1], device).shape[1]

    def fit_weighted(self, model, data: ClientData, w: np.ndarray, config: RoundConfig, generator, device) -> float:
        """Local epochs of SGD on sum_i w_i * CE(x_i, y_i) / batch size (the M-step)."""
        x = torch.as_tensor(data.x_train).to(device)
        y = torch.as_tensor(data.y_train).to(device)
        weights = torch.as_tensor(w, dtype=torch.float32).to(device)
        optimizer = self.make_optimizer(model, config)
        model.train()
        total, seen = 0.0, 0
        for _ in range(config.local_epochs):
            for xb, index in batches(x, torch.arange(len(y), device=device), config.batch_size, generator):
                optimizer.zero_grad()
                per_sample = nn.functional.cross_entropy(model(xb), y[index], reduction="none")
                loss = (weights[index] * per_sample).sum() / len(index)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
                seen += len(index)
        return total / max(seen, 1)

    def mixture_logits(
        self, model: nn.Module, models: list[ArrayRecord], pi: np.ndarray, x: np.ndarray, device
    ) -> torch.Tensor:
        """log sum_j pi_j softmax(f_j(x)): the mixture's log-probabilities as logits (models
        of weight 0 are not run)."""
        probabilities = sum(
            weight * torch.softmax(self.logits_of(model, record, x, device), dim=1)
            for weight, record in zip(pi, models)
            if weight > 0
        )
        return torch.log(probabilities.clamp_min(1e-12))
