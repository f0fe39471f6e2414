"""Vectorised clients (fedsim.vectorize) take the steps the sequential trainer takes."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.data import ClientData
from fedsim.errors import UserError
from fedsim.models import build_model
from fedsim.models.norm import batchnorm_keys
from fedsim.trainer import ClientTrainer, RoundConfig
from fedsim.vectorize import (
    choose_k,
    estimate_bytes_per_client,
    fit_clients,
    train_clients,
    vectorizable,
)
from strategies.fedbn import FedBNTrainer
from strategies.fedwon import AGC_LAMBDA, FedWonTrainer
from strategies.fraug import FRAugTrainer

ATOL = 1e-5  # float32 parameters after a few dozen steps: rounding differs, steps do not
RTOL = 1e-5
ATOL64 = 1e-10  # the same in float64: the steps are the same, up to rounding
CPU = torch.device("cpu")


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


def assert_same(trainer, model, starts, datas, configs, seeds=None, atol=ATOL):
    """Vectorised and sequential fits agree per client: every state entry, the metrics,
    and the generator's state afterwards."""
    configs = configs if isinstance(configs, list) else [configs] * len(starts)
    seeds = seeds or list(range(len(starts)))
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    fits = fit_clients(model, starts, datas, configs, generators, CPU, trainer)
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


def test_fedavg_sgd_momentum_weight_decay_equal_sizes():
    model = build_model("lenet", (1, 8, 8), 4)
    starts = [model.state_dict()] * 3
    datas = [client_data(24, (1, 8, 8), 4, seed) for seed in range(3)]
    config = RoundConfig(batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3)
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config)
    moved(fits, starts)
    # the three clients saw different data, so they differ
    assert not torch.equal(fits[0].state["head.weight"], fits[1].state["head.weight"])


def test_adam_with_weight_decay_and_epochs():
    model = build_model("mlp", (1, 8, 8), 5, hidden=(16,))
    starts = [perturbed_state(model, seed) for seed in range(3)]
    datas = [client_data(20, (1, 8, 8), 5, 10 + seed) for seed in range(3)]
    config = RoundConfig(batch_size=8, lr=0.01, weight_decay=1e-2, optimizer="adam", local_epochs=2)
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config)
    moved(fits, starts)


def test_fedprox_per_client_settings():
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
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, configs)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unequal_sizes_padded_and_masked(dtype):
    """Clients with fewer batches stop; last batches of different sizes are padded."""
    model = build_model("lenet", (1, 8, 8), 3, channels=(3, 4), hidden=(10, 8)).to(dtype)
    sizes = (23, 8, 13, 1, 0)  # 3 batches (last of 7), 1 full, 2 (last of 5), 1 of one, none
    starts = [perturbed_state(model, seed) for seed in range(len(sizes))]
    numpy_dtype = np.float32 if dtype == torch.float32 else np.float64
    datas = [client_data(n, (1, 8, 8), 3, 20 + seed, numpy_dtype) for seed, n in enumerate(sizes)]
    config = RoundConfig(batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3, local_epochs=2)
    atol = ATOL if dtype == torch.float32 else ATOL64
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config, atol=atol)
    moved(fits[:4], starts[:4])
    assert all(torch.equal(fits[4].state[key], starts[4][key]) for key in starts[4])
    assert fits[4].metrics["train_loss"] == 0.0


def test_fedwon_adaptive_gradient_clipping():
    """AGC on every parameter but the head (WSConv gains, skip gains, biases), per client
    threshold; a small threshold so that clipping happens."""
    model = build_model("resnet", (3, 8, 8), 4, norm="none", width=4)
    starts = [perturbed_state(model, seed) for seed in range(3)]
    datas = [client_data(n, (3, 8, 8), 4, 30 + seed) for seed, n in enumerate((16, 12, 7))]
    configs = [
        RoundConfig(batch_size=6, lr=0.1, momentum=0.9, weight_decay=1e-4, extra={AGC_LAMBDA: value})
        for value in (0.01, 0.05, 0.32)
    ]
    fits, _ = assert_same(FedWonTrainer(), model, starts, datas, configs)
    assert [fit.metrics[AGC_LAMBDA] for fit in fits] == [0.01, 0.05, 0.32]
    moved(fits, starts)
    with pytest.raises(ValueError, match="agc-lambda"):
        fit_clients(model, starts, datas, RoundConfig(), [torch.Generator()] * 3, CPU, FedWonTrainer())


def test_fedbn_own_batchnorm_and_running_stats():
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
    fits, _ = assert_same(FedBNTrainer(), model, starts, datas, config)
    tracked = [key for key in global_state if key.endswith("num_batches_tracked")]
    # 2 epochs of 3, 2 and 2 batches
    assert [int(fit.state[tracked[0]]) - int(start[tracked[0]]) for fit, start in zip(fits, starts)] == [6, 4, 4]
    means = [key for key in global_state if key.endswith("running_mean")]
    assert not torch.equal(fits[0].state[means[0]], fits[1].state[means[0]])


def test_batchnorm1d_skips_single_sample_batches():
    """DigitCNN has BatchNorm1d: a trailing batch of one sample is skipped, as fit does.

    In float64: BatchNorm over a batch of two, the second client's last, amplifies the
    rounding differences of float32 a thousandfold (1e-3 on weights that move by 1)."""
    model = build_model("digitcnn", (1, 8, 8), 3, norm="bn").double()
    starts = [model.state_dict()] * 2
    datas = [client_data(n, (1, 8, 8), 3, 50 + seed, np.float64) for seed, n in enumerate((9, 6))]  # 4+4+1, 4+2
    config = RoundConfig(batch_size=4, lr=0.02, momentum=0.9)
    fits, _ = assert_same(ClientTrainer(), model, starts, datas, config, atol=ATOL64)
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
    results = train_clients(
        trainer, model, [arrays] * 2, datas, config, states, [torch.Generator().manual_seed(s) for s in (1, 2)], CPU
    )
    for client, result in enumerate(results):
        reference = trainer.train(
            copy.deepcopy(model),
            arrays,
            datas[client],
            config,
            states[client],
            torch.Generator().manual_seed(client + 1),
            CPU,
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
    assert not ok and "train" in reason
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
