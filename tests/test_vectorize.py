"""Vectorised clients (fedsim.vectorize) take the steps the sequential trainer takes."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.nn import functional as F

from fedsim.data import ClientData
from fedsim.errors import UserError
from fedsim.models import build_model
from fedsim.models.norm import batchnorm_keys
from fedsim.trainer import ClientCall, ClientTrainer, RoundConfig
from fedsim.vectorize import (
    choose_k,
    estimate_bytes_per_client,
    fit_clients,
    layers,
    train_clients,
    vectorizable,
)
from fedsim.vectorize import plan as stacked_plan
from fedsim.vectorize.layers import Unsupported, max_pool_2x2
from fedsim.vectorize.plan import build_plan, plan_for
from strategies.fedbn import FedBNTrainer
from strategies.fedwon import AGC_LAMBDA, FedWonTrainer
from strategies.fraug import FRAugTrainer

ATOL = 1e-5  # float32 parameters after a few dozen steps: rounding differs, steps do not
RTOL = 1e-5
ATOL64 = 1e-10  # the same in float64: the steps are the same, up to rounding
CPU = torch.device("cpu")
ENGINES = ["stacked", "vmap"]  # fit_clients' two paths; "auto" takes the first the model allows


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and two threads on a shared two-core host
    slow every kernel a hundredfold while the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def client_data(n: int, shape: tuple[int, ...], classes: int, seed: int, dtype=np.float32) -> ClientData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(dtype)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    return ClientData(x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])


def perturbed_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state with every float entry moved a little: a client's own start."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            noise = 0.05 * torch.randn(value.shape, generator=generator)
            value = value + noise.abs() if key.endswith("running_var") else value + noise
        state[key] = value.clone()
    return state


def sequential(trainer, model, start, data, config, seed):
    """ClientTrainer.fit alone, on a copy of the model loaded with ``start``."""
    own = copy.deepcopy(model)
    own.load_state_dict(start, strict=True)
    generator = torch.Generator().manual_seed(seed)
    metrics = trainer.fit(own, data, config, generator, CPU)
    return own.state_dict(), metrics, generator


def assert_same(trainer, model, starts, datas, configs, seeds=None, atol=ATOL, engine="auto"):
    """Vectorised and sequential fits agree per client: every state entry, the metrics,
    and the generator's state afterwards."""
    configs = configs if isinstance(configs, list) else [configs] * len(starts)
    seeds = seeds or list(range(len(starts)))
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    fits = fit_clients(model, starts, datas, configs, generators, CPU, trainer, engine=engine)
    assert len(fits) == len(starts)
    worst = 0.0
    for client, fit in enumerate(fits):
        state, metrics, generator = sequential(
            trainer, model, starts[client], datas[client], configs[client], seeds[client]
        )
        assert list(fit.state) == list(state)
        for key, expected in state.items():
            got = fit.state[key]
            assert got.dtype == expected.dtype and got.device.type == "cpu", key
            if expected.is_floating_point():
                torch.testing.assert_close(got, expected, atol=atol, rtol=RTOL, msg=f"client {client}: {key}")
                worst = max(worst, float((got - expected).abs().max()))
            else:
                assert torch.equal(got, expected), f"client {client}: {key}"
        assert set(fit.metrics) == set(metrics)
        for name, value in metrics.items():
            assert fit.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
        # the same draws were taken from the client's generator
        assert torch.equal(torch.randperm(50, generator=generator), torch.randperm(50, generator=generators[client]))
    return fits, worst


def moved(fits, starts) -> None:
    """Training did change something (the comparison is not vacuous)."""
    for fit, start in zip(fits, starts, strict=True):
        assert any(not torch.equal(fit.state[key], start[key]) for key in start)


@pytest.mark.parametrize("engine", ENGINES)
def test_fedavg_sgd_momentum_weight_decay_equal_sizes(engine):
    model = build_model("lenet", (1, 8, 8), 4)
    starts = [model.state_dict()] * 3
    datas = [client_data(24, (1, 8, 8), 4, seed) for seed in range(3)]
    config = RoundConfig(batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3)
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config, engine=engine)
    moved(fits, starts)
    # the three clients saw different data, so they differ
    assert not torch.equal(fits[0].state["head.weight"], fits[1].state["head.weight"])


@pytest.mark.parametrize("engine", ENGINES)
def test_adam_with_weight_decay_and_epochs(engine):
    model = build_model("mlp", (1, 8, 8), 5, hidden=(16,))
    starts = [perturbed_state(model, seed) for seed in range(3)]
    datas = [client_data(20, (1, 8, 8), 5, 10 + seed) for seed in range(3)]
    config = RoundConfig(batch_size=8, lr=0.01, weight_decay=1e-2, optimizer="adam", local_epochs=2)
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config, engine=engine)
    moved(fits, starts)


@pytest.mark.parametrize("engine", ENGINES)
def test_fedprox_per_client_settings(engine):
    """FedProx's mu, and learning rate, momentum, batch size and epochs that differ per client."""
    model = build_model("mlp", (6,), 3, hidden=(8, 8))
    starts = [perturbed_state(model, seed) for seed in range(3)]
    datas = [client_data(n, (6,), 3, seed) for seed, n in enumerate((30, 17, 9))]
    base = RoundConfig(lr=0.1, momentum=0.5, weight_decay=1e-3)
    configs = [
        replace(base, batch_size=8, extra={"proximal-mu": 0.5}),
        replace(base, batch_size=5, lr=0.03, momentum=0.0, local_epochs=3, extra={"proximal-mu": 0.1}),
        replace(base, batch_size=4, momentum=0.9, local_epochs=2),
    ]
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, configs, engine=engine)
    moved(fits, starts)


def test_frozen_parameters_stay():
    """A parameter with requires_grad=False: SGD skips it (no weight decay, no momentum)."""
    model = build_model("mlp", (6,), 3, hidden=(8,))
    model.features[1].weight.requires_grad_(False)
    starts = [perturbed_state(model, seed) for seed in range(2)]
    datas = [client_data(12, (6,), 3, seed) for seed in range(2)]
    config = RoundConfig(batch_size=4, lr=0.1, momentum=0.9, weight_decay=1e-2, extra={"proximal-mu": 0.1})
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config)
    assert all(
        torch.equal(fit.state["features.1.weight"], start["features.1.weight"]) for fit, start in zip(fits, starts)
    )
    moved(fits, starts)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unequal_sizes_padded_and_masked(dtype, engine):
    """Clients with fewer batches stop; last batches of different sizes are padded."""
    model = build_model("lenet", (1, 8, 8), 3, channels=(3, 4), hidden=(10, 8)).to(dtype)
    sizes = (23, 8, 13, 1, 0)  # 3 batches (last of 7), 1 full, 2 (last of 5), 1 of one, none
    starts = [perturbed_state(model, seed) for seed in range(len(sizes))]
    numpy_dtype = np.float32 if dtype == torch.float32 else np.float64
    datas = [client_data(n, (1, 8, 8), 3, 20 + seed, numpy_dtype) for seed, n in enumerate(sizes)]
    config = RoundConfig(batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3, local_epochs=2)
    atol = ATOL if dtype == torch.float32 else ATOL64
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config, atol=atol, engine=engine)
    moved(fits[:4], starts[:4])
    assert all(torch.equal(fits[4].state[key], starts[4][key]) for key in starts[4])
    assert fits[4].metrics["train_loss"] == 0.0


def fedwon_resnet_case(data_seed: int, sizes: tuple[int, ...]):
    """FedWon's ResNet (no norm, WSConv) in float64 for three clients of ``sizes`` samples,
    each with its own AGC threshold (0.01, 0.05, 0.32: small enough that clipping happens)."""
    model = build_model("resnet", (3, 8, 8), 4, norm="none", width=4).double()
    starts = [perturbed_state(model, seed) for seed in range(len(sizes))]
    datas = [client_data(n, (3, 8, 8), 4, data_seed + seed, np.float64) for seed, n in enumerate(sizes)]
    configs = [
        RoundConfig(batch_size=6, lr=0.1, momentum=0.9, weight_decay=1e-4, extra={AGC_LAMBDA: value})
        for value in (0.01, 0.05, 0.32)
    ]
    return model, starts, datas, configs


@pytest.mark.parametrize("engine", ENGINES)
def test_fedwon_adaptive_gradient_clipping(engine):
    """AGC on every parameter but the head (WSConv gains, skip gains, biases), per client
    threshold; a small threshold so that clipping happens. In float64: in float32 a
    rounding difference can flip one unit's clip-or-not decision (about once in 50 runs,
    on either engine), which then moves the weights by 4e-5."""
    model, starts, datas, configs = fedwon_resnet_case(data_seed=30, sizes=(16, 12, 7))
    fits, _ = assert_same(FedWonTrainer(), model, starts, datas, configs, atol=ATOL64, engine=engine)
    assert [fit.metrics[AGC_LAMBDA] for fit in fits] == [0.01, 0.05, 0.32]
    moved(fits, starts)
    with pytest.raises(ValueError, match="agc-lambda"):
        fit_clients(model, starts, datas, RoundConfig(), [torch.Generator()] * 3, CPU, FedWonTrainer())


@pytest.mark.parametrize("engine", ENGINES)
def test_fedbn_own_batchnorm_and_running_stats(engine):
    """Each client starts from its own BatchNorm layers and ends with its own running
    statistics; unequal last batches are grouped by size."""
    model = build_model("resnet", (3, 8, 8), 4, norm="bn", width=4)
    global_state = model.state_dict()
    local = batchnorm_keys(model)
    starts = []
    for seed in range(3):
        own = perturbed_state(model, seed)
        starts.append({key: own[key] if key in local else global_state[key] for key in global_state})
    datas = [client_data(n, (3, 8, 8), 4, 40 + seed) for seed, n in enumerate((20, 11, 16))]
    config = RoundConfig(batch_size=8, lr=0.05, momentum=0.9, local_epochs=2)
    fits, _ = assert_same(FedBNTrainer(), model, starts, datas, config, engine=engine)
    tracked = [key for key in global_state if key.endswith("num_batches_tracked")]
    # 2 epochs of 3, 2 and 2 batches
    assert [int(fit.state[tracked[0]]) - int(start[tracked[0]]) for fit, start in zip(fits, starts)] == [6, 4, 4]
    means = [key for key in global_state if key.endswith("running_mean")]
    assert not torch.equal(fits[0].state[means[0]], fits[1].state[means[0]])


@pytest.mark.parametrize("engine", ENGINES)
def test_batchnorm1d_skips_single_sample_batches(engine):
    """DigitCNN has BatchNorm1d: a trailing batch of one sample is skipped, as fit does.

    In float64: BatchNorm over a batch of two, the second client's last, amplifies the
    rounding differences of float32 a thousandfold (1e-3 on weights that move by 1)."""
    model = build_model("digitcnn", (1, 8, 8), 3, norm="bn").double()
    starts = [model.state_dict()] * 2
    datas = [client_data(n, (1, 8, 8), 3, 50 + seed, np.float64) for seed, n in enumerate((9, 6))]  # 4+4+1, 4+2
    config = RoundConfig(batch_size=4, lr=0.02, momentum=0.9)
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config, atol=ATOL64, engine=engine)
    assert int(fits[0].state["features.1.num_batches_tracked"]) == 2
    with pytest.raises(UserError, match="batch_size = 1"):
        fit_clients(model, starts, datas, replace(config, batch_size=1), [torch.Generator()] * 2, CPU)


def test_train_clients_matches_trainer_train_for_fedbn():
    """receive, vectorised fit, send: FedBN's replies and kept BatchNorm states."""
    model = build_model("resnet", (3, 8, 8), 3, norm="bn", width=4)
    trainer = FedBNTrainer()
    arrays = ArrayRecord(model.state_dict())
    local = batchnorm_keys(model)
    own = perturbed_state(model, 7)
    states = [{}, {key: own[key].numpy() for key in local}]  # a new client, and one with its own BN
    datas = [client_data(n, (3, 8, 8), 3, 60 + seed) for seed, n in enumerate((10, 13))]
    config = RoundConfig(batch_size=4, lr=0.05)
    calls = [
        ClientCall(model, arrays, datas[client], config, states[client], torch.Generator().manual_seed(seed), CPU)
        for client, seed in enumerate((1, 2))
    ]
    results = train_clients(trainer, calls)
    for client, result in enumerate(results):
        reference = trainer.train(
            ClientCall(
                copy.deepcopy(model),
                arrays,
                datas[client],
                config,
                states[client],
                torch.Generator().manual_seed(client + 1),
                CPU,
            )
        )
        got, expected = result.arrays.to_torch_state_dict(), reference.arrays.to_torch_state_dict()
        assert set(got) == set(expected) and not set(got) & local
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=ATOL, rtol=RTOL)
        assert set(result.state) == set(reference.state) == local
        for key in local:
            np.testing.assert_allclose(result.state[key], reference.state[key], atol=ATOL, rtol=RTOL)
        assert result.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"], rel=1e-5)


def test_mixed_optimizers_refused():
    model = build_model("mlp", (4,), 2, hidden=(4,))
    datas = [client_data(4, (4,), 2, seed) for seed in range(2)]
    configs = [RoundConfig(optimizer="adam"), RoundConfig(optimizer="sgd")]
    with pytest.raises(ValueError, match="same optimizer"):
        fit_clients(model, [model.state_dict()] * 2, datas, configs, [torch.Generator()] * 2, CPU)


def test_vectorizable_known_trainers_and_overrides():
    for trainer in (ClientTrainer(), FedWonTrainer(), FedBNTrainer()):
        assert vectorizable(trainer) == (True, "")

    class OwnFit(ClientTrainer):
        def fit(self, model, data, config, generator, device):
            return super().fit(model, data, config, generator, device)

    class OwnLoss(FedBNTrainer):
        def batch_loss(self, model, x, y):
            return super().batch_loss(model, x, y)

    class OwnClip(FedWonTrainer):
        def before_step(self, model, config):
            pass

    class OwnReceive(FedBNTrainer):  # receive and send are outside fit: still vectorisable
        def receive(self, model, arrays, state):
            super().receive(model, arrays, state)

    ok, reason = vectorizable(OwnFit())
    assert not ok and "overrides fit" in reason
    ok, reason = vectorizable(OwnLoss())
    assert not ok and "overrides batch_loss" in reason
    ok, reason = vectorizable(OwnClip())
    assert not ok and "overrides before_step" in reason
    assert vectorizable(OwnReceive()) == (True, "")
    ok, reason = vectorizable(FRAugTrainer())
    assert not ok and "declares can_vectorize = False" in reason

    class Declined(OwnReceive):  # nothing the loop cannot reproduce, but it says no
        can_vectorize = False

    assert vectorizable(Declined()) == (False, "Declined declares can_vectorize = False")
    patched = ClientTrainer()
    patched.before_step = lambda model, config: None
    assert not vectorizable(patched)[0]
    model = build_model("mlp", (4,), 2, hidden=(4,))
    with pytest.raises(ValueError, match="overrides fit"):
        fit_clients(
            model, [model.state_dict()], [client_data(4, (4,), 2, 0)], RoundConfig(), [torch.Generator()], CPU, OwnFit()
        )


def test_choose_k_respects_memory_limit():
    model = build_model("lenet", (1, 28, 28), 10)
    per_client = estimate_bytes_per_client(model, 32, (1, 28, 28))
    parameters = sum(p.numel() * 4 for p in model.parameters())
    assert per_client > 4 * parameters  # parameters, gradients, optimiser state, activations
    assert estimate_bytes_per_client(model, 64, (1, 28, 28)) > per_client  # activations grow with the batch
    assert choose_k(model, 32, (1, 28, 28), CPU, limit=5 * per_client + 1) == 5
    assert choose_k(model, 32, (1, 28, 28), CPU, limit=5 * per_client - 1) == 4
    assert choose_k(model, 32, (1, 28, 28), CPU, limit=10) == 1  # never fewer than one client
    assert choose_k(model, 32, (1, 28, 28), CPU, limit=100 * per_client, max_k=7) == 7
    assert choose_k(model, 32, (1, 28, 28), CPU) >= 1  # the host's MemAvailable


# The stacked path (fedsim.vectorize.plan): its layouts, its pieces, and what it refuses.


@pytest.fixture(params=["cpu", "folded", "per-client"])
def layout(request, monkeypatch):
    """How the stacked layers run: as on the CPU (per client where activations are large,
    max_pool_2x2), as on a GPU (folded: one grouped convolution, one batch_norm for all
    clients, max_pool2d), or every layer that can, per client."""
    if request.param == "folded":
        monkeypatch.setattr(stacked_plan, "PER_CLIENT_DEVICES", frozenset())
        monkeypatch.setattr(stacked_plan, "FAST_POOL_DEVICES", frozenset())
    elif request.param == "per-client":
        monkeypatch.setattr(stacked_plan, "PER_CLIENT_CONV", 0)
        monkeypatch.setattr(stacked_plan, "PER_CLIENT_ACTIVATION", 0)
    return request.param


def test_stacked_layouts_lenet_unequal_sizes_epochs(layout):
    """Convolutions, ReLU fused into 2x2 max-pooling, Linear; padded last batches, clients
    that stop early, per-client weight decay (the unfused SGD)."""
    model = build_model("lenet", (1, 8, 8), 3, channels=(3, 4), hidden=(10, 8))
    sizes = (23, 8, 13, 5)
    starts = [perturbed_state(model, seed) for seed in range(len(sizes))]
    datas = [client_data(n, (1, 8, 8), 3, 70 + seed) for seed, n in enumerate(sizes)]
    base = RoundConfig(batch_size=8, lr=0.1, momentum=0.9, local_epochs=2)
    configs = [replace(base, weight_decay=wd) for wd in (0.0, 1e-3, 1e-2, 1e-3)]
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, configs, engine="stacked")
    moved(fits, starts)


def test_stacked_layouts_batchnorm_running_stats(layout):
    """BatchNorm2d and BatchNorm1d per client (or as K * C channels of one batch_norm):
    batch statistics, running mean and unbiased running variance, num_batches_tracked,
    batches grouped by size; FedProx on top. Float64, as BatchNorm over a batch of two
    amplifies float32 rounding."""
    model = build_model("digitcnn", (1, 8, 8), 3, norm="bn").double()
    starts = [perturbed_state(model, seed) for seed in range(3)]
    datas = [client_data(n, (1, 8, 8), 3, 80 + seed, np.float64) for seed, n in enumerate((11, 6, 8))]
    config = RoundConfig(batch_size=4, lr=0.02, momentum=0.9, extra={"proximal-mu": 0.1})
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config, atol=ATOL64, engine="stacked")
    # 3 batches (4, 4, 3), 2 (4, 2) and 2 (4, 4)
    tracked = "features.1.num_batches_tracked"
    assert [int(fit.state[tracked]) - int(start[tracked]) for fit, start in zip(fits, starts)] == [3, 2, 2]


@pytest.mark.parametrize("norm", ["gn", "ln"])
def test_stacked_layouts_group_and_layer_norm_adam(layout, norm):
    """GroupNorm and LayerNorm with each client's affine; Adam with per-client learning
    rates and weight decay (the unfused Adam). Float64: Adam divides by the gradient's
    running scale, so on a weight that normalisation makes nearly scale-invariant (a
    near-zero gradient) float32 rounding moves it by up to 3e-3 after a few steps, in
    either engine (vmap as much as stacked); in float64 they agree to 5e-12."""
    model = build_model("digitcnn", (1, 8, 8), 3, norm=norm).double()
    starts = [perturbed_state(model, seed) for seed in range(2)]
    datas = [client_data(n, (1, 8, 8), 3, 90 + seed, np.float64) for seed, n in enumerate((10, 7))]
    configs = [
        RoundConfig(batch_size=4, lr=lr, weight_decay=wd, optimizer="adam") for lr, wd in ((1e-3, 0.0), (3e-3, 1e-2))
    ]
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, configs, atol=ATOL64, engine="stacked")
    moved(fits, starts)


def test_stacked_layouts_fedwon_resnet(layout):
    """WSConv2d standardised per client, the residual branch times each client's skip
    gain, the shortcut's sum, adaptive average pooling; AGC per client. Float64: AGC
    clips a unit or not by comparing two norms, so in float32 a rounding difference at a
    unit on the threshold can move a weight by 1e-5 or more (seen about once in fifty
    runs of test_fedwon_adaptive_gradient_clipping, either engine)."""
    model, starts, datas, configs = fedwon_resnet_case(data_seed=100, sizes=(12, 9, 6))
    fits, _ = assert_same(FedWonTrainer(), model, starts, datas, configs, atol=ATOL64, engine="stacked")
    moved(fits, starts)


def test_stacked_layouts_fedbn_resnet(layout):
    model = build_model("resnet", (3, 8, 8), 3, norm="bn", width=4)
    starts = [perturbed_state(model, seed) for seed in range(2)]
    datas = [client_data(n, (3, 8, 8), 3, 110 + seed) for seed, n in enumerate((9, 12))]
    config = RoundConfig(batch_size=4, lr=0.05, momentum=0.9)
    fits, _ = assert_same(FedBNTrainer(), model, starts, datas, config, engine="stacked")
    moved(fits, starts)


def test_max_pool_2x2_matches_max_pool2d_bitwise():
    """The same values and the same gradient as max_pool2d, ties included (constant
    regions: the first maximum of the window gets the gradient), odd sizes included; and
    with ``relu`` the same as max_pool2d of ReLU."""
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 2, 8, 8), (2, 3, 7, 9), (4, 5, 5)]:
        x = torch.randn(shape, generator=generator)
        x[..., :4, :4] = 0.5  # ties among positive values
        x[..., 4:, :2] = -1.0  # ties among negative values
        x = x.round(decimals=1)  # more ties
        grad = torch.randn(*shape[:-2], shape[-2] // 2, shape[-1] // 2, generator=generator)
        for relu in (False, True):
            a = x.clone().requires_grad_(True)
            b = x.clone().requires_grad_(True)
            expected = F.max_pool2d(torch.relu(a) if relu else a, 2)
            got = max_pool_2x2(b, relu)
            assert torch.equal(got, expected)
            expected.backward(grad)
            got.backward(grad)
            assert torch.equal(b.grad, a.grad), (shape, relu)


@pytest.mark.parametrize("engine", ENGINES)
def test_shared_layer_and_tied_weights(engine, monkeypatch):
    """A Linear called twice (one module under two names: its two gradients summed, not
    one overwriting the other, and the model left holding its own parameters), and one
    parameter in two modules; in the stacked path with every Linear's weight gradient
    written into a buffer kept across steps, groups of different sizes included."""
    monkeypatch.setattr(layers, "GRADIENT_BUFFER_ELEMENTS", 1)
    shared = nn.Linear(6, 6)
    twice = nn.Sequential(nn.Flatten(), shared, nn.ReLU(), shared, nn.Tanh(), nn.Linear(6, 3))
    tied = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
    tied[5].weight = tied[3].weight
    for model, classes in ((twice, 3), (tied, 5)):
        own = {name: tensor for name, tensor in model.named_parameters(remove_duplicate=False)}
        starts = [perturbed_state(model, seed) for seed in range(3)]
        aliases = {"3.weight": "1.weight", "3.bias": "1.bias"} if model is twice else {"5.weight": "3.weight"}
        for start in starts:  # a state dict's entries for one tensor hold the same values
            for alias, name in aliases.items():
                start[alias] = start[name]
        datas = [client_data(n, (6,), classes, 120 + seed) for seed, n in enumerate((14, 5, 9))]
        for config in (
            RoundConfig(batch_size=4, lr=0.1, momentum=0.9, weight_decay=1e-3, local_epochs=2),
            RoundConfig(batch_size=4, lr=0.01, optimizer="adam", local_epochs=2),
        ):
            fits, _ = assert_same(ClientTrainer(), model, starts, datas, config, engine=engine)
            moved(fits, starts)
        assert all(tensor is own[name] for name, tensor in model.named_parameters(remove_duplicate=False))
        assert all(tensor.device.type == "cpu" for tensor in model.parameters())


class Untraceable(nn.Module):
    """A forward that takes the batch's length: torch.fx cannot trace it (vmap can)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).reshape(len(x), -1))


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.PReLU(), nn.Linear(8, 3)), "PReLU"),
        (Untraceable(), "torch.fx cannot trace"),
        (nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)), "inplace"),
    ],
)
def test_unsupported_model_falls_back_to_vmap(model, reason):
    """A layer the stacked path does not know, a forward fx cannot trace, an in-place
    ReLU: build_plan refuses, engine="stacked" is a ValueError, and the default engine
    trains with vmap, still as the sequential trainer does."""
    with pytest.raises(Unsupported, match=reason):
        build_plan(model, (6,), torch.float32, CPU)
    starts = [perturbed_state(model, seed) for seed in range(2)]
    datas = [client_data(n, (6,), 3, 130 + seed) for seed, n in enumerate((10, 7))]
    config = RoundConfig(batch_size=4, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=reason):
        fit_clients(model, starts, datas, config, [torch.Generator()] * 2, CPU, engine="stacked")
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config)  # engine="auto"
    moved(fits, starts)
    with pytest.raises(ValueError, match="engine"):
        fit_clients(model, starts, datas, config, [torch.Generator()] * 2, CPU, engine="jit")


def test_plan_kept_per_model_until_it_changes():
    model = build_model("lenet", (1, 8, 8), 3)
    plan = plan_for(model, (1, 8, 8), torch.float32, CPU)
    assert plan_for(model, (1, 8, 8), torch.float32, CPU) is plan
    assert plan_for(model, (1, 8, 8), torch.float32, CPU, batch_size=4) is not plan  # another layout
    model.head = nn.Linear(model.head.in_features, 3)  # a new layer: a new plan
    assert plan_for(model, (1, 8, 8), torch.float32, CPU) is not plan
    model.features[1] = nn.PReLU()  # refused, and remembered as refused
    for _ in range(2):
        with pytest.raises(Unsupported, match="PReLU"):
            plan_for(model, (1, 8, 8), torch.float32, CPU)


def test_auto_trains_a_large_model_one_at_a_time_on_a_cpu():
    """On a CPU vectorising the 14M-parameter digit CNN was measured slower than one at a
    time; LeNet-sized models are vectorised as far as memory allows."""
    from fedsim.vectorize import auto_k

    large = build_model("digitcnn", (3, 28, 28), 10)
    k, why = auto_k(large, 32, (3, 28, 28), "cpu", max_k=10)
    assert k == 1 and "14.2M parameters" in why
    small = build_model("lenet", (1, 28, 28), 10)
    k, why = auto_k(small, 32, (1, 28, 28), "cpu", max_k=10)
    assert k == min(10, choose_k(small, 32, (1, 28, 28), "cpu")) and "clients at once on cpu" in why
