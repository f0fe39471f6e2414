"""Parity of fedsim's Neurotoxin with its authors' code.

Reference: jhcknzzm/Federated-Learning-Backdoor, commit
21a9eafc00240b6eea7c2c202bcb8249ee880491: ``FL_Backdoor_CV/helper.py`` (``grad_mask_cv``) and
``FL_Backdoor_CV/train_funcs.py`` (``train_cv_poison``'s step and ``apply_grad_mask``). The
golden numbers below were made by running ``grad_mask_cv`` and ``apply_grad_mask``
unchanged (on the CPU) on the tiny model and data this file builds (:func:`tiny`, :data:`X`,
:data:`Y`), the masked steps as ``train_cv_poison`` takes them (zero_grad, forward,
cross-entropy, backward, ``apply_grad_mask``, step) with the attacker's optimizer of
``FL_Backdoor_CV/utils/cifar10_params.yaml`` (SGD, ``poison_lr`` 0.05, ``poison_momentum``
0.9, ``poison_decay`` 0.005). The clean data is one participant's, in batches of 4 in order
(fedsim's attacker uses its own data); the steps ran on the poisoned batches fedsim forms
from the round's generator (seed 7, 2 epochs of batches of 4, half of each batch's
non-target samples stamped with a 1x1 patch of 1.0 at the top-left pixel and relabelled 2).

Departures pinned here: ``reset_masked`` (not the code's) resets the masked coordinates
after training; the clean gradient restores BatchNorm's running statistics (the code
changes the server's); the paper's ``direction = "global_update"`` is tested in
``test_attacks.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.attacks.base import AttackRound
from fedsim.attacks.neurotoxin import Neurotoxin
from fedsim.attacks.triggers import Trigger
from fedsim.data import ClientData
from fedsim.trainer import ClientCall, ClientTrainer, RoundConfig

CPU = torch.device("cpu")
X = torch.rand(10, 1, 3, 3, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 1])
DATA = ClientData(X.numpy(), Y.numpy(), X.numpy()[:2], Y.numpy()[:2])
CONFIG = RoundConfig(server_round=1, batch_size=4, lr=0.05, momentum=0.9, weight_decay=0.005, local_epochs=2)
TRIGGER = Trigger("patch", size=1, location="top-left")

# grad_mask_cv's masks: the flat indices it zeroes (masks) in each parameter
MASKED = {
    # aggregate_all_layer = 1 (every script), gradmask_ratio = 0.95 (the README's)
    (False, 0.95): {"1.weight": [], "1.bias": [], "3.weight": [], "3.bias": [0, 1, 2]},
    # aggregate_all_layer = 0 (the argument's default)
    (True, 0.95): {"1.weight": [12, 15], "1.bias": [1], "3.weight": [6], "3.bias": [1]},
    (False, 0.8): {"1.weight": [10, 12, 15, 16, 17], "1.bias": [1], "3.weight": [6, 10], "3.bias": [0, 1, 2]},
}

# the parameters after the code's 6 masked steps (aggregate_all_layer 1, ratio 0.95); fedsim's
# are bit-identical on the CPU, the tolerance leaves room for other kernels
TRAINED = {
    "1.weight": [
        -0.002484492026269436, 0.17801816761493683, -0.2731265127658844, -0.24422046542167664, -0.12781301140785217,
        0.08898769319057465, -0.006574979517608881, 0.2631193995475769, -0.029449602589011192, 0.14699962735176086,
        -0.0750083476305008, -0.038781628012657166, -0.2909252345561981, -0.1980872005224228, -0.12093859165906906,
        0.029965955764055252, 0.16949473321437836, 0.23077285289764404, -0.17929013073444366, -0.12160975486040115,
        0.1480061262845993, 0.3012818694114685, -0.042444974184036255, 0.2622017562389374, -0.032024674117565155,
        0.06660541892051697, 0.3224122226238251, -0.3078462779521942, -0.20891138911247253, -0.08401256799697876,
        -0.12935462594032288, 0.28671759366989136, -0.21509762108325958, -0.15276090800762177, -0.2318429946899414,
        -0.3107966184616089,
    ],
    "1.bias": [
        -0.19371356070041656, 0.3433533310890198, 0.19990070164203644, 0.16083800792694092,
    ],
    "3.weight": [
        0.026178667321801186, -0.28518199920654297, 0.035347484052181244, -0.4647681713104248, -0.35967403650283813,
        -0.2902129590511322, 0.25726941227912903, 0.29185497760772705, -0.22075992822647095, 0.04561701789498329,
        0.4240188002586365, 0.49485278129577637,
    ],
    "3.bias": [
        0.19755730032920837, 0.06724559515714645, 0.3337500989437103,
    ],
}  # fmt: skip


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(9, 4), nn.ReLU(), nn.Linear(4, 3))


def step(model: nn.Module, config: RoundConfig = CONFIG) -> AttackRound:
    return AttackRound(ArrayRecord(model.state_dict()), config, {}, DATA, CPU)


def train(attacker: Neurotoxin, config: RoundConfig = CONFIG):
    model = tiny()
    arrays = ArrayRecord(model.state_dict())
    return attacker.train(ClientCall(model, arrays, DATA, config, {}, torch.Generator().manual_seed(7), CPU)), arrays


@pytest.mark.parametrize("per_layer, ratio", list(MASKED))
def test_the_mask_is_grad_mask_cvs(per_layer, ratio):
    """The kept share ``ratio`` of coordinates with the smallest clean-gradient magnitude,
    over all layers or per layer: ``topk(-|g|, int(n * ratio))``."""
    model = tiny()
    attacker = Neurotoxin(ClientTrainer(), target=2, ratio=ratio, per_layer=per_layer)
    kept = attacker.keep_mask(attacker.benign_direction(model, step(model)))
    masked = {name: torch.nonzero(mask.reshape(-1) == 0).reshape(-1).tolist() for name, mask in kept.items()}
    assert masked == MASKED[per_layer, ratio]
    assert all(set(mask.unique().tolist()) <= {0.0, 1.0} for mask in kept.values())


def test_the_defaults_are_the_codes_scripts():
    attacker = Neurotoxin(ClientTrainer(), target=2)
    assert (attacker.ratio, attacker.per_layer, attacker.direction, attacker.reset_masked) == (
        0.95,
        False,
        "clean_gradient",
        False,
    )


def test_masked_training_is_the_codes_step_by_step():
    """The mask multiplies every gradient before every step; SGD's weight decay and
    momentum come after it, so the masked coordinates (here the output bias) still decay."""
    attacker = Neurotoxin(ClientTrainer(), target=2, trigger=TRIGGER, poison_fraction=0.5)
    result, arrays = train(attacker)
    for name, expected in TRAINED.items():
        np.testing.assert_allclose(result.arrays[name].numpy().reshape(-1), expected, rtol=0, atol=1e-6)
    bias = result.arrays["3.bias"].numpy()
    assert np.all(bias != arrays["3.bias"].numpy()) and np.allclose(bias, arrays["3.bias"].numpy(), atol=2e-3)


def test_reset_masked_a_departure_makes_the_update_zero_on_the_masked_coordinates():
    default, arrays = train(Neurotoxin(ClientTrainer(), target=2, trigger=TRIGGER, poison_fraction=0.5))
    reset, _ = train(Neurotoxin(ClientTrainer(), target=2, trigger=TRIGGER, poison_fraction=0.5, reset_masked=True))
    np.testing.assert_array_equal(reset.arrays["3.bias"].numpy(), arrays["3.bias"].numpy())
    for name in ("1.weight", "1.bias", "3.weight"):  # nothing masked there: the same training
        np.testing.assert_array_equal(reset.arrays[name].numpy(), default.arrays[name].numpy())


def test_the_clean_gradient_leaves_batchnorm_statistics_and_the_round_generator_alone():
    """The code computes its gradient in training mode on the server's own model; here
    BatchNorm's batch statistics are used as there, but the running ones are restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    before = {name: b.clone() for name, b in model.named_buffers()}
    attacker = Neurotoxin(ClientTrainer(), target=2)
    attacker.clean_gradient(model, step(model))
    assert all(torch.equal(before[name], b) for name, b in model.named_buffers())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    attacker.train(ClientCall(tiny(), ArrayRecord(tiny().state_dict()), DATA, CONFIG, {}, g1, CPU))
    ClientTrainer().train(ClientCall(tiny(), ArrayRecord(tiny().state_dict()), DATA, CONFIG, {}, g2, CPU))
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ratio": 0.0}, r"ratio \(the share of coordinates kept\) must be in \(0, 1\]"),
        ({"ratio": 1.5}, r"ratio .* must be in \(0, 1\]"),
        ({"direction": "paper"}, "direction must be 'clean_gradient' or 'global_update'"),
    ],
)
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        Neurotoxin(ClientTrainer(), target=2, **options)
