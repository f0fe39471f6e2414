"""RLR against the authors' code: golden numbers it computed on a fixed input.

The golden numbers below were computed by the reference code of Ozdayi et al., repository
TinfoilHat0/Defending-Against-Backdoors-with-Robust-Learning-Rate at commit
20b8f845264c5c2f78bdb61e4e8d0729de211fe2: ``Aggregation.compute_robustLR`` and
``Aggregation.agg_avg`` of src/aggregation.py (imported unmodified with PyTorch; its ``models``
import stubbed, which only its Fisher-information plotting uses), with ``aggr = "avg"``, no
noise and no clipping, agent data sizes = the example counts, and the agents' updates in
float64 as ``Agent.local_train`` returns them. ``RLR_LR_t`` is ``compute_robustLR``'s vector,
``RLR_STEP_t`` is ``lr_vector * aggregated_updates``, what ``aggregate_updates`` adds to the
model (before it casts the model to float32). The input is :func:`_updates`.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from strategies.defences.rlr import RLR
from tests.test_defences import NODE, _round

GLOBAL = np.linspace(-1.0, 1.0, 16)  # the global parameters the updates start from


def _updates() -> tuple[np.ndarray, list[int]]:
    """8 clients, 16 coordinates: 6 honest updates around one direction, 2 attackers that
    flip the sign of coordinates 0-5 and scale them up, and a few exact zeros (sign 0); the
    example counts."""
    rng = np.random.default_rng(7)
    n, d = 8, 16
    base = rng.normal(size=d)
    updates = base + 1.2 * rng.normal(size=(n, d))
    updates[6:, :6] = -4.0 * base[:6] + 0.2 * rng.normal(size=(2, 6))
    updates[rng.integers(0, n, 5), rng.integers(0, d, 5)] = 0.0
    examples = rng.integers(5, 60, n)
    return updates, [int(e) for e in examples]


# fmt: off
RLR_LR_4 = np.array([1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0])
RLR_STEP_4 = np.array(
    [
        -0.8099169405984029, -0.2298069587269641, -0.11751189762905478, 0.2763484210153496, 0.6086003756030101,
        0.4623466483622968, -0.18047558508502481, 1.636568934664604, -0.39209770621535606, -0.5385486245476219,
        0.511473558748168, -0.19278115730912398, -0.1548885047750194, -0.6830922910697861, 0.3436212334052683,
        0.7715995896597123,
    ]
)
RLR_LR_5 = np.array([0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, 0.5, 0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5])
RLR_STEP_5 = np.array(
    [
        -0.40495847029920146, -0.11490347936348205, 0.05875594881452739, 0.1381742105076748, 0.30430018780150503,
        0.2311733241811484, -0.09023779254251241, 0.818284467332302, -0.19604885310767803, 0.26927431227381093,
        -0.255736779374084, -0.09639057865456199, -0.0774442523875097, 0.34154614553489304, 0.17181061670263414,
        -0.38579979482985616,
    ]
)
# fmt: on


@pytest.mark.parametrize(
    ("threshold", "server_lr", "lrs", "step"),
    [(4, 1.0, RLR_LR_4, RLR_STEP_4), (5, 0.5, RLR_LR_5, RLR_STEP_5)],
    ids=["threshold-4", "threshold-5-lr-0.5"],
)
def test_rlr_matches_the_reference(threshold, server_lr, lrs, step):
    updates, examples = _updates()
    defence = RLR(FedAvg(), threshold=threshold, server_lr=server_lr)
    np.testing.assert_array_equal(defence.learning_rates(updates), lrs)
    new, _ = _round(defence, updates, examples=examples, global_vector=GLOBAL)
    np.testing.assert_allclose(new - GLOBAL, step, rtol=1e-9, atol=1e-12)
    assert defence.last_accepted == [NODE + i for i in range(len(updates))]


def test_the_input_reaches_the_references_branches():
    updates, _ = _updates()
    agreement = np.abs(np.sign(updates).sum(axis=0))
    assert (updates == 0).any() and (agreement % 2 == 1).any(), "a sign of 0 counts for neither side"
    assert (agreement == 4).any() and RLR_LR_4[agreement == 4].min() > 0, "a sum equal to the threshold keeps the step"
    assert (RLR_LR_4 < 0).any() and (RLR_LR_4 > 0).any()
