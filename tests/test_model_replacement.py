"""Model replacement's boosting factor: exact under example-weighted FedAvg by default, from
what the server tells an attacker of its round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedsim.attacks.base import ROUND_EXAMPLES
from fedsim.attacks.model_replacement import ModelReplacement
from fedsim.data import ClientData, load_dataset
from fedsim.models import build_model
from fedsim.runner import run_experiment
from fedsim.trainer import ClientCall, ClientTrainer, RoundConfig
from tests.conftest import tiny_experiment


def _data() -> ClientData:
    d = load_dataset("digits")
    return ClientData(d.x_train[:120], d.y_train[:120], d.x_test[:10], d.y_test[:10])


def _model():
    torch.manual_seed(0)
    return build_model("mlp", (1, 8, 8), 10)


def _reply(attack, data, **extra) -> dict[str, np.ndarray]:
    config = RoundConfig(server_round=1, client=0, batch_size=32, lr=0.05, extra=extra)
    arrays = ArrayRecord(_model().state_dict())
    result = attack.train(
        ClientCall(_model(), arrays, data, config, {}, torch.Generator().manual_seed(1), torch.device("cpu"))
    )
    return {key: result.arrays[key].numpy() for key in result.arrays.keys()}


def test_exact_gamma_is_the_rounds_examples_over_the_attackers():
    data = _data()
    start = {key: value.numpy() for key, value in _model().state_dict().items()}
    plain = _reply(ModelReplacement(ClientTrainer(), target=0, gamma=1.0), data)
    boosted = _reply(ModelReplacement(ClientTrainer(), target=0), data, **{ROUND_EXAMPLES: 600})
    for key, value in plain.items():  # 600 examples in the round, 120 the attacker's: gamma 5
        np.testing.assert_allclose(boosted[key], start[key] + 5.0 * (value - start[key]), rtol=1e-5, atol=1e-6)


def test_exact_gamma_without_the_rounds_examples_is_a_one_line_error():
    with pytest.raises(ValueError, match="gamma = 'exact' needs the round's training examples") as error:
        _reply(ModelReplacement(ClientTrainer(), target=0), _data())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("gamma", [0, -1.0, "fixed", True])
def test_gamma_is_exact_or_a_positive_number(gamma):
    with pytest.raises(ValueError, match="gamma must be 'exact' or a number > 0"):
        ModelReplacement(ClientTrainer(), target=0, gamma=gamma)


def test_the_server_tells_an_attacker_the_examples_of_its_rounds_clients(tmp_path, monkeypatch):
    told, trained = [], []
    boost, fit = ModelReplacement.boost, ClientTrainer.fit

    def telling(self, step):
        told.append((step.config.server_round, step.config.extra[ROUND_EXAMPLES]))
        return boost(self, step)

    def counting(self, model, data, config, generator, device):
        trained.append((config.server_round, config.client, data.num_train))
        return fit(self, model, data, config, generator, device)

    monkeypatch.setattr(ModelReplacement, "boost", telling)
    monkeypatch.setattr(ClientTrainer, "fit", counting)
    experiment = tiny_experiment(
        "strategy.fraction_train=0.5",
        "client.local_test_fraction=0.3",
        "attack=[{method='model_replacement', clients=[1], target=0}]",
    )
    run_experiment(experiment, tmp_path / "run")
    assert told, "the attacker trained"
    for server_round, total in told:
        sizes = [size for r, _client, size in trained if r == server_round]
        assert len(sizes) == 2 and total == sum(sizes)
