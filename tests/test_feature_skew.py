"""FedBN and FedWon: the rules of the papers, and the models whose normalisation swaps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.build import load_experiment
from fedsim.clipping import adaptive_clip_
from fedsim.data import DATASETS, ClientData, DatasetInfo, load_dataset
from fedsim.data.dataset import Dataset
from fedsim.errors import UserError
from fedsim.models import build_model
from fedsim.models.norm import RELU_GAMMA, WSConv2d, batchnorm_keys, has_normalization
from fedsim.runner import run_experiment
from fedsim.state import ClientStateStore
from fedsim.trainer import ClientCall, RoundConfig
from strategies.fedbn import FedBNTrainer

from .conftest import QUICKSTART, tiny_experiment

NORM_MODELS = {"digitcnn": (3, 28, 28), "resnet": (3, 28, 28), "alexnet": (3, 64, 64)}


# -- models -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(NORM_MODELS))
@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "none"])
def test_models_swap_their_normalisation(name, norm):
    shape = NORM_MODELS[name]
    model = build_model(name, shape, 10, norm=norm)
    kinds = {type(m) for m in model.modules()}
    expected = {"bn": nn.BatchNorm2d, "gn": nn.GroupNorm, "ln": nn.GroupNorm, "none": WSConv2d}[norm]
    assert expected in kinds
    assert has_normalization(model) == (norm != "none")
    model.eval()
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_digitcnn_has_the_papers_shape():
    model = build_model("digitcnn", (3, 28, 28), 10)
    dense = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(6272, 2048), (2048, 512), (512, 10)]
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [64, 64, 128]


def test_wsconv_standardises_each_output_channel():
    torch.manual_seed(0)
    conv = WSConv2d(3, 8, 5)
    with torch.no_grad():
        conv.weight.mul_(7).add_(3)  # far from standard
        conv.gain.copy_(torch.linspace(0.5, 2.0, 8).view(8, 1, 1, 1))
    fan_in = 3 * 5 * 5
    w_hat = conv.standardized_weight().detach()
    # W_hat_i = g_i * gamma * (W_i - mean_i) / (std_i * sqrt(N)): undo the scale and the
    # standardised weight must have zero mean and unit variance per output channel.
    standardized = w_hat * math.sqrt(fan_in) / (conv.gain.detach() * RELU_GAMMA)
    flat = standardized.view(8, -1)
    assert torch.allclose(flat.mean(dim=1), torch.zeros(8), atol=1e-5)
    assert torch.allclose(flat.var(dim=1, unbiased=False), torch.ones(8), atol=1e-3)
    # 1 / std(ReLU(z)) for z ~ N(0, 1), analytically; NFNets' sampled constant is 1.7139.
    assert RELU_GAMMA == pytest.approx(1 / math.sqrt(0.5 - 1 / (2 * math.pi)))
    assert RELU_GAMMA == pytest.approx(1.7139, rel=1e-3)
    expected = torch.nn.functional.conv2d(torch.ones(1, 3, 5, 5), w_hat, conv.bias)
    assert torch.allclose(conv(torch.ones(1, 3, 5, 5)), expected)


# -- adaptive gradient clipping -----------------------------------------------------
def test_agc_clips_exactly_the_units_whose_ratio_exceeds_lambda():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.6, 0.8]]))  # norms 5, 0, 1, 1
    weight.grad = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.05, 0.0], [0.3, 0.4]])  # norms 1, 1, 0.05, 0.5
    lam = 0.1
    adaptive_clip_([weight], lam)
    grad_norms = weight.grad.norm(dim=1)
    # unit 0: 1 / 5 = 0.2 > 0.1 -> clipped to 0.1 * 5 = 0.5
    # unit 1: 1 / max(0, 1e-3) = 1000 > 0.1 -> clipped to 0.1 * 1e-3
    # unit 2: 0.05 / 1 = 0.05 <= 0.1 -> untouched
    # unit 3: 0.5 / 1 = 0.5 > 0.1 -> clipped to 0.1, direction kept
    assert grad_norms.tolist() == pytest.approx([0.5, 1e-4, 0.05, 0.1], rel=1e-5)
    assert torch.allclose(weight.grad[2], torch.tensor([0.05, 0.0]))
    assert torch.allclose(weight.grad[3] / grad_norms[3], torch.tensor([0.6, 0.8]))


def test_agc_treats_a_conv_output_channel_as_one_unit():
    weight = nn.Parameter(torch.ones(2, 3, 2, 2))  # each channel's norm: sqrt(12)
    weight.grad = torch.ones(2, 3, 2, 2)
    weight.grad[1] *= 0.01
    adaptive_clip_([weight], 0.5)
    norms = weight.grad.flatten(1).norm(dim=1)
    assert norms[0].item() == pytest.approx(0.5 * math.sqrt(12), rel=1e-5)
    assert norms[1].item() == pytest.approx(0.01 * math.sqrt(12), rel=1e-5)


# -- FedBN --------------------------------------------------------------------------
def _client_data(n: int = 24) -> ClientData:
    generator = np.random.default_rng(0)
    x = generator.random((n, 3, 28, 28), dtype=np.float32)
    y = generator.integers(0, 10, n)
    return ClientData(x, y, x[:4], y[:4])


def test_fedbn_never_sends_and_never_overwrites_batchnorm():
    torch.manual_seed(0)
    model = build_model("resnet", (3, 28, 28), 10, norm="bn")
    bn = batchnorm_keys(model)
    assert {"features.1.running_mean", "features.1.weight", "features.1.num_batches_tracked"} <= bn
    global_arrays = ArrayRecord(model.state_dict())
    trainer = FedBNTrainer()
    config = RoundConfig(server_round=1, lr=0.1)
    first = trainer.train(
        ClientCall(model, global_arrays, _client_data(), config, {}, torch.Generator(), torch.device("cpu"))
    )
    assert not bn & set(first.arrays.keys()), "BatchNorm tensors must not leave the client"
    assert set(first.state) == bn

    # The server (wrongly) sends BatchNorm tensors of its own: the client keeps its own.
    poisoned = {k: v.clone() for k, v in build_model("resnet", (3, 28, 28), 10, norm="bn").state_dict().items()}
    for key in bn:
        if poisoned[key].is_floating_point():
            poisoned[key].fill_(123.0)
    fresh = build_model("resnet", (3, 28, 28), 10, norm="bn")
    trainer.receive(fresh, ArrayRecord(poisoned), first.state)
    for key in bn:
        assert np.array_equal(fresh.state_dict()[key].numpy(), first.state[key]), key
    shared = next(k for k in poisoned if k not in bn)
    assert torch.equal(fresh.state_dict()[shared], poisoned[shared])


def test_fedbn_averages_uniformly_by_default():
    experiment = tiny_experiment("strategy.name=fedbn", "model.name=resnet", "rounds=1")
    assert experiment.strategy.params["weighting"] == "uniform"
    from flwr.app import MetricRecord, RecordDict

    from fedsim.build import make_strategy

    strategy = make_strategy(experiment, 2)
    replies = []
    for value, count in ((0.0, 10), (1.0, 30)):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": _array(value)}),
                "metrics": MetricRecord({"num-examples": count, "train_loss": value}),
            }
        )
        replies.append(_reply(content))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays["w"].numpy().tolist() == [0.5]  # uniform, not (0*10 + 1*30) / 40 = 0.75
    strategy.weighting = "samples"
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays["w"].numpy().tolist() == [0.75]


def _array(value: float):
    from flwr.app import Array

    return Array(np.array([value], dtype=np.float32))


def _reply(content):
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    instruction = Message(content, dst_node_id=5, message_type="train")
    return Message(content, reply_to=instruction)


@pytest.mark.parametrize("engine", ["inprocess", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])])
def test_fedbn_batchnorm_statistics_survive_rounds(engine, tmp_path):
    """num_batches_tracked counts every batch a client's BN layer has ever seen: it keeps
    growing from round to round only if the client's BN came back from its state."""
    states = {}
    for rounds in (1, 2):  # a checkpoint keeps only the newest state, so run one round, then two
        experiment = tiny_experiment(
            "strategy.name=fedbn", "model.name=resnet", "model.width=4", f"engine.name={engine}",
            f"rounds={rounds}", "client.batch_size=64",
        )  # fmt: skip
        run_experiment(experiment, tmp_path / f"run{rounds}")
        states[rounds] = ClientStateStore(tmp_path / f"run{rounds}/client_state")
    key = "features.1.num_batches_tracked"
    for client in range(4):
        after_one, after_two = int(states[1].load(client, 1)[key]), int(states[2].load(client, 2)[key])
        assert after_one > 0
        assert after_two == 2 * after_one, "round 2 must continue from round 1's statistics"
        mean_one = states[1].load(client, 1)["features.1.running_mean"]
        mean_two = states[2].load(client, 2)["features.1.running_mean"]
        assert not np.array_equal(mean_one, mean_two)


def test_fedbn_reports_client_side_accuracy(tmp_path):
    experiment = tiny_experiment("strategy.name=fedbn", "model.name=resnet", "model.width=4")
    summary = run_experiment(experiment, tmp_path / "run").summary
    metrics = pd.read_csv(tmp_path / "run/metrics.csv", dtype={"id": str})
    assert summary["accuracy_evaluated_on"] == "client-holdout"
    assert "server" not in set(metrics.scope), "FedBN's global arrays are not a model to evaluate"
    final = metrics[(metrics.scope == "federated") & (metrics.id == "evaluate") & (metrics.metric == "accuracy")]
    assert summary["accuracy"] == pytest.approx(final.value.iloc[-1])


# -- FedWon -------------------------------------------------------------------------
@pytest.mark.parametrize("model", sorted(NORM_MODELS))
def test_fedwon_model_has_no_normalisation(model):
    experiment = load_experiment(QUICKSTART, ["strategy.name=fedwon", f"model.name={model}"])
    assert experiment.model.params["norm"] == "none"
    built = build_model(model, NORM_MODELS[model], 10, **experiment.model.params)
    assert not has_normalization(built)
    convs = [m for m in built.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(conv, WSConv2d) for conv in convs)


def test_fedwon_clips_the_body_but_not_the_classifier():
    from strategies.fedwon import FedWonTrainer

    torch.manual_seed(0)
    model = build_model("resnet", (3, 28, 28), 10, norm="none", width=4)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 100.0)  # far beyond any threshold
    head_before = [p.grad.clone() for p in model.head.parameters()]
    FedWonTrainer().before_step(model, RoundConfig(server_round=1, extra={"agc-lambda": 0.01}))
    assert all(torch.equal(before, p.grad) for before, p in zip(head_before, model.head.parameters()))
    conv = model.features[0]
    ratio = conv.weight.grad.flatten(1).norm(dim=1) / conv.weight.detach().flatten(1).norm(dim=1).clamp_min(1e-3)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.01), rtol=1e-4)


def test_norm_free_resnet_scales_its_residual_branches_by_a_learnable_gain():
    torch.manual_seed(0)
    model = build_model("resnet", (3, 28, 28), 10, norm="none", width=4)
    gains = [block.skip_gain for block in model.modules() if getattr(block, "skip_gain", None) is not None]
    assert len(gains) == 3 and all(gain.item() == 1.0 and gain.requires_grad for gain in gains)
    shut = build_model("resnet", (3, 28, 28), 10, norm="none", width=4, residual_gain=0.0)
    block = shut.features[3]  # the first residual block: with its branch shut it is relu(x)
    x = torch.rand(2, 4, 28, 28)
    assert torch.equal(block(x), torch.relu(x))
    assert all(getattr(b, "skip_gain", None) is None for b in build_model("resnet", (3, 28, 28), 10).modules())


def test_fedwon_sends_its_lambda_to_the_clients():
    from flwr.app import ConfigRecord

    from fedsim.build import make_strategy
    from fedsim.engine import InProcessGrid

    experiment = tiny_experiment("strategy.name=fedwon", "model.name=resnet", "strategy.clip_lambda=0.5")
    strategy = make_strategy(experiment, num_clients=2)
    grid = InProcessGrid(client_app=None, num_clients=2)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.content["config"]["agc-lambda"] for m in messages] == [0.5, 0.5]


def test_fedwon_refuses_models_it_cannot_make_norm_free():
    with pytest.raises(UserError, match="needs a model with a 'norm' option"):
        load_experiment(QUICKSTART, ["strategy.name=fedwon", "model.name=lenet"])
    with pytest.raises(UserError, match="conflicts with strategy 'fedwon'"):
        load_experiment(QUICKSTART, ["strategy.name=fedwon", "model.name=resnet", "model.norm=bn"])


def test_fedwon_trains_at_batch_size_one(tmp_path):
    experiment = tiny_experiment(
        "strategy.name=fedwon",
        "model.name=resnet",
        "model.width=8",
        "client.batch_size=1",
        "client.lr=0.02",
        "partition.num_clients=2",
        "dataset.test_fraction=0.9",
        "rounds=3",
    )
    summary = run_experiment(experiment, tmp_path / "run").summary
    metrics = pd.read_csv(tmp_path / "run/metrics.csv", dtype={"id": str})
    loss = metrics[(metrics.scope == "server") & (metrics.metric == "loss")].value
    assert loss.iloc[-1] < loss.iloc[0]
    assert summary["accuracy"] > 0.2  # ten classes: chance is 0.1


def test_batchnorm1d_at_batch_size_one_is_a_clear_error(tmp_path):
    experiment = tiny_experiment("model.name=digitcnn", "client.batch_size=1", "rounds=1")
    with pytest.raises(UserError, match="batch_size = 1 cannot train the model's BatchNorm1d"):
        run_experiment(experiment, tmp_path / "run")


# -- per-domain accuracy ------------------------------------------------------------
def _two_domain_digits(test_fraction: float = 0.2) -> Dataset:
    """digits and its photographic negative: a toy two-domain dataset."""
    base = load_dataset("digits")
    return Dataset(
        "digits-negative",
        np.concatenate([base.x_train, 1 - base.x_train]),
        np.concatenate([base.y_train, base.y_train]),
        np.concatenate([base.x_test, 1 - base.x_test]),
        np.concatenate([base.y_test, base.y_test]),
        base.classes,
        domains=("plain", "negative"),
        domain_train=np.repeat([0, 1], len(base.y_train)),
        domain_test=np.repeat([0, 1], len(base.y_test)),
    )


def test_accuracy_by_domain(tmp_path, monkeypatch):
    monkeypatch.setitem(
        DATASETS,
        "digits-negative",
        DatasetInfo(_two_domain_digits, "toy", (1, 8, 8), tuple("0123456789"), ("plain", "negative")),
    )
    experiment = tiny_experiment("dataset.name=digits-negative", "rounds=3")
    summary = run_experiment(experiment, tmp_path / "run").summary
    assert set(summary["accuracy_by_domain"]) == {"plain", "negative"}
    metrics = pd.read_csv(tmp_path / "run/metrics.csv", dtype={"id": str})
    domain = metrics[(metrics.scope == "domain") & (metrics["round"] == 3)]
    assert dict(zip(domain.id, domain.value)) == pytest.approx(summary["accuracy_by_domain"])
    # The domains split the clients' held-out samples: weighted by how many each domain has
    # there, their accuracies give back the clients' example-weighted accuracy.
    from fedsim.environment import RunEnvironment
    from fedsim.worker import worker_for

    worker = worker_for(RunEnvironment(experiment, tmp_path / "run"))
    held_out = np.concatenate([worker.client_data(client, 1).domain_test for client in range(4)])
    counts = np.bincount(held_out, minlength=2)
    combined = (
        counts[0] * summary["accuracy_by_domain"]["plain"] + counts[1] * summary["accuracy_by_domain"]["negative"]
    ) / counts.sum()
    overall = metrics[(metrics.scope == "federated") & (metrics.id == "evaluate") & (metrics.metric == "accuracy")]
    assert combined == pytest.approx(overall.value.iloc[-1], abs=1e-6)
