"""Parity of fedsim's DBA with its reference code.

Reference: AI-secure/DBA, commit 3cabf7ec3d9967eefb9c3cb983c6eb671ac12b33. The golden
numbers are the yamls' own (``utils/mnist_params.yaml``, ``cifar_params.yaml``,
``tiny_params.yaml``: each adversary's ``N_poison_pattern``, ``poisoning_per_batch``), what
``image_helper.py``'s ``add_pixel_pattern`` stamps with them (1 on every channel of those
pixels: channel 0 of MNIST, the 3 of CIFAR-10 and Tiny-ImageNet), and what
``image_train.py``'s ``scale_weights_poison`` step (``target + (value - target) * rate``)
made of the small state dicts :func:`global_and_local` builds, run unchanged.

Departures pinned here: target-class samples are not poisoned (the reference poisons the
first ``poisoning_per_batch`` samples whatever their label), and integer buffers are not
scaled (the reference scales BatchNorm's sample counter too).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedsim.attacks.base import AttackRound
from fedsim.attacks.dba import DBA
from fedsim.attacks.triggers import Trigger
from fedsim.data import ClientData
from fedsim.trainer import ClientCall, ClientTrainer, RoundConfig

CPU = torch.device("cpu")

# the yamls' 0_poison_pattern ... 3_poison_pattern, as [row, col] lists
MNIST = [
    [[0, 0], [0, 1], [0, 2], [0, 3]],
    [[0, 6], [0, 7], [0, 8], [0, 9]],
    [[3, 0], [3, 1], [3, 2], [3, 3]],
    [[3, 6], [3, 7], [3, 8], [3, 9]],
]
CIFAR = [
    [[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 5]],
    [[0, 9], [0, 10], [0, 11], [0, 12], [0, 13], [0, 14]],
    [[4, 0], [4, 1], [4, 2], [4, 3], [4, 4], [4, 5]],
    [[4, 9], [4, 10], [4, 11], [4, 12], [4, 13], [4, 14]],
]
TINY = [
    [[0, 0], [1, 0], [0, 1], [1, 1], [0, 2], [1, 2], [0, 3], [1, 3], [0, 4], [1, 4], [0, 5], [1, 5], [0, 6], [1, 6],
     [0, 7], [1, 7], [0, 8], [1, 8], [0, 9], [1, 9]],
    [[0, 12], [1, 12], [0, 13], [1, 13], [0, 14], [1, 14], [0, 15], [1, 15], [0, 16], [1, 16], [0, 17], [1, 17],
     [0, 18], [1, 18], [0, 19], [1, 19], [0, 20], [1, 20], [0, 21], [1, 21]],
    [[4, 0], [5, 0], [4, 1], [5, 1], [4, 2], [5, 2], [4, 3], [5, 3], [4, 4], [5, 4], [4, 5], [5, 5], [4, 6], [5, 6],
     [4, 7], [5, 7], [4, 8], [5, 8], [4, 9], [5, 9]],
    [[4, 12], [5, 12], [4, 13], [5, 13], [4, 14], [5, 14], [4, 15], [5, 15], [4, 16], [5, 16], [4, 17], [5, 17],
     [4, 18], [5, 18], [4, 19], [5, 19], [4, 20], [5, 20], [4, 21], [5, 21]],
]  # fmt: skip
# dataset: (image shape, patterns, poisoning_per_batch of a batch of 64)
DATASETS = {"mnist": ((1, 28, 28), MNIST, 20), "cifar": ((3, 32, 32), CIFAR, 5), "tiny": ((3, 64, 64), TINY, 20)}

# scale_weights_poison = 100 on global_and_local()'s state dicts, by the reference's loop
SCALED = {
    "w": [1.1376514434814453, -0.8900654315948486, -1.9967567920684814, -0.2882424592971802, 0.016077399253845215,
          -2.4697861671447754],
    "b": [0.5260489583015442, 0.27171069383621216, -0.346144437789917],
}  # fmt: skip
REFERENCE_SCALED_COUNTER = 305  # the reference's "n": 5 + (8 - 5) * 100; fedsim sends 8


def pixels(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(mask))}


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_each_colluders_bar_is_the_yamls_poison_pattern_and_the_test_trigger_their_union(dataset):
    shape, patterns, _ = DATASETS[dataset]
    height, width = shape[1:]
    union = set()
    for agent, pattern in enumerate(patterns):
        attacker = DBA(ClientTrainer(), target=2, part=agent, parts=4)
        assert pixels(attacker.training_trigger().mask(height, width)) == {tuple(p) for p in pattern}
        assert pixels(attacker.test_trigger.mask(height, width)) == {tuple(p) for p in sum(patterns, [])}
        union |= {tuple(p) for p in pattern}
    assert len(union) == sum(len(p) for p in patterns), "the local triggers are disjoint"


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_poisoning_stamps_1_on_every_channel_of_the_reference_share_of_a_batch(dataset):
    shape, patterns, per_batch = DATASETS[dataset]
    attacker = DBA(ClientTrainer(), target=2, part=1, parts=4)
    x, y = torch.zeros(64, *shape), torch.zeros(64, dtype=torch.long)
    xp, yp, count = attacker.poison(x, y)
    assert count == per_batch
    assert torch.all(yp[:per_batch] == 2) and torch.all(yp[per_batch:] == 0)
    expected = torch.zeros(shape)
    for row, col in patterns[1]:
        expected[:, row, col] = 1.0
    assert all(torch.equal(xp[i], expected) for i in range(per_batch))
    assert torch.equal(xp[per_batch:], x[per_batch:]) and not x.any(), "the input is unchanged"


def test_departure_target_class_samples_are_skipped_by_the_poisoned_share():
    """The reference poisons samples 0 to 19 of a batch of 64 whatever their labels; fedsim
    takes the first 20 that are not of the target class, the contract of every fedsim attack
    (a poisoned sample is one whose label changes), so that attacks compare."""
    attacker = DBA(ClientTrainer(), target=2, part=0, parts=4)
    y = torch.zeros(64, dtype=torch.long)
    y[[0, 3, 5]] = 2
    _, yp, count = attacker.poison(torch.zeros(64, 1, 28, 28), y)
    poisoned = [i for i in range(64) if yp[i] == 2 and y[i] != 2]
    assert count == 20 and poisoned == [i for i in range(23) if i not in (0, 3, 5)]


def global_and_local() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    target = {"w": torch.randn(2, 3), "b": torch.randn(3), "n": torch.tensor(5)}
    trained = {"w": target["w"] + 0.01 * torch.randn(2, 3), "b": target["b"] + 0.01 * torch.randn(3)}
    return target, {**trained, "n": torch.tensor(8)}


def record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({key: Array(value.numpy()) for key, value in state.items()})


def test_scale_is_the_references_scale_weights_poison():
    target, trained = global_and_local()
    step = AttackRound(record(target), RoundConfig(), {}, None, CPU)
    reply = DBA(ClientTrainer(), target=2, part=0, parts=4, scale=100).craft_reply(record(trained), step)
    for key, expected in SCALED.items():
        np.testing.assert_allclose(reply[key].numpy().reshape(-1), expected, rtol=0, atol=1e-6)
    # departure: an integer buffer is sent as trained (the reference's would be 305)
    assert int(reply["n"].numpy()) == 8 != REFERENCE_SCALED_COUNTER
    unscaled = record(trained)
    assert DBA(ClientTrainer(), target=2, part=0, parts=4).craft_reply(unscaled, step) is unscaled, "default 1"


def test_a_scaled_round_sends_the_scaled_update_of_its_poisoned_training():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 4
    data = ClientData(x.numpy(), y.numpy(), x.numpy()[:2], y.numpy()[:2])

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 4))

    arrays = ArrayRecord(model().state_dict())
    config = RoundConfig(server_round=1, batch_size=8, lr=0.1)
    results = [
        DBA(ClientTrainer(), target=2, part=0, parts=2, scale=scale).train(
            ClientCall(model(), arrays, data, config, {}, torch.Generator().manual_seed(7), CPU)
        )
        for scale in (1.0, 30.0)
    ]
    for key in arrays.keys():
        g, local = arrays[key].numpy(), results[0].arrays[key].numpy()
        np.testing.assert_allclose(results[1].arrays[key].numpy(), g + (local - g) * 30.0, rtol=0, atol=1e-6)


def test_more_parts_continue_the_grid_and_other_sizes_follow_the_rule():
    bars = Trigger("bars", bars=6)
    assert [pixels(part.mask(28, 28)) for part in bars.split(6)][4:] == [
        {(6, c) for c in range(4)},
        {(6, c) for c in range(6, 10)},
    ]
    # sizes between the yamls' take the bars of the largest size not above them
    assert Trigger("bars").bar_geometry(48, 48) == ((1, 6), 3) and Trigger("bars").bar_geometry(30, 30) == ((1, 4), 2)
    assert Trigger("bars").bar_geometry(224, 224) == ((2, 10), 2)
    # smaller than MNIST: its bars shrunk in proportion (1x1 bars 1 apart on 8x8 digits)
    assert pixels(Trigger("bars").mask(8, 8)) == {(0, 0), (0, 2), (2, 0), (2, 2)}
    with pytest.raises(ValueError, match=r"20 bars of 1x1 pixels, 1 apart, .* do not fit a 8x8 image; give"):
        Trigger("bars", bars=20).mask(8, 8)


def test_a_user_chooses_the_bars_or_a_split_patch():
    attacker = DBA(ClientTrainer(), target=2, part=1, parts=2, bar=(2, 3), gap=1)
    assert pixels(attacker.training_trigger().mask(28, 28)) == {(r, c) for r in (0, 1) for c in (4, 5, 6)}
    moved = Trigger("bars", bars=2, location="bottom-right")
    assert pixels(moved.mask(28, 28)) == {(27, c) for c in (18, 19, 20, 21, 24, 25, 26, 27)}
    patch = Trigger("patch", size=2, location="top-left")
    split = DBA(ClientTrainer(), target=2, part=1, parts=2, trigger=patch)
    assert pixels(split.training_trigger().mask(8, 8)) == {(1, 0), (1, 1)} and split.test_trigger == patch
    with pytest.raises(ValueError, match="bar and gap shape its default bars; give them on the trigger instead"):
        DBA(ClientTrainer(), target=2, part=0, parts=2, trigger=patch, gap=1)


def test_a_lone_attacker_trains_with_the_whole_global_trigger_as_the_references_centralized_one():
    attacker = DBA(ClientTrainer(), target=2, part=0, parts=1, local_triggers=4)
    assert pixels(attacker.training_trigger().mask(32, 32)) == {tuple(p) for p in sum(CIFAR, [])}
    two_of_four = DBA(ClientTrainer(), target=2, part=1, parts=2, local_triggers=4)
    assert pixels(two_of_four.training_trigger().mask(32, 32)) == {tuple(p) for p in CIFAR[1]}
    assert pixels(two_of_four.test_trigger.mask(32, 32)) == {tuple(p) for p in sum(CIFAR, [])}


def test_a_given_poison_fraction_replaces_the_share_by_image_size():
    attacker = DBA(ClientTrainer(), target=2, part=0, parts=4, poison_fraction=0.5)
    assert attacker.poison(torch.zeros(64, 3, 32, 32), torch.zeros(64, dtype=torch.long))[2] == 32


@pytest.mark.parametrize(
    "options, message",
    [
        ({"scale": 0.0}, "DBA's scale must be a finite number > 0, got 0.0"),
        ({"local_triggers": 0}, "DBA's local_triggers must be an integer >= 1, got 0"),
        ({"parts": 4, "local_triggers": 3}, "DBA's 4 colluding clients need a local trigger each, got 3; raise"),
        ({"bar": (0, 2)}, r"a bar is \(height, width\), both >= 1; got \(0, 2\)"),
        ({"gap": -1}, "the gap between bars must be an integer >= 0, got -1"),
        ({"part": 2}, r"DBA's part must be in \[0, parts\), got part = 2, parts = 2"),
    ],
)
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        DBA(ClientTrainer(), **{"target": 2, "part": 0, "parts": 2, **options})
