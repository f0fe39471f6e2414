"""Drift streams (partitioners/drift.py): every client's view per slot is what the schedule
or preset says, a label map never touches inputs, a transform never touches labels,
label drift changes only P(y), the events are the ground truth, and the stream survives
a round trip through its .npz."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.data.transforms import parse_transform
from partitioners import PARTITIONERS, ClientView, DriftPartitioner, DriftStream, Partition
from partitioners.drift import LABEL, REAL, VIRTUAL, parse_label_map

from .conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FEDDAA_TOML = ROOT / "experiments" / "drift" / "feddaa-mnist5k.toml"


@pytest.fixture(scope="module")
def y():
    return np.random.default_rng(7).integers(0, 10, 2400)


def apply_view(stream: DriftStream, view: ClientView, x: np.ndarray, y: np.ndarray):
    """What a client trains on: its samples' images through their transforms and labels
    through their label maps (the engine's job, written out here to check the stream)."""
    size = len(view.indices)
    concepts = view.concepts if view.concepts is not None else np.zeros(size, np.int64)
    transforms = view.transforms if view.transforms is not None else np.zeros(size, np.int64)
    images = x[view.indices].copy()
    for t in np.unique(transforms):
        if t:
            rows = transforms == t
            images[rows] = parse_transform(stream.transform_specs[t])(images[rows], seed=0)
    return images, stream.label_maps[concepts, y[view.indices]]


def proportions(stream: DriftStream, view: ClientView) -> np.ndarray:
    return np.bincount(stream.labels[view.indices], minlength=stream.num_classes) / len(view.indices)


def per_sample(ids: np.ndarray | None, view: ClientView) -> np.ndarray:
    return ids if ids is not None else np.zeros(len(view.indices), np.int64)


def changed(matrix: np.ndarray) -> np.ndarray:
    out = np.zeros(matrix.shape, dtype=bool)
    out[:, 1:] = matrix[:, 1:] != matrix[:, :-1]
    return out


# -- presets -------------------------------------------------------------------------------


def test_feddaa_concepts_enter_two_three_four_balanced_and_rotation_follows_the_slot(y):
    stream = DriftPartitioner(20, preset="feddaa", num_slots=7, rounds_per_slot=3).split(y, seed=0)
    concepts = stream.concept_matrix()
    assert [len(np.unique(concepts[:, t])) for t in range(7)] == [2, 3, 4, 4, 4, 4, 4]
    for t in range(7):
        counts = np.bincount(concepts[:, t])
        assert counts.max() - counts.min() <= 1, f"slot {t}: clients per concept {counts}"
        for view in stream.at(t):
            assert view.transform == t % 3
            assert np.all(per_sample(view.transforms, view) == t % 3)
            assert np.all(per_sample(view.concepts, view) == view.concept)
        owned = np.concatenate([view.indices for view in stream.at(t)])
        assert len(np.unique(owned)) == len(owned) == len(y), "every slot deals the IID shards once each"
    assert stream.transform_specs == ("identity", "rotate-120", "rotate-240")
    assert stream.concept_specs == ("identity", "reverse", "shift-1", "shift-2")
    labels = np.arange(10)
    expected = [labels, 9 - labels, (labels + 1) % 10, (labels + 2) % 10]
    assert all(np.array_equal(row, want) for row, want in zip(stream.label_maps, expected))
    events = stream.events
    assert np.array_equal((events & REAL) > 0, changed(concepts))
    assert np.all((events[:, 1:] & VIRTUAL) > 0) and not np.any(events & LABEL)
    assert stream.test_sets() == [(c, t) for c in range(4) for t in range(3)]
    assert not np.array_equal(concepts[:, 3], concepts[:, 4]), "clients are dealt anew each slot"


def test_feddaa_without_reshuffling_keeps_each_clients_shard(y):
    stream = DriftPartitioner(8, preset="feddaa", reshuffle_shards=False).split(y, seed=0)
    for client in range(8):
        assert all(np.array_equal(stream.at(t)[client].indices, stream[client]) for t in range(stream.num_slots))


@pytest.mark.parametrize(
    "schedule, swap_slots",
    [("sudden", [3, 3, 3]), ("incremental", [3, 4, 5]), ("recurring", None)],
)
def test_fedccfa_groups_swap_label_pairs_at_the_patterns_slots(y, schedule, swap_slots):
    stream = DriftPartitioner(20, preset="fedccfa", schedule=schedule, num_slots=6).split(y, seed=0)
    group = np.select([np.arange(20) % 10 < 3, np.arange(20) % 10 < 6], [0, 1], 2)
    expected = np.zeros((20, 6), dtype=np.int64)
    for client, g in enumerate(group):
        if swap_slots is None:  # on at the middle, off, on again
            expected[client, [3, 5]] = g + 1
        else:
            expected[client, swap_slots[g] :] = g + 1
    assert np.array_equal(stream.concept_matrix(), expected)
    assert np.array_equal(stream.real_drift(), changed(expected))
    swapped = stream.label_maps[1]
    assert (
        swapped[1] == 2
        and swapped[2] == 1
        and np.array_equal(np.delete(swapped, [1, 2]), np.delete(np.arange(10), [1, 2]))
    )
    assert [parse_label_map(s, 10).tolist() for s in stream.concept_specs] == stream.label_maps.tolist()


# -- generic schedules ---------------------------------------------------------------------


def test_sudden_real_drift_moves_a_fraction_to_the_next_concept_and_never_touches_inputs(y):
    partitioner = DriftPartitioner(10, num_slots=7, drift_every=2, drift_fraction=0.3, reshuffle_shards=False)
    stream = partitioner.split(y, seed=3)
    concepts = stream.concept_matrix()
    moved = changed(concepts)
    assert moved.sum(axis=0).tolist() == [0, 0, 3, 0, 3, 0, 3], "3 of 10 clients at each drift point, none between"
    rows, slots = np.nonzero(moved)
    assert np.all(concepts[rows, slots] == (concepts[rows, slots - 1] + 1) % 4)
    x = np.random.default_rng(0).random((len(y), 1, 4, 4)).astype(np.float32)
    for client in range(10):
        first_x, first_y = apply_view(stream, stream.at(0)[client], x, y)
        for t in range(1, 7):
            view = stream.at(t)[client]
            assert view.transforms is None and np.array_equal(view.indices, stream[client])
            images, labels = apply_view(stream, view, x, y)
            assert np.array_equal(images, first_x), "a label map changed the inputs"
            assert np.array_equal(labels, stream.label_maps[view.concept, first_y])
            if view.concept:
                assert not np.array_equal(labels, first_y)


def test_virtual_drift_transforms_images_and_never_touches_labels(y):
    stream = DriftPartitioner(6, num_slots=4, drift_types=["virtual"], drift_fraction=1.0).split(y, seed=0)
    assert np.array_equal(stream.transform_matrix()[0], [0, 1, 2, 0])
    assert len(stream.label_maps) == 4 and np.all(stream.concept_matrix() == 0)
    x = np.random.default_rng(0).random((len(y), 1, 8, 8)).astype(np.float32)
    for t in range(4):
        for view in stream.at(t):
            images, labels = apply_view(stream, view, x, y)
            assert view.concepts is None
            assert np.array_equal(labels, y[view.indices]), "a transform changed the labels"
            assert np.array_equal(images, x[view.indices]) == (view.transform == 0)
    assert np.array_equal(stream.events, VIRTUAL * changed(stream.transform_matrix()))


def test_label_drift_changes_only_the_class_proportions(y):
    stream = DriftPartitioner(8, num_slots=4, drift_types=["label"], drift_fraction=0.5, label_alpha=0.3).split(
        y, seed=2
    )
    assert np.all(stream.concept_matrix() == 0) and np.all(stream.transform_matrix() == 0)
    label_events = (stream.events & LABEL) > 0
    assert label_events.sum(axis=0).tolist() == [0, 4, 4, 4] and not np.any(stream.events & (REAL | VIRTUAL))
    for t in range(1, 4):
        for client, view in enumerate(stream.at(t)):
            assert view.is_plain, "label drift maps no labels and transforms no images"
            assert len(view.indices) == len(stream[client])
            before = proportions(stream, stream.at(t - 1)[client])
            distance = np.abs(proportions(stream, view) - before).sum() / 2
            if label_events[client, t]:
                assert distance > 0.15, f"client {client}, slot {t}: P(y) hardly moved ({distance:.3f})"
            elif not label_events[client, : t + 1].any():
                assert distance < 0.15  # a fresh IID shard


def test_gradual_drift_mixes_old_and_new_over_the_window(y):
    stream = DriftPartitioner(
        4, num_slots=8, schedule="gradual", window=3, drift_every=4, drift_fraction=1.0, samples_per_client=100
    ).split(y, seed=0)
    for view_by_slot in zip(*(stream.at(t) for t in range(8))):
        shares = [np.mean(per_sample(v.concepts, v) == 1) for v in view_by_slot]
        assert shares == [0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0]
        assert all(set(np.unique(per_sample(v.concepts, v))) <= {0, 1} for v in view_by_slot)
        assert [v.concept for v in view_by_slot] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert np.all(stream.events[:, 4:] == REAL) and not stream.events[:, :4].any()


def test_recurring_drift_returns_to_the_earlier_concept(y):
    stream = DriftPartitioner(6, num_slots=6, schedule="recurring", drift_fraction=1.0).split(y, seed=0)
    concepts = stream.concept_matrix()
    partner = concepts[:, 1]
    assert np.all(partner > 0)
    assert np.array_equal(concepts, np.where(np.arange(6) % 2 == 1, partner[:, None], 0))


def test_incremental_drift_takes_small_steps(y):
    stream = DriftPartitioner(
        4, num_slots=5, schedule="incremental", drift_types=["real", "virtual"], drift_fraction=1.0, rotation_step=15.0
    ).split(y, seed=0)
    assert np.array_equal(stream.concept_matrix()[0], np.arange(5))
    for a, b in zip(stream.label_maps[:-1], stream.label_maps[1:]):
        assert np.count_nonzero(a != b) == 2, "each step swaps one more label pair"
    assert stream.transform_specs == ("identity", "rotate-15", "rotate-30", "rotate-45", "rotate-60")
    assert np.all(stream.events[:, 1:] == REAL | VIRTUAL)


def test_events_match_the_changes_of_every_kind(y):
    stream = DriftPartitioner(12, num_slots=6, drift_types=["real", "virtual", "label"]).split(y, seed=5)
    events = stream.events
    assert np.array_equal((events & REAL) > 0, changed(stream.concept_matrix()))
    assert np.array_equal(stream.real_drift(), (events & REAL) > 0)
    assert np.array_equal((events & VIRTUAL) > 0, changed(stream.transform_matrix()))
    assert ((events & LABEL) > 0).sum(axis=0).tolist() == [0, 6, 6, 6, 6, 6]
    kinds = {int(e) for e in np.unique(events)}
    assert {REAL, VIRTUAL, LABEL} & kinds and len(kinds) > 4, "the kinds drift independently"


# -- the stream as a Partition -------------------------------------------------------------


def test_save_load_round_trip_and_determinism(tmp_path, y):
    partitioner = DriftPartitioner(6, num_slots=5, schedule="gradual", drift_types=["real", "virtual", "label"])
    stream = partitioner.split(y, seed=11)
    stream.save(tmp_path / "s.npz")
    loaded = Partition.load(tmp_path / "s.npz")
    assert isinstance(loaded, DriftStream) and loaded == stream
    assert loaded.test_sets() == stream.test_sets() and loaded.rounds_per_slot == 40
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:
        assert all(data[key].dtype != object for key in data.files)
    assert partitioner.split(y, seed=11) == stream
    assert partitioner.split(y, seed=12) != stream
    assert stream != Partition(stream.client_indices, y) and Partition(stream.client_indices, y) != stream


def test_slots_follow_rounds(y):
    stream = DriftPartitioner(4, num_slots=3, rounds_per_slot=5).split(y, seed=0)
    assert [stream.slot_of(r) for r in (0, 1, 5, 6, 10, 11, 15, 16, 1000)] == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert stream.view(2, 7) is stream.at(1)[2]
    assert stream.num_slots == 3 and Partition([np.arange(3)], np.zeros(3, int)).num_slots == 1


def test_stream_refuses_inconsistent_views():
    labels = np.zeros(10, np.int64)
    labels[5:] = 1
    good = ClientView(np.arange(5))
    with pytest.raises(ValueError, match="indices"):
        DriftStream([[ClientView(np.array([3, 10]))]], labels)
    with pytest.raises(ValueError, match="concepts"):
        DriftStream([[ClientView(np.arange(3), concepts=np.ones(2, np.int64))]], labels)
    with pytest.raises(ValueError, match="concepts ids"):
        DriftStream([[ClientView(np.arange(3), concepts=np.ones(3, np.int64))]], labels)
    with pytest.raises(ValueError, match="identity"):
        DriftStream([[good]], labels, label_maps=np.array([[1, 0]]))
    with pytest.raises(ValueError, match="transform"):
        DriftStream([[good]], labels, transform_specs=["identity", "spin-3"])
    with pytest.raises(ValueError, match="slot 0"):
        DriftStream([[good]], labels, events=np.ones((1, 1), np.int64))


def test_hand_built_stream_derives_its_events_from_the_main_concept_and_transform():
    labels = np.arange(6) % 3
    slots = [
        [ClientView(np.arange(3)), ClientView(np.arange(3, 6))],
        [ClientView(np.arange(3), concepts=np.ones(3, np.int64), concept=1), ClientView(np.arange(3, 6))],
        [
            ClientView(np.arange(3), concepts=np.ones(3, np.int64), concept=1),
            ClientView(np.arange(3, 6), transforms=np.ones(3, np.int64), transform=1),
        ],
    ]
    maps = np.array([[0, 1, 2], [1, 0, 2]])
    stream = DriftStream(slots, labels, label_maps=maps, transform_specs=["identity", "invert"])
    assert stream.events.tolist() == [[0, REAL, 0], [0, 0, VIRTUAL]]
    assert stream.test_sets() == [(0, 0), (0, 1), (1, 0)]
    assert stream.at(0)[0].concepts is None and stream.client_indices[1].tolist() == [3, 4, 5]


@pytest.mark.parametrize(
    "params, message",
    [
        ({"concepts": ["identity", "bogus-1"]}, "bogus"),
        ({"concepts": ["identity", "swap-1"]}, "swap-1"),
        ({"concepts": ["reverse", "identity"]}, r"concepts\[0\]"),
        ({"transforms": ["identity", "spin-3"]}, "transforms"),
        ({"num_slots": 0}, "num_slots"),
        ({"drift_types": ["magic"]}, "drift_types"),
        ({"drift_fraction": 1.5}, "drift_fraction"),
        ({"schedule": "sometimes"}, "schedule"),
        ({"preset": "feddaa", "schedule": "gradual"}, "preset='feddaa' fixes schedule"),
        ({"preset": "feddaa", "drift_types": ["label"]}, "drift_types"),
        ({"preset": "fedccfa", "schedule": "gradual"}, "gradual"),
        ({"preset": "fedccfa", "schedule": "incremental", "num_slots": 3}, "num_slots"),
        ({"schedule": "incremental", "concepts": ["identity", "reverse"]}, "concepts"),
        ({"rotation_step": 7.0}, "rotation_step"),
    ],
)
def test_bad_parameters_name_themselves(params, message):
    with pytest.raises(ValueError, match=message):
        DriftPartitioner(8, **params)


def test_impossible_splits_say_why(y):
    with pytest.raises(ValueError, match="swap-1-12"):
        DriftPartitioner(4, concepts=["identity", "swap-1-12"]).split(y)
    with pytest.raises(ValueError, match="same label map"):
        DriftPartitioner(4, concepts=["identity", "shift-10"]).split(y)
    with pytest.raises(ValueError, match="samples_per_client"):
        DriftPartitioner(4, samples_per_client=601).split(y)
    with pytest.raises(ValueError, match="7 classes"):
        DriftPartitioner(4, preset="fedccfa").split(y % 5)
    assert PARTITIONERS["drift"] is DriftPartitioner


# -- fedsim partition draws the stream -----------------------------------------------------


def test_fedsim_partition_draws_the_stream(tmp_path, monkeypatch):
    from fedsim.cli import main

    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "p"
    assert main(["partition", str(FEDDAA_TOML), "--set", "partition.num_slots=4", "--out", str(out)]) == 0
    for plot in ("stream_concepts.png", "stream_events.png", "partition_labels.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == PNG_MAGIC
    stream = Partition.load(out / "partition.npz")
    assert isinstance(stream, DriftStream) and stream.num_slots == 4
    section = json.loads((out / "skew.json").read_text())["stream"]
    assert section["num_slots"] == 4 and section["rounds_per_slot"] == 40
    assert section["concepts"] == ["identity", "reverse", "shift-1", "shift-2"]
    assert section["transforms"] == ["identity", "rotate-120", "rotate-240"]
    assert section["events_per_slot"]["virtual"] == [0, 20, 20, 20]
    assert section["events_per_slot"]["real"] == stream.real_drift().sum(axis=0).tolist()
    assert section["events_per_slot"]["label"] == [0, 0, 0, 0]


def test_heatmap_tilts_long_column_labels_and_leaves_short_ones(monkeypatch, tmp_path):
    import fedsim.plots

    drawn = {}

    def keep(figure, path):
        axis = figure.axes[0]
        drawn["rotation"] = {label.get_rotation() for label in axis.get_xticklabels()}
        drawn["ticks"] = len(axis.get_xticks())
        fedsim.plots.plt.close(figure)

    monkeypatch.setattr(fedsim.plots, "save_figure", keep)
    domains = [
        "identity",
        "rotate-30",
        "invert",
        "noise-0.2",
        "blur-1.5",
        "contrast-0.4",
        "colour",
        "rotate-45+noise-0.1",
    ]
    fedsim.plots.plot_heatmap(np.ones((16, 8), np.int64), tmp_path / "h.png", "domains", "domain", domains)
    assert drawn["rotation"] == {45.0}
    fedsim.plots.plot_heatmap(np.ones((16, 10), np.int64), tmp_path / "h.png", "classes", "class", list("0123456789"))
    assert drawn["rotation"] == {0.0}
    fedsim.plots.plot_heatmap(np.ones((5, 300), np.int64), tmp_path / "h.png", "many", "group", list(range(300)))
    assert drawn["ticks"] <= fedsim.plots.MAX_TICKS
