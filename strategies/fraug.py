"""FRAug (Chen et al., ICCV 2023): federated representation augmentation for feature skew.

A shared generator G: [z, onehot(y)] -> Linear-BN-ReLU-Linear-BN-ReLU -> feature size
makes client-agnostic embeddings; a local RTNet: [g, onehot(y)] -> Linear-BN-ReLU-Linear-BN
turns them into client-specific ones, ``anchor + residual``, the anchor being the real
embedding e = ``model.features(x)`` or the class prototype mu_y (an EMA of class-mean
embeddings, momentum 0.3). Per local batch, as in the authors' ``users/user_FRAug.py``:

(a) model: (1 - r_L) CE(h(e), y) + r_L CE(h(e_hat), y_hat), e_hat made without grad (it
    trains the head only), r_L = min(0.5, r), r = exp(gamma (t - T)), t the 0-based round
    (``server_round - 1``) and T the run's rounds (``total_rounds``);
(b) generator: CE(h(G(z, y)), y) - lambda_G D(G(z, y), e), D = Gaussian-kernel MMD or
    ``"l2"`` (MSE to the prototypes). The minus sign is the code's ("maximize the distance
    between real and fake"): G is pushed away from this client's embeddings, towards the
    consensus of the others, and RTNet pulls its output back to the client;
(c) RTNet: -Entropy(softmax h(e_hat)) + lambda_RT D(e_hat, anchor).

With ``anchor = "both"`` (the code's ``use_homo_label_aug = 2`` on every dataset), each step
uses two synthetic batches, averaged: labels cycling over all classes anchored at the
prototypes, and the batch's labels anchored at its real embeddings. z ~ U[0, 1).

The server averages the model and G with sample weights (G's arrays are in the global
record under ``generator.``). BatchNorm stays local as in FedBN: every BN entry of the
model (``local_batchnorm = "layers"``, the paper) or only its running statistics
(``"statistics"``, the code's ``no_bn_running_stats``). G's BN is shared (the code's Digits
and PACS setting; ``generator_batchnorm = "local"`` is its OfficeHome ``no_local``); BN
counters (num_batches_tracked) never leave a client. RTNet and the prototypes live only in
the client's state. A client evaluates its own model (no augmentation).

Defaults are the authors' PACS settings (``main.py``): generator and RTNet lr 0.05,
lambda_G 10, lambda_RT 1, gamma 0.01, latent = feature size / 2; the model's SGD lr 0.01,
momentum 0.5 come from the experiment's ``[client]`` table (G and RTNet use its momentum,
as the code's ``local_momentum``). Digits in the code: gamma 0.002, lambda_G 1 with L2,
MMD for RTNet; the code's "local_epochs" (20 on Digits) count batches, not epochs.
fedsim builds the three optimizers afresh every round (the code keeps them).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from torch import nn
from torch.nn import functional as F

from fedsim.checks import check_bool, check_choice, check_integer, check_number, check_positive
from fedsim.errors import UserError
from fedsim.seeding import derive_seed
from fedsim.trainer import ClientCall, ClientState, TrainResult
from fedsim.training import batches
from strategies.fedbn import BATCHNORM_ENTRIES, FedBN, FedBNTrainer, batchnorm_keys_by_name
from strategies.fraug_networks import Generator, RTNet, augmentation_weight, distance, entropy, ratio

GENERATOR = "generator."  # G's arrays in the global record and in a client's state
RTNET = "rtnet."  # RTNet's arrays in a client's state (never in a message)
PROTOTYPES = "prototypes"  # a client's class prototypes (classes x features), in its state
CONFIG_PREFIX = "fraug-"
# which BatchNorm entries stay on the client, by setting
LOCAL_ENTRIES = {
    "layers": BATCHNORM_ENTRIES,
    "statistics": ("running_mean", "running_var", "num_batches_tracked"),
    "shared": ("num_batches_tracked",),
    "local": BATCHNORM_ENTRIES,
}


def local_keys(keys: Iterable[str], entries: tuple[str, ...]) -> set[str]:
    """The BatchNorm keys among ``keys`` whose entry (weight, running_mean, ...) is in ``entries``."""
    return {key for key in batchnorm_keys_by_name(keys) if key.rsplit(".", 1)[-1] in entries}


# -- settings sent to the clients --------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """FRAug's client settings: validated on the server, sent as ``fraug-*`` train config keys."""

    total_rounds: int
    generator_lr: float = 0.05
    rtnet_lr: float = 0.05
    lambda_g: float = 10.0
    lambda_rt: float = 1.0
    gamma: float = 0.01
    prototype_momentum: float = 0.3
    anchor: str = "both"
    generator_distance: str = "mmd"
    rtnet_distance: str = "mmd"
    feature_interpolation: bool = False
    local_batchnorm: str = "layers"
    generator_batchnorm: str = "shared"

    def __post_init__(self) -> None:
        check_integer("total_rounds (the run's rounds, T)", self.total_rounds, minimum=1)
        for name in ("generator_lr", "rtnet_lr"):
            check_positive(name, getattr(self, name))
        for name in ("lambda_g", "lambda_rt", "gamma"):
            check_number(name, getattr(self, name), at_least=0)
        check_number("prototype_momentum", self.prototype_momentum, above=0, at_most=1)
        check_choice("anchor", self.anchor, ("both", "embedding", "prototype"))
        check_choice("generator_distance", self.generator_distance, ("mmd", "l2"))
        check_choice("rtnet_distance", self.rtnet_distance, ("mmd", "l2"))
        check_choice("local_batchnorm", self.local_batchnorm, ("layers", "statistics"))
        check_choice("generator_batchnorm", self.generator_batchnorm, ("shared", "local"))
        check_bool("feature_interpolation", self.feature_interpolation)

    def to_config(self) -> dict:
        return {CONFIG_PREFIX + name.replace("_", "-"): value for name, value in asdict(self).items()}

    @classmethod
    def from_config(cls, extra) -> Settings:
        keys = {CONFIG_PREFIX + name.replace("_", "-"): name for name in cls.__dataclass_fields__}
        missing = sorted(key for key in keys if key not in extra)
        if missing:
            raise ValueError(
                f"FRAug's client needs {missing[0]!r} in the train config, which strategies.fraug.FRAug sends"
            )
        return cls(**{name: extra[key] for key, name in keys.items()})


def split(arrays: ArrayRecord) -> tuple[ArrayRecord, ArrayRecord]:
    """The global record as (the model's arrays, G's arrays without the prefix)."""
    model = ArrayRecord({key: arrays[key] for key in arrays.keys() if not key.startswith(GENERATOR)})
    generator = ArrayRecord({key[len(GENERATOR) :]: arrays[key] for key in arrays.keys() if key.startswith(GENERATOR)})
    return model, generator


# -- the client --------------------------------------------------------------------------
class FRAugTrainer(FedBNTrainer):
    """FRAug's client: the three steps per batch; BN, RTNet and prototypes stay local."""

    can_vectorize = False  # two-stage local training with the generator and RTNet

    def receive(self, model: nn.Module, arrays: ArrayRecord, state: ClientState) -> None:
        """The model's part of the arrays, with this client's own BatchNorm (FedBN's rule)."""
        super().receive(model, split(arrays)[0], state)

    def train(self, call: ClientCall) -> TrainResult:
        model, arrays, data, config = call.model, call.arrays, call.data, call.config
        state, generator, device = call.state, call.generator, call.device
        settings = Settings.from_config(config.extra)
        _, shared = split(arrays)
        if not shared:
            raise ValueError("FRAug's client received no generator arrays ('generator.*'); use strategies.fraug.FRAug")
        self.receive(model, arrays, state)
        model.to(device)
        features, classes = model.head.in_features, model.head.out_features
        latent = shared["net.0.weight"].shape[1] - classes
        with torch.random.fork_rng(devices=[]):  # RTNet's first initialisation: from this round's generator
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
            g_net, rt_net = Generator(features, latent, classes), RTNet(features, latent, classes)
        own_g = {key[len(GENERATOR) :]: torch.as_tensor(v) for key, v in state.items() if key.startswith(GENERATOR)}
        g_net.load_state_dict({**shared.to_torch_state_dict(), **own_g}, strict=True)
        own_rt = {key[len(RTNET) :]: torch.as_tensor(v) for key, v in state.items() if key.startswith(RTNET)}
        if own_rt:
            rt_net.load_state_dict(own_rt, strict=True)
        prototypes = torch.as_tensor(state.get(PROTOTYPES, np.zeros((classes, features), np.float32))).to(device)
        g_net.to(device), rt_net.to(device)
        metrics = self.fit_fraug(model, g_net, rt_net, prototypes, data, config, settings, generator, device)

        weights, g_weights = model.state_dict(), g_net.state_dict()
        local_model = local_keys(weights, LOCAL_ENTRIES[settings.local_batchnorm])
        local_g = local_keys(g_weights, LOCAL_ENTRIES[settings.generator_batchnorm])

        def numpy(tensor: torch.Tensor) -> np.ndarray:
            return tensor.detach().cpu().numpy().copy()

        reply = {key: Array(numpy(v)) for key, v in weights.items() if key not in local_model}
        reply.update({GENERATOR + key: Array(numpy(v)) for key, v in g_weights.items() if key not in local_g})
        new_state = {key: numpy(weights[key]) for key in local_model}
        new_state.update({GENERATOR + key: numpy(g_weights[key]) for key in local_g})
        new_state.update({RTNET + key: numpy(v) for key, v in rt_net.state_dict().items()})
        new_state[PROTOTYPES] = numpy(prototypes)
        return TrainResult(ArrayRecord(reply), metrics, new_state)

    def fit_fraug(self, model, g_net, rt_net, prototypes, data, config, settings: Settings, generator, device):
        """Local epochs; per batch the model, generator and RTNet steps. Updates ``prototypes`` in place."""
        if config.batch_size == 1:
            raise UserError("[client] batch_size = 1 cannot train FRAug's BatchNorm1d generator and RTNet")
        x, y = torch.as_tensor(data.x_train).to(device), torch.as_tensor(data.y_train).to(device)
        classes, latent = g_net.num_classes, g_net.latent_dim
        optimizer = self.make_optimizer(model, config)
        optimizer_g = torch.optim.SGD(g_net.parameters(), lr=settings.generator_lr, momentum=config.momentum)
        optimizer_rt = torch.optim.SGD(rt_net.parameters(), lr=settings.rtnet_lr, momentum=config.momentum)
        r = ratio(config.server_round, settings.total_rounds, settings.gamma)
        r_l = augmentation_weight(config.server_round, settings.total_rounds, settings.gamma)
        per_round = config.local_epochs * math.ceil(len(y) / config.batch_size)
        first_step = (config.server_round - 1) * per_round
        sums = {"train_loss": 0.0, "generator_loss": 0.0, "rtnet_loss": 0.0}
        seen, step = 0, first_step - 1

        def noise(n: int) -> torch.Tensor:
            return torch.rand(n, latent, generator=generator).to(device)

        def synthetic(e_real, yb, y_cycle):
            """(anchor, labels, G's output) per anchor kind: prototypes of cycling labels, real embeddings."""
            pairs = []
            if settings.anchor in ("both", "prototype"):
                pairs.append((prototypes[y_cycle], y_cycle))
            if settings.anchor in ("both", "embedding"):
                pairs.append((e_real, yb))
            return [(anchor, labels, g_net(noise(len(labels)), labels)) for anchor, labels in pairs]

        for _ in range(config.local_epochs):
            for xb, yb in batches(x, y, config.batch_size, generator):
                step += 1
                if len(yb) < 2:  # BatchNorm1d cannot normalise one sample (the code skips it too)
                    continue
                # the code's balanced labels, rotated by the global step
                y_cycle = (torch.arange(len(yb), device=device) + step * len(yb)) % classes

                # (a) the model: real and synthetic embeddings (the latter train the head only)
                model.train(), g_net.eval(), rt_net.eval()
                optimizer.zero_grad()
                e = model.features(xb)
                self.update_prototypes(prototypes, e.detach(), yb, settings.prototype_momentum)
                loss_real = F.cross_entropy(model.head(e), yb)
                with torch.no_grad():
                    made = []
                    for anchor, labels, g in synthetic(e.detach(), yb, y_cycle):
                        e_hat = rt_net(g, anchor, labels)
                        made.append((r * e_hat + (1 - r) * anchor if settings.feature_interpolation else e_hat, labels))
                loss_synthetic = sum(F.cross_entropy(model.head(e_hat), labels) for e_hat, labels in made) / len(made)
                loss = (1 - r_l) * loss_real + r_l * loss_synthetic
                loss.backward()
                optimizer.step()

                # (b) the generator: classifiable, and far from this client's embeddings
                model.eval(), g_net.train()
                optimizer_g.zero_grad()
                fake = g_net(noise(len(yb)), y_cycle)
                with torch.no_grad():
                    target = model.features(xb) if settings.generator_distance == "mmd" else prototypes[y_cycle]
                far = distance(settings.generator_distance, fake, target)
                loss_g = F.cross_entropy(model.head(fake), y_cycle) - settings.lambda_g * far
                loss_g.backward()
                optimizer_g.step()

                # (c) RTNet: hard (high-entropy) embeddings near the anchor
                g_net.eval(), rt_net.train()
                optimizer_rt.zero_grad()
                with torch.no_grad():
                    e_eval = model.features(xb) if settings.anchor != "prototype" else None
                    made = synthetic(e_eval, yb, y_cycle)
                loss_rt = 0.0
                for anchor, labels, g in made:
                    e_hat = rt_net(g, anchor, labels)
                    near = distance(settings.rtnet_distance, e_hat, anchor)
                    loss_rt = loss_rt + (-entropy(model.head(e_hat)) + settings.lambda_rt * near) / len(made)
                loss_rt.backward()
                optimizer_rt.step()

                for key, value in (("train_loss", loss), ("generator_loss", loss_g), ("rtnet_loss", loss_rt)):
                    sums[key] += float(value.detach()) * len(yb)
                seen += len(yb)
        model.zero_grad(set_to_none=True)
        return {**{key: total / max(seen, 1) for key, total in sums.items()}, "augmentation_weight": r_l}

    @staticmethod
    def update_prototypes(prototypes: torch.Tensor, e: torch.Tensor, y: torch.Tensor, momentum: float) -> None:
        """EMA of the batch's class means, for the classes present: mu <- (1 - m) mu + m mean."""
        onehot = F.one_hot(y, len(prototypes)).to(e.dtype)
        counts = onehot.sum(0).unsqueeze(1)
        means = onehot.T @ e / counts.clamp_min(1)
        m = (counts > 0).to(e.dtype) * momentum
        prototypes.mul_(1 - m).add_(m * means)


# -- the server --------------------------------------------------------------------------
class FRAug(FedBN):
    """FRAug (Chen et al., ICCV 2023): shared generator, local RTNet, local BatchNorm.

    ``total_rounds`` (required) is T in r = exp(gamma (t - T)): the experiment's ``rounds``
    (a strategy does not see them). ``latent_dim`` defaults to the feature size // 2. The
    other parameters are :class:`Settings`'; ``weighting`` is FedBN's (here "samples").
    """

    client_trainer = FRAugTrainer

    @staticmethod
    def validate_model(model: nn.Module) -> None:
        """FRAug augments the input of the final linear layer, ``model.head``. A model without
        BatchNorm is accepted: then only the augmentation remains (G and RTNet have BN)."""
        if not isinstance(getattr(model, "head", None), nn.Linear):
            raise ValueError("FRAug needs the model's final layer as an nn.Linear named 'head'; this model has none")
        if not isinstance(getattr(model, "features", None), nn.Module):
            raise ValueError("FRAug needs the model's body as 'features' (the embedding the head classifies)")

    def __init__(
        self,
        *,
        total_rounds: int,
        generator_lr: float = 0.05,
        rtnet_lr: float = 0.05,
        lambda_g: float = 10.0,
        lambda_rt: float = 1.0,
        gamma: float = 0.01,
        latent_dim: int | None = None,
        prototype_momentum: float = 0.3,
        anchor: Literal["both", "embedding", "prototype"] = "both",
        generator_distance: Literal["mmd", "l2"] = "mmd",
        rtnet_distance: Literal["mmd", "l2"] = "mmd",
        feature_interpolation: bool = False,
        local_batchnorm: Literal["layers", "statistics"] = "layers",
        generator_batchnorm: Literal["shared", "local"] = "shared",
        weighting: Literal["uniform", "samples"] = "samples",
        **kwargs,
    ) -> None:
        super().__init__(weighting=weighting, **kwargs)
        if latent_dim is not None:
            check_integer("latent_dim", latent_dim, minimum=1)
        self.latent_dim = latent_dim
        self.settings = Settings(
            total_rounds=total_rounds,
            generator_lr=generator_lr,
            rtnet_lr=rtnet_lr,
            lambda_g=lambda_g,
            lambda_rt=lambda_rt,
            gamma=gamma,
            prototype_momentum=prototype_momentum,
            anchor=anchor,
            generator_distance=generator_distance,
            rtnet_distance=rtnet_distance,
            feature_interpolation=feature_interpolation,
            local_batchnorm=local_batchnorm,
            generator_batchnorm=generator_batchnorm,
        )

    def initial_arrays(self, new_model) -> ArrayRecord:
        """The experiment's new model plus G, its sizes read from ``head.weight`` (classes x
        features); G's seed is derived from the model's initial head, hence from the run's seed."""
        model = new_model(0)
        if "head.weight" not in model:
            raise ValueError("FRAug needs the model's final nn.Linear named 'head' (no 'head.weight' array)")
        head = model["head.weight"].numpy()
        classes, features = head.shape
        latent = self.latent_dim or max(features // 2, 1)
        seed = derive_seed(zlib.crc32(np.ascontiguousarray(head).tobytes()), "fraug-generator")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            g_net = Generator(features, latent, classes)
        arrays = {key: model[key] for key in model.keys()}
        arrays.update({GENERATOR + key: Array(v.numpy().copy()) for key, v in g_net.state_dict().items()})
        return ArrayRecord(arrays)

    def local_keys_by_name(self, keys: Iterable[str]) -> set[str]:
        """The global record's keys that stay on the clients: the model's BatchNorm entries
        (by ``local_batchnorm``) and G's (its counters, or all of its BN with "local")."""
        keys = list(keys)
        model = [key for key in keys if not key.startswith(GENERATOR)]
        g_keys = [key[len(GENERATOR) :] for key in keys if key.startswith(GENERATOR)]
        g_local = local_keys(g_keys, LOCAL_ENTRIES[self.settings.generator_batchnorm])
        return local_keys(model, LOCAL_ENTRIES[self.settings.local_batchnorm]) | {GENERATOR + key for key in g_local}

    def with_initial_batchnorm(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.initial_batchnorm is None:  # FedBN's rule, with FRAug's set of local keys
            local = self.local_keys_by_name(arrays.keys())
            self.initial_batchnorm = ArrayRecord({key: arrays[key] for key in arrays.keys() if key in local})
            self.initial_order = list(arrays.keys())
        return super().with_initial_batchnorm(arrays)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if not any(key.startswith(GENERATOR) for key in arrays.keys()):
            raise ValueError(
                f"FRAug: the global arrays have no generator ('{GENERATOR}*'); start from "
                "FRAug.initial_arrays(new_model), which adds it to the model's arrays"
            )
        for key, value in self.settings.to_config().items():
            config[key] = value
        return super().configure_train(server_round, arrays, config, grid)

    def refuse_batchnorm(self, replies: list[Message]) -> None:
        """A reply must carry G and none of the arrays that stay local (BN, RTNet)."""
        local = set(self.initial_batchnorm.keys()) if self.initial_batchnorm is not None else set()
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            for record in reply.content.array_records.values():
                leaked = sorted(key for key in record.keys() if key in local or key.startswith(RTNET))
                if leaked:
                    raise ValueError(
                        f"FRAug: the reply of node {node} carries arrays that stay on the client ({', '.join(leaked[:3])}"
                        f"{', ...' if len(leaked) > 3 else ''}); its ClientApp does not run strategies.fraug's client"
                    )
                if not any(key.startswith(GENERATOR) for key in record.keys()):
                    raise ValueError(
                        f"FRAug: the reply of node {node} has no generator arrays ('{GENERATOR}*'), so its ClientApp "
                        "did not train FRAug's generator; use fedsim's ClientApp with strategies.fraug.FRAug"
                    )
