"""FLTrust against the authors' code: golden numbers it computes on a fixed input.

The authors (Cao et al.) keep no public repository of their code; the MXNet program that
circulates as theirs, with ``fltrust(gradients, net, lr, f, byz)`` ("The last one is the server
update") in nd_aggregation.py, is copied into many public repositories. The copy read is
pengyan0708/git at commit 5c2102018d6cb4700760f97ad7a964c45dc0b44c, nd_aggregation.py. MXNet is
not installable here, so its computation was reproduced line by line with NumPy in float64
(nd.dot, nd.norm, nd.maximum, nd.sum as np.dot, np.linalg.norm, np.maximum, np.sum; MXNet
itself would work in float32), with the attack hook as the identity (the planted updates are
the attack):
cos_i = g0.g_i / (||g0|| + 1e-9) / (||g_i|| + 1e-9), ReLU, w_i = cos_i / (sum cos + 1e-9),
aggregate = sum_i g_i w_i / (||g_i|| + 1e-9) * ||g0||. ``FLT_TRUST`` is the ReLU'd cos,
``FLT_AGG`` the aggregate, on :func:`_updates`; ``*_TINY`` the same on the input times 1e-10.
FLPoison's port (vio1etus/FLPoison at commit 368c9403e5dd27775a09af211a7a9d82fbe890ee,
aggregators/fltrust.py, its lines run with scikit-learn) agrees with ``FLT_AGG`` to 2e-10.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from strategies.defences.base import ACCEPTED, REJECTED
from strategies.defences.fltrust import FLTrust
from tests.test_defences import NODE, _record, _round, _split

GLOBAL = np.linspace(-1.0, 1.0, 10)  # the global parameters the updates start from
# the authors' code adds 1e-9 to each norm and to the sum of the scores; fedsim does not
# (see FLTrust's docstring), which moves these results by ~1e-9 relative
RTOL = 1e-8


def _updates() -> tuple[np.ndarray, np.ndarray]:
    """The server's update g0 and 8 client updates, 10 coordinates: 4 honest (g0 plus noise,
    of different sizes), one sign-flipped and scaled (-3 g0), one scaled up (20 g0 plus
    noise), one random, one all zero."""
    rng = np.random.default_rng(7)
    d = 10
    g0 = rng.normal(size=d)
    honest = [s * g0 + rng.normal(size=d) for s in (0.5, 1.0, 2.0, 4.0)]
    updates = np.stack([*honest, -3.0 * g0, 20.0 * g0 + rng.normal(size=d), rng.normal(size=d), np.zeros(d)])
    return g0, updates


# fmt: off
FLT_TRUST = np.array(
    [
        0.49212059064424946, 0.4612335490006278, 0.9209285035468305, 0.9361966113414252, 0.0, 0.998425498177595,
        0.7440832587303547, 0.0,
    ]
)
FLT_AGG = np.array(
    [
        -0.13794690497686052, 0.0953419745675856, -0.3498282821427175, -0.8310436518310967, -0.22661792627608535,
        -0.7501762199927734, -0.03482146812220566, 1.0327417549814868, -0.6858338982347202, -0.5107920944195709,
    ]
)
FLT_TRUST_TINY = np.array(
    [
        0.021914791939823076, 0.022609592576541115, 0.0609570188314283, 0.079853359029124, 0.0, 0.1423691225164814,
        0.026729726357103686, 0.0,
    ]
)
FLT_AGG_TINY = np.array(
    [
        -2.9993101709265484e-12, 1.1197642952474642e-11, -1.95260374300836e-11, -4.635055507685208e-11,
        -1.729565796662886e-11, -5.271139680409675e-11, 2.234347147756867e-12, 6.929562317603314e-11,
        -2.8217989603343732e-11, -2.8845458708805287e-11,
    ]
)
# fmt: on


def _fltrust(g0: np.ndarray) -> FLTrust:
    def root_update(arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        start = np.concatenate([arrays["w"].numpy(), arrays["b"].numpy()])
        return _record(_split(start + g0))

    return FLTrust(FedAvg(), root_update=root_update)


def test_fltrust_matches_the_authors_code():
    g0, updates = _updates()
    defence = _fltrust(g0)
    new, metrics = _round(defence, updates, global_vector=GLOBAL)
    trust = np.array([defence.last_trust[NODE + i] for i in range(len(updates))])
    np.testing.assert_allclose(trust, FLT_TRUST, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(new - GLOBAL, FLT_AGG, rtol=RTOL, atol=1e-12)
    # the sign-flipped and the zero update get score 0 and are rejected
    assert defence.last_accepted == [NODE + i for i in np.flatnonzero(FLT_TRUST > 0)] and metrics[REJECTED] == 2


def test_fltrust_keeps_the_model_when_every_score_is_0_as_the_authors_code_does():
    # every client opposes the server: the authors' code's aggregate is exactly 0 (FLPoison's
    # port would average the rescaled updates uniformly instead)
    g0, updates = _updates()
    opposed = -np.abs(updates[:4]) * np.sign(g0)
    defence = _fltrust(g0)
    new, metrics = _round(defence, opposed, global_vector=GLOBAL)
    np.testing.assert_array_equal(new, GLOBAL)
    assert defence.last_accepted == [] and metrics[ACCEPTED] == 0
    assert set(defence.last_trust.values()) == {0.0}


def test_fltrust_scales_with_the_updates_where_the_authors_code_does_not():
    # the departure: at a scale of 1e-10 the authors' 1e-9 guards dominate the norms (their
    # aggregate is no longer 1e-10 times FLT_AGG); fedsim's aggregate scales exactly
    scale = 1e-10
    g0, updates = _updates()
    defence = _fltrust(scale * g0)
    new, _ = _round(defence, scale * updates, global_vector=np.zeros(10))
    trust = np.array([defence.last_trust[NODE + i] for i in range(len(updates))])
    np.testing.assert_allclose(trust, FLT_TRUST, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(new, scale * FLT_AGG, rtol=RTOL, atol=1e-22)
    assert not np.allclose(FLT_AGG_TINY, scale * FLT_AGG, rtol=0.1, atol=0)
    assert not np.allclose(FLT_TRUST_TINY, FLT_TRUST, rtol=0.1, atol=0)
