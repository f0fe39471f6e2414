"""FRAug: the losses, what stays on the clients, both engines and an exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedsim.build import load_experiment
from fedsim.data import ClientData
from fedsim.errors import UserError
from fedsim.models import build_model
from fedsim.models.norm import batchnorm_keys
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from fedsim.state import ClientStateStore
from fedsim.trainer import ClientCall, RoundConfig
from strategies.fraug import FRAug, FRAugTrainer
from strategies.fraug_networks import augmentation_weight, entropy, mmd, ratio

from .conftest import QUICKSTART

# two rotated digit domains, one client each, FedBN's digit CNN (BatchNorm), a small share
SMALL = [
    "dataset.name=digits",
    'dataset.domains=["identity", "rotate-90"]',
    "partition.name=domain",
    "partition.num_clients=2",
    "partition.fraction=0.25",
    "model.name=digitcnn",
    "strategy.name=fraug",
    "client.lr=0.05",
    "client.momentum=0.5",
    "client.batch_size=32",
]


def small(*overrides: str, rounds: int = 2):
    return load_experiment(QUICKSTART, [*SMALL, f"rounds={rounds}", f"strategy.total_rounds={rounds}", *overrides])


# -- the losses ---------------------------------------------------------------------------
def test_mmd_is_zero_for_identical_samples_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=generator)
    assert mmd(x, x).item() == pytest.approx(0.0, abs=1e-6)
    near = mmd(x, x + 0.1).item()
    far = mmd(x, x + 3.0).item()
    assert 0 < near < far
    assert mmd(torch.zeros(8, 4), torch.zeros(8, 4)).item() == pytest.approx(0.0, abs=1e-6)  # no 0/0


def test_augmentation_weight_follows_exp_gamma_t_minus_T_capped_at_half():
    # t is the 0-based round (the authors' com_round): server round 1 is t = 0
    assert ratio(1, 300, 0.01) == pytest.approx(math.exp(-3.0))
    assert ratio(300, 300, 0.01) == pytest.approx(math.exp(-0.01))
    assert augmentation_weight(1, 300, 0.01) == pytest.approx(math.exp(-3.0))
    assert augmentation_weight(300, 300, 0.01) == 0.5  # capped: synthetic never outweighs real
    assert augmentation_weight(1, 300, 0.0) == 0.5
    crossing = 300 - math.log(2) / 0.01  # r = 0.5 here
    assert (
        augmentation_weight(math.floor(crossing), 300, 0.01)
        < 0.5
        <= augmentation_weight(math.ceil(crossing) + 1, 300, 0.01)
    )


def test_entropy_is_log_classes_for_uniform_logits():
    assert entropy(torch.zeros(4, 10)).item() == pytest.approx(math.log(10))
    assert entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_prototypes_are_an_ema_of_class_means_over_the_classes_present():
    prototypes = torch.ones(3, 2)
    e = torch.tensor([[2.0, 4.0], [4.0, 6.0], [10.0, 10.0]])
    FRAugTrainer.update_prototypes(prototypes, e, torch.tensor([0, 0, 2]), 0.3)
    expected = torch.tensor([[0.7 + 0.3 * 3.0, 0.7 + 0.3 * 5.0], [1.0, 1.0], [0.7 + 3.0, 0.7 + 3.0]])
    assert torch.allclose(prototypes, expected)


# -- parameters and models ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "name"),
    [
        ({"total_rounds": 0}, "total_rounds"),
        ({"generator_lr": 0.0}, "generator_lr"),
        ({"rtnet_lr": -1.0}, "rtnet_lr"),
        ({"lambda_g": float("nan")}, "lambda_g"),
        ({"lambda_rt": -0.5}, "lambda_rt"),
        ({"gamma": -0.01}, "gamma"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"prototype_momentum": 1.5}, "prototype_momentum"),
        ({"anchor": "mean"}, "anchor"),
        ({"generator_distance": "l1"}, "generator_distance"),
        ({"local_batchnorm": "none"}, "local_batchnorm"),
    ],
)
def test_bad_parameters_raise_one_line_errors(bad, name):
    with pytest.raises(ValueError, match=name) as error:
        FRAug(**{"total_rounds": 10, **bad})
    assert "\n" not in str(error.value)


def test_T_is_the_experiments_rounds_unless_set_and_errors_are_one_line():
    assert load_experiment(QUICKSTART, [*SMALL, "rounds=7"]).strategy.params["total_rounds"] == 7
    assert (
        load_experiment(QUICKSTART, [*SMALL, "rounds=7", "strategy.total_rounds=300"]).strategy.params["total_rounds"]
        == 300
    )
    with pytest.raises(UserError, match=r"\[strategy\] gamma must be") as error:
        load_experiment(QUICKSTART, [*SMALL, "strategy.total_rounds=2", "strategy.gamma=-1.0"])
    assert "\n" not in str(error.value)


def test_validate_model_needs_a_linear_head_but_not_batchnorm():
    FRAug.validate_model(build_model("digitcnn", (1, 8, 8), 10))
    FRAug.validate_model(build_model("mlp", (1, 8, 8), 10))  # no BN: the augmentation alone
    with pytest.raises(ValueError, match="'head'"):
        FRAug.validate_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))


# -- the client: what it sends and what it keeps -------------------------------------------
def _one_round(strategy: FRAug, model: nn.Module, state=None):
    """One client's training round on random 8x8 data: (arrays sent, result)."""
    torch.manual_seed(0)
    initial = strategy.initial_arrays(lambda _index: ArrayRecord(model.state_dict()))
    sent = strategy.with_initial_batchnorm(initial)
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    config = RoundConfig(server_round=1, lr=0.05, momentum=0.5, batch_size=16, extra=strategy.settings.to_config())
    result = FRAugTrainer().train(
        ClientCall(
            model,
            sent,
            ClientData(x, y, x[:4], y[:4]),
            config,
            state or {},
            torch.Generator().manual_seed(1),
            torch.device("cpu"),
        ),
    )
    return sent, result


@pytest.mark.parametrize("local_batchnorm", ["layers", "statistics"])
def test_client_keeps_batchnorm_rtnet_and_prototypes_and_sends_the_rest(local_batchnorm):
    model = build_model("digitcnn", (1, 8, 8), 10)
    bn = batchnorm_keys(model)
    statistics = {key for key in bn if key.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    strategy = FRAug(total_rounds=5, local_batchnorm=local_batchnorm)
    sent, result = _one_round(strategy, model)
    reply, state = set(result.arrays.keys()), set(result.state)
    local = bn if local_batchnorm == "layers" else statistics
    assert not reply & local and local <= state
    assert (bn - local) <= reply  # "statistics": BN weight and bias are averaged, as in the authors' code
    assert not any(key.startswith("rtnet.") for key in reply)
    assert {"rtnet.net.0.weight", "rtnet.net.4.running_mean", "prototypes"} <= state
    assert result.state["prototypes"].shape == (10, 512) and np.abs(result.state["prototypes"]).sum() > 0
    # G goes back whole except its BN counters; its latent size is half the feature size
    assert {"generator.net.0.weight", "generator.net.1.running_mean"} <= reply
    assert "generator.net.1.num_batches_tracked" not in reply and "generator.net.1.num_batches_tracked" in state
    assert sent["generator.net.0.weight"].shape == (512, 256 + 10)
    assert not np.array_equal(sent["generator.net.0.weight"].numpy(), result.arrays["generator.net.0.weight"].numpy())
    assert set(result.metrics) == {"train_loss", "generator_loss", "rtnet_loss", "augmentation_weight"}

    # next round: RTNet starts from the state (a tiny lr keeps it there), not from a new initialisation
    frozen = FRAug(total_rounds=5, local_batchnorm=local_batchnorm, rtnet_lr=1e-12)
    _, again = _one_round(frozen, build_model("digitcnn", (1, 8, 8), 10), state=result.state)
    np.testing.assert_allclose(again.state["rtnet.net.0.weight"], result.state["rtnet.net.0.weight"], atol=1e-6)
    _, fresh = _one_round(frozen, build_model("digitcnn", (1, 8, 8), 10))
    assert np.abs(fresh.state["rtnet.net.0.weight"] - result.state["rtnet.net.0.weight"]).max() > 1e-3


def test_generator_batchnorm_can_stay_local():
    sent, result = _one_round(
        FRAug(total_rounds=3, generator_batchnorm="local"), build_model("digitcnn", (1, 8, 8), 10)
    )
    assert not any(key.startswith("generator.net.1.") for key in result.arrays.keys())
    assert {"generator.net.1.weight", "generator.net.1.running_var"} <= set(result.state)


def test_generator_init_is_seeded_by_the_model_init():
    def arrays(seed):
        torch.manual_seed(seed)
        model = build_model("digitcnn", (1, 8, 8), 10)
        return FRAug(total_rounds=2).initial_arrays(lambda _index: ArrayRecord(model.state_dict()))

    key = "generator.net.0.weight"
    assert np.array_equal(arrays(0)[key].numpy(), arrays(0)[key].numpy())
    assert not np.array_equal(arrays(0)[key].numpy(), arrays(1)[key].numpy())


def _reply(arrays: dict[str, np.ndarray]) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    content = RecordDict(
        {
            "arrays": ArrayRecord({key: Array(value) for key, value in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    return Message(content, reply_to=Message(content, dst_node_id=5, message_type="train"))


def test_server_refuses_replies_that_leak_local_arrays_or_lack_the_generator():
    model = build_model("digitcnn", (1, 8, 8), 10)
    strategy = FRAug(total_rounds=2)
    sent, result = _one_round(strategy, model)
    good = {key: result.arrays[key].numpy() for key in result.arrays.keys()}
    strategy.aggregate_train(1, [_reply(good)])
    with pytest.raises(ValueError, match="stay on the client"):
        strategy.aggregate_train(1, [_reply({**good, "features.1.running_mean": np.zeros(64, np.float32)})])
    with pytest.raises(ValueError, match="stay on the client"):
        strategy.aggregate_train(1, [_reply({**good, "rtnet.net.0.weight": np.zeros(2, np.float32)})])
    with pytest.raises(ValueError, match="no generator arrays"):
        strategy.aggregate_train(1, [_reply({k: v for k, v in good.items() if not k.startswith("generator.")})])


# -- runs ---------------------------------------------------------------------------------
def test_a_run_sends_no_rtnet_or_batchnorm_and_the_generator_learns(tmp_path, monkeypatch):
    sent, replies, evaluations = {}, [], []
    configure, aggregate, evaluate = FRAug.configure_train, FRAug.aggregate_train, FRAug.aggregate_evaluate

    def record_sent(self, server_round, arrays, config, grid):
        messages = list(configure(self, server_round, arrays, config, grid))
        sent[server_round] = [message.content for message in messages]
        return messages

    def record_replies(self, server_round, results):
        results = list(results)
        replies.extend(reply.content for reply in results)
        return aggregate(self, server_round, results)

    def record_evaluations(self, server_round, results):
        results = list(results)
        evaluations.extend(reply.content for reply in results)
        return evaluate(self, server_round, results)

    monkeypatch.setattr(FRAug, "configure_train", record_sent)
    monkeypatch.setattr(FRAug, "aggregate_train", record_replies)
    monkeypatch.setattr(FRAug, "aggregate_evaluate", record_evaluations)
    summary = run_experiment(small(), tmp_path / "run").summary
    assert summary["accuracy_evaluated_on"] == "client-holdout"

    bn = batchnorm_keys(build_model("digitcnn", (1, 8, 8), 10))
    assert len(replies) == 4 and len(evaluations) == 4
    for content in replies:
        keys = set(next(iter(content.array_records.values())).keys())
        assert not any(key.startswith("rtnet.") for key in keys)
        assert not keys & bn
        assert "generator.net.0.weight" in keys
    for content in evaluations:
        assert not content.array_records  # metrics only
    for contents in sent.values():
        for content in contents:
            assert not any(key.startswith("rtnet.") for record in content.array_records.values() for key in record)
            assert content.config_records["config"]["fraug-total-rounds"] == 2
    generator = [{k: v.numpy() for k, v in sent[r][0]["arrays"].items() if k.startswith("generator.")} for r in (1, 2)]
    assert generator[0].keys() == generator[1].keys()
    assert not np.array_equal(generator[0]["generator.net.0.weight"], generator[1]["generator.net.0.weight"])

    store = ClientStateStore(tmp_path / "run/client_state")
    for client in (0, 1):
        state = store.load(client, 2)
        assert "rtnet.net.0.weight" in state and "prototypes" in state and bn <= set(state)


@pytest.mark.ray
@pytest.mark.slow  # CI: Ray's bits are checked generically in test_engines and test_resume
def test_ray_run_is_bit_identical_to_in_process(tmp_path):
    run_experiment(small(), tmp_path / "local")
    run_experiment(small("engine.name=ray", "engine.num_cpus=1"), tmp_path / "ray")
    assert (tmp_path / "ray/metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, monkeypatch):
    from fedsim import checkpoint as checkpoints

    experiment = small(rounds=4)
    run_experiment(experiment, tmp_path / "reference")
    original = RunDirectory.save_checkpoint

    def stop_after_round_2(self, checkpoint):
        original(self, checkpoint)
        if checkpoint.round == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDirectory, "save_checkpoint", stop_after_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, tmp_path / "run")
    monkeypatch.setattr(RunDirectory, "save_checkpoint", original)
    assert run_experiment(experiment, tmp_path / "run").status == "resume"

    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    final = [checkpoints.load(tmp_path / folder / "checkpoint.npz").arrays for folder in ("run", "reference")]
    assert list(final[0].keys()) == list(final[1].keys())
    for key in final[0].keys():
        np.testing.assert_array_equal(final[0][key].numpy(), final[1][key].numpy())
    states = [ClientStateStore(tmp_path / folder / "client_state") for folder in ("run", "reference")]
    for client in (0, 1):
        a, b = states[0].load(client, 4), states[1].load(client, 4)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_fraug_refuses_global_arrays_without_its_generator():
    from flwr.app import ConfigRecord

    model = build_model("digitcnn", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="FRAug.initial_arrays"):
        FRAug(total_rounds=2).configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), None)
