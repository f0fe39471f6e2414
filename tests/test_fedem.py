"""FedEM (strategies.fedem): parity of its EM steps with the authors' code, the clusters it
finds on a tiny two-concept stream, exact resume, Ray, and a static partition.

The golden numbers below were computed by the reference code of Marfoq et al., repository
omarfoq/FedEM at commit 996faddf865fd03c6852b7ffe64410e31b339e94: ``MixtureClient``'s
``update_sample_weights`` and ``update_learners_weights`` (``client.py``; the ensemble's
``gather_losses`` stubbed to return :func:`reference_input`'s losses, float32, as
(models, samples)), two rounds in a row for each of three clients, so that the second
round starts from the pi of the first; and ``Learner.fit_epoch`` (``learners/learner.py``)
on a linear model, one full batch, with the optimiser of ``utils/optim.py`` (SGD, momentum
0.9, weight decay 5e-4) at lr 0.1, weighted by the second-round w of client 0 and model 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.build import load_experiment
from fedsim.data import ClientData
from fedsim.runner import run_experiment
from fedsim.trainer import ClientCall, RoundConfig
from partitioners.base import Partition
from strategies.fedem import PREDICTION, FedEM, FedEMTrainer
from strategies.soft_clustering import assignment
from tests.conftest import QUICKSTART, interrupted_and_resumed, tiny_experiment

FEDEM = "strategies.fedem:FedEM"
MODELS, CLASSES, SAMPLES, CLIENTS = 3, 4, 6, 3


# -- parity with the authors' code ------------------------------------------------------------
def reference_input() -> tuple[np.ndarray, np.ndarray]:
    """Per-sample losses (round, client, sample, model; float32, as the code computes them)
    and labels (client, sample)."""
    rng = np.random.default_rng(2024)
    losses = rng.uniform(0.05, 4.0, size=(2, CLIENTS, SAMPLES, MODELS)).astype(np.float32)
    return losses, rng.integers(0, CLASSES, size=(CLIENTS, SAMPLES))


# fmt: off
FEDEM_PI = [  # [round][client]
    [[0.413479447, 0.200490847, 0.38602975], [0.354669303, 0.393152356, 0.252178401], [0.332663864, 0.38573131, 0.281604797]],
    [[0.260030359, 0.266028941, 0.4739407], [0.393139035, 0.441760302, 0.165100649], [0.27780208, 0.45896855, 0.263229251]],
]
FEDEM_W_ROUND_2_CLIENT_0 = np.array([
    [0.551998079, 0.0759895742, 0.372012317],
    [0.350270331, 0.410901934, 0.238827735],
    [0.259993225, 0.241993397, 0.498013318],
    [0.0352124386, 0.58739388, 0.377393663],
    [0.133524939, 0.0472916476, 0.81918335],
    [0.229183093, 0.232603163, 0.53821373],
])
MSTEP_WEIGHT = np.array([
    [-1.27158642, 0.0139115267, -0.0338919573, -0.298111916, -1.03576529],
    [-0.412320137, -1.09271169, -1.3676815, 0.223785192, -1.11406171],
    [1.16802692, 0.72240299, -1.99188614, 0.268106461, -1.10598588],
    [0.0336479992, 0.0459938496, -1.98561239, -0.234623328, -0.258794516],
])
MSTEP_BIAS = np.array([0.961648226, -1.17065489, 0.731071293, -1.10241282])
# fmt: on


def linear_model() -> tuple[nn.Module, np.ndarray]:
    """The M-step's linear model (5 inputs, 4 classes) and inputs, as the reference run drew them."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(SAMPLES, 5)).astype(np.float32)
    model = nn.Linear(5, CLASSES)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(rng.normal(size=(CLASSES, 5)).astype(np.float32)))
        model.bias.copy_(torch.as_tensor(rng.normal(size=CLASSES).astype(np.float32)))
    return model, x


def with_fixed_losses(trainer_class: type[FedEMTrainer]) -> FedEMTrainer:
    """A trainer whose per-sample losses are the reference input's (``trainer.table``)."""

    class Fixed(trainer_class):
        table: np.ndarray

        def losses(self, model, models, x, y, device):
            return torch.as_tensor(self.table, dtype=torch.float64)

    return Fixed()


def two_rounds(trainer_class: type[FedEMTrainer], config_between=lambda metrics: {}):
    """Each client's train_models in two rounds on the reference input, its state carried
    over: [(round, client) -> (state, metrics)]. ``config_between`` gives round 2's extra
    config from round 1's metrics (FedRC's label marginals)."""
    losses, labels = reference_input()
    model, x = linear_model()
    records = [ArrayRecord(model.state_dict()) for _ in range(MODELS)]
    trainer = with_fixed_losses(trainer_class)
    states, out = [{} for _ in range(CLIENTS)], {}
    extra = {}
    for r in range(2):
        metrics = []
        for c in range(CLIENTS):
            trainer.table = losses[r, c]
            data = ClientData(x, labels[c], x[:0], labels[c][:0])
            config = RoundConfig(server_round=r + 1, batch_size=32, lr=0.1, extra=extra)
            call = ClientCall(model, {}, data, config, states[c], torch.Generator().manual_seed(0), "cpu")
            _, _, reply, states[c] = trainer.train_models(call, records)
            out[r, c] = (states[c], reply)
            metrics.append(reply)
        extra = config_between(metrics)
    return out


def test_fedem_e_step_and_mixture_match_the_authors_code():
    out = two_rounds(FedEMTrainer)
    for (r, c), (state, _) in out.items():
        np.testing.assert_allclose(state["fedem/pi"], FEDEM_PI[r][c], rtol=1e-5, err_msg=f"round {r + 1} client {c}")
    losses, labels = reference_input()
    w = assignment(torch.as_tensor(losses[1, 0], dtype=torch.float64), labels[0], out[0, 0][0]["fedem/pi"])
    np.testing.assert_allclose(w, FEDEM_W_ROUND_2_CLIENT_0, rtol=1e-5)


def test_the_weighted_m_step_matches_the_authors_learner():
    losses, labels = reference_input()
    pi = np.asarray(FEDEM_PI[0][0])
    w = assignment(torch.as_tensor(losses[1, 0], dtype=torch.float64), labels[0], pi)[:, 1]
    model, x = linear_model()
    config = RoundConfig(local_epochs=1, batch_size=32, lr=0.1, momentum=0.9, weight_decay=5e-4)
    data = ClientData(x, labels[0], x[:0], labels[0][:0])
    FedEMTrainer().fit_weighted(model, data, w, config, torch.Generator().manual_seed(0), "cpu")
    np.testing.assert_allclose(model.weight.detach().numpy(), MSTEP_WEIGHT, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.bias.detach().numpy(), MSTEP_BIAS, rtol=1e-5, atol=1e-7)


def test_a_client_predicts_with_its_mixture_kept_or_refitted():
    """Two 'models' on one-hot inputs: model 0 predicts the label, model 1 the label + 1.
    Kept pi [0.2, 0.8] mixes them so; refitted on the client's data (labelled as model 0
    says) the mixture moves to model 0."""
    y = np.arange(8) % CLASSES
    x = np.eye(CLASSES, dtype=np.float32)[y]
    models = []
    for shift in (0, 1):
        layer = nn.Linear(CLASSES, CLASSES, bias=False)
        with torch.no_grad():
            layer.weight.copy_(10.0 * torch.roll(torch.eye(CLASSES), shift, dims=0))
        models.append(ArrayRecord(layer.state_dict()))
    data = ClientData(x, y, x, y)
    state = {"fedem/pi": np.array([0.2, 0.8])}
    trainer = FedEMTrainer()

    def probabilities(prediction: str, state: dict) -> np.ndarray:
        config = RoundConfig(extra={PREDICTION: prediction})
        call = ClientCall(layer, {}, data, config, state, None, "cpu")
        return torch.exp(trainer.predict_models(call, models)).numpy()

    stored = probabilities("stored", state)
    np.testing.assert_allclose(stored[np.arange(8), y], 0.2, atol=1e-3)
    np.testing.assert_allclose(stored[np.arange(8), (y + 1) % CLASSES], 0.8, atol=1e-3)
    assert (probabilities("refit", state)[np.arange(8), y] > 0.99).all()
    before_its_first_round = probabilities("stored", {})  # uniform
    np.testing.assert_allclose(before_its_first_round[np.arange(8), y], 0.5, atol=1e-3)


def test_fedem_options_are_checked():
    with pytest.raises(ValueError, match="aggregation must be"):
        FedEM(aggregation="mean")
    with pytest.raises(ValueError, match="prediction must be"):
        FedEM(prediction="best")
    with pytest.raises(ValueError, match="num_models must be"):
        FedEM(num_models=0)


# -- end to end --------------------------------------------------------------------------------
# two concepts, labels y and 9 - y: slot 0 (round 1) all in concept 0, then half the clients
# in concept 1 for the rest of the run
TWO_CONCEPTS = [
    "dataset.name=digits",
    "partition.name=drift",
    "partition.num_clients=8",
    "partition.num_slots=2",
    "partition.rounds_per_slot=1",
    'partition.concepts=["identity", "reverse"]',
    "partition.drift_fraction=0.5",
    "rounds=12",
    "model.name=mlp",
    "model.hidden=[32]",
    "client.lr=0.1",
    "client.local_epochs=5",
    "client.batch_size=32",
    "strategy.fraction_train=1.0",
]


def two_concepts(*overrides: str):
    return load_experiment(QUICKSTART, [*TWO_CONCEPTS, *overrides])


def separates_the_concepts(strategy: str, pi_key: str, tmp_path) -> None:
    """Each concept's clients end with most of their mixture on one model, the two concepts
    on different models, and the mixture beats FedAvg's one model by far."""
    result = run_experiment(two_concepts(f"strategy.name={strategy}", "strategy.num_models=2"), tmp_path / "soft")
    fedavg = run_experiment(two_concepts("strategy.name=fedavg"), tmp_path / "fedavg")
    stream = Partition.load(result.path / "partition.npz")
    concepts = np.array([stream.view_at(client, 1).concept for client in range(8)])
    assert set(concepts) == {0, 1}
    pis = []
    for client in range(8):
        with np.load(result.path / "client_state" / str(client) / "r000012.npz") as state:
            pis.append(state[pi_key])
    pis = np.array(pis)
    mean = np.stack([pis[concepts == concept].mean(axis=0) for concept in (0, 1)])
    chosen = mean.argmax(axis=1)
    assert chosen[0] != chosen[1], mean
    assert mean.max(axis=1).min() > 0.75, mean
    assert result.summary["accuracy"] > fedavg.summary["accuracy"] + 0.2


def test_fedem_separates_two_concepts(tmp_path):
    separates_the_concepts(FEDEM, "fedem/pi", tmp_path)


def resumes_exactly(strategy: str, tmp_path, monkeypatch) -> None:
    experiment = two_concepts(f"strategy.name={strategy}", "strategy.num_models=2", "rounds=4", "client.local_epochs=1")
    assert interrupted_and_resumed(experiment, tmp_path, monkeypatch, crash_round=2).status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    states = sorted((tmp_path / "run" / "client_state").rglob("*.npz"))
    assert states
    for path in states:
        twin = tmp_path / "reference" / path.relative_to(tmp_path / "run")
        with np.load(path) as mine, np.load(twin) as theirs:
            assert mine.files == theirs.files
            for key in mine.files:
                np.testing.assert_array_equal(mine[key], theirs[key])


def test_fedem_resumes_exactly(tmp_path, monkeypatch):
    resumes_exactly(FEDEM, tmp_path, monkeypatch)


def ray_agrees(strategy: str, tmp_path) -> None:
    outputs = {}
    for engine, overrides in {"inprocess": [], "ray": ["engine.name=ray", "engine.num_workers=2"]}.items():
        experiment = two_concepts(
            f"strategy.name={strategy}", "strategy.num_models=2", "rounds=2", "client.local_epochs=1", *overrides
        )
        run_experiment(experiment, tmp_path / engine)
        outputs[engine] = (tmp_path / engine / "metrics.csv").read_bytes()
    assert outputs["ray"] == outputs["inprocess"]


@pytest.mark.ray
def test_fedem_on_ray_agrees_with_in_process(tmp_path):
    ray_agrees(FEDEM, tmp_path)


def close_to_fedavg_without_drift(strategy: str, tmp_path) -> None:
    """On a static partition every client holds one concept: the mixture ends within a few
    points of FedAvg (each on the clients' held-out data)."""
    runs = {
        name: run_experiment(
            tiny_experiment(f"strategy.name={name}", "rounds=6", "client.local_epochs=2"),
            tmp_path / name.replace(":", "-"),
        )
        for name in (strategy, "fedavg")
    }
    mixture = runs[strategy].summary["client_accuracy_mean"]
    fedavg = runs["fedavg"].summary["client_accuracy_mean"]
    assert mixture > 0.8
    assert abs(mixture - fedavg) < 0.06, (mixture, fedavg)


def test_fedem_without_drift_is_close_to_fedavg(tmp_path):
    close_to_fedavg_without_drift(FEDEM, tmp_path)
