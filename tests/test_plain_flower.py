"""fedsim's strategies in plain Flower apps (fedsim.plain_flower): the client halves keep
FedBN's BatchNorm local and apply FedWon's AGC, and the server halves refuse replies from
ClientApps without them, instead of silently running FedAvg. Every round samples from the
nodes online (strategies.flower_start), and a client whose state went back stops the run."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from torch import nn
from torch.nn import functional as F

from fedsim import checkpoint as checkpoints
from fedsim.data import load_dataset
from fedsim.errors import UserError
from fedsim.models import build_model
from fedsim.models.norm import WSConv2d, batchnorm_keys
from fedsim.plain_flower import BATCHNORM_KEY, STATE_KEY, client_app, fedbn_mod
from strategies.fedbn import FedBN, batchnorm_keys_by_name
from strategies.fedwon import FedWon
from strategies.flower_start import NodesOnlineGrid, StartsOnceNodesAreOnline

ROOT = Path(__file__).resolve().parents[1]
# the page that documents fedsim's strategies in a Flower app of your own, with a complete app
EXAMPLE_PAGE = ROOT / "docs/guide/flower-app.md"
EXAMPLE_HEADING = "# fedsim's strategies in your own Flower app"
NUM_CLIENTS = 3
BN_CHANNELS = 8  # bn_model's BatchNorm layer
DIGITS = load_dataset("digits")


# -- a user's own model, data and ClientApp ---------------------------------------------
def bn_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, BN_CHANNELS, 3, padding=1),
        nn.BatchNorm2d(BN_CHANNELS),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def norm_free_model() -> nn.Module:
    return nn.Sequential(WSConv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def scaled_digits(context: Context):
    """Client i: every third digit, scaled by i + 1, so that BatchNorm statistics differ."""
    i = int(context.node_config["partition-id"])
    part, scale = slice(i, None, NUM_CLIENTS), i + 1.0
    return DIGITS.x_train[part] * scale, DIGITS.y_train[part], DIGITS.x_test[part] * scale, DIGITS.y_test[part]


def ordinary_app(model_fn, mods=None) -> ClientApp:
    """A ClientApp as Flower's tutorials write it: local SGD, the whole state dict back."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        model = model_fn()
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        x, y, _, _ = (torch.as_tensor(part) for part in scaled_digits(context))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        for start in range(0, len(y), 32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[start : start + 32]), y[start : start + 32]).backward()
            optimizer.step()
        metrics = MetricRecord({"num-examples": len(y)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        model = model_fn()
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        model.eval()
        _, _, x, y = (torch.as_tensor(part) for part in scaled_digits(context))
        with torch.no_grad():
            accuracy = float((model(x).argmax(1) == y).float().mean())
        return Message(
            RecordDict({"metrics": MetricRecord({"accuracy": accuracy, "num-examples": len(y)})}), reply_to=message
        )

    return app


def bn_probe(state_key: str):
    """A Mod that adds, to each evaluate reply, the client id and its first BatchNorm
    layer's running mean and batch count, as kept in ``context.state[state_key]``."""

    def probe(message: Message, context: Context, call_next) -> Message:
        reply = call_next(message, context)
        if message.metadata.message_type == MessageType.EVALUATE and not reply.has_error():
            # the same keys from every client, or Flower refuses to aggregate: a client with
            # no BatchNorm of its own (it never trained) reports -1 batches
            metrics = reply.content["metrics"]
            metrics["client"] = int(context.node_config["partition-id"])
            if state_key in context.state:
                own = context.state.array_records[state_key]
                metrics["bn-running-mean"] = own["1.running_mean"].numpy().astype(float).tolist()
                metrics["bn-batches"] = int(own["1.num_batches_tracked"].numpy())
            else:
                metrics["bn-running-mean"] = [float("nan")] * BN_CHANNELS
                metrics["bn-batches"] = -1
        return reply

    return probe


class Recording:
    """Records what a strategy sends in each round, how many clients trained, and what each
    client reports in evaluation."""

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent = {**getattr(self, "sent", {}), server_round: messages[0].content["arrays"]}
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        failed = [reply.error.reason for reply in replies if reply.has_error()]
        self.failed = {**getattr(self, "failed", {}), server_round: failed}
        self.trained = {**getattr(self, "trained", {}), server_round: len(replies) - len(failed)}
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        self.evaluated = {**getattr(self, "evaluated", {}), server_round: [dict(r.content["metrics"]) for r in replies]}
        return super().aggregate_evaluate(server_round, replies)


class RecordingFedBN(Recording, FedBN):
    pass


class RecordingFedWon(Recording, FedWon):
    pass


# -- one Flower simulation, every scenario in turn ------------------------------------------
# name: (strategy, model, ClientApp, rounds)
SCENARIOS = {
    "fedbn, fedsim's client": (
        RecordingFedBN, bn_model, client_app(FedBN, bn_model, scaled_digits, mods=[bn_probe(STATE_KEY)]), 2
    ),
    "fedbn, ordinary client": (FedBN, bn_model, ordinary_app(bn_model), 1),
    "fedbn, ordinary client with fedbn_mod": (
        RecordingFedBN, bn_model, ordinary_app(bn_model, mods=[bn_probe(BATCHNORM_KEY), fedbn_mod]), 2
    ),
    "fedwon, ordinary client": (FedWon, norm_free_model, ordinary_app(norm_free_model), 1),
    "fedwon, fedsim's client": (RecordingFedWon, norm_free_model, client_app(FedWon, norm_free_model, scaled_digits), 2),
}  # fmt: skip


def _scenario(message: Message) -> str:
    return str(message.content["config"]["scenario"])


dispatching_app = ClientApp()  # hands each message to its scenario's ClientApp


@dispatching_app.train()
def _train(message: Message, context: Context) -> Message:
    return SCENARIOS[_scenario(message)][2](message, context)


@dispatching_app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    return SCENARIOS[_scenario(message)][2](message, context)


TWO_ACTORS = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}


def simulate(names) -> dict:
    """One run_simulation (Ray starts once) on two Ray actors whose ServerApp plays the
    named scenarios at once, as a user's app would: for each, the strategy and its Result,
    or the exception it raised."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    found, strategies = {}, {}
    for name in names:
        strategy_cls, model_fn, _, _ = SCENARIOS[name]
        torch.manual_seed(0)
        strategies[name] = strategy_cls(min_available_nodes=NUM_CLIENTS)
        strategies[name].initial = ArrayRecord(model_fn().state_dict())
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        # nothing comes before the first start: its round 1 is configured while Flower's
        # simulation is still registering the nodes (strategies.flower_start)
        for name, strategy in strategies.items():
            rounds = SCENARIOS[name][3]
            try:
                found[name] = (
                    strategy,
                    strategy.start(
                        grid=grid,
                        initial_arrays=strategy.initial,
                        num_rounds=rounds,
                        train_config=ConfigRecord({"scenario": name, "lr": 0.1}),
                        evaluate_config=ConfigRecord({"scenario": name}),
                        timeout=600,  # a broken simulation fails the test instead of hanging it
                    ),
                )
            except (ValueError, UserError) as error:
                found[name] = strategy, error
                continue
            if not found[name][1].train_metrics_clientapp:
                raise RuntimeError(f"{name}: no client replied")

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as fedsim's engines set it
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(server_app, dispatching_app, NUM_CLIENTS, backend_config=TWO_ACTORS)
    finally:  # Flower's Ray backend sets PYTHONPATH to this process's sys.path; later tests start Ray too
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    return found


@pytest.fixture(scope="module")
def outcomes():
    """Every scenario, in one simulation."""
    return simulate(list(SCENARIOS))


def _succeeded(outcomes, name):
    strategy, result = outcomes[name]
    assert not isinstance(result, Exception), f"{name}: {result}"
    return strategy, result


def _assert_batchnorm_stayed_local(strategy, result) -> None:
    # Flower's simulation sets aside a client whose training failed (a loaded machine's Ray
    # can lose an actor); the test needs every client, so say why one is missing
    assert not any(strategy.failed.values()), f"a client's training failed: {strategy.failed}"
    # the ServerApp starts at once, before Flower's simulation has registered its nodes:
    # round 1 still samples every client (strategies.flower_start)
    assert strategy.trained == {1: NUM_CLIENTS, 2: NUM_CLIENTS}, strategy.trained
    initial = strategy.initial
    bn = batchnorm_keys_by_name(initial.keys())
    assert bn, "the test model has BatchNorm"
    assert not batchnorm_keys_by_name(result.arrays.keys()), "BatchNorm arrays were averaged"
    assert set(result.arrays.keys()) == set(initial.keys()) - bn
    for key in bn:  # round 2 sends the initial BatchNorm values with the shared arrays
        assert np.array_equal(strategy.sent[2][key].numpy(), initial[key].numpy()), key
    assert set(strategy.sent[2].keys()) == set(initial.keys())
    # Each client's own running statistics: different for every client (its inputs are
    # scaled differently), and carried from round 1 into round 2 by context.state.
    first, second = ({m["client"]: m for m in strategy.evaluated[r]} for r in (1, 2))
    assert sorted(second) == list(range(NUM_CLIENTS))
    means = [np.array(second[client]["bn-running-mean"]) for client in range(NUM_CLIENTS)]
    for a in range(NUM_CLIENTS):
        for b in range(a + 1, NUM_CLIENTS):
            assert not np.allclose(means[a], means[b], rtol=0.05), (a, b)
    for client in range(NUM_CLIENTS):
        # -1: the client's round-1 context.state had no BatchNorm (it did not train in round 1)
        assert first[client]["bn-batches"] > 0, (client, {c: m["bn-batches"] for c, m in first.items()})
        assert second[client]["bn-batches"] == 2 * first[client]["bn-batches"]


# -- the documented example ------------------------------------------------------------------
def readme_example() -> str:
    """The complete app: the first python block under EXAMPLE_HEADING in EXAMPLE_PAGE."""
    section = EXAMPLE_PAGE.read_text().split(EXAMPLE_HEADING + "\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_example_uses_fedsims_client_half():
    code = readme_example()
    assert "client_app(FedBN" in code and "run_simulation(" in code


# runs a script as __main__, printing how many clients FedBN's replies came from in each
# round; Flower's simulation registers its nodes a second late, as on a loaded machine, so
# that the app's strategy starts before they are online whatever this machine's speed
COUNTING_DRIVER = """
import runpy, sys, time
from flwr.server.superlink.fleet.vce import vce_api
from strategies.fedbn import FedBN

register_nodes = vce_api._register_nodes


def registering_late(*args, **kwargs):
    time.sleep(1)
    return register_nodes(*args, **kwargs)


vce_api._register_nodes = registering_late
aggregate_train = FedBN.aggregate_train


def counting(self, server_round, replies):
    replies = list(replies)
    trained = sum(not reply.has_error() for reply in replies)
    print(f"round {server_round}: {trained} clients trained", flush=True)
    return aggregate_train(self, server_round, replies)


FedBN.aggregate_train = counting
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@pytest.mark.ray
def test_the_readme_example_runs_and_trains_every_client_from_round_1(tmp_path):
    script = tmp_path / "fedbn_app.py"
    script.write_text(readme_example())
    (tmp_path / "counting.py").write_text(COUNTING_DRIVER)
    command = [sys.executable, "counting.py", str(script)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trained = dict(map(int, found) for found in re.findall(r"round (\d+): (\d+) clients trained", done.stdout))
    assert trained == {1: 3, 2: 3, 3: 3}, done.stdout[-3000:]
    accuracy = float(re.search(r"mean client accuracy after 3 rounds: ([0-9.]+)", done.stdout).group(1))
    assert accuracy > 0.85


# -- plain Flower apps under run_simulation ------------------------------------------------
@pytest.mark.ray
def test_fedbn_with_fedsims_client_app_keeps_batchnorm_local(outcomes):
    strategy, result = _succeeded(outcomes, "fedbn, fedsim's client")
    _assert_batchnorm_stayed_local(strategy, result)
    assert result.evaluate_metrics_clientapp[2]["accuracy"] > 0.6


@pytest.mark.ray
@pytest.mark.parametrize("repetitions", [2, pytest.param(50, marks=pytest.mark.slow)])
def test_fedbn_with_fedsims_client_app_trains_every_client_in_every_simulation(repetitions):
    """Each simulation starts Flower's runtime afresh, where its nodes register while the
    ServerApp already runs: every one must train all clients from round 1."""
    name = "fedbn, fedsim's client"
    for repetition in range(repetitions):
        strategy, result = _succeeded(simulate([name]), name)
        try:
            _assert_batchnorm_stayed_local(strategy, result)
        except AssertionError as error:
            raise AssertionError(f"simulation {repetition + 1} of {repetitions}: {error}") from error


@pytest.mark.ray
def test_fedbn_refuses_an_ordinary_client_app(outcomes):
    _, error = outcomes["fedbn, ordinary client"]
    assert isinstance(error, ValueError)
    assert re.search(r"FedBN: the reply of node \d+ carries BatchNorm arrays", str(error))
    assert "fedbn_mod" in str(error) and "does not keep BatchNorm local" in str(error)


@pytest.mark.ray
def test_fedbn_mod_makes_an_ordinary_client_app_keep_batchnorm_local(outcomes):
    strategy, result = _succeeded(outcomes, "fedbn, ordinary client with fedbn_mod")
    _assert_batchnorm_stayed_local(strategy, result)
    assert result.evaluate_metrics_clientapp[2]["accuracy"] > 0.6


@pytest.mark.ray
def test_fedwon_refuses_an_ordinary_client_app(outcomes):
    _, error = outcomes["fedwon, ordinary client"]
    assert isinstance(error, ValueError)
    assert "has no 'agc-lambda' train metric" in str(error) and "adaptive gradient clipping" in str(error)


@pytest.mark.ray
def test_fedwon_with_fedsims_client_app_trains(outcomes):
    strategy, result = _succeeded(outcomes, "fedwon, fedsim's client")
    assert result.train_metrics_clientapp[2]["agc-lambda"] == pytest.approx(strategy.clip_lambda)
    assert result.evaluate_metrics_clientapp[2]["accuracy"] > 0.5


# -- the server halves, without a simulation -------------------------------------------------
class Nodes:
    """Just enough of a Grid for a strategy's configure_* methods."""

    def get_node_ids(self):
        return [11, 12]


def _reply(content: RecordDict, node: int = 12) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _train_reply(arrays: ArrayRecord, node: int = 12, **metrics) -> Message:
    return _reply(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10, **metrics})}), node)


def test_batchnorm_is_recognised_by_name_as_by_the_model():
    model = build_model("resnet", (3, 28, 28), 10, norm="bn", width=4)
    assert batchnorm_keys_by_name(model.state_dict()) == batchnorm_keys(model)
    assert not batchnorm_keys_by_name(build_model("resnet", (3, 28, 28), 10, norm="gn", width=4).state_dict())
    assert batchnorm_keys_by_name(nn.BatchNorm1d(3).state_dict()) == set(nn.BatchNorm1d(3).state_dict())


def test_fedbn_sends_the_initial_batchnorm_with_every_message_and_checkpoints_it(tmp_path):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1  # messages outside a run
    torch.manual_seed(0)
    initial = ArrayRecord(bn_model().state_dict())
    bn = batchnorm_keys_by_name(initial.keys())
    strategy = FedBN(min_available_nodes=2)
    first = list(strategy.configure_train(1, initial, ConfigRecord(), Nodes()))
    assert list(first[0].content["arrays"].keys()) == list(initial.keys())
    shared = ArrayRecord({key: Array(np.asarray(initial[key].numpy() + 1)) for key in initial.keys() if key not in bn})
    # through a checkpoint on disk, as a resumed run gets it: state_dict() as arrays and JSON
    path = tmp_path / "checkpoint.npz"
    checkpoints.save(path, checkpoints.Checkpoint(1, initial, checkpoints.strategy_state(strategy), 0, "", 0.0))
    restored = FedBN(min_available_nodes=2)
    checkpoints.restore_strategy(restored, checkpoints.load(path).strategy_state, str(path))
    for later in (strategy, restored):
        for messages in (
            later.configure_train(2, shared, ConfigRecord(), Nodes()),
            later.configure_evaluate(2, shared, ConfigRecord(), Nodes()),
        ):
            for message in messages:
                sent = message.content["arrays"]
                assert list(sent.keys()) == list(initial.keys()), "a complete model, in the model's order"
                for key in sent.keys():
                    expected = initial[key] if key in bn else shared[key]
                    assert np.array_equal(sent[key].numpy(), expected.numpy()), key


def test_fedbn_refuses_replies_with_batchnorm():
    torch.manual_seed(0)
    full = ArrayRecord(bn_model().state_dict())
    shared = ArrayRecord({key: full[key] for key in full.keys() if key not in batchnorm_keys_by_name(full.keys())})
    strategy = FedBN()
    for weighting in ("uniform", "samples"):
        strategy.weighting = weighting
        arrays, _ = strategy.aggregate_train(1, [_train_reply(shared, 11), _train_reply(shared, 12)])
        assert set(arrays.keys()) == set(shared.keys())
        with pytest.raises(ValueError, match=r"reply of node 12 carries BatchNorm arrays \(1\.bias, 1\.num_batches"):
            strategy.aggregate_train(1, [_train_reply(shared, 11), _train_reply(full, 12)])


def test_fedwon_refuses_replies_without_its_clipping():
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    strategy = FedWon(clip_lambda=0.5)
    strategy.aggregate_train(1, [_train_reply(arrays, 11, **{"agc-lambda": 0.5})])
    with pytest.raises(ValueError, match="node 12 has no 'agc-lambda' train metric"):
        strategy.aggregate_train(1, [_train_reply(arrays, 11, **{"agc-lambda": 0.5}), _train_reply(arrays, 12)])
    with pytest.raises(ValueError, match="node 12 applied AGC at agc-lambda = 0.1"):
        strategy.aggregate_train(1, [_train_reply(arrays, 12, **{"agc-lambda": 0.1})])


def test_fedbn_mod_swaps_in_the_clients_own_batchnorm_without_touching_the_message():
    torch.manual_seed(0)
    initial = ArrayRecord(bn_model().state_dict())
    bn = batchnorm_keys_by_name(initial.keys())
    context = Context(run_id=0, node_id=12, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    received = []

    def train(message: Message, context: Context) -> Message:
        arrays = message.content["arrays"]
        received.append(arrays)
        trained = ArrayRecord(
            {key: Array(np.asarray(arrays[key].numpy() + 1)) for key in arrays.keys()}
        )  # a full state dict
        return Message(RecordDict({"arrays": trained, "metrics": MetricRecord({"num-examples": 1})}), reply_to=message)

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    content = RecordDict({"arrays": initial, "config": ConfigRecord({"server-round": 1})})
    first = fedbn_mod(Message(content, dst_node_id=12, message_type=MessageType.TRAIN), context, train)
    assert set(first.content["arrays"].keys()) == set(initial.keys()) - bn, "BatchNorm stays on the client"
    own = context.state.array_records[BATCHNORM_KEY]
    assert set(own.keys()) == bn
    assert np.array_equal(own["1.running_mean"].numpy(), initial["1.running_mean"].numpy() + 1)

    untouched = copy.deepcopy({key: initial[key].numpy() for key in initial.keys()})
    second = Message(content, dst_node_id=12, message_type=MessageType.TRAIN)
    fedbn_mod(second, context, train)
    for key in initial.keys():  # the client trained from its own BatchNorm and the server's rest
        expected = own[key].numpy() if key in bn else initial[key].numpy()
        assert np.array_equal(received[-1][key].numpy(), expected), key
    assert second.content["arrays"] is initial, "the received message is left alone"
    for key in initial.keys():
        assert np.array_equal(initial[key].numpy(), untouched[key]), key


# -- sampling from the nodes online, without a simulation ----------------------------------
class RegisteringNodes(Nodes):
    """A Grid whose three nodes come online only after ``reads`` reads of the node list, as
    Flower's simulation registers its SuperNodes after starting the ServerApp."""

    def __init__(self, reads: int) -> None:
        self.reads, self.offline_reads = 0, reads

    def get_node_ids(self):
        self.reads += 1
        return [11, 12, 13] if self.reads > self.offline_reads else []


def test_a_round_configured_before_the_nodes_register_samples_them_all_once_they_are_online():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    arrays = ArrayRecord(bn_model().state_dict())
    strategy = FedBN(min_available_nodes=3)
    # Flower's FedAvg alone fixes the sample size from the nodes online at first, none:
    # max(0, min_train_nodes) = 2, and sample_nodes then waits for 3 but samples 2
    assert len(list(strategy.configure_train(1, arrays, ConfigRecord(), RegisteringNodes(1)))) == 2
    grid = NodesOnlineGrid(RegisteringNodes(3), min_nodes=3)
    assert sorted(m.metadata.dst_node_id for m in strategy.configure_train(1, arrays, ConfigRecord(), grid)) == [
        11,
        12,
        13,
    ]
    assert len(list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))) == 3


def test_every_strategy_fedsim_ships_starts_its_rounds_on_a_grid_that_waits_for_its_nodes(monkeypatch):
    from flwr.serverapp.strategy import Strategy

    from strategies import STRATEGIES
    from strategies.defences import DEFENCES, defend

    for name in STRATEGIES:
        assert STRATEGIES[name].start is StartsOnceNodesAreOnline.start, name
    for name in DEFENCES:
        assert DEFENCES[name].start is StartsOnceNodesAreOnline.start, name
    grids = []
    monkeypatch.setattr(Strategy, "start", lambda self, grid, *args, **kwargs: grids.append(grid))
    FedBN(min_available_nodes=3).start(grid=Nodes(), initial_arrays=ArrayRecord(), num_rounds=1)
    defend(FedBN(min_available_nodes=4), "fedmedian").start(Nodes(), ArrayRecord())
    assert [(type(grid), grid.min_nodes) for grid in grids] == [(NodesOnlineGrid, 3), (NodesOnlineGrid, 4)]


class Replying(Nodes):
    """A Grid that answers every message with the given error reason (None: a good reply)."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason
        self.clients = {11: 0, 12: 1}  # as fedsim's grids carry

    def send_and_receive(self, messages, *, timeout=None):
        content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
        if self.reason is None:
            return [Message(content, reply_to=message) for message in messages]
        return [Message(Error(code=0, reason=self.reason), reply_to=message) for message in messages]


def test_a_clients_user_error_stops_a_plain_flower_run_and_other_failures_do_not():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    message = Message(RecordDict(), dst_node_id=12, message_type=MessageType.TRAIN)
    # as Flower's Ray backend reports it: the exception's type, then the client's traceback
    reason = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()\n"
        '  File "fedsim/state.py", line 60, in check\n'
        "fedsim.errors.UserError: client 1's state went back: it wrote its state in round 2, but as of round 3 "
        "its state is from round 1; an update was lost, so the run stops\n'>"
    )
    with pytest.raises(UserError, match=r"^client 1's state went back: .* round 2, .* round 3 .* round 1; .*stops$"):
        NodesOnlineGrid(Replying(reason), 1).send_and_receive([message])
    assert NodesOnlineGrid(Replying("<class 'ValueError'>:<'bad'>"), 1).send_and_receive([message])[0].has_error()
    assert not NodesOnlineGrid(Replying(None), 1).send_and_receive([message])[0].has_error()
    assert NodesOnlineGrid(Replying(None), 1).clients == {11: 0, 12: 1}, "other attributes pass through"


# -- a client whose state went back stops the run ----------------------------------------
def _message(kind: str, server_round: int, arrays: ArrayRecord) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round, "lr": 0.1})})
    return Message(content, dst_node_id=12, message_type=kind)


def _client_context(run_id: int) -> Context:
    return Context(run_id=run_id, node_id=12, node_config={"partition-id": 1}, state=RecordDict(), run_config={})


def test_client_app_stops_a_client_whose_state_went_back():
    torch.manual_seed(0)
    arrays = ArrayRecord(bn_model().state_dict())
    app = client_app(FedBN, bn_model, scaled_digits)
    context = _client_context(run_id=901)
    before_round_1 = copy.deepcopy(context.state)
    app(_message(MessageType.TRAIN, 1, arrays), context)
    app(_message(MessageType.EVALUATE, 1, arrays), context)
    after_round_1 = copy.deepcopy(context.state)
    app(_message(MessageType.TRAIN, 2, arrays), context)
    app(_message(MessageType.EVALUATE, 2, arrays), context)

    context.state = after_round_1  # the round-2 update is lost
    with pytest.raises(UserError, match=r"^client 1's state went back: it wrote its state in round 2, but as of round 2 its state is from round 1; an update was lost, so the run stops$"):  # fmt: skip
        app(_message(MessageType.EVALUATE, 2, arrays), context)
    with pytest.raises(UserError, match=r"in round 2, but as of round 3 its state is from round 1"):
        app(_message(MessageType.TRAIN, 4, arrays), context)
    context.state = before_round_1
    with pytest.raises(UserError, match=r"in round 2, but as of round 2 its state is none"):
        app(_message(MessageType.EVALUATE, 2, arrays), context)

    # round 2 run again from round 1's state (a retry) is no regression; nor is a client
    # this process never saw write
    context.state = copy.deepcopy(after_round_1)
    app(_message(MessageType.TRAIN, 2, arrays), context)
    app(_message(MessageType.EVALUATE, 5, arrays), _client_context(run_id=902))


def test_fedbn_mod_stops_a_client_whose_batchnorm_went_back():
    torch.manual_seed(0)
    initial = ArrayRecord(bn_model().state_dict())
    context = _client_context(run_id=903)

    def handler(message: Message, context: Context) -> Message:
        arrays = message.content["arrays"]
        if message.metadata.message_type != MessageType.TRAIN:
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=message)
        trained = ArrayRecord({key: Array(np.asarray(arrays[key].numpy() + 1)) for key in arrays.keys()})
        return Message(RecordDict({"arrays": trained, "metrics": MetricRecord({"num-examples": 1})}), reply_to=message)

    fedbn_mod(_message(MessageType.TRAIN, 1, initial), context, handler)
    after_round_1 = copy.deepcopy(context.state)
    fedbn_mod(_message(MessageType.TRAIN, 2, initial), context, handler)
    fedbn_mod(_message(MessageType.EVALUATE, 2, initial), context, handler)
    context.state = after_round_1
    with pytest.raises(UserError, match=r"^client 1's state went back: it wrote its state in round 2, but as of round 2 its state is from round 1"):  # fmt: skip
        fedbn_mod(_message(MessageType.EVALUATE, 2, initial), context, handler)
    fedbn_mod(_message(MessageType.TRAIN, 2, initial), context, handler)  # round 2 again: no regression
