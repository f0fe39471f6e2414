"""FedRC (strategies.fedrc): parity of its robust E-step and label marginals with the
authors' code, the clusters it finds on a tiny two-concept stream, exact resume, Ray, and a
static partition.

The golden numbers below were computed by the reference code of Guo et al., repository
LINs-lab/FedRC at commit ce792292655688c99206d4b5f126ec63934d1b1a: class ``FedRC`` of
``client.py`` (``update_sample_weights``, ``update_learners_weights``, which also computes
the soft label counts ``labels_learner_weights``, and ``update_labels_weights``; the
ensemble's ``gather_losses`` stubbed to return the losses of
:func:`tests.test_fedem.reference_input`), two rounds for each of three clients, with the
label marginals of every model set between them as ``run_experiment.py`` does after each
round (summed over the clients, floored at 1e-8, normalised per model).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.fedrc import LABEL_PRIOR, FedRC, FedRCTrainer
from strategies.soft_clustering import LABEL_COUNTS, assignment, label_prior
from tests.test_fedem import (
    MODELS,
    close_to_fedavg_without_drift,
    ray_agrees,
    reference_input,
    resumes_exactly,
    separates_the_concepts,
    two_rounds,
)

FEDRC = "strategies.fedrc:FedRC"

# fmt: off
FEDRC_PI = [  # [round][client]
    [[0.413479447, 0.200490877, 0.38602975], [0.354669303, 0.393152326, 0.252178401], [0.332663864, 0.38573131, 0.281604856]],
    [[0.248959675, 0.251436323, 0.499603987], [0.370131373, 0.465725094, 0.164143533], [0.343716145, 0.408431798, 0.247852042]],
]
FEDRC_PRIOR_AFTER_ROUND_1 = np.array([
    [0.337825894, 0.451878667, 0.0869514644, 0.123343997],
    [0.219029874, 0.326779217, 0.315075755, 0.139115155],
    [0.268465549, 0.198439315, 0.28524527, 0.247849911],
])
FEDRC_W_ROUND_2_CLIENT_0 = np.array([
    [0.804228604, 0.0305532943, 0.1652181],
    [0.27267608, 0.493368655, 0.233955294],
    [0.150399372, 0.193577558, 0.656023026],
    [0.0206299201, 0.475880921, 0.503489137],
    [0.0646818206, 0.0316790231, 0.903639197],
    [0.18114236, 0.283558488, 0.535299182],
])
FEDRC_COUNTS_ROUND_2_CLIENT_0 = np.array([
    [0.45381844, 0.235711128, 0.804228604, 0],
    [0.776927114, 0.701137543, 0.0305532943, 0],
    [0.769254446, 2.06315136, 0.1652181, 0],
])
# fmt: on


def server_prior(metrics: list[dict]) -> np.ndarray:
    """The label marginals the server computes from the clients' reported counts."""
    return label_prior([np.asarray(m[LABEL_COUNTS]) for m in metrics], MODELS)


def test_fedrc_e_step_label_marginals_and_mixture_match_the_authors_code():
    priors = []

    def between(metrics):
        priors.append(server_prior(metrics))
        return {LABEL_PRIOR: priors[-1].ravel().tolist()}

    out = two_rounds(FedRCTrainer, between)
    for (r, c), (state, _) in out.items():
        np.testing.assert_allclose(state["fedrc/pi"], FEDRC_PI[r][c], rtol=1e-5, err_msg=f"round {r + 1} client {c}")
    np.testing.assert_allclose(priors[0], FEDRC_PRIOR_AFTER_ROUND_1, rtol=1e-5)
    counts = np.asarray(out[1, 0][1][LABEL_COUNTS]).reshape(MODELS, -1)
    np.testing.assert_allclose(counts, FEDRC_COUNTS_ROUND_2_CLIENT_0, rtol=1e-5, atol=1e-7)
    losses, labels = reference_input()
    w = assignment(torch.as_tensor(losses[1, 0], dtype=torch.float64), labels[0], out[0, 0][0]["fedrc/pi"], priors[0])
    np.testing.assert_allclose(w, FEDRC_W_ROUND_2_CLIENT_0, rtol=1e-5)


def test_the_label_marginal_floors_an_absent_label():
    counts = [np.array([[2.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 3.0]])]
    prior = label_prior(counts, 2)
    np.testing.assert_allclose(prior.sum(axis=1), 1.0)
    assert prior[0, 1] == pytest.approx(1e-8 / 3)  # never seen: floored, not zero
    np.testing.assert_allclose(prior[1], [1e-8 / (3 + 1e-8), 3 / (3 + 1e-8)])


def test_fedrc_options_are_checked():
    with pytest.raises(ValueError, match="aggregation must be"):
        FedRC(aggregation="mean")
    with pytest.raises(ValueError, match="prediction must be"):
        FedRC(prediction="best")
    with pytest.raises(ValueError, match="num_models must be"):
        FedRC(num_models=0)
    assert FedRC().num_models == 3  # the authors' K


def test_fedrc_separates_two_concepts(tmp_path):
    separates_the_concepts(FEDRC, "fedrc/pi", tmp_path)


def test_fedrc_resumes_exactly_with_its_label_marginals(tmp_path, monkeypatch):
    resumes_exactly(FEDRC, tmp_path, monkeypatch)


@pytest.mark.ray
def test_fedrc_on_ray_agrees_with_in_process(tmp_path):
    ray_agrees(FEDRC, tmp_path)


def test_fedrc_without_drift_is_close_to_fedavg(tmp_path):
    close_to_fedavg_without_drift(FEDRC, tmp_path)
