"""Mirage's trigger search against the authors' client, on a small fixed input.

The golden numbers below were computed by running ``MirageClient`` of fabacha/Mirage
(``Mirage/participants/clients/MirageClient.py`` with ``Mirage/utils/utils.py``'s
``poisoned_batch_injection``, commit cd6f089b0eb3257ec9dfc6c38f02d7261a4b2dfb; the official
repository was not found, and this derived copy agrees with yangland/Mirage) on the input
that :func:`tiny_model` and :func:`tiny_data` rebuild: a 4-class network (a 3x3 convolution
to 4 channels, ReLU, a linear head on 144 features), 48 images of 1x6x6, target 1, batches
of 16 with 2 poisoned samples each (the reference's ``poisoned_len``), blend alpha 0.3,
``discriminator_train_samples_pre_class`` 5, ``discriminator_batch_size`` 8, detector SGD
lr 0.05, momentum 0.9, weight decay 5e-4 for 5 epochs, ``trigger_lr`` 0.01, 3 iterations.
The reference's random draws (its detector loader's shuffle, its head's initialisation)
come from torch's global generator, fedsim's from the round's, so the pieces are compared
with the draws fixed on both sides: the detector set (deterministic), the detector head
trained in order from the initialisation torch.manual_seed(5) gives, and three passes of
trigger steps against that detector.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsim.attacks.mirage import DetectorHead, Mirage, detector_set, train_detector_head
from fedsim.trainer import ClientTrainer

CLASSES, TARGET, N, BATCH, POISON_FRACTION = 4, 1, 48, 16, 2 / 16
DETECTOR = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=8)
DETECTOR_EPOCHS, STEP, ITERATIONS = 5, 0.01, 3

# -- golden numbers from the reference (see the module docstring) --------------------------
# the detector set: original indices, non-target classes first (labelled 1), then the target class (0)
REFERENCE_DETECTOR_INDEX = [7, 31, 20, 10, 21, 39, 1, 36, 25, 33, 45, 40, 11, 38, 23]
REFERENCE_TARGET_INDEX = [24, 44, 0, 30, 32, 34, 19, 42, 4, 16]
# the trained detector's probability of "clean target" (0) on the detector set, in order
REFERENCE_DETECTOR_P0 = [
    0.5307618975639343, 0.5611017346382141, 0.5820837616920471, 0.6028996109962463, 0.5771576762199402,
    0.5706968307495117, 0.6016944646835327, 0.6191772222518921, 0.588610827922821, 0.5511085987091064,
    0.6046996116638184, 0.525406002998352, 0.6002485752105713, 0.5715016722679138, 0.6718488931655884,
    0.6586595773696899, 0.654461145401001, 0.6285942792892456, 0.6610177159309387, 0.6159863471984863,
    0.7033764719963074, 0.6594737768173218, 0.5907140970230103, 0.5249012112617493, 0.8417739272117615,
]  # fmt: skip
# the sums of the head's four parameter tensors (first weight, first bias, second weight, second bias)
REFERENCE_HEAD_SUMS = [-4.55795875180047, -0.08592584519647062, -1.3850761512294412, 0.08582971198484302]
# (pattern - 0.5) / trigger_lr after three passes of sign steps: net steps per pixel
REFERENCE_TRIGGER_STEPS = [
    -9, 3, -3, -3, -3, -9, 9, 9, -9, -7, -9, -9, 3, -9, 9, -9, -3, -3, -3, 9, -9, -9, 3, 9, -3, -9, -9, -3, 9, -9,
    -9, -9, -9, -9, 3, -9,
]  # fmt: skip


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(144, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval().requires_grad_(False)


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1, 6, 6, generator=generator)
    y = torch.randint(0, CLASSES, (N,), generator=generator)
    return x, y


def attacker() -> Mirage:
    """Mirage with the reference run's settings."""
    return Mirage(
        ClientTrainer(),
        target=TARGET,
        poison_fraction=POISON_FRACTION,
        step=STEP,
        iterations=ITERATIONS,
        detector_samples_per_class=5,
        detector_epochs=DETECTOR_EPOCHS,
        detector_batch_size=DETECTOR["batch_size"],
        detector_lr=DETECTOR["lr"],
    )


def detector_inputs(model, x, y, pattern):
    """The detector set's indices, images and labels as fedsim builds them."""
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    others, targets = detector_set(losses, y, TARGET, per_class=5)
    images = torch.cat([attacker().trigger.apply(x[others], pattern=pattern), x[targets]])
    labels = torch.cat([torch.ones(len(others), dtype=torch.long), torch.zeros(len(targets), dtype=torch.long)])
    return others, targets, images, labels


def trained_head(model, images, labels) -> DetectorHead:
    initial = DetectorHead.initial(144, 10, torch.Generator().manual_seed(5))
    features = model.features(images)
    orders = [torch.arange(len(labels))] * DETECTOR_EPOCHS
    return train_detector_head(initial, features, labels, orders, **DETECTOR)


def test_the_detector_set_is_the_references():
    model, (x, y) = tiny_model(), tiny_data()
    others, targets, _, _ = detector_inputs(model, x, y, torch.full((1, 6, 6), 0.5))
    assert others.tolist() == REFERENCE_DETECTOR_INDEX
    assert targets.tolist() == REFERENCE_TARGET_INDEX


def test_the_detector_head_initialises_and_trains_as_the_references():
    """nn.Linear's initialisation under torch.manual_seed(5), then torch.optim.SGD on the
    head of a frozen network, equal the closed-form head trained from the same draws."""
    model, (x, y) = tiny_model(), tiny_data()
    _, _, images, labels = detector_inputs(model, x, y, torch.full((1, 6, 6), 0.5))
    torch.manual_seed(5)
    reference = nn.Sequential(nn.Linear(144, 10), nn.ReLU(), nn.Linear(10, 2))
    initial = DetectorHead.initial(144, 10, torch.Generator().manual_seed(5))
    for ours, theirs in zip((initial.w1, initial.b1, initial.w2, initial.b2), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=0)
    head = trained_head(model, images, labels)
    with torch.no_grad():
        p0 = torch.softmax(head(model.features(images)), dim=1)[:, 0]
    np.testing.assert_allclose(p0.numpy(), REFERENCE_DETECTOR_P0, rtol=0, atol=2e-6)
    sums = [float(tensor.double().sum()) for tensor in (head.w1, head.b1, head.w2, head.b2)]
    np.testing.assert_allclose(sums, REFERENCE_HEAD_SUMS, rtol=0, atol=2e-5)


def test_the_trigger_steps_are_the_references():
    """Three passes over the batches, one sign step per batch holding the target class,
    against the detector trained above."""
    model, (x, y) = tiny_model(), tiny_data()
    start = torch.full((1, 6, 6), 0.5)
    _, _, images, labels = detector_inputs(model, x, y, start)
    detector = trained_head(model, images, labels)
    batch_list = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    pattern = start
    for _ in range(ITERATIONS):
        pattern = attacker().trigger_steps(model, detector, pattern, batch_list)
    steps = ((pattern - 0.5) / STEP).flatten().numpy()
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)  # on the grid of sign steps
    assert np.round(steps).astype(int).tolist() == REFERENCE_TRIGGER_STEPS


def test_the_search_retrains_the_detector_on_each_iterations_pattern(monkeypatch):
    """Each iteration rebuilds the detector set with the pattern as it stands (the
    reference's generate_discriminator_dataloader), trains a new head, then takes its pass."""
    model, (x, y) = tiny_model(), tiny_data()
    mirage = attacker()
    seen, trained = [], []
    real_steps, real_train = mirage.trigger_steps, mirage.train_detector

    def steps(model, detector, pattern, batch_list):
        seen.append(pattern.clone())
        return real_steps(model, detector, pattern, batch_list)

    def train(features, labels, generator):
        trained.append(features.clone())
        return real_train(features, labels, generator)

    monkeypatch.setattr(mirage, "trigger_steps", steps)
    monkeypatch.setattr(mirage, "train_detector", train)
    step = type(
        "Step", (), {"generator": torch.Generator().manual_seed(0), "config": type("C", (), {"batch_size": BATCH})}
    )
    start = torch.full((1, 6, 6), 0.5)
    final = mirage.search(model, x, y, start, step)
    assert len(seen) == len(trained) == ITERATIONS
    others, targets, _, _ = detector_inputs(model, x, y, start)
    for pattern, features in zip(seen, trained, strict=True):  # the detector saw that iteration's pattern
        expected = model.features(mirage.trigger.apply(x[others], pattern=pattern))
        torch.testing.assert_close(features[: len(others)], expected)
        torch.testing.assert_close(features[len(others) :], model.features(x[targets]))
    assert not torch.equal(seen[1], seen[0]) and not torch.equal(final, seen[-1])


def test_an_attacker_without_target_class_samples_takes_no_step():
    model, (x, y) = tiny_model(), tiny_data()
    keep = y != TARGET
    step = type(
        "Step", (), {"generator": torch.Generator().manual_seed(0), "config": type("C", (), {"batch_size": BATCH})}
    )
    start = torch.full((1, 6, 6), 0.5)
    assert torch.equal(attacker().search(model, x[keep], y[keep], start, step), start)
