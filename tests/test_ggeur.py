"""GGEUR: pooled class geometry, generation as in the authors' code, and a real run that
sends statistics and a linear head, never an embedding."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import ClientData
from fedsim.errors import UserError
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from fedsim.trainer import RoundConfig
from strategies import GGEUR
from strategies.ggeur import (
    EIGENVALUES,
    EIGENVECTORS,
    Generation,
    GGEURTrainer,
    class_statistics,
    geometry,
    pool_statistics,
    sample_around,
)
from tests.conftest import interrupted_and_resumed, tiny_experiment

FEATURES = [
    "features.name=model",
    "features.epochs=2",
    "model.name=linear",
    "client.optimizer=adam",
    "client.lr=0.001",
    "strategy.name=ggeur",
    "strategy.target=40",
    "strategy.per_sample=5",
    "strategy.per_sample_few=20",
]


def ggeur_experiment(*overrides: str):
    return tiny_experiment(*FEATURES, *overrides)


def _random_clients(rng, num_clients=4, num_classes=3, dims=5):
    data = []
    for k in range(num_clients):
        n = rng.integers(0, 40)
        y = rng.integers(0, num_classes, n)
        x = rng.normal(k, 1 + k, (n, dims)) + y[:, None]  # each client shifted: the between-client term matters
        data.append((x, y))
    return data


def test_the_pooled_covariance_is_the_covariance_of_the_pooled_data():
    rng = np.random.default_rng(0)
    clients = _random_clients(rng)
    stats = [class_statistics(x, y, 3) for x, y in clients]
    counts, means, covariances = (np.stack([s[key] for s in stats]) for key in ("count", "mean", "covariance"))
    mean, covariance = pool_statistics(counts, means, covariances)
    pooled = class_statistics(np.concatenate([x for x, _ in clients]), np.concatenate([y for _, y in clients]), 3)
    np.testing.assert_allclose(mean, pooled["mean"], atol=1e-12)
    np.testing.assert_allclose(covariance, pooled["covariance"], atol=1e-12)
    assert covariances.dtype == np.float64


def test_a_covariance_share_pools_only_the_largest_holders():
    x = [np.zeros((2, 2)), np.array([[0.0, 0], [2, 2], [4, 4], [6, 6]]), np.array([[10.0, 0], [0, 10], [5, 5]])]
    y = [np.zeros(2, int), np.zeros(4, int), np.zeros(3, int)]
    stats = [class_statistics(a, b, 1) for a, b in zip(x, y)]
    counts, means, covariances = (np.stack([s[key] for s in stats]) for key in ("count", "mean", "covariance"))
    # 4 + 3 of 9 samples reach 0.7: the two largest clients, not the one with 2
    _, covariance = pool_statistics(counts, means, covariances, share=0.7)
    expected = class_statistics(np.concatenate(x[1:]), np.zeros(7, int), 1)["covariance"]
    np.testing.assert_allclose(covariance, expected, atol=1e-12)


def test_the_covariance_is_float64_and_stable_with_more_dimensions_than_samples():
    rng = np.random.default_rng(1)
    dims, n = 100, 5
    # float32 embeddings far from the origin with a small spread: a float32 covariance loses the spread
    x = (1e4 + 1e-1 * rng.standard_normal((n, dims))).astype(np.float32)
    stats = class_statistics(x, np.zeros(n, int), 1)
    exact = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    np.testing.assert_allclose(stats["covariance"][0], exact, atol=1e-12)
    x = x.astype(np.float64)
    values, vectors = geometry(stats["covariance"])
    assert np.isfinite(values).all() and (values >= 0).all(), "negative round-off eigenvalues are clipped"
    assert (values[0] > 1e-9).sum() == n - 1, "rank n - 1 from n samples"
    samples = sample_around(x[:1], values[0], vectors[0], 2000, rng)
    assert np.isfinite(samples).all()
    # generated samples stay in the span of the data's spread: no direction gets spurious variance
    spread = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][: n - 1]
    offsets = samples - x[0]
    leftover = offsets - (offsets @ spread.T) @ spread
    assert np.abs(leftover).max() < 1e-6 * np.abs(offsets).max()


def test_generated_samples_have_the_requested_covariance():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T
    values, vectors = geometry(sigma[None])
    centre = rng.normal(size=(1, 6))
    samples = sample_around(centre, values[0], vectors[0], 200_000, rng)
    np.testing.assert_allclose(samples.mean(0), centre[0], atol=0.05 * np.sqrt(np.diag(sigma)).max())
    np.testing.assert_allclose(np.cov(samples, rowvar=False), sigma, atol=0.03 * np.abs(sigma).max())


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigenvalue_scaling_picks_the_largest_or_the_smallest(which):
    sigma = np.diag(np.arange(1.0, 21.0))[None]  # eigenvalues 1..20
    values, _ = geometry(sigma, which, scaled=10)
    plain, _ = geometry(sigma)
    ratio = values[0] / plain[0]
    if which == "largest":  # the largest (20) gets x5, the tenth largest (11) x1
        np.testing.assert_allclose(ratio[10:], np.linspace(1, 5, 10))
        np.testing.assert_allclose(ratio[:10], 1)
    else:  # the code: eigh's first ten, the smallest (1) x5
        np.testing.assert_allclose(ratio[:10], np.linspace(5, 1, 10))
        np.testing.assert_allclose(ratio[10:], 1)


def test_single_domain_generation_follows_the_authors_counts():
    rng = np.random.default_rng(3)
    values, vectors = np.ones(2), np.eye(2)
    plan = Generation("single", target=100, per_sample=7, per_sample_few=50, few=10)
    none = np.zeros((0, 2))
    assert len(plan.fill(rng.normal(size=(3, 2)), values, vectors, none, rng)) == 97  # few: 50 per original, cut
    assert len(plan.fill(rng.normal(size=(20, 2)), values, vectors, none, rng)) == 80  # 7 each = 140, cut to 80
    assert len(plan.fill(rng.normal(size=(60, 2)), values, vectors, none, rng)) == 40  # one each around 40 originals
    assert len(plan.fill(rng.normal(size=(150, 2)), values, vectors, none, rng)) == 0  # already past the target
    assert len(plan.fill(none, values, vectors, rng.normal(size=(3, 2)), rng)) == 0  # single domain: held classes only


def test_multi_domain_generation_uses_other_clients_prototypes():
    rng = np.random.default_rng(4)
    values, vectors = np.full(2, 1e-6), np.eye(2)
    plan = Generation("multi", target=50, per_sample=50, per_prototype=50)
    prototypes = np.array([[100.0, 0.0], [0.0, 100.0]])
    lacking = plan.fill(np.zeros((0, 2)), values, vectors, prototypes, rng)
    assert len(lacking) == 50
    assert np.allclose(np.abs(lacking).max(axis=1), 100, atol=0.1), "a lacking class comes from the prototypes"
    assert len(plan.fill(rng.normal(size=(20, 2)), values, vectors, prototypes, rng)) == 30


def test_ggeur_options_are_checked():
    with pytest.raises(ValueError, match="covariance_share"):
        GGEUR(covariance_share=0.0)
    with pytest.raises(ValueError, match="scale_eigenvalues"):
        GGEUR(scale_eigenvalues="biggest")


def test_ggeur_refuses_a_model_that_is_not_a_linear_head(tmp_path):
    with pytest.raises(UserError, match="linear head on frozen embeddings"):
        run_experiment(ggeur_experiment("model.name=mlp"), tmp_path / "run")


class RecordingGGEUR(GGEUR):
    """GGEUR that keeps the shape of every reply it receives."""

    replies: list[tuple[str, dict]] = []

    def _record(self, phase, replies):
        for reply in replies:
            content = reply.content
            arrays = {
                name: {key: tuple(array.shape) for key, array in record.items()}
                for name, record in content.array_records.items()
            }
            type(self).replies.append((phase, arrays))

    def aggregate_query(self, server_round, replies):
        replies = list(replies)
        self._record("query", replies)
        return super().aggregate_query(server_round, replies)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self._record("train", replies)
        return super().aggregate_train(server_round, replies)


def test_only_statistics_and_the_head_leave_a_client(tmp_path):
    RecordingGGEUR.replies.clear()
    run_experiment(ggeur_experiment("strategy.name=tests.test_ggeur:RecordingGGEUR"), tmp_path / "run")
    phases = [phase for phase, _ in RecordingGGEUR.replies]
    assert phases.count("query") == 4, "one statistics round, every client, before training"
    assert phases.count("train") == 8 and phases.index("train") == 4
    dims, classes = 84, 10  # LeNet's features on the digits
    for phase, arrays in RecordingGGEUR.replies:
        if phase == "query":
            assert arrays == {
                "statistics": {"count": (classes,), "mean": (classes, dims), "covariance": (classes, dims, dims)}
            }
        else:
            assert arrays == {"arrays": {"head.weight": (classes, dims), "head.bias": (classes,)}}


def test_a_client_fills_each_class_it_holds_to_the_target_once_per_slot():
    trainer = GGEURTrainer()
    rng = np.random.default_rng(5)
    y = np.array([0] * 3 + [1] * 30)
    data = ClientData(rng.normal(size=(33, 4)).astype(np.float32), y, np.zeros((0, 4), np.float32), np.zeros(0, int))
    values, vectors = geometry(np.stack([np.eye(4)] * 3))
    shape = {EIGENVALUES: values.astype(np.float32), EIGENVECTORS: vectors.astype(np.float32)}
    extra = {f"ggeur-{k}": v for k, v in vars(Generation("single", target=40, per_sample=5, per_sample_few=20)).items()}
    config = RoundConfig(client=2, seed=7, extra=extra)
    augmented = trainer._augmented(data, config, shape)
    assert np.bincount(augmented.y_train, minlength=3).tolist() == [40, 40, 0], "class 2 is not held: not made"
    np.testing.assert_array_equal(augmented.x_train[:33], data.x_train)  # the originals stay
    assert augmented.x_train.dtype == np.float32
    again = GGEURTrainer()._augmented(data, RoundConfig(client=2, seed=7, server_round=5, extra=extra), shape)
    np.testing.assert_array_equal(again.x_train, augmented.x_train)  # drawn once: the same in every round


def test_ggeur_reports_its_statistics_round(tmp_path):
    run = run_experiment(ggeur_experiment(), tmp_path / "run")
    metrics = RunDirectory(run.path).read_metrics()
    query = metrics[metrics.id == "query"]
    assert set(query.metric) >= {"clients-pooled", "embedding-dims", "mean-eigenvalue"}
    assert query[query.metric == "clients-pooled"].value.tolist() == [4.0]
    assert run.summary["rounds_completed"] == 2


def test_ggeur_resumes_exactly(tmp_path, monkeypatch):
    experiment = ggeur_experiment("rounds=3")
    assert interrupted_and_resumed(experiment, tmp_path, monkeypatch).status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()


@pytest.mark.ray
@pytest.mark.slow  # CI: Ray's bits are checked generically in test_engines and test_resume
def test_ggeur_on_ray_gives_the_in_process_bits(tmp_path):
    run_experiment(ggeur_experiment(), tmp_path / "local")
    run_experiment(ggeur_experiment("engine.name=ray", "engine.num_workers=2"), tmp_path / "ray")
    assert (tmp_path / "ray/metrics.csv").read_bytes() == (tmp_path / "local/metrics.csv").read_bytes()


def test_ggeur_refuses_to_train_before_its_statistics_round():
    from flwr.app import Array, ArrayRecord, ConfigRecord

    with pytest.raises(ValueError, match="statistics round must run first"):
        GGEUR().configure_train(1, ArrayRecord({"head.bias": Array(np.zeros(2))}), ConfigRecord(), None)


class _TwoNodes:
    def get_node_ids(self):
        return [1, 2]


@pytest.mark.parametrize("mu", [0.0, 0.1])
def test_ggeur_combines_with_fedprox(mu):
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1  # as a ServerApp has them
    strategy = GGEUR(proximal_mu=mu)
    strategy.load_state_dict({"shape": ArrayRecord({EIGENVALUES: Array(np.ones((2, 3), np.float32))})})
    messages = list(
        strategy.configure_train(1, ArrayRecord({"head.bias": Array(np.zeros(2))}), ConfigRecord(), _TwoNodes())
    )
    config = messages[0].content["config"]
    assert config.get("proximal-mu") == (mu if mu else None)
    assert EIGENVALUES in messages[0].content["arrays"], "the geometry travels with the head"
