"""The Partition object and the Partitioner contract shared by every split scheme.

A partitioner is built from its parameters, in the manner of scikit-learn's splitters,
and its ``split(y, *, domains=None, embeddings=None, groups=None, seed)`` returns a
:class:`Partition`: one integer index array per client into ``y``. Impossible parameters
raise a ValueError that names the parameter and says why: the constructors check theirs
with :mod:`fedsim.checks`, and ``split`` checks the data (:func:`check_labels`, ...).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedsim.atomic import write_npz
from fedsim.checks import check_integer
from partitioners.skew import measure_skew


@dataclass(frozen=True)
class ClientView:
    """What one client holds in one time slot: positions into the training set, and for a
    drift stream (:mod:`partitioners.drift`) what happens to each of those samples.

    ``concepts[i]`` picks the label map that sample ``i``'s label goes through (real
    drift: P(y|x) changes) and ``transforms[i]`` the input transform its image goes
    through (virtual drift: P(x) changes); both index the stream's tables
    (``label_maps``, ``transform_specs``), whose entry 0 is the identity. ``None`` means
    every sample uses entry 0. Label drift needs neither: the indices themselves change.
    ``concept`` and ``transform`` are the view's main ones, by which metrics are grouped.
    """

    indices: np.ndarray
    concepts: np.ndarray | None = None
    transforms: np.ndarray | None = None
    concept: int = 0
    transform: int = 0

    @property
    def is_plain(self) -> bool:
        """No label map and no transform: the samples as the dataset holds them."""
        return self.concepts is None and self.transforms is None


class ClientIndices(Sequence[np.ndarray]):
    """Every client's indices, held as one array and each client's slice of it (the CSR
    layout): client ``i`` holds ``order[offsets[i]:offsets[i + 1]]``, a view made when
    asked. Eight bytes per client and per sample, however many clients: a natural split
    into a million writers keeps no million arrays."""

    def __init__(self, order: np.ndarray, offsets: np.ndarray) -> None:
        self.order = np.asarray(order, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) == 0 or self.offsets[0] != 0:
            raise ValueError("offsets must be a 1-D array starting at 0")
        if self.offsets[-1] != len(self.order) or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"offsets must rise to the {len(self.order)} indices")

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray]) -> ClientIndices:
        if isinstance(arrays, ClientIndices):
            return arrays
        arrays = [np.asarray(ix, dtype=np.int64).ravel() for ix in arrays]
        order = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        return cls(order, np.concatenate([[0], np.cumsum([len(ix) for ix in arrays], dtype=np.int64)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, client):
        if isinstance(client, slice):
            return [self[i] for i in range(*client.indices(len(self)))]
        client = range(len(self))[client]  # negative ids count from the end; out of range raises
        return self.order[self.offsets[client] : self.offsets[client + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for client in range(len(self)):
            yield self.order[self.offsets[client] : self.offsets[client + 1]]

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


class Partition:
    """Per-client index arrays into one labelled array, with the labels kept beside them.

    Parameters
    ----------
    client_indices : sequence of integer arrays
        ``client_indices[i]`` holds the positions in ``labels`` owned by client ``i``.
    labels : integer array
        The labels of every sample the indices point into.
    num_classes : int, optional
        Number of classes; defaults to ``labels.max() + 1``.
    groups : mapping of str to integer array, optional
        Other per-sample group ids worth inspecting, such as ``"cluster"`` for an
        embedding split or ``"domain"`` for a domain split (same length as ``labels``).
    """

    # the .npz entry that marks a file a subclass saved (DriftStream's "stream_format")
    file_marker: ClassVar[str | None] = None

    def __init__(
        self,
        client_indices: Sequence[np.ndarray],
        labels: np.ndarray,
        num_classes: int | None = None,
        groups: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.client_indices = ClientIndices.from_arrays(client_indices)
        self.num_classes = int(num_classes if num_classes is not None else self.labels.max() + 1)
        self.groups = {name: np.asarray(g, dtype=np.int64) for name, g in (groups or {}).items()}

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def sizes(self) -> np.ndarray:
        """Number of samples per client."""
        return self.client_indices.sizes

    def __getitem__(self, client: int) -> np.ndarray:
        return self.client_indices[client]

    # -- time: a static partition is a stream of one slot ---------------------------------
    num_slots: int = 1
    label_maps: np.ndarray | None = None  # (concepts, classes): concept c maps label y to label_maps[c, y]
    transform_specs: tuple[str, ...] = ("identity",)  # fedsim.data.transforms specs, by transform id

    @property
    def is_stream(self) -> bool:
        """Whether what clients hold changes over time or by concept: several slots, or
        label maps (a drift stream)."""
        return self.num_slots > 1 or self.label_maps is not None

    def slot_of(self, server_round: int) -> int:
        """The time slot a server round (from 1) falls in."""
        return 0

    def view(self, client: int, server_round: int) -> ClientView:
        """What ``client`` holds in ``server_round``: the engines train and evaluate on it.
        A static partition gives the same view in every round; a drift stream the view
        of the round's slot."""
        return self.view_at(client, self.slot_of(server_round))

    def view_at(self, client: int, slot: int) -> ClientView:
        """What ``client`` holds in time slot ``slot``."""
        return ClientView(self.client_indices[client])

    def __len__(self) -> int:
        return self.num_clients

    def label_matrix(self) -> np.ndarray:
        """Clients x classes matrix of sample counts."""
        return self.group_matrix(self.labels, self.num_classes)

    def group_matrix(self, group_ids: np.ndarray, num_groups: int | None = None) -> np.ndarray:
        """Clients x groups matrix of sample counts for any per-sample group id."""
        group_ids = np.asarray(group_ids, dtype=np.int64)
        num_groups = int(num_groups if num_groups is not None else group_ids.max() + 1)
        owned = self.assigned()
        clients = np.repeat(np.arange(self.num_clients), self.sizes)
        cells = np.bincount(clients * num_groups + group_ids[owned], minlength=self.num_clients * num_groups)
        return cells.reshape(self.num_clients, num_groups)

    def assigned(self) -> np.ndarray:
        """Every index some client owns, client by client."""
        return self.client_indices.order

    def skew(self, embeddings: np.ndarray | None = None):
        """How far each client's data is from the federation's: see :func:`partitioners.skew.measure_skew`."""
        return measure_skew(self, embeddings)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the partition to an ``.npz`` file atomically (temp file + rename)."""
        arrays: dict[str, np.ndarray] = {
            "labels": self.labels,
            "num_classes": np.array(self.num_classes),
            "sizes": self.sizes,
            "indices": self.assigned(),
        }
        for name, group in self.groups.items():
            arrays[f"group_{name}"] = group
        write_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Partition:
        """A partition, or the drift stream (a Partition too) that :meth:`save` wrote: a
        subclass that saves more marks its files with its :attr:`file_marker` and reads
        them back with its ``from_npz``."""
        with np.load(path, allow_pickle=False) as data:
            for kind in _subclasses(Partition):
                if kind.file_marker is not None and kind.file_marker in data.files:
                    return kind.from_npz(data)
            offsets = np.concatenate([[0], np.cumsum(data["sizes"], dtype=np.int64)])
            groups = {k[len("group_") :]: data[k] for k in data.files if k.startswith("group_")}
            return cls(
                ClientIndices(data["indices"], offsets),
                data["labels"],
                int(data["num_classes"]),
                groups=groups,
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return (
            self.num_clients == other.num_clients
            and self.num_classes == other.num_classes
            and np.array_equal(self.labels, other.labels)
            and all(np.array_equal(a, b) for a, b in zip(self.client_indices, other.client_indices))
            and self.groups.keys() == other.groups.keys()
            and all(np.array_equal(g, other.groups[name]) for name, g in self.groups.items())
        )

    def __repr__(self) -> str:
        sizes = self.sizes
        return (
            f"Partition(num_clients={self.num_clients}, num_classes={self.num_classes}, "
            f"sizes min/median/max={sizes.min()}/{int(np.median(sizes))}/{sizes.max()})"
        )


class Partitioner(ABC):
    """Base class: store parameters in ``__init__`` (checked there), split in ``split``.

    ``requires`` names the per-sample inputs besides labels that the scheme needs
    (``"domains"``, ``"embeddings"`` or ``"groups"``, the natural groups such as devices);
    fedsim passes them when the dataset has them.
    """

    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, num_clients: int) -> None:
        check_integer("num_clients", num_clients, minimum=1)
        self.num_clients = num_clients

    @abstractmethod
    def split(
        self,
        y: np.ndarray,
        *,
        domains: np.ndarray | None = None,
        embeddings: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        seed: int = 0,
    ) -> Partition:
        """Return the partition of ``y`` for this seed."""

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters, as scikit-learn estimators report them."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def check_labels(y: np.ndarray) -> np.ndarray:
    """Return ``y`` as a 1-D array of non-negative int64 labels, or raise ValueError."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D array of labels, got shape {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
        raise ValueError("y must hold non-negative integer class labels")
    return y.astype(np.int64, copy=False)


def check_min_size(min_size: int, num_clients: int, num_samples: int) -> None:
    """An impossible minimum size is a parameter error, not a sampling failure."""
    if min_size * num_clients > num_samples:
        raise ValueError(
            f"min_size={min_size} x num_clients={num_clients} = {min_size * num_clients} "
            f"exceeds the {num_samples} samples; lower min_size or num_clients"
        )


def check_group_ids(name: str, values: np.ndarray | None, num_samples: int) -> np.ndarray:
    """A per-sample group id array (such as ``domains``) of the labels' length, as int64."""
    if values is None:
        raise ValueError(f"this scheme needs {name}: pass split(y, {name}=...) with one id per sample")
    values = np.asarray(values)
    if values.shape != (num_samples,) or (values.size and not np.issubdtype(values.dtype, np.integer)):
        raise ValueError(
            f"{name} must be a 1-D integer array with one id per sample ({num_samples}), got {values.shape}"
        )
    if values.size and values.min() < 0:
        raise ValueError(f"{name} must hold non-negative ids")
    return values.astype(np.int64, copy=False)


def indices_by_owner(owner: np.ndarray, num_clients: int) -> ClientIndices:
    """Group sample positions by their owning client (owner -1 = unassigned), each
    client's in increasing order, without an array per client."""
    # numpy's stable sort is a radix sort for 16-bit integers: ~7x faster than on int64.
    if num_clients <= np.iinfo(np.int16).max:
        owner = owner.astype(np.int16)
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner[owner >= 0], minlength=num_clients)
    start = int(np.count_nonzero(owner < 0))
    return ClientIndices(order[start:], np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))


def _subclasses(cls: type) -> list[type]:
    """Every subclass of ``cls`` defined so far, depth first."""
    return [kind for sub in cls.__subclasses__() for kind in (sub, *_subclasses(sub))]
