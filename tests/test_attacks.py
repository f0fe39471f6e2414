"""Attacks as client behaviours (fedsim.attacks): triggers, poisoning, windows, methods."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.attacks import ATTACKS
from fedsim.attacks.badnets import BadNets
from fedsim.attacks.base import STATE_PREFIX, AttackTrainer, poisoned_count
from fedsim.attacks.blend import Blend
from fedsim.attacks.dba import DBA
from fedsim.attacks.label_flip import LabelFlip
from fedsim.attacks.mirage import PATTERN, Mirage
from fedsim.attacks.model_replacement import ModelReplacement
from fedsim.attacks.neurotoxin import PREVIOUS, Neurotoxin
from fedsim.attacks.triggers import Trigger
from fedsim.data import ClientData, load_dataset
from fedsim.errors import UserError
from fedsim.models import build_model
from fedsim.models.norm import batchnorm_keys
from fedsim.registry import build
from fedsim.trainer import ClientCall, ClientTrainer, RoundConfig
from strategies.fedbn import FedBNTrainer
from strategies.fedwon import AGC_LAMBDA, FedWonTrainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data() -> ClientData:
    d = load_dataset("digits")
    return ClientData(d.x_train[:200], d.y_train[:200], d.x_test[:50], d.y_test[:50])


def lenet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("lenet", (1, 8, 8), 10)


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(
        "features", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    )
    model.add_module("head", nn.Linear(4 * 8 * 8, 10))
    return model


def run(trainer, model, arrays, data, round_=1, state=None, seed=7, **config):
    config = RoundConfig(server_round=round_, client=0, batch_size=32, lr=0.05, **config)
    generator = torch.Generator().manual_seed(seed)
    return trainer.train(ClientCall(model, arrays, data, config, dict(state or {}), generator, CPU))


def same_record(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a.keys()) == list(b.keys()) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a.keys())


# -- triggers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location, rows, cols",
    [("top-left", (0, 3), (0, 3)), ("top-right", (0, 3), (5, 8)), ("bottom-left", (5, 8), (0, 3)),
     ("bottom-right", (5, 8), (5, 8)), ((2, 4), (2, 5), (4, 7))],
)  # fmt: skip
def test_patch_lands_exactly_at_its_location_on_every_channel(location, rows, cols):
    x = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    trigger = Trigger("patch", size=3, location=location, value=0.75)
    for batch in (x, torch.as_tensor(x)):
        out = trigger.apply(batch)
        assert type(out) is type(batch)
        out = np.asarray(out)
        expected = x.copy()
        expected[:, :, rows[0] : rows[1], cols[0] : cols[1]] = 0.75
        np.testing.assert_array_equal(out, expected)
    # never in place
    assert not np.any(x == 0.75)
    one = trigger.apply(x[0])  # one image (C, H, W)
    np.testing.assert_array_equal(one, expected[0])


def test_patch_that_does_not_fit_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        Trigger("patch", size=3, location=(6, 0)).apply(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="location"):
        Trigger("patch", location="middle")
    with pytest.raises(ValueError, match="kind"):
        Trigger("stripes")


def test_blend_formula_is_exact_and_the_pattern_is_a_function_of_the_seed():
    x = np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32)
    trigger = Trigger("blend", alpha=0.2, seed=3)
    t = trigger.blend_pattern((1, 8, 8))
    np.testing.assert_array_equal(t, Trigger("blend", seed=3).blend_pattern((1, 8, 8)))
    assert not np.array_equal(t, Trigger("blend", seed=4).blend_pattern((1, 8, 8)))
    expected = (1 - np.float32(0.2)) * x + np.float32(0.2) * t
    np.testing.assert_allclose(trigger.apply(x), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(trigger.apply(torch.as_tensor(x)).numpy(), expected, rtol=0, atol=1e-7)
    given = np.full((1, 8, 8), 0.9, np.float32)
    np.testing.assert_allclose(Trigger("blend", alpha=0.5, pattern=given).apply(x), 0.5 * x + 0.45, atol=1e-7)


def test_learnable_trigger_starts_at_half_with_alpha_03_and_is_differentiable():
    trigger = Trigger("learnable")
    assert trigger.alpha == 0.3
    x = torch.zeros(2, 1, 8, 8)
    np.testing.assert_allclose(trigger.apply(x).numpy(), 0.15, atol=1e-7)
    t = torch.full((1, 8, 8), 0.5, requires_grad=True)
    trigger.apply(x, pattern=t).sum().backward()
    np.testing.assert_allclose(t.grad.numpy(), 0.3 * 2, atol=1e-6)
    updated = trigger.with_pattern(torch.ones(1, 8, 8))
    np.testing.assert_allclose(updated.apply(x).numpy(), 0.3, atol=1e-7)


def test_dba_sub_triggers_tile_the_full_patch():
    full = Trigger("patch", size=4, location="top-left")
    parts = full.split(4)
    masks = [part.mask(8, 8) for part in parts]
    assert sum(m.astype(int) for m in masks).max() == 1  # disjoint
    np.testing.assert_array_equal(np.logical_or.reduce(masks), full.mask(8, 8))  # together the full patch
    x = np.zeros((1, 1, 8, 8), np.float32)
    stamped = x
    for part in parts:
        stamped = part.apply(stamped)
    np.testing.assert_array_equal(stamped, full.apply(x))
    assert [int(p.mask(8, 8).sum()) for p in Trigger("patch", size=3).split(4)] == [3, 2, 2, 2]
    with pytest.raises(ValueError):
        Trigger("blend").split(2)


# -- poisoning a batch ---------------------------------------------------------------------


def test_only_the_poisoned_fraction_is_triggered_and_relabelled():
    attacker = BadNets(ClientTrainer(), target=0, trigger=Trigger("patch", size=2, value=5.0), poison_fraction=0.25)
    y = torch.tensor([0, 3, 0, 4, 5, 6, 7, 8, 9, 1])  # 10 samples: ceil(2.5) = 3 poisoned
    x = torch.rand(10, 1, 8, 8)
    x0, y0 = x.clone(), y.clone()
    xp, yp, count = attacker.poison(x, y)
    assert count == 3
    chosen = torch.tensor([False, True, False, True, True, False, False, False, False, False])  # first 3 non-target
    assert torch.equal(yp[chosen], torch.zeros(3, dtype=torch.long))
    assert torch.equal(yp[~chosen], y[~chosen])
    assert torch.equal(xp[~chosen], x[~chosen])  # untouched
    assert torch.equal(xp[chosen], attacker.trigger.apply(x[chosen]))
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs unchanged
    assert (xp[chosen][:, :, 6:, 6:] == 5.0).all()


def test_poisoning_caps_at_the_eligible_samples():
    attacker = BadNets(ClientTrainer(), target=2, poison_fraction=0.5)
    y = torch.tensor([2, 2, 2, 1])
    _, yp, count = attacker.poison(torch.zeros(4, 1, 8, 8), y)
    assert count == 1 and yp.tolist() == [2, 2, 2, 2]


def test_label_flip_relabels_the_source_class_only_and_leaves_images():
    flip = LabelFlip(ClientTrainer(), target=7, source=1)
    y = torch.tensor([1, 2, 1, 7, 1])
    x = torch.rand(5, 1, 8, 8)
    xp, yp, count = flip.poison(x, y)
    assert count == 3 and yp.tolist() == [7, 2, 7, 7, 7]
    assert torch.equal(xp, x)
    every = LabelFlip(ClientTrainer(), target=7)
    assert every.poison(x, y)[1].tolist() == [7] * 5


def test_an_attacker_trains_on_poisoned_batches(data):
    model = lenet()
    arrays = ArrayRecord(model.state_dict())
    attacker = BadNets(ClientTrainer(), target=0, poison_fraction=0.125)
    result = run(attacker, model, arrays, data)
    nontarget = int((data.y_train != 0).sum())
    expected = sum(
        min(math.ceil(0.125 * n), nontarget) for n in [32] * (len(data.y_train) // 32) + [len(data.y_train) % 32]
    )
    assert poisoned_count(result.state) == expected
    benign = run(ClientTrainer(), lenet(), arrays, data)
    assert not same_record(result.arrays, benign.arrays)


# -- the window ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attack", ["badnets", "blend", "dba", "label_flip", "model_replacement", "neurotoxin", "mirage"]
)
def test_outside_the_window_an_attacker_is_the_wrapped_trainer_bit_for_bit(data, attack):
    options = {
        "dba": {"part": 0, "parts": 2},
        "model_replacement": {"gamma": 10.0},
        "mirage": {"iterations": 2, "detector_epochs": 2, "local_epochs": 1},
    }.get(attack, {})
    model = lenet()
    arrays = ArrayRecord(model.state_dict())
    attacker = ATTACKS[attack](ClientTrainer(), target=3, window=(5, 8), **options)
    state = {"kept": np.arange(3.0)}
    for round_ in (1, 4, 9):
        benign = run(ClientTrainer(), lenet(), arrays, data, round_=round_, state=state)
        attacked = run(attacker, lenet(), arrays, data, round_=round_, state=state)
        assert same_record(attacked.arrays, benign.arrays)
        assert attacked.metrics == benign.metrics
        # the attack keeps its own keys (its poisoned count, Neurotoxin's last global arrays)
        inner_state = {k: v for k, v in attacked.state.items() if not k.startswith(STATE_PREFIX)}
        assert inner_state.keys() == benign.state.keys()
        assert all(np.array_equal(inner_state[k], benign.state[k]) for k in benign.state)
        assert poisoned_count(attacked.state) == 0
    inside = run(attacker, lenet(), arrays, data, round_=5)
    assert not same_record(inside.arrays, run(ClientTrainer(), lenet(), arrays, data, round_=5).arrays)


def test_the_attacker_leaves_the_generator_stream_as_the_wrapped_trainer_does(data):
    arrays = ArrayRecord(lenet().state_dict())
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    config = RoundConfig(server_round=1, batch_size=32)
    BadNets(ClientTrainer(), target=0).train(ClientCall(lenet(), arrays, data, config, {}, g1, CPU))
    ClientTrainer().train(ClientCall(lenet(), arrays, data, config, {}, g2, CPU))
    assert torch.equal(g1.get_state(), g2.get_state())


# -- methods -------------------------------------------------------------------------------


def test_model_replacement_scales_the_update_by_gamma(data):
    model = lenet()
    arrays = ArrayRecord(model.state_dict())
    benign = run(ClientTrainer(), lenet(), arrays, data, round_=2)
    attacked = run(ModelReplacement(ClientTrainer(), target=0, gamma=4.0), lenet(), arrays, data, round_=2)
    assert poisoned_count(attacked.state) == 0
    for key in arrays.keys():
        g, local = arrays[key].numpy(), benign.arrays[key].numpy()
        np.testing.assert_allclose(attacked.arrays[key].numpy(), g + 4.0 * (local - g), rtol=0, atol=1e-6)
        np.testing.assert_allclose(attacked.arrays[key].numpy() - g, 4.0 * (local - g), rtol=1e-4, atol=1e-7)
    with_trigger = run(ModelReplacement(ClientTrainer(), target=0, gamma=4.0, trigger=Trigger()), lenet(), arrays, data)
    assert poisoned_count(with_trigger.state) > 0


def test_neurotoxin_global_update_direction_masks_the_largest_coordinates_of_the_last_global_update(data):
    model = lenet()
    previous = {
        k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
        for k, v in model.state_dict().items()
    }
    arrays = ArrayRecord(model.state_dict())
    attacker = Neurotoxin(ClientTrainer(), target=0, ratio=0.95, direction="global_update")
    # the attacker saw `previous` last time it trained: the benign direction is previous - current
    first = run(attacker, lenet(), ArrayRecord(previous), data, round_=1)
    assert any(key.startswith(STATE_PREFIX + PREVIOUS) for key in first.state)
    names = [name for name, _ in model.named_parameters()]
    direction = torch.cat([(previous[n] - model.state_dict()[n]).abs().reshape(-1) for n in names])
    masked = torch.ones(direction.numel(), dtype=torch.bool)
    masked[torch.topk(-direction, int(direction.numel() * 0.95)).indices] = False

    def update(result):
        return torch.cat([torch.as_tensor(result.arrays[n].numpy() - arrays[n].numpy()).reshape(-1) for n in names])

    # without weight decay a masked coordinate never moves, momentum or not
    result = run(attacker, lenet(), arrays, data, round_=2, state=first.state, momentum=0.9)
    assert masked.sum() > 0 and torch.all(update(result)[masked] == 0)
    assert (update(result)[~masked] != 0).float().mean() > 0.5  # it did train elsewhere
    # the state now remembers this round's global arrays
    np.testing.assert_array_equal(result.state[STATE_PREFIX + PREVIOUS + names[0]], arrays[names[0]].numpy())
    # weight decay is added by the optimizer after the mask, as in the authors' code ...
    decayed = run(attacker, lenet(), arrays, data, round_=2, state=first.state, weight_decay=1e-3, momentum=0.9)
    assert (update(decayed)[masked] != 0).float().mean() > 0.5
    # ... unless the masked coordinates are reset to the global values after training
    resetting = Neurotoxin(ClientTrainer(), target=0, ratio=0.95, direction="global_update", reset_masked=True)
    reset = run(resetting, lenet(), arrays, data, round_=2, state=first.state, weight_decay=1e-3, momentum=0.9)
    assert torch.all(update(reset)[masked] == 0)


def test_neurotoxin_keeps_no_history_for_the_clean_gradient_and_masks_per_layer(data):
    arrays = ArrayRecord(lenet().state_dict())
    result = run(Neurotoxin(ClientTrainer(), target=0, ratio=0.9, per_layer=True), lenet(), arrays, data)
    assert not any(key.startswith(STATE_PREFIX + PREVIOUS) for key in result.state)
    for name, p in lenet().named_parameters():
        update = result.arrays[name].numpy() - arrays[name].numpy()
        assert (update == 0).mean() >= (p.numel() - int(p.numel() * 0.9)) / p.numel()


def test_dba_trains_with_its_part_and_is_tested_with_the_full_patch():
    full = Trigger("patch", size=4, location="top-left", value=9.0)
    attacker = DBA(ClientTrainer(), target=1, part=2, parts=4, trigger=full, poison_fraction=0.125)
    assert attacker.test_trigger == full
    xp, _, count = attacker.poison(torch.zeros(8, 1, 8, 8), torch.full((8,), 5))
    assert count == 1
    np.testing.assert_array_equal((xp[0, 0] == 9.0).numpy(), full.split(4)[2].mask(8, 8))


# -- composition with strategies' own trainers ------------------------------------------


def test_it_wraps_fedbn_batchnorm_stays_in_state_not_in_the_reply(data):
    model = bn_model()
    arrays = ArrayRecord(model.state_dict())
    bn = batchnorm_keys(model)
    for attacker in (
        BadNets(FedBNTrainer(), target=0),
        ModelReplacement(FedBNTrainer(), target=0, gamma=3.0),
        Neurotoxin(FedBNTrainer(), target=0),
    ):
        result = run(attacker, bn_model(), arrays, data)
        assert bn and not bn & set(result.arrays.keys())
        assert bn <= set(result.state)
        again = run(attacker, bn_model(), arrays, data, round_=2, state=result.state)
        assert bn <= set(again.state)
    # outside the window: FedBN's result exactly
    attacker = BadNets(FedBNTrainer(), target=0, window=(3, 3))
    benign, attacked = run(FedBNTrainer(), bn_model(), arrays, data), run(attacker, bn_model(), arrays, data)
    assert same_record(attacked.arrays, benign.arrays)
    assert {k for k in attacked.state if not k.startswith(STATE_PREFIX)} == benign.state.keys()
    assert all(np.array_equal(attacked.state[k], benign.state[k]) for k in bn)


def test_it_wraps_fedwon_and_keeps_its_clipping_metric(data):
    arrays = ArrayRecord(lenet().state_dict())
    result = run(Blend(FedWonTrainer(), target=0), lenet(), arrays, data, extra={AGC_LAMBDA: 0.32})
    assert result.metrics[AGC_LAMBDA] == 0.32 and poisoned_count(result.state) > 0


def test_a_trainer_that_does_not_train_through_batch_loss_is_refused(data):
    class Custom(ClientTrainer):
        def fit(self, model, data, config, generator, device):
            return {}

    with pytest.raises(ValueError, match="batch_loss"):
        run(BadNets(Custom(), target=0), lenet(), ArrayRecord(lenet().state_dict()), data)


def test_registry_and_wrapping_rules():
    assert set(ATTACKS) == {"badnets", "blend", "dba", "label_flip", "model_replacement", "neurotoxin", "mirage"}
    assert all(issubclass(ATTACKS[name], AttackTrainer) for name in ATTACKS)
    with pytest.raises(ValueError):
        BadNets(BadNets(ClientTrainer(), target=0), target=1)
    with pytest.raises(ValueError):
        BadNets(ClientTrainer(), target=0, window=(5, 2))
    with pytest.raises(ValueError):
        BadNets(ClientTrainer(), target=0, trigger=Trigger("blend"))


# -- Mirage --------------------------------------------------------------------------------


def test_mirage_learns_a_clamped_pattern_keeps_it_in_state_and_trains_with_it(data):
    arrays = ArrayRecord(lenet().state_dict())
    attacker = Mirage(ClientTrainer(), target=2, iterations=3, detector_epochs=2, local_epochs=1, step=0.01, clamp=0.52)
    result = run(attacker, lenet(), arrays, data)
    pattern = result.state[STATE_PREFIX + PATTERN]
    assert pattern.shape == (1, 8, 8)
    assert np.all(np.abs(pattern) <= 0.52 + 1e-7)
    steps = (pattern - 0.5) / 0.01  # sign steps of 0.01 from 0.5, clamped at 0.52
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
    # one step per batch holding target-class samples, in each of the 3 iterations
    batches_with_target = sum(bool((data.y_train[i : i + 32] == 2).any()) for i in range(0, 200, 32))
    assert batches_with_target == 7
    assert pattern.min() >= 0.5 - 3 * batches_with_target * 0.01 - 1e-6
    assert np.abs(np.round(steps)).max() > 3  # more than one step per iteration
    assert not np.allclose(pattern, 0.5)
    assert poisoned_count(result.state) > 0
    learned = attacker.learned_trigger(result.state)
    np.testing.assert_allclose(learned.apply(np.zeros((1, 1, 8, 8), np.float32))[0], 0.3 * pattern, atol=1e-6)
    # the next attack round starts from the learned pattern
    again = run(attacker, lenet(), arrays, data, round_=2, state=result.state)
    assert not np.array_equal(again.state[STATE_PREFIX + PATTERN], pattern)


def test_mirage_trains_with_the_references_sgd_settings():
    config = Mirage(ClientTrainer(), target=0).training_config(RoundConfig(lr=0.1, local_epochs=2))
    assert (config.lr, config.momentum, config.weight_decay, config.local_epochs) == (0.01, 0.9, 5e-4, 5)
    kept = Mirage(ClientTrainer(), target=0, lr=None, momentum=None, weight_decay=None, local_epochs=None)
    config = kept.training_config(RoundConfig(lr=0.1, momentum=0.5, local_epochs=2))
    assert (config.lr, config.momentum, config.weight_decay, config.local_epochs) == (0.1, 0.5, 0.0, 2)


def test_attacks_build_from_a_table_as_the_wiring_will_and_pickle():
    trigger = Trigger("patch", size=2, location=[1, 1])
    assert trigger.location == (1, 1)
    attacker = build(
        ATTACKS["neurotoxin"],
        {"target": 4, "poison_fraction": 0.25, "window": [3, 6], "ratio": 0.98},
        "[[attack]]",
        trainer=FedWonTrainer(),
        trigger=trigger,
    )
    assert (attacker.target, attacker.window, attacker.ratio, attacker.trigger) == (4, (3, 6), 0.98, trigger)
    assert attacker.clip_lambda is FedWonTrainer.clip_lambda  # the wrapped trainer's own helpers stay reachable
    copy = pickle.loads(pickle.dumps(attacker))
    assert copy.window == (3, 6) and isinstance(copy.trainer, FedWonTrainer)
    with pytest.raises(UserError, match="top_k"):
        build(ATTACKS["neurotoxin"], {"target": 1, "top_k": 0.1}, "[[attack]]", trainer=ClientTrainer())


@pytest.mark.parametrize(
    "attack, default, wrong",
    [(BadNets, "patch", "blend"), (Blend, "blend", "patch"), (Mirage, "learnable", "patch"), (DBA, "bars", "blend")],
)
def test_each_attack_makes_its_default_trigger_and_refuses_a_kind_it_cannot_use(attack, default, wrong):
    from fedsim.trainer import ClientTrainer

    extra = {"part": 0, "parts": 2} if attack is DBA else {}
    assert attack(ClientTrainer(), target=1, **extra).trigger.kind == default
    with pytest.raises(ValueError, match=rf"{attack.__name__} takes a .*'{default}'.* trigger, got a '{wrong}' one"):
        attack(ClientTrainer(), target=1, trigger=Trigger(wrong), **extra)


def test_mirages_closed_form_detector_head_is_torch_sgds():
    """The detector head's update is written out (autograd and torch.optim cost several
    times the arithmetic on its thousands of tiny steps); it must be torch.optim.SGD's on
    Linear-ReLU-Linear, initialised and shuffled from the same generator."""
    attacker = Mirage(ClientTrainer(), target=1, detector_epochs=4, detector_batch_size=16)
    features, labels = torch.randn(70, 12), torch.randint(0, 2, (70,))
    head = attacker.train_detector(features, labels, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    reference = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 2))
    with torch.no_grad():
        for parameter, fan_in in zip(reference.parameters(), (12, 12, 10, 10), strict=True):
            bound = 1 / math.sqrt(fan_in)
            parameter.copy_(torch.empty(parameter.shape).uniform_(-bound, bound, generator=generator))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    orders = [torch.randperm(70, generator=generator) for _ in range(4)]
    for order in orders:
        for start in range(0, 70, 16):
            index = order[start : start + 16]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(reference(features[index]), labels[index]).backward()
            optimizer.step()
    for ours, theirs in zip((head.w1, head.b1, head.w2, head.b2), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-6)
