"""Concept-drift streams: every client holds a different view of the data in each time slot.

Three kinds of drift change what a client holds (FedDAA, 2025):

- real drift: P(y|x) changes. A *concept* is a label map; sample ``i`` of a view has its
  label ``y`` replaced by ``label_maps[concepts[i], y]``. The inputs are untouched.
- virtual drift: P(x) changes. A view's images go through an input transform of
  :mod:`fedsim.data.transforms` (``transform_specs[transforms[i]]``). The labels are untouched.
- label drift: P(y) changes. The view's indices are redrawn with other class
  proportions. Neither labels nor inputs are altered.

Slots are tied to server rounds by ``rounds_per_slot``: rounds 1..R are slot 0, R+1..2R
slot 1, and so on; rounds past the last slot stay in it. :class:`DriftPartitioner`
("drift") builds a :class:`DriftStream`, which records for every (client, slot) its
:class:`~partitioners.base.ClientView` and which kinds of drift led into it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.atomic import write_npz
from fedsim.checks import check, check_bool, check_choice, check_integer, check_number, check_positive
from fedsim.data.transforms import parse_transform
from partitioners.allocation import cut_counts
from partitioners.base import ClientView, Partition, Partitioner, check_labels

# Drift events are a bitmask per (client, slot): what changed on the way INTO that slot.
REAL, VIRTUAL, LABEL = 1, 2, 4
EVENT_BITS = {"real": REAL, "virtual": VIRTUAL, "label": LABEL}
EVENT_NAMES = {
    0: "no drift",
    REAL: "real",
    VIRTUAL: "virtual",
    REAL | VIRTUAL: "real + virtual",
    LABEL: "label",
    REAL | LABEL: "real + label",
    VIRTUAL | LABEL: "virtual + label",
    REAL | VIRTUAL | LABEL: "real + virtual + label",
}

DRIFT_TYPES = ("real", "virtual", "label")
SCHEDULES = ("sudden", "gradual", "incremental", "recurring")
PRESETS = ("none", "feddaa", "fedccfa")
DEFAULT_CONCEPTS = ("identity", "reverse", "shift-1", "shift-2")
DEFAULT_TRANSFORMS = ("identity", "rotate-120", "rotate-240")
FEDCCFA_CONCEPTS = ("identity", "swap-1-2", "swap-3-4", "swap-5-6")
LABEL_MAP_HELP = "identity, reverse, shift-K, swap-A-B, permute-S; join steps with +, e.g. swap-1-2+swap-3-4"


# -- label maps ----------------------------------------------------------------------------


def parse_label_map(spec: str, num_classes: int | None = None) -> np.ndarray | None:
    """The label map a spec names, as an int64 array ``m`` with ``m[y]`` the new label of ``y``.

    Specs: ``identity``; ``reverse`` (C-1-y); ``shift-K`` ((y+K) mod C); ``swap-A-B``
    (labels A and B trade places); ``permute-S`` (a random permutation drawn with seed S).
    Steps joined by ``+`` apply left to right. Without ``num_classes`` only the syntax is
    checked (and None returned). A ValueError says what is wrong.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"label map {spec!r} is not a spec (choose from: {LABEL_MAP_HELP})")
    mapping = None if num_classes is None else np.arange(num_classes, dtype=np.int64)
    for part in spec.strip().split("+"):
        name, _, rest = part.strip().partition("-")
        numbers = rest.split("-") if rest else []
        expected = {"identity": 0, "reverse": 0, "shift": 1, "swap": 2, "permute": 1}
        if name not in expected:
            raise ValueError(f"unknown label map {part.strip()!r} in {spec!r} (choose from: {LABEL_MAP_HELP})")
        if len(numbers) != expected[name] or not all(n.isascii() and n.isdigit() for n in numbers):
            raise ValueError(
                f"label map {part.strip()!r} in {spec!r} needs {expected[name] or 'no'} non-negative "
                f"integer(s) (choose from: {LABEL_MAP_HELP})"
            )
        values = [int(n) for n in numbers]
        if name == "swap" and values[0] == values[1]:
            raise ValueError(f"label map {part.strip()!r} swaps a label with itself")
        if mapping is None:
            continue
        classes = len(mapping)
        if name == "reverse":
            step = classes - 1 - np.arange(classes)
        elif name == "shift":
            step = (np.arange(classes) + values[0]) % classes
        elif name == "swap":
            if max(values) >= classes:
                raise ValueError(f"label map {part.strip()!r} names a label >= the {classes} classes")
            step = np.arange(classes)
            step[values[0]], step[values[1]] = values[1], values[0]
        elif name == "permute":
            step = np.random.default_rng(values[0]).permutation(classes)
        else:
            step = np.arange(classes)
        mapping = step[mapping]
    return mapping


def _pair_swap_chain(num_classes: int) -> list[str]:
    """Incremental real drift's concepts: state j swaps one more label pair (0-1, 2-3, ...)
    than state j-1; past all C//2 pairs the pairs swap back one by one, so the chain
    cycles with period 2 * (C // 2) and every step changes exactly two labels."""
    pairs = num_classes // 2
    chain = []
    for state in range(2 * pairs):
        swapped = range(state) if state <= pairs else range(state - pairs, pairs)
        chain.append("+".join(f"swap-{2 * i}-{2 * i + 1}" for i in swapped) or "identity")
    return chain


def _rotation_chain(step: float) -> list[str]:
    """Incremental virtual drift's transforms: state j rotates by j * step degrees, mod 360."""
    period = round(360 / step)
    return ["identity"] + [f"rotate-{j * step:g}" for j in range(1, period)]


# -- the stream ----------------------------------------------------------------------------


class DriftStream(Partition):
    """A drift stream: one :class:`ClientView` per client and time slot.

    It is a :class:`Partition` whose ``client_indices`` are slot 0's indices, so skew
    reports and partition plots describe the first slot.

    Parameters
    ----------
    views : sequence over slots of sequences over clients of ClientView
    labels : integer array
        Labels of every sample the views index into (the training set).
    num_classes : int, optional
    label_maps : int array (concepts, classes), optional
        Row ``c`` maps label ``y`` to ``label_maps[c, y]``; row 0 is the identity.
        Default: the identity alone.
    transform_specs : sequence of str
        Input transform specs (:func:`fedsim.data.transforms.parse_transform`) by id;
        entry 0 is ``"identity"``.
    events : int array (clients, slots), optional
        Drift bitmask for the change into each slot (1 real, 2 virtual, 4 label); slot 0
        is 0. Default: real where a view's main concept changed, virtual where its main
        transform changed.
    rounds_per_slot : int
        Server rounds per slot.
    concept_specs : sequence of str, optional
        A name for each label map (its spec), for plots and reports.
    """

    file_marker = "stream_format"  # what save writes and Partition.load looks for

    def __init__(
        self,
        views: Sequence[Sequence[ClientView]],
        labels: np.ndarray,
        num_classes: int | None = None,
        label_maps: np.ndarray | None = None,
        transform_specs: Sequence[str] = ("identity",),
        events: np.ndarray | None = None,
        rounds_per_slot: int = 1,
        concept_specs: Sequence[str] | None = None,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
        if not views or not views[0]:
            raise ValueError("views must hold at least one slot of at least one client")
        num_clients = len(views[0])
        if any(len(slot) != num_clients for slot in views):
            raise ValueError(f"views: every slot must hold {num_clients} clients, got {[len(s) for s in views]}")
        check_integer("rounds_per_slot", rounds_per_slot, minimum=1)

        if label_maps is None:
            label_maps = np.arange(num_classes, dtype=np.int64)[None, :]
        label_maps = np.asarray(label_maps)
        if label_maps.ndim != 2 or label_maps.shape[1] != num_classes or len(label_maps) == 0:
            raise ValueError(f"label_maps must have shape (concepts, {num_classes}), got {label_maps.shape}")
        if not np.issubdtype(label_maps.dtype, np.integer) or label_maps.min() < 0 or label_maps.max() >= num_classes:
            raise ValueError(f"label_maps must map labels to integers in [0, {num_classes})")
        if not np.array_equal(label_maps[0], np.arange(num_classes)):
            raise ValueError("label_maps[0] must be the identity (concept 0 leaves labels as they are)")
        self.label_maps = label_maps.astype(np.int64)

        transform_specs = tuple(str(s) for s in transform_specs)
        if not transform_specs or transform_specs[0] != "identity":
            raise ValueError(f"transform_specs[0] must be 'identity', got {transform_specs[:1]}")
        for spec in transform_specs:
            parse_transform(spec)
        self.transform_specs = transform_specs

        num_concepts = len(self.label_maps)
        if concept_specs is None:
            concept_specs = ["identity", *(f"concept-{c}" for c in range(1, num_concepts))]
        self.concept_specs = tuple(str(s) for s in concept_specs)
        if len(self.concept_specs) != num_concepts:
            raise ValueError(f"concept_specs names {len(self.concept_specs)} concepts, label_maps has {num_concepts}")

        self._views = tuple(
            tuple(
                _checked_view(view, len(labels), num_concepts, len(transform_specs), slot, client)
                for client, view in enumerate(slot_views)
            )
            for slot, slot_views in enumerate(views)
        )
        self._rounds_per_slot = int(rounds_per_slot)
        super().__init__([view.indices for view in self._views[0]], labels, num_classes)

        if events is None:
            events = np.zeros((num_clients, self.num_slots), dtype=np.int64)
            concept, transform = self.concept_matrix(), self.transform_matrix()
            events[:, 1:] |= REAL * (concept[:, 1:] != concept[:, :-1])
            events[:, 1:] |= VIRTUAL * (transform[:, 1:] != transform[:, :-1])
        events = np.asarray(events)
        if events.shape != (num_clients, self.num_slots) or not np.issubdtype(events.dtype, np.integer):
            raise ValueError(f"events must be an integer array of shape {(num_clients, self.num_slots)}")
        if events.size and (events.min() < 0 or events.max() > REAL | VIRTUAL | LABEL):
            raise ValueError("events must be bitmasks of 1 (real), 2 (virtual) and 4 (label)")
        if events[:, 0].any():
            raise ValueError("events of slot 0 must be 0: no slot comes before it")
        self.events = events.astype(np.int64)

    # -- time -------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:  # type: ignore[override]
        return len(self._views)

    @property
    def rounds_per_slot(self) -> int:
        return self._rounds_per_slot

    def slot_of(self, server_round: int) -> int:
        """Rounds 1..R are slot 0, R+1..2R slot 1, ...; rounds past the last slot stay in it
        (round 0, the initial evaluation, is slot 0)."""
        if server_round < 1:
            return 0
        return min((int(server_round) - 1) // self._rounds_per_slot, self.num_slots - 1)

    def at(self, slot: int) -> list[ClientView]:
        """Every client's view in ``slot``."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} is outside the stream's {self.num_slots} slots")
        return list(self._views[slot])

    def view_at(self, client: int, slot: int) -> ClientView:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} is outside the stream's {self.num_slots} slots")
        return self._views[slot][client]

    # -- what the stream holds --------------------------------------------------------------
    def concept_matrix(self) -> np.ndarray:
        """Clients x slots: each view's main concept."""
        return np.array([[v.concept for v in slot] for slot in self._views], dtype=np.int64).T

    def transform_matrix(self) -> np.ndarray:
        """Clients x slots: each view's main transform."""
        return np.array([[v.transform for v in slot] for slot in self._views], dtype=np.int64).T

    def real_drift(self) -> np.ndarray:
        """Clients x slots: True where real drift led into the slot (the ground truth a
        drift detector is scored against)."""
        return (self.events & REAL) > 0

    def test_sets(self) -> list[tuple[int, int]]:
        """The (concept id, transform id) pairs some sample of the stream goes through:
        the test sets on which accuracy per concept can be read."""
        pairs = set()
        for slot in self._views:
            for view in slot:
                concepts = view.concepts if view.concepts is not None else np.zeros(len(view.indices), np.int64)
                transforms = view.transforms if view.transforms is not None else np.zeros_like(concepts)
                codes = np.unique(concepts * len(self.transform_specs) + transforms)
                pairs.update((int(c) // len(self.transform_specs), int(c) % len(self.transform_specs)) for c in codes)
                if not len(view.indices):
                    pairs.add((view.concept, view.transform))
        return sorted(pairs)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: slots, tables and drift events per slot."""
        return {
            "num_slots": self.num_slots,
            "rounds_per_slot": self.rounds_per_slot,
            "concepts": list(self.concept_specs),
            "transforms": list(self.transform_specs),
            "test_sets": [list(pair) for pair in self.test_sets()],
            "events_per_slot": {
                kind: [int(n) for n in ((self.events & bit) > 0).sum(axis=0)] for kind, bit in EVENT_BITS.items()
            },
        }

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the stream to an ``.npz`` of plain arrays (no pickles), atomically."""
        flat = [view for slot in self._views for view in slot]
        empty = np.zeros(0, np.int64)

        def per_sample(ids: np.ndarray | None, size: int) -> np.ndarray:
            return ids if ids is not None else np.zeros(size, np.int64)

        write_npz(
            path,
            {
                "stream_format": np.array(1),
                "labels": self.labels,
                "num_classes": np.array(self.num_classes),
                "rounds_per_slot": np.array(self.rounds_per_slot),
                "label_maps": self.label_maps,
                "concept_specs": np.array(self.concept_specs, dtype=str),
                "transform_specs": np.array(self.transform_specs, dtype=str),
                "events": self.events,
                "sizes": np.array([len(v.indices) for v in flat], np.int64).reshape(self.num_slots, -1),
                "indices": np.concatenate([v.indices for v in flat]) if flat else empty,
                "concepts": np.concatenate([per_sample(v.concepts, len(v.indices)) for v in flat]),
                "transforms": np.concatenate([per_sample(v.transforms, len(v.indices)) for v in flat]),
                "main_concept": self.concept_matrix().T,
                "main_transform": self.transform_matrix().T,
            },
        )

    @classmethod
    def from_npz(cls, data: Mapping[str, np.ndarray]) -> DriftStream:
        """The stream :meth:`save` wrote, from the opened ``.npz`` (``np.load(path)``)."""
        if int(data["stream_format"]) != 1:
            raise ValueError(f"drift stream format {int(data['stream_format'])} is not supported (this is 1)")
        sizes = np.asarray(data["sizes"])
        bounds = np.cumsum(sizes.ravel())[:-1]
        indices, concepts, transforms = (np.split(data[key], bounds) for key in ("indices", "concepts", "transforms"))
        main_concept, main_transform = data["main_concept"], data["main_transform"]
        num_slots, num_clients = sizes.shape
        flat = [
            ClientView(indices[k], concepts[k], transforms[k], int(concept), int(transform))
            for k, (concept, transform) in enumerate(zip(main_concept.ravel(), main_transform.ravel()))
        ]
        views = [flat[slot * num_clients : (slot + 1) * num_clients] for slot in range(num_slots)]
        return cls(
            views,
            data["labels"],
            int(data["num_classes"]),
            label_maps=data["label_maps"],
            transform_specs=[str(s) for s in data["transform_specs"]],
            events=data["events"],
            rounds_per_slot=int(data["rounds_per_slot"]),
            concept_specs=[str(s) for s in data["concept_specs"]],
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DriftStream):
            return False if isinstance(other, Partition) else NotImplemented
        return (
            super().__eq__(other) is True
            and self.num_slots == other.num_slots
            and self.rounds_per_slot == other.rounds_per_slot
            and np.array_equal(self.label_maps, other.label_maps)
            and self.transform_specs == other.transform_specs
            and self.concept_specs == other.concept_specs
            and np.array_equal(self.events, other.events)
            and all(_same_view(a, b) for mine, theirs in zip(self._views, other._views) for a, b in zip(mine, theirs))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"DriftStream(num_clients={self.num_clients}, num_slots={self.num_slots}, "
            f"rounds_per_slot={self.rounds_per_slot}, concepts={len(self.label_maps)}, "
            f"transforms={len(self.transform_specs)})"
        )


def _checked_view(
    view: ClientView, num_samples: int, num_concepts: int, num_transforms: int, slot: int, client: int
) -> ClientView:
    """The view with int64 arrays (all-zero id arrays become None), or a ValueError naming it."""
    where = f"view of client {client} in slot {slot}"
    indices = np.asarray(view.indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"{where}: indices must be a 1-D integer array")
    if indices.size and (indices.min() < 0 or indices.max() >= num_samples):
        raise ValueError(f"{where}: indices must lie in [0, {num_samples})")
    checked = []
    for name, ids, count in (
        ("concepts", view.concepts, num_concepts),
        ("transforms", view.transforms, num_transforms),
    ):
        if ids is not None:
            ids = np.asarray(ids)
            if ids.shape != indices.shape or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise ValueError(f"{where}: {name} must hold one integer id per index ({len(indices)})")
            if ids.size and (ids.min() < 0 or ids.max() >= count):
                raise ValueError(f"{where}: {name} ids must lie in [0, {count})")
            ids = ids.astype(np.int64) if ids.any() else None
        checked.append(ids)
    for name, main, count in (("concept", view.concept, num_concepts), ("transform", view.transform, num_transforms)):
        if isinstance(main, bool) or not isinstance(main, (int, np.integer)) or not 0 <= main < count:
            raise ValueError(f"{where}: {name} must be an id in [0, {count}), got {main!r}")
    return ClientView(indices.astype(np.int64), checked[0], checked[1], int(view.concept), int(view.transform))


def _same_view(a: ClientView, b: ClientView) -> bool:
    def same(x: np.ndarray | None, y: np.ndarray | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))

    return (
        np.array_equal(a.indices, b.indices)
        and same(a.concepts, b.concepts)
        and same(a.transforms, b.transforms)
        and a.concept == b.concept
        and a.transform == b.transform
    )


# -- schedules -----------------------------------------------------------------------------


@dataclass
class _Track:
    """One kind of drift for every client over the slots: at (client, slot) the client is
    moving from state ``old`` to state ``new`` and a share ``share`` of its samples is in
    ``new`` (share 1: wholly in ``new``)."""

    old: np.ndarray
    new: np.ndarray
    share: np.ndarray

    @classmethod
    def pure(cls, states: np.ndarray) -> _Track:
        states = np.asarray(states, dtype=np.int64)
        return cls(states.copy(), states.copy(), np.ones(states.shape))

    def changed(self) -> np.ndarray:
        """Clients x slots: the mixture of states differs from the previous slot's."""
        old = np.where(self.share >= 1, self.new, self.old)
        out = np.zeros(self.new.shape, dtype=bool)
        out[:, 1:] = (
            (old[:, 1:] != old[:, :-1])
            | (self.new[:, 1:] != self.new[:, :-1])
            | (self.share[:, 1:] != self.share[:, :-1])
        )
        return out


class DriftPartitioner(Partitioner):
    """Concept-drift streams ("drift"): each client holds a different view in each time slot.

    The data is split IID into ``num_clients`` shards, as the FedDAA authors do. In every
    slot each client holds one shard: client ``i`` holds shard ``i`` in slot 0, and with
    ``reshuffle_shards`` the shards are dealt to the clients anew (a random permutation)
    in every later slot, so a client sees fresh samples of the same distribution;
    without it a client keeps its shard. ``samples_per_client`` > 0 keeps the first that
    many samples of each shard (0: the whole shard, an even share ``len(y) // num_clients``).
    On that, drift acts as follows.

    **Generic streams** (``preset = "none"``). Every client starts in concept 0 (labels
    as they are), transform 0 (images as they are) and its own shard (no label drift).
    Drift points are the slots ``drift_every``, ``2 * drift_every``, ...; at each drift
    point and for each of the ``drift_types`` independently, ``round(drift_fraction *
    num_clients)`` clients (at least one) drift, drawn at random among those eligible: a
    client whose previous slot showed it a single state (one not in the middle of a
    gradual change). What a drifting client moves to depends on the ``schedule``:

    - ``sudden``: wholly to the next state at once: concept ``k -> (k + 1) mod
      len(concepts)``, transform ``k -> (k + 1) mod len(transforms)``, and for label
      drift a fresh draw of class proportions from Dirichlet(``label_alpha``).
    - ``gradual``: to the same next state, but over ``window`` slots: in the j-th slot
      from the drift point (j = 0 .. window-1) a share (j + 1) / (window + 1) of the
      client's samples (chosen at random) is in the new concept or transform, the rest
      in the old one; from slot ``window`` on, all of them. Label drift mixes the old and
      new class proportions in the same shares. The view's main concept is the new one
      from a share of 1/2 on.
    - ``incremental``: one small step. Real drift walks a chain of label maps where each
      step swaps one more label pair (``swap-0-1``, ``swap-0-1+swap-2-3``, ...; past all
      C // 2 pairs they swap back one by one); virtual drift rotates by ``rotation_step``
      more degrees (mod 360); label drift moves the class proportions halfway towards a
      fresh Dirichlet draw. The chains replace ``concepts`` / ``transforms``, so those must
      stay at their defaults.
    - ``recurring``: back and forth between two states, A B A B ...: concept 0 and one
      concept drawn per client from ``concepts[1:]``; transform 0 and one drawn from
      ``transforms[1:]``; the shard's own proportions and one Dirichlet draw.

    The events of a generic stream mark, per kind, each slot whose mix of states differs
    from the previous slot's: a gradual change marks every slot of its window and the slot
    where it completes; a fresh shard of the same state is no drift.

    With label drift a client's view is not its shard but ``len(shard)`` (or
    ``samples_per_client``) samples drawn from the whole training set with the client's
    class proportions (without replacement, except for a class asked for more samples
    than it has), so label-drifted views of different clients may share samples.

    **Preset "feddaa"** (FedDAA 2025; the authors' repository
    LeegerPENG/FedDAA-Dynamic-Client-Clustering-for-Concept-Drift-Adaptation-in-Federated-Learning,
    ``create_c/make_fmnist_c-60_client-...py`` and ``FedDAA_Fashion_MINST.py``). Four
    concepts y, C-1-y, (y+1) mod C, (y+2) mod C; every view of slot t rotated by
    0/120/240 degrees for t mod 3 (transform t mod 3). Concepts enter over the first
    slots: concepts {0, 1} in slot 0, {0, 1, 2} in slot 1, all four from slot 2. In every
    slot the clients are dealt among the present concepts in equal numbers (within one)
    in a fresh random order. The authors bake concept ``s // 15`` into shard ``s`` of 60
    and give client j shard ``index[j]``: slot 0 deals shards 0..29 twice each (30 + 30
    clients), slot 1 shards 0..44 once plus 5 more of each concept's 15 drawn with
    replacement (20 + 20 + 20), later slots a random permutation of all 60 (15 each).
    Here a concept is a label map applied to a view, so the concept counts are theirs
    while every client keeps a distinct shard (no shard is held twice). Events: real where
    a client's concept changes, virtual at every slot change (the rotation changes),
    label never. The preset fixes every generic parameter; it leaves ``num_clients``,
    ``num_slots``, ``rounds_per_slot``, ``reshuffle_shards`` and ``samples_per_client`` open.

    **Preset "fedccfa"** (FedCCFA's drift suite, wenwenwenwenti/FedCCFA ``utils/drift.py``
    and ``methods/*.py``: 200 rounds, sudden drift at round 100, incremental at rounds 100,
    110, 120, recurrent at rounds 100 and 150). Clients are grouped by ``id mod 10``: < 3
    swap labels 1 and 2, < 6 swap 3 and 4, the rest swap 5 and 6 (concepts 1, 2, 3; concept
    0 is the identity). With d = ``num_slots // 2`` (round 100 of 200): ``schedule =
    "sudden"``: every group swaps at slot d; ``"incremental"``: group g swaps at slot
    d + g (d moved earlier if the three slots would not fit); ``"recurring"``: the swaps
    toggle on at d and then every P = max(1, (num_slots - d) // 2) slots (FedCCFA's 200
    rounds: on at 100, off at 150; with 6 slots: on at 3, off at 4, on at 5). FedCCFA's
    clients keep their data: set ``reshuffle_shards = false`` to match. The preset leaves
    ``schedule`` (sudden, incremental or recurring) open besides what "feddaa" leaves open.

    Parameters
    ----------
    num_clients : int
    num_slots : int
        Time slots (>= 1).
    rounds_per_slot : int
        Server rounds per slot (FedDAA: 40).
    preset : {"none", "feddaa", "fedccfa"}
    drift_types : list of {"real", "virtual", "label"}
    schedule : {"sudden", "gradual", "incremental", "recurring"}
    drift_fraction : float
        Share of clients that drift at each drift point, in (0, 1].
    drift_every : int
        Slots between drift points.
    window : int
        Gradual drift: slots over which old and new mix.
    concepts : list of str
        Label-map specs (:func:`parse_label_map`), ``concepts[0] = "identity"``.
    transforms : list of str
        :mod:`fedsim.data.transforms` specs for virtual drift, ``transforms[0] = "identity"``.
    label_alpha : float
        Dirichlet concentration of label drift's class proportions.
    rotation_step : float
        Incremental virtual drift: degrees per step, in [0.1, 180]; must divide 360.
    samples_per_client : int
        Samples per view; 0: a whole shard.
    reshuffle_shards : bool
        Deal the shards to the clients anew in every slot.
    """

    def __init__(
        self,
        num_clients: int,
        num_slots: int = 6,
        rounds_per_slot: int = 40,
        preset: str = "none",
        drift_types: tuple[str, ...] = ("real",),
        schedule: str = "sudden",
        drift_fraction: float = 0.5,
        drift_every: int = 1,
        window: int = 2,
        concepts: tuple[str, ...] = DEFAULT_CONCEPTS,
        transforms: tuple[str, ...] = DEFAULT_TRANSFORMS,
        label_alpha: float = 0.5,
        rotation_step: float = 30.0,
        samples_per_client: int = 0,
        reshuffle_shards: bool = True,
    ) -> None:
        super().__init__(num_clients)
        check_integer("num_slots", num_slots, minimum=1)
        check_integer("rounds_per_slot", rounds_per_slot, minimum=1)
        check_choice("preset", preset, PRESETS)
        drift_types = _string_list("drift_types", drift_types)
        for kind in drift_types:
            check_choice("drift_types entry", kind, DRIFT_TYPES)
        check(
            drift_types and len(set(drift_types)) == len(drift_types),
            f"drift_types must name each of {', '.join(DRIFT_TYPES)} at most once, and one at least",
        )
        check_choice("schedule", schedule, SCHEDULES)
        check_number("drift_fraction", drift_fraction, above=0, at_most=1)
        check_integer("drift_every", drift_every, minimum=1)
        check_integer("window", window, minimum=1)
        concepts = _string_list("concepts", concepts)
        for spec in concepts:
            try:
                parse_label_map(spec)
            except ValueError as error:
                raise ValueError(f"concepts: {error}") from None
        check(
            concepts and concepts[0] == "identity",
            f"concepts[0] must be 'identity' (every client starts with its labels as they are), got {concepts[:1]}",
        )
        transforms = _string_list("transforms", transforms)
        for spec in transforms:
            try:
                parse_transform(spec)
            except ValueError as error:
                raise ValueError(f"transforms: {error}") from None
        check(
            transforms and transforms[0] == "identity",
            f"transforms[0] must be 'identity' (every client starts with its images as they are), got {transforms[:1]}",
        )
        for name, specs in (("concepts", concepts), ("transforms", transforms)):
            check(len(set(specs)) == len(specs), f"{name} names an entry twice: {list(specs)}")
        check_positive("label_alpha", label_alpha)
        check_positive("rotation_step", rotation_step)
        check(
            0.1 <= rotation_step <= 180 and abs(360 / rotation_step - round(360 / rotation_step)) <= 1e-9,
            f"rotation_step must divide 360 and lie in [0.1, 180] degrees, got {rotation_step!r}",
        )
        check_integer("samples_per_client", samples_per_client, minimum=0)
        check_bool("reshuffle_shards", reshuffle_shards)

        self.num_slots = num_slots
        self.rounds_per_slot = rounds_per_slot
        self.preset = preset
        self.drift_types = drift_types
        self.schedule = schedule
        self.drift_fraction = drift_fraction
        self.drift_every = drift_every
        self.window = window
        self.concepts = concepts
        self.transforms = transforms
        self.label_alpha = label_alpha
        self.rotation_step = rotation_step
        self.samples_per_client = samples_per_client
        self.reshuffle_shards = bool(reshuffle_shards)
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Refuse parameters that cannot shape this stream, in one line each."""
        defaults = {
            "drift_types": ("real",),
            "schedule": "sudden",
            "drift_fraction": 0.5,
            "drift_every": 1,
            "window": 2,
            "concepts": DEFAULT_CONCEPTS,
            "transforms": DEFAULT_TRANSFORMS,
            "label_alpha": 0.5,
            "rotation_step": 30.0,
        }
        if self.preset != "none":
            open_here = {"schedule"} if self.preset == "fedccfa" else set()
            for name, default in defaults.items():
                if name not in open_here and getattr(self, name) != default:
                    raise ValueError(
                        f"preset={self.preset!r} fixes {name} (it builds the paper's stream); "
                        f"leave {name} at its default {default!r} or use preset='none'"
                    )
        if self.preset == "feddaa" and self.num_clients < 4:
            raise ValueError(f"preset='feddaa' has 4 concepts and needs num_clients >= 4, got {self.num_clients}")
        if self.preset == "fedccfa":
            if self.schedule == "gradual":
                raise ValueError(
                    "preset='fedccfa' has no gradual pattern: schedule must be sudden, incremental or recurring"
                )
            least = {"sudden": 2, "incremental": 4, "recurring": 3}[self.schedule]
            if self.num_slots < least:
                raise ValueError(
                    f"preset='fedccfa' with schedule={self.schedule!r} needs num_slots >= {least}, got {self.num_slots}"
                )
        if self.preset != "none":
            return
        incremental = self.schedule == "incremental"
        if "real" in self.drift_types:
            if incremental and self.concepts != DEFAULT_CONCEPTS:
                raise ValueError(
                    "concepts: incremental real drift builds its own chain of label-pair swaps; leave concepts at its default"
                )
            if not incremental and len(self.concepts) < 2:
                raise ValueError("concepts must hold at least 2 label maps for real drift")
        if "virtual" in self.drift_types:
            if incremental and self.transforms != DEFAULT_TRANSFORMS:
                raise ValueError(
                    "transforms: incremental virtual drift rotates by rotation_step per step; leave transforms at its default"
                )
            if not incremental and len(self.transforms) < 2:
                raise ValueError("transforms must hold at least 2 transforms for virtual drift")

    # -- split ------------------------------------------------------------------------------
    def split(self, y, *, domains=None, embeddings=None, groups=None, seed: int = 0) -> DriftStream:
        y = check_labels(y)
        n, slots = self.num_clients, self.num_slots
        if n > len(y):
            raise ValueError(f"num_clients={n} exceeds the {len(y)} samples; lower num_clients")
        even = len(y) // n
        if self.samples_per_client > even:
            raise ValueError(
                f"samples_per_client={self.samples_per_client} exceeds a shard's {even} samples "
                f"({len(y)} // num_clients={n}); lower samples_per_client or num_clients"
            )
        num_classes = int(y.max()) + 1

        shards = np.array_split(np.random.default_rng([seed, 0]).permutation(len(y)), n)
        deal = np.empty((n, slots), dtype=np.int64)  # deal[c, t]: the shard client c holds in slot t
        deal[:, 0] = np.arange(n)
        shuffle = np.random.default_rng([seed, 1])
        for t in range(1, slots):
            deal[:, t] = shuffle.permutation(n) if self.reshuffle_shards else np.arange(n)

        if self.preset == "feddaa":
            concept_specs, transform_specs = list(DEFAULT_CONCEPTS), list(DEFAULT_TRANSFORMS)
            real, virtual = self._feddaa(seed), _Track.pure(np.tile(np.arange(slots) % 3, (n, 1)))
            label, proportions = _Track.pure(np.zeros((n, slots))), None
        elif self.preset == "fedccfa":
            if num_classes < 7:
                raise ValueError(f"preset='fedccfa' swaps labels up to 6 and needs >= 7 classes, y has {num_classes}")
            concept_specs, transform_specs = list(FEDCCFA_CONCEPTS), ["identity"]
            real, virtual = self._fedccfa(), _Track.pure(np.zeros((n, slots)))
            label, proportions = _Track.pure(np.zeros((n, slots))), None
        else:
            concept_specs, transform_specs, real, virtual, label, proportions = self._generic(y, num_classes, seed)

        label_maps = np.stack([parse_label_map(spec, num_classes) for spec in concept_specs])
        # Two concepts with one label map would be real drift that changes nothing. (Without
        # real drift the table goes unused: the defaults then suit a 2-class dataset too.)
        uses_concepts = self.preset != "none" or "real" in self.drift_types
        for a in range(len(label_maps) if uses_concepts else 0):
            for b in range(a):
                if np.array_equal(label_maps[a], label_maps[b]):
                    raise ValueError(
                        f"concepts {concept_specs[b]!r} and {concept_specs[a]!r} are the same label map "
                        f"for {num_classes} classes; list concepts that differ, e.g. concepts = ['identity', 'reverse']"
                    )
        events = (REAL * real.changed() + VIRTUAL * virtual.changed() + LABEL * label.changed()).astype(np.int64)
        views = self._views(y, num_classes, shards, deal, real, virtual, label, proportions, seed)
        return DriftStream(
            views,
            y,
            num_classes,
            label_maps=label_maps,
            transform_specs=transform_specs,
            events=events,
            rounds_per_slot=self.rounds_per_slot,
            concept_specs=concept_specs,
        )

    def _feddaa(self, seed: int) -> _Track:
        """Concepts {0, 1} in slot 0, {0, 1, 2} in slot 1, all four after; balanced, dealt
        in a fresh random client order every slot."""
        rng = np.random.default_rng([seed, 2])
        states = np.empty((self.num_clients, self.num_slots), dtype=np.int64)
        for t in range(self.num_slots):
            present = min(2 + t, 4)
            states[rng.permutation(self.num_clients), t] = np.arange(self.num_clients) % present
        return _Track.pure(states)

    def _fedccfa(self) -> _Track:
        """Group g (client id mod 10: < 3, < 6, rest) swaps label pair g at the pattern's slots."""
        n, slots = self.num_clients, self.num_slots
        group = np.select([np.arange(n) % 10 < 3, np.arange(n) % 10 < 6], [0, 1], 2)
        swapped = np.zeros((n, slots), dtype=bool)
        middle = slots // 2
        if self.schedule == "sudden":
            swapped[:, middle:] = True
        elif self.schedule == "incremental":
            first = min(middle, slots - 3)
            for g in range(3):
                swapped[group == g, first + g :] = True
        else:  # recurring: on at the middle, then toggled every `period` slots
            period = max(1, (slots - middle) // 2)
            for t in range(middle, slots):
                swapped[:, t] = (t - middle) // period % 2 == 0
        return _Track.pure(np.where(swapped, (group + 1)[:, None], 0))

    def _generic(self, y: np.ndarray, num_classes: int, seed: int):
        n, slots = self.num_clients, self.num_slots
        incremental = self.schedule == "incremental"
        concept_specs = list(self.concepts)
        transform_specs = list(self.transforms)
        zeros = _Track.pure(np.zeros((n, slots)))
        real, virtual, label, proportions = zeros, zeros, zeros, None

        if "real" in self.drift_types:
            if incremental:
                if num_classes < 2:
                    raise ValueError("incremental real drift swaps label pairs and needs >= 2 classes")
                concept_specs = _pair_swap_chain(num_classes)
            real = self._generic_track(len(concept_specs), np.random.default_rng([seed, 10, REAL]))
            if incremental:
                concept_specs = concept_specs[: int(real.new.max()) + 1]
        if "virtual" in self.drift_types:
            if incremental:
                transform_specs = _rotation_chain(self.rotation_step)
            virtual = self._generic_track(len(transform_specs), np.random.default_rng([seed, 10, VIRTUAL]))
            if incremental:
                transform_specs = transform_specs[: int(virtual.new.max()) + 1]
        if "label" in self.drift_types:
            label = self._generic_track(None, np.random.default_rng([seed, 10, LABEL]))
            proportions = self._label_proportions(y, num_classes, label, seed)
        return concept_specs, transform_specs, real, virtual, label, proportions

    def _generic_track(self, num_states: int | None, rng: np.random.Generator) -> _Track:
        """Who drifts when, and to what, for one drift type. States: ids into the concept or
        transform table (``num_states`` of them), or for label drift (``None``) the index of
        the client's class proportions (0: its shard as it is, k: its k-th draw)."""
        n, slots, window = self.num_clients, self.num_slots, self.window
        old = np.zeros((n, slots), dtype=np.int64)
        new = np.zeros((n, slots), dtype=np.int64)
        share = np.ones((n, slots))
        partner = rng.integers(1, num_states, size=n) if num_states and num_states > 1 else np.ones(n, np.int64)
        drifts = np.zeros(n, dtype=np.int64)  # how many times each client has drifted
        started = np.full(n, -1)  # slot where a gradual change began
        how_many = max(1, round(self.drift_fraction * n))
        for t in range(1, slots):
            old[:, t], new[:, t] = new[:, t - 1], new[:, t - 1]
            moving = (started >= 0) & (t - started < window)
            old[moving, t] = old[moving, t - 1]
            share[moving, t] = (t - started[moving] + 1) / (window + 1)
            if t % self.drift_every:
                continue
            eligible = np.flatnonzero(share[:, t - 1] >= 1)
            chosen = np.sort(rng.choice(eligible, size=min(how_many, len(eligible)), replace=False))
            for client in chosen:
                current = new[client, t - 1]
                if self.schedule == "recurring":
                    target = partner[client] if current == 0 else 0
                elif num_states is None:
                    target = drifts[client] + 1
                else:
                    target = (current + 1) % num_states
                drifts[client] += 1
                new[client, t] = target
                if self.schedule == "gradual":
                    old[client, t], share[client, t], started[client] = current, 1 / (window + 1), t
                else:
                    old[client, t] = target
        return _Track(old, new, share)

    def _label_proportions(self, y: np.ndarray, num_classes: int, label: _Track, seed: int) -> list[np.ndarray]:
        """Per client, its class proportions by label state: row 0 the global proportions
        (for mixing; state 0 alone means the shard as it is), row k its k-th drift's."""
        present = np.bincount(y, minlength=num_classes) > 0
        overall = np.bincount(y, minlength=num_classes) / len(y)
        tables = []
        for client in range(self.num_clients):
            rng = np.random.default_rng([seed, 20, client])
            states = int(label.new[client].max()) + 1
            table = np.zeros((max(states, 2 if self.schedule == "recurring" else 1), num_classes))
            table[0] = overall
            for k in range(1, len(table)):
                draw = np.zeros(num_classes)
                draw[present] = rng.dirichlet(np.full(present.sum(), self.label_alpha))
                table[k] = 0.5 * table[k - 1] + 0.5 * draw if self.schedule == "incremental" else draw
            tables.append(table)
        return tables

    def _views(self, y, num_classes, shards, deal, real, virtual, label, proportions, seed) -> list[list[ClientView]]:
        members = [np.flatnonzero(y == k) for k in range(num_classes)]
        limit = self.samples_per_client
        views = []
        for t in range(self.num_slots):
            slot = []
            for client in range(self.num_clients):
                rng = np.random.default_rng([seed, 30, client, t])
                shard = shards[deal[client, t]]
                size = limit or len(shard)
                if label.share[client, t] >= 1 and label.new[client, t] == 0:
                    indices = shard[:size]
                else:
                    table = proportions[client]
                    p = (1 - label.share[client, t]) * table[label.old[client, t]]
                    p = p + label.share[client, t] * table[label.new[client, t]]
                    indices = _draw_with_proportions(members, p, size, rng)
                concepts, concept = _per_sample(real, client, t, len(indices), rng)
                transforms, transform = _per_sample(virtual, client, t, len(indices), rng)
                slot.append(ClientView(indices, concepts, transforms, concept, transform))
            views.append(slot)
        return views


def _per_sample(track: _Track, client: int, slot: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One state id per sample (a random ``share`` of them in the new state) and the main one."""
    old, new, share = track.old[client, slot], track.new[client, slot], track.share[client, slot]
    ids = np.full(size, new if share >= 1 else old, dtype=np.int64)
    if share < 1:
        ids[rng.permutation(size)[: int(round(share * size))]] = new
    return ids, int(new if share >= 0.5 else old)


def _draw_with_proportions(members: list[np.ndarray], p: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices with class proportions ``p`` (each count within one of ``p * size``),
    without replacement unless a class has fewer samples than asked of it."""
    counts = cut_counts(np.asarray(p, dtype=float)[None, :] / p.sum(), np.array([size]))[0]
    parts = [
        rng.choice(pool, size=count, replace=count > len(pool)) for pool, count in zip(members, counts) if count > 0
    ]
    return rng.permutation(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _string_list(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    return tuple(value)
