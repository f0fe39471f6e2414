"""FLAME against its two public ports, on one fixed input: the same kept set, clipping bound
and aggregate as the port fedsim follows, and the departures pinned.

The golden numbers come from running each port's FLAME computation, with its framework
stubbed out and its tensors in float64, on the input of :func:`_input` (hdbscan 0.8.44):

- FLPoison: github.com/vio1etus/FLPoison, aggregators/flame.py (with
  aggregators/aggregator_utils.py's normclipping), commit 368c9403e5dd27775a09af211a7a9d82fbe890ee;
- BackFed: github.com/thinh-dao/BackFed, backfed/servers/flame_server.py, commit
  ab3bcbd1a7339f626b3dd9117676d88b6ac1abb5 (its default lamda = 0.001 and eta = 0.1).
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedAvg

from fedsim.seeding import derive_seed
from strategies.defences.base import clip_to, mean_update
from strategies.defences.flame import FLAME, cosine_distances, majority_cluster
from tests.test_defences import NODE, _configure, _reply

LAYOUT = [("hidden.weight", (3, 4)), ("hidden.bias", (3,)), ("out.weight", (2, 3)), ("out.bias", (2,))]
D = 23
BENIGN = list(range(7))  # clients 7, 8, 9 are the attackers


def _input() -> tuple[np.ndarray, np.ndarray]:
    """The global model (23 parameters) and 10 updates: 7 along one direction at different
    norms, 3 attackers along another, longer (so that clipping bites)."""
    rng = np.random.default_rng(20240611)
    start = rng.normal(0.0, 0.5, D)
    benign_direction, attack_direction = rng.normal(size=D), rng.normal(size=D)
    benign = [benign_direction * rng.uniform(0.05, 0.2) + 0.03 * rng.normal(size=D) for _ in range(7)]
    attack = [attack_direction * rng.uniform(0.2, 0.3) + 0.01 * rng.normal(size=D) for _ in range(3)]
    return start, np.stack(benign + attack)


def _arrays(vector: np.ndarray) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for key, shape in LAYOUT:
        size = int(np.prod(shape))
        out[key] = vector[start : start + size].reshape(shape)
        start += size
    return out


def _vector(arrays) -> np.ndarray:
    return np.concatenate([arrays[key].numpy().ravel() for key, _ in LAYOUT])


def _run(defence: FLAME, server_round: int = 1) -> np.ndarray:
    """The round's new global vector (float64 replies: nothing is rounded on the way)."""
    start, updates = _input()
    _configure(defence, _arrays(start), len(updates), server_round)
    replies = [_reply(NODE + i, _arrays(start + u)) for i, u in enumerate(updates)]
    arrays, _ = defence.aggregate_train(server_round, replies)
    return _vector(arrays)


# -- golden numbers ------------------------------------------------------------------------
# FLPoison: HDBSCAN(metric="cosine", min_cluster_size=6, min_samples=1, allow_single_cluster)
# on the client models: labels [0]*7 + [-1]*3, kept = label 0
FLPOISON_KEPT = BENIGN
FLPOISON_MEDIAN = 0.7505541938432856  # np.median of the 10 update norms
# the mean of the kept updates clipped to the median, before noise (its normclipping divides
# by norm + 1e-6)
FLPOISON_AGGREGATE = np.array(
    [-0.09127589366987773, 0.03402452784301728, -0.01035856544493892, 0.09108333361592448,
     0.01059099148113432, 0.17285245030526902, -0.03400760829416712, 0.08339978756453824,
     0.01399692745005846, 0.1908594562876344, -0.23064727111738306, 0.10534379557891078,
     -0.10586916286057392, -0.09592252657413348, -0.01276879217941469, -0.1648463472108696,
     -0.11820315880376513, -0.04878479892623271, -0.03794843457896517, -0.2016371715928114,
     -0.09903716445229202, -0.0028871589856965, -0.01237877453787002]
)  # fmt: skip
# its noise: per tensor, gamma * median * torch.std(tensor of the new model), gamma = 1.2e-5
FLPOISON_SIGMA = {
    "hidden.weight": 3.6924667134913486e-06,
    "hidden.bias": 3.3216033334627043e-06,
    "out.weight": 4.141219124734288e-06,
    "out.bias": 3.3251877853324066e-06,
}
FLPOISON_GAMMA = 1.2e-5

# BackFed: the same HDBSCAN on the last two state entries of the client models (out.weight,
# out.bias): the same labels; clipping bound torch.median, the lower of the two middle norms
BACKFED_KEPT = BENIGN
BACKFED_CLIP_NORM = 0.7336216049817907
BACKFED_ETA, BACKFED_LAMBDA = 0.1, 0.001
# eta times the mean of the kept updates clipped to BACKFED_CLIP_NORM, before noise
BACKFED_AGGREGATE = np.array(
    [-0.00904600009126999, 0.00335749968986589, -0.00102163623877009, 0.00901863042171811,
     0.00102788581971365, 0.01712029979496836, -0.00337431524344417, 0.00826762856067109,
     0.00137367805593868, 0.0189185422528234, -0.02285674213349984, 0.01043747807152623,
     -0.01048963073575024, -0.00950336570888803, -0.00126676556666392, -0.01635463950725048,
     -0.01170437875348862, -0.00483270343979692, -0.00376912432031977, -0.01996409776477251,
     -0.00982095230002729, -0.0002941432768888, -0.00121652378016651]
)  # fmt: skip
# its noise: per tensor, lamda * clip_norm * torch.std(tensor of the new model)
BACKFED_SIGMA = {
    "hidden.weight": 0.00027896048417968915,
    "hidden.bias": 0.000288607729390907,
    "out.weight": 0.00031209092614657876,
    "out.bias": 0.00027529287773120744,
}

# the hdbscan package's labels (metric="cosine", algorithm="generic", min_cluster_size=6,
# min_samples=1, allow_single_cluster=True) on three inputs built from _input()
HDBSCAN_LABELS = {
    "models": [0, 0, 0, 0, 0, 0, 0, -1, -1, -1],
    "updates": [0, 0, 0, 0, -1, 0, 0, -1, -1, -1],
    "last two layers of the models": [0, 0, 0, 0, 0, 0, 0, -1, -1, -1],
}


# -- what fedsim follows -----------------------------------------------------------------
def test_flame_keeps_clips_and_averages_as_flpoison():
    start, updates = _input()
    defence = FLAME(FedAvg(), noise_lambda=0.0)
    new = _run(defence)
    assert [node - NODE for node in defence.last_accepted] == FLPOISON_KEPT
    assert defence.last_bound == FLPOISON_MEDIAN  # the same median, to the last bit
    # FLPoison's clipping divides by norm + 1e-6: a relative difference below 2e-6 here
    np.testing.assert_allclose(new - start, FLPOISON_AGGREGATE, rtol=4e-6, atol=0)
    exact = mean_update(clip_to(updates[FLPOISON_KEPT], FLPOISON_MEDIAN))
    np.testing.assert_allclose(new - start, exact, rtol=1e-12, atol=1e-15)


def test_sklearns_hdbscan_labels_as_the_hdbscan_package_with_flames_settings():
    start, updates = _input()
    models = start + updates
    last_two = models[:, 15:]  # out.weight and out.bias
    for name, points in (("models", models), ("updates", updates), ("last two layers of the models", last_two)):
        expected = [i for i, label in enumerate(HDBSCAN_LABELS[name]) if label == 0]
        assert majority_cluster(cosine_distances(points), len(points) // 2 + 1) == expected, name


def test_clustering_the_updates_instead_drops_a_benign_client():
    defence = FLAME(FedAvg(), noise_lambda=0.0, cluster_on="updates")
    _run(defence)
    assert [node - NODE for node in defence.last_accepted] == [0, 1, 2, 3, 5, 6]


def test_the_noise_is_lambda_times_the_median_norm_on_every_parameter():
    quiet = _run(FLAME(FedAvg(), noise_lambda=0.0), server_round=3)
    defence = FLAME(FedAvg(), noise_lambda=0.001, seed=5)
    noisy = _run(defence, server_round=3)
    sigma = 0.001 * FLPOISON_MEDIAN  # the paper's sigma = lambda * S, one for all parameters
    assert defence.last_noise_std == sigma
    drawn = np.random.default_rng(derive_seed(5, "defence-flame", 3)).normal(0.0, sigma, D)
    np.testing.assert_allclose(noisy - quiet, drawn, rtol=1e-9, atol=1e-15)


# -- departures, pinned --------------------------------------------------------------------
def test_the_ports_scale_each_tensors_noise_by_its_std_which_fedsim_does_not():
    """Both ports draw a tensor's noise with lambda * S * std(tensor) (unbiased std of the new
    model's tensor): the golden sigmas follow that rule, and fedsim's single sigma does not."""
    start, _ = _input()
    for sigmas, factor, bound, aggregate in (
        (FLPOISON_SIGMA, FLPOISON_GAMMA, FLPOISON_MEDIAN, FLPOISON_AGGREGATE),
        (BACKFED_SIGMA, BACKFED_LAMBDA, BACKFED_CLIP_NORM, BACKFED_AGGREGATE),
    ):
        model = _arrays(start + aggregate)
        for key, sigma in sigmas.items():
            np.testing.assert_allclose(sigma, factor * bound * np.std(model[key], ddof=1), rtol=1e-12)
            assert not np.isclose(sigma, BACKFED_LAMBDA * FLPOISON_MEDIAN, rtol=0.01)


def test_backfed_differs_only_by_its_lower_median_and_its_server_learning_rate():
    start, updates = _input()
    models = start + updates
    # its clustering input (the output layer of the models) keeps the same clients here
    assert majority_cluster(cosine_distances(models[:, 15:]), 6) == BACKFED_KEPT
    norms = np.sort(np.linalg.norm(updates, axis=1))
    assert BACKFED_CLIP_NORM == norms[4] != FLPOISON_MEDIAN == (norms[4] + norms[5]) / 2
    ours = BACKFED_ETA * mean_update(clip_to(updates[BACKFED_KEPT], BACKFED_CLIP_NORM))
    np.testing.assert_allclose(ours, BACKFED_AGGREGATE, rtol=1e-12, atol=1e-16)


def test_without_a_cluster_every_reply_is_kept_as_in_backfed(monkeypatch):
    """BackFed keeps everyone when HDBSCAN labels every point noise; FLPoison averages an
    empty set (NaN). One allowed cluster all but rules the case out, so it is forced here."""
    import strategies.defences.flame as flame

    monkeypatch.setattr(flame, "majority_cluster", lambda distances, size: [])
    start, updates = _input()
    defence = FLAME(FedAvg(), noise_lambda=0.0)
    new = _run(defence)
    assert [node - NODE for node in defence.last_accepted] == list(range(10))
    np.testing.assert_allclose(new - start, mean_update(clip_to(updates, FLPOISON_MEDIAN)), rtol=1e-12, atol=1e-16)
