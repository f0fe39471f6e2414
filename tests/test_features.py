"""[features]: a frozen extractor's view of the dataset (a model trained on a public split,
a user's checkpoint, or precomputed files), and the linear model that trains on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.build import load_experiment
from fedsim.data import load_dataset
from fedsim.environment import experiment_dataset
from fedsim.errors import UserError
from fedsim.models import build_model
from partitioners import PARTITIONERS
from tests.conftest import QUICKSTART, tiny_experiment

DIGITS = load_dataset("digits")


def test_raw_inputs_leave_the_experiment_and_its_fingerprint_as_before():
    experiment = tiny_experiment()
    assert "features" not in experiment.to_dict()
    assert experiment_dataset(experiment) is load_dataset("digits", **experiment.dataset.params)


def test_the_model_extractor_removes_its_public_split_and_is_cached():
    experiment = tiny_experiment("features.name=model", "features.epochs=1", "features.public_fraction=0.2")
    features = experiment_dataset(experiment)
    raw = load_dataset("digits", **experiment.dataset.params)
    assert features.x_train.shape == (len(raw.y_train) - int(np.ceil(0.2 * len(raw.y_train))), 84)
    assert features.x_test.shape == (len(raw.y_test), 84) and features.x_train.dtype == np.float32
    assert np.bincount(features.y_train).min() > 0.7 * np.bincount(raw.y_train).min(), "stratified"
    again = experiment_dataset(experiment)
    np.testing.assert_array_equal(again.x_train, features.x_train)
    # a different extractor seed: another public split and another encoder
    reseeded = ("features.name=model", "features.epochs=1", "features.public_fraction=0.2", "features.seed=1")
    other = experiment_dataset(tiny_experiment(*reseeded))
    assert other.y_train.shape == features.y_train.shape and not np.array_equal(other.y_train, features.y_train)


def test_a_checkpoint_extractor_uses_the_saved_weights(tmp_path):
    torch.manual_seed(0)
    net = build_model("lenet", DIGITS.input_shape, 10)
    torch.save(net.state_dict(), tmp_path / "encoder.pt")
    features = experiment_dataset(
        tiny_experiment("features.name=checkpoint", f"features.path={tmp_path / 'encoder.pt'}")
    )
    raw = load_dataset("digits", **tiny_experiment().dataset.params)
    with torch.no_grad():
        expected = net.eval().features(torch.as_tensor(raw.x_test[:5])).numpy()
    np.testing.assert_allclose(features.x_test[:5], expected, rtol=1e-5, atol=1e-6)
    assert len(features.y_train) == len(raw.y_train), "a user's encoder has no public split to remove"


def test_a_checkpoint_that_is_a_pickle_is_refused_never_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"features.0.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"\[features\] path = .* is not a weights file fedsim can read safely"):
        experiment_dataset(tiny_experiment("features.name=checkpoint", f"features.path={tmp_path / 'evil.pt'}"))
    assert not (tmp_path / "pwned").exists()


def test_file_features_and_their_mistakes(tmp_path):
    raw = load_dataset("digits", **tiny_experiment().dataset.params)
    np.save(tmp_path / "train.npy", np.ones((len(raw.y_train), 3)))
    np.save(tmp_path / "test.npy", np.ones((len(raw.y_test), 3)))
    np.save(tmp_path / "short.npy", np.ones((5, 3)))
    files = ["features.name=file", f"features.train={tmp_path / 'train.npy'}"]
    features = experiment_dataset(tiny_experiment(*files, f"features.test={tmp_path / 'test.npy'}"))
    assert features.x_train.shape == (len(raw.y_train), 3) and features.input_shape == (3,)
    with pytest.raises(UserError, match=r"\[features\] test = .*short.npy' has shape \(5, 3\); it must have one row"):
        experiment_dataset(tiny_experiment(*files, f"features.test={tmp_path / 'short.npy'}"))
    with pytest.raises(UserError, match=r"\[features\] test = .*: no such file"):
        experiment_dataset(tiny_experiment(*files, f"features.test={tmp_path / 'missing.npy'}"))


def test_bad_features_tables_are_one_line_errors():
    with pytest.raises(UserError, match=r"\[features\] name = 'modle' is not a known features.*did you mean 'model'"):
        load_experiment(QUICKSTART, ["features.name=modle"])
    with pytest.raises(UserError, match=r"\[features\] public_fraction = 1.5 is invalid"):
        load_experiment(QUICKSTART, ["features.name=model", "features.public_fraction=1.5"])
    with pytest.raises(UserError, match=r"\[features\] missing required key 'train'"):
        load_experiment(QUICKSTART, ["features.name=file"])


def test_a_linear_model_is_the_head_on_flat_features():
    model = build_model("linear", (84,), 10)
    assert [name for name, _ in model.named_parameters()] == ["head.weight", "head.bias"]
    assert model(torch.zeros(2, 84)).shape == (2, 10)


@pytest.mark.parametrize("model", ["lenet", "digitcnn", "resnet", "alexnet"])
def test_an_image_model_on_flat_features_says_which_model_to_use(model, tmp_path):
    from fedsim.runner import run_experiment

    experiment = tiny_experiment("features.name=model", "features.epochs=1", f"model.name={model}")
    with pytest.raises(
        UserError, match=rf"\[model\] '{model}' takes images .* shape \(84,\); use name = 'mlp' or 'linear'"
    ):
        run_experiment(experiment, tmp_path / "run")


def test_dirichlet_min_per_class_gives_every_client_every_class():
    y = np.repeat(np.arange(10), 60)
    split = PARTITIONERS["dirichlet"](num_clients=10, alpha=0.05, min_per_class=2).split(y, seed=0)
    assert split.label_matrix().min() == 2
    assert (PARTITIONERS["dirichlet"](num_clients=10, alpha=0.05).split(y, seed=0).label_matrix() == 0).any()
    with pytest.raises(ValueError, match="min_per_class=7 needs 70 samples of every class"):
        PARTITIONERS["dirichlet"](num_clients=10, min_per_class=7).split(y, seed=0)
