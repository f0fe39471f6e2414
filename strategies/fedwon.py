"""FedWon (Zhuang & Lyu, ICLR 2024): federated learning without normalisation.

Every normalisation layer is removed and every convolution reparameterised with scaled
weight standardisation (:class:`fedsim.models.norm.WSConv2d`); clients train with
adaptive gradient clipping (Brock et al., 2021) and the server averages all parameters
as FedAvg does. With no batch statistics, it trains at batch size 1.

The server sends AGC's threshold as ``agc-lambda`` in every train config; the client half
(:class:`FedWonTrainer`: fedsim's ClientApp, or :func:`fedsim.plain_flower.client_app`
in a plain Flower app) reports the threshold it applied as the train metric
``agc-lambda``, and the server refuses a reply without it, which comes from a ClientApp
that did not clip: averaging it would silently be FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedsim.data import ClientData
from fedsim.models.norm import has_normalization
from fedsim.trainer import ClientTrainer, RoundConfig

AGC_EPS = 1e-3  # the floor on a weight's norm, so zero-initialised units can still move
AGC_LAMBDA = "agc-lambda"  # the threshold: sent in the train config, reported as a train metric


def unitwise_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Norm per output unit: over each row of a dense weight and each output channel's
    fan-in of a conv weight (WSConv's per-channel gain, shaped (C, 1, 1, 1), is thus one
    unit per channel); a vector or a scalar (a bias) counts as one unit."""
    if tensor.ndim <= 1:
        return torch.linalg.vector_norm(tensor)
    return torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.ndim)), keepdim=True)


@torch.no_grad()
def agc_scale(max_norm: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """AGC's factor per unit: max_norm / ||G_i|| where ||G_i|| exceeds max_norm, else 1.
    Shared with the vectorised trainers (:mod:`fedsim.vectorize`), which must clip as this
    does."""
    return torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-12), torch.ones_like(grad_norm))


def adaptive_clip_(parameters: Iterable[nn.Parameter], clip_lambda: float, eps: float = AGC_EPS) -> None:
    """Adaptive gradient clipping, in place: for each unit i, if
    ||G_i|| / max(||W_i||, eps) > lambda, then G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i."""
    for parameter in parameters:
        if parameter.grad is None:
            continue
        max_norm = clip_lambda * unitwise_norm(parameter).clamp_min(eps)
        grad_norm = unitwise_norm(parameter.grad)
        parameter.grad.mul_(agc_scale(max_norm, grad_norm))


def classifier(model: nn.Module) -> nn.Module:
    """The layer AGC leaves alone, as NFNets do: ``model.head`` (every fedsim model has
    one), else the model's last ``nn.Linear``, else none (an empty module)."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return head
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else nn.Module()


class FedWonTrainer(ClientTrainer):
    """FedAvg's local SGD with adaptive gradient clipping on every layer but the classifier
    (:func:`classifier`), at the server's threshold; the threshold applied is reported as
    the train metric ``agc-lambda``."""

    @staticmethod
    def clip_lambda(config: RoundConfig) -> float:
        if AGC_LAMBDA not in config.extra:
            raise ValueError(
                f"FedWon's client needs AGC's threshold {AGC_LAMBDA!r} in the train config, "
                "which strategies.fedwon.FedWon sends"
            )
        return float(config.extra[AGC_LAMBDA])

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        config: RoundConfig,
        generator: torch.Generator,
        device: torch.device,
    ) -> dict[str, float]:
        clip_lambda = self.clip_lambda(config)
        return {**super().fit(model, data, config, generator, device), AGC_LAMBDA: clip_lambda}

    def before_step(self, model: nn.Module, config: RoundConfig) -> None:
        head = {id(p) for p in classifier(model).parameters()}
        body = [p for p in model.parameters() if id(p) not in head]
        adaptive_clip_(body, self.clip_lambda(config))


class FedWon(FedAvg):
    """FedWon (Zhuang & Lyu, ICLR 2024): norm-free WSConv model, AGC, FedAvg aggregation.

    ``clip_lambda`` is AGC's threshold. The authors' workshop version ("Is Batch
    Normalization Necessary for Multi-domain Federated Learning?", 2023) sets 0.1 unless it
    says otherwise and, in one ablation, uses AGC only at batch size 32; the ICLR text was
    not available to check. NFNets advise 0.01 at very large batches and larger values for
    small ones. The default, 0.32, was the best of {0.32, 1.28} on digits-domains
    (cross-silo, seed 0, 20 rounds, batch 32, lr 0.1: 0.922 against 0.913 mean client
    accuracy); 0.01 and 0.08 trained far slower (at lr 0.01). The workshop's 0.1, over the
    whole cross-silo experiment (3 seeds, 50 rounds), gave 0.899 +- 0.008 against
    0.914 +- 0.012 at 0.32.
    """

    client_trainer = FedWonTrainer
    model_options = {"norm": "none"}  # every model this strategy trains is norm-free

    @staticmethod
    def validate_model(model: nn.Module) -> None:
        if has_normalization(model):
            raise ValueError("the model still has normalisation layers; FedWon trains norm-free models (norm = 'none')")

    def __init__(self, *, clip_lambda: float = 0.32, **kwargs) -> None:
        super().__init__(**kwargs)
        if not clip_lambda > 0:
            raise ValueError(f"clip_lambda must be > 0, got {clip_lambda!r}")
        self.clip_lambda = clip_lambda

    def configure_train(self, server_round, arrays, config, grid):
        config[AGC_LAMBDA] = self.clip_lambda
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregation, of replies whose clients applied this strategy's AGC."""
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            applied = [record[AGC_LAMBDA] for record in reply.content.metric_records.values() if AGC_LAMBDA in record]
            if not applied:
                raise ValueError(
                    f"FedWon: the reply of node {node} has no {AGC_LAMBDA!r} train metric, so its ClientApp did "
                    "not apply FedWon's adaptive gradient clipping (AGC), and averaging it would be FedAvg. Use "
                    "fedsim's ClientApp or fedsim.plain_flower.client_app(FedWon, model_fn, data_fn); a ClientApp "
                    f"of your own must clip with strategies.fedwon.adaptive_clip_ at the config's {AGC_LAMBDA!r} "
                    f"and report that value as the train metric {AGC_LAMBDA!r}"
                )
            for value in applied:
                if not isinstance(value, (int, float)) or not math.isclose(value, self.clip_lambda, rel_tol=1e-6):
                    raise ValueError(
                        f"FedWon: node {node} applied AGC at {AGC_LAMBDA} = {value}, but this strategy's "
                        f"clip_lambda is {self.clip_lambda}; the client must clip at the threshold the server sends"
                    )
        return super().aggregate_train(server_round, replies)
