"""FoolsGold against the authors' code: golden numbers it computed on a fixed input.

The golden numbers below were computed by the official FoolsGold code, repository
DistributedML/FoolsGold at commit 0aa55114296a2d3c2bcb6f544a6fae31e8e7b8b4: ``foolsgold()`` of
ML/code/model_aggregator.py (imported unmodified, NumPy and scikit-learn's cosine_similarity,
``init(n, d, 1)``, no importance weighting, no Krum filter), fed as ML/code/ML_main.py feeds it
(``memory_size = 0``): each round every update of L2 norm > 1 is divided by its norm, the
history is the running sum of those clipped updates, and the aggregate is
``np.dot(delta.T, wv)``. The weight vector ``wv`` was read by a second call with
``this_delta`` = the identity (whose result is ``wv`` itself). The input is :func:`_rounds`.
``*_UNCLIPPED`` are the same code fed the updates without ML_main.py's clipping.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from strategies.defences.base import clip_to
from strategies.defences.foolsgold import FoolsGold, foolsgold_weights
from tests.test_defences import NODE, _round

GLOBAL = np.linspace(-1.0, 1.0, 12)  # the global parameters the updates start from
EXAMPLES = [5, 50, 12, 30, 8, 40, 20]  # FoolsGold ignores them, as the reference does


def _rounds() -> list[np.ndarray]:
    """7 clients, 12 coordinates, 4 rounds: 4 honest clients of different scales (norms from
    about 0.4 to 11, so some are clipped and one never is), and 3 sybils that push one
    direction with a little noise each (the third with more)."""
    rng = np.random.default_rng(7)
    n_honest, d, rounds = 4, 12, 4
    scales = np.array([0.15, 0.8, 2.5, 1.2])
    target = rng.normal(size=d)
    out = []
    for _ in range(rounds):
        honest = rng.normal(size=(n_honest, d)) * scales[:, None]
        sybils = np.stack(
            [
                3.0 * target + 0.3 * rng.normal(size=d),
                0.7 * target + 0.1 * rng.normal(size=d),
                2.0 * target + 1.5 * rng.normal(size=d),
            ]
        )
        out.append(np.vstack([honest, sybils]))
    return out


# fmt: off
FG_WEIGHTS = np.array(
    [
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.39220908271796895],
        [0.44607463469291436, 1.0, 0.4255980106226034, 1.0, 0.0, 0.0, 0.0],
        [0.9211722639351476, 1.0, 0.40871454940114293, 1.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
    ]
)
FG_SUM = np.array(
    [
        [
            -0.1737723031114377, 0.6738043057879199, -0.7260904899132176, -0.6414187443000539, -0.0905069776492251,
            0.09285555841349337, -1.2109373866125774, 0.18303863542703055, -0.19035434815815563, -0.5887603259617568,
            0.9393055531704095, -0.23776426156507685,
        ],
        [
            -0.11413315503443006, -0.6401234220704433, 0.6063408430010528, 0.3631840903237968, -0.6338451197226156,
            -0.14793865812304263, -0.2523485951117305, -0.5617523310134088, 0.23887509593413242, -0.5312168655316992,
            0.34999714871881066, -0.0575982516229297,
        ],
        [
            0.34759920964945457, 0.03388250860508474, -0.13364507069559736, -0.45636049678223317,
            0.27178403764406034, -0.11841997250801503, -0.5490979382932462, 0.8434675330264064, -0.5310102394606793,
            0.14959294596441475, -0.3414601399010196, 0.19890007543579824,
        ],
        [
            0.28810687579876293, -0.6121088664974894, -0.6704316638345049, 0.4800339840732534, -0.05872674769881192,
            0.5400497893570203, 0.3257345277710331, -0.1887752603618223, 0.5520036092142319, -0.1563060004577927,
            -0.16375824963574667, 0.8760405749582802,
        ],
    ]
)
FG_WEIGHTS_UNCLIPPED = np.array(
    [
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.3922090827179698],
        [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        [0.8731586139188938, 1.0, 0.2598380590339088, 1.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
    ]
)
FG_SUM_UNCLIPPED = np.array(
    [
        [
            -0.8249557731312593, 3.9012801096709584, -2.7839019195787214, -3.0046216871660025, 0.45454372920138675,
            0.47984205312440964, -4.765496421895568, 1.8787164610517153, 1.6721166300810562, -3.6172295952244538,
            4.91435012378619, -0.4945872841883314,
        ],
        [
            0.01601659637715319, -2.0089461925523597, 2.060948863566581, 2.1459746962542523, -0.9059065528591996,
            -0.39204458149945787, -0.1636108802355843, -2.013770484973784, 1.5261753922477919, -1.3378354998174593,
            0.7162248711036223, -0.7977589537595944,
        ],
        [
            1.6410102402127915, 0.8314339990688583, -1.2604887112640855, -2.32752845489879, 0.9757737610634261,
            -1.0853803491415317, -2.1906384315652696, 2.453407669064973, -2.08864497575988, -0.26723344156355266,
            -0.8045705649079866, 0.062421134989918414,
        ],
        [
            0.5725861915650825, -2.320931535958515, -4.514358327935084, 3.3424957426954283, 1.524748995113085,
            3.333223042383176, 2.0636895012698533, 0.015128295829457392, 1.3320752577208819, -1.4742779063071585,
            -0.6632165216747342, 2.5230828438119075,
        ],
    ]
)
# fmt: on


def _play(defence: FoolsGold):
    """Each round through the defence's public aggregate_train: (update, weights, accepted)."""
    for server_round, updates in enumerate(_rounds(), start=1):
        new, _ = _round(defence, updates, examples=EXAMPLES, server_round=server_round, global_vector=GLOBAL)
        histories = np.stack([defence.history[NODE + i] for i in range(len(updates))])
        yield new - GLOBAL, foolsgold_weights(histories, defence.kappa), [node - NODE for node in defence.last_accepted]


@pytest.mark.parametrize(
    ("clip_updates", "weights", "sums"),
    [(True, FG_WEIGHTS, FG_SUM), (False, FG_WEIGHTS_UNCLIPPED, FG_SUM_UNCLIPPED)],
    ids=["clipped", "unclipped"],
)
def test_foolsgold_matches_the_reference_round_by_round(clip_updates, weights, sums):
    defence = FoolsGold(FedAvg(), clip_updates=clip_updates)
    for r, (update, got_weights, accepted) in enumerate(_play(defence)):
        np.testing.assert_allclose(got_weights, weights[r], rtol=1e-9, atol=1e-12)
        assert accepted == [int(i) for i in np.flatnonzero(weights[r] > 0)]
        # the one departure: fedsim divides the reference's sum_i wv_i * update_i by sum_i wv_i
        np.testing.assert_allclose(update, sums[r] / weights[r].sum(), rtol=1e-9, atol=1e-12)
        assert not np.allclose(update, sums[r], rtol=1e-3)


def test_foolsgold_clips_before_the_history_and_by_default():
    assert FoolsGold(FedAvg()).clip_updates is True
    defence = FoolsGold(FedAvg())
    list(_play(defence))
    rounds = _rounds()
    assert any(np.linalg.norm(u) > 1 for u in rounds[0]) and any(np.linalg.norm(u) < 1 for u in rounds[0])
    for i in range(len(rounds[0])):
        expected = sum(clip_to(u, 1.0)[i] for u in rounds)
        np.testing.assert_allclose(defence.history[NODE + i], expected, rtol=1e-9, atol=1e-12)


def test_the_input_reaches_the_references_branches():
    # weights of 1 (logit > 1), of 0 (logit < 0) and between; the first two sybils always 0
    assert ((FG_WEIGHTS > 0) & (FG_WEIGHTS < 1)).any() and (FG_WEIGHTS == 1).any()
    assert (FG_WEIGHTS[:, 4:6] == 0).all() and (FG_WEIGHTS[:, :4] < 1).any()
    # pardoning lowers the top similarity of a client whose weight lies strictly in (0, 1)
    histories = np.cumsum([clip_to(u, 1.0) for u in _rounds()], axis=0)
    pardoned = []
    for r, h in enumerate(histories):
        unit = h / np.linalg.norm(h, axis=1)[:, None]
        cs = unit @ unit.T - np.eye(len(h))
        maxcs = cs.max(axis=1)
        top = cs.argmax(axis=1)
        pardoned += [(r, i) for i in range(len(h)) if maxcs[i] < maxcs[top[i]] and 0 < FG_WEIGHTS[r, i] < 1]
    assert pardoned
