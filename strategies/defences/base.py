"""The defence wrapper: a Flower Strategy around any other, whose aggregation it replaces.

A defence is built as ``Defence(strategy, **options)``, in the manner of Flower's DP
wrappers (``DifferentialPrivacyServerSideFixedClipping``): it is itself a Strategy. It
passes ``configure_train``, ``configure_evaluate``, ``aggregate_evaluate`` and ``summary``
to the wrapped strategy, and answers every attribute it does not define itself from the
wrapped instance (``personalized``, ``initial_arrays``, ``weighted_by_key``,
``min_train_nodes``, ``configure_query``, ...), so it composes with any one-model fedsim
strategy (FedAvg, FedProx, FedBN, FedWon). Attributes set on the wrapper stay on the wrapper.

**Class attributes.** fedsim reads ``client_trainer``, ``model_options``, ``personalized``
and ``validate_model`` from the strategy *class*. A defence changes none of them: the
clients train as the wrapped strategy says. :func:`defended` makes, once per pair, a
subclass of the defence that carries the wrapped class's values of those attributes, and
:func:`strategies.defences.defend` builds an instance of it, so ``type(defence).client_trainer`` is FedBN's
trainer for a defended FedBN. fedsim may equally keep reading them from the wrapped
strategy's class (``resolve_strategy(name)``), which gives the same values.

**Aggregation.** ``aggregate_train`` first hands the replies to the wrapped strategy's own
``aggregate_train``: its checks run (Flower's reply consistency, FedBN's refusal of
BatchNorm arrays, FedWon's AGC check) and its train metrics are returned as it computes
them; its arrays are discarded. The valid replies then become update vectors: each reply's
arrays minus the global arrays of the last ``configure_train`` (only the keys the replies
carry, so FedBN's replies without BatchNorm work). Floating-point parameters form the
vector a defence's rule sees (:class:`Updates`), in float64 whatever the model's dtype (a
squared distance between two float32 models of norm ~1 carries an error of ~1e-4, more
than the distance between two late-training updates). BatchNorm running statistics and
integer buffers are not directions of learning, so they are averaged over the accepted
clients as FedAvg would (weighted by examples); a defence whose ``include_statistics`` is
True takes the floating-point statistics into its vectors too. A rule returns the aggregate update and the clients it
accepted (:class:`Aggregate`); the wrapper writes ``last_accepted`` (node ids) and adds
``defence-accepted`` and ``defence-rejected`` counts to the metrics.

**State.** ``state_dict()`` merges the wrapped strategy's state with the defence's own
(keys prefixed ``defence.``); values are NumPy arrays and JSON data, never pickles.

**Randomness.** A defence that draws (noise) seeds a generator from its ``seed`` (the
experiment's) and the round, never from global state.

**No silent no-op.** A defence whose options make it the identity or a plain mean refuses
them, or says so once by name (:meth:`Defence.warn_once`) when only a round's number of
clients makes it so. :meth:`Defence.min_clients` is the fewest replies a round needs for
the rule to hold (Krum's n >= 2f + 3); ``configure_train`` refuses a round that samples
fewer, and fedsim checks it against the experiment before a run starts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsim import multimodel
from fedsim.checks import check, check_integer
from fedsim.notices import warn
from fedsim.protocols import Stateful
from fedsim.seeding import derive_seed
from strategies.flower_start import StartsOnceNodesAreOnline

STATE_PREFIX = "defence."
ACCEPTED, REJECTED = "defence-accepted", "defence-rejected"
# buffers that are statistics of the data, not directions of learning
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# what fedsim reads from a strategy class; a defence takes them from the strategy it wraps
CLASS_ATTRIBUTES = ("client_trainer", "model_options", "personalized", "validate_model")


def is_statistic(key: str, array: np.ndarray, include_statistics: bool = False) -> bool:
    """An entry averaged as FedAvg would, outside the update vector: BatchNorm running
    statistics (by name), unless ``include_statistics``, and any array that is not
    floating point."""
    if not np.issubdtype(array.dtype, np.floating):
        return True
    return not include_statistics and key.rsplit(".", 1)[-1] in STATISTICS


@dataclass(frozen=True)
class ServerResources:
    """What the server holds that a defence may need besides the replies (see
    :meth:`Defence.from_server`): a way to build the model, the dataset, the clients'
    local-training settings, how many clients there are and the experiment's seed."""

    new_model: Callable[[], Any]
    dataset: Any  # fedsim.data.Dataset
    client: Any  # the experiment's [client] table (fedsim.config.ClientTable)
    num_clients: int
    seed: int


@dataclass
class Updates:
    """One round's client updates: ``vectors[i]`` is client ``node_ids[i]``'s reply minus the
    global arrays, over the floating-point parameters in ``layout`` order."""

    node_ids: list[int]
    vectors: np.ndarray  # (n, d), float64
    weights: np.ndarray  # (n,): examples (FedAvg's weights), or ones under uniform weighting
    global_vector: np.ndarray  # (d,): the global parameters the updates start from
    layout: dict[str, tuple[slice, tuple[int, ...]]]  # parameter key -> (its slice, its shape)
    records: list[ArrayRecord]  # the replies' arrays, statistics included (to rebuild a client's model)

    def __len__(self) -> int:
        return len(self.node_ids)

    def vector_of(self, arrays: ArrayRecord) -> np.ndarray:
        """``arrays``' parameters as one vector in this layout (a server update, say)."""
        missing = [key for key in self.layout if key not in arrays]
        if missing:
            raise ValueError(f"the arrays lack {len(missing)} parameters of the replies, e.g. {missing[0]!r}")
        return np.concatenate([np.asarray(arrays[key].numpy(), np.float64).ravel() for key in self.layout])

    def part(self, vectors: np.ndarray, key: str) -> np.ndarray:
        """Parameter ``key`` of each row of ``vectors`` (n, d), in its own shape."""
        where, shape = self.layout[key]
        return vectors[:, where].reshape(len(vectors), *shape)


@dataclass
class Aggregate:
    """What a defence's rule decides: the update added to the global parameters, and the
    indices (into :class:`Updates`) of the clients it accepted."""

    update: np.ndarray
    accepted: list[int]


def mean_update(vectors: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The (weighted) mean of the rows; a zero update when there are none or no weight."""
    if len(vectors) == 0:
        return np.zeros(vectors.shape[1])
    weights = np.ones(len(vectors)) if weights is None else np.asarray(weights, np.float64)
    total = weights.sum()
    if total <= 0:
        return np.zeros(vectors.shape[1])
    return weights @ vectors / total


def clip_to(vectors: np.ndarray, bound: float) -> np.ndarray:
    """Each row scaled by min(1, bound / ||row||): L2 norms at most ``bound``."""
    norms = np.linalg.norm(vectors, axis=1)
    scale = np.minimum(1.0, bound / np.maximum(norms, np.finfo(np.float64).tiny))
    return vectors * scale[:, None]


def cosine_similarities(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities of the rows (0 against a zero row)."""
    norms = np.linalg.norm(vectors, axis=1)
    unit = vectors / np.where(norms > 0, norms, 1.0)[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


class Defence(StartsOnceNodesAreOnline, Strategy):
    """A robust aggregation wrapped around any Flower strategy (see the module docstring).

    Subclasses implement :meth:`aggregate_updates`; ``seed`` (the experiment's) seeds the
    draws of defences that add noise, together with the round.
    """

    name: ClassVar[str] = "defence"
    # parameters the server fills in with :meth:`from_server` (never from an experiment
    # file), besides ``strategy`` and ``seed``: FLTrust's root_update, DeepSight's model_fn
    # and input_shape
    needs: ClassVar[tuple[str, ...]] = ()
    # whether the rule drops clients, so that ``last_accepted`` is a verdict on each: False
    # for rules that keep every reply and only bound its influence (clipping, medians),
    # whose detection rates would be a meaningless 0 of n
    filters: ClassVar[bool] = True
    # what a missing required option means, for its one-line error (fedsim.registry)
    required_help: ClassVar[dict[str, str]] = {}
    # whether BatchNorm running statistics join the update vectors (distance-based rules
    # set it from their option of that name)
    include_statistics: bool = False

    @classmethod
    def from_server(cls, server: ServerResources) -> dict[str, Any]:
        """The values of :attr:`needs`, made from what the server holds."""
        return {}

    def __init__(self, strategy: Strategy, *, seed: int = 0) -> None:
        check(
            isinstance(strategy, Strategy),
            f"strategy must be a flwr Strategy instance, got {type(strategy).__name__}",
        )
        check(
            not isinstance(strategy, Defence),
            f"strategy is already defended by {type(strategy).__name__}; defences do not stack",
        )
        check_integer("seed", seed)
        self.strategy = strategy
        self.seed = seed
        self.global_arrays: ArrayRecord | None = None  # what the last configure_train sent
        self.last_accepted: list[int] = []  # node ids the last aggregate_train accepted
        self._warned: set[str] = set()

    # -- the wrapped strategy answers what the defence does not define ------------------
    def __getattr__(self, name: str) -> Any:
        strategy = self.__dict__.get("strategy")
        if strategy is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(strategy, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.strategy!r})"

    def summary(self) -> None:
        log(INFO, "\t├──> Defence %s around %s", type(self).__name__, type(self.strategy).__name__)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if multimodel.is_packed(arrays):
            raise ValueError(
                f"{type(self).__name__} aggregates one global model; {type(self.strategy).__name__} keeps several"
            )
        self.global_arrays = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if messages and len(messages) < self.min_clients():
            raise ValueError(self.too_few_clients(len(messages)))
        return messages

    # -- what the rule needs --------------------------------------------------------------
    def min_clients(self) -> int:
        """The fewest replies a round needs for the rule to hold (1: any)."""
        return 1

    def too_few_clients(self, sampled: int) -> str:
        """The one-line refusal of a round of ``sampled`` clients, below :meth:`min_clients`."""
        return (
            f"{self.name} needs at least {self.min_clients()} clients per round with these options, "
            f"but a round samples {sampled}; sample more clients"
        )

    def warn_once(self, message: str) -> None:
        """Say ``message`` (a problem the run goes on despite) once per defence instance."""
        if message not in self._warned:
            self._warned.add(message)
            warn(message)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # -- state ------------------------------------------------------------------------------
    def defence_state(self) -> dict[str, Any]:
        """The defence's own state (NumPy arrays and JSON data); none by default."""
        return {}

    def load_defence_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`defence_state` returned."""

    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's state, plus the defence's under ``defence.`` keys."""
        state = dict(self.strategy.state_dict()) if isinstance(self.strategy, Stateful) else {}
        state.update({STATE_PREFIX + key: value for key, value in self.defence_state().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = {key[len(STATE_PREFIX) :]: value for key, value in state.items() if key.startswith(STATE_PREFIX)}
        inner = {key: value for key, value in state.items() if not key.startswith(STATE_PREFIX)}
        if isinstance(self.strategy, Stateful):
            self.strategy.load_state_dict(inner)
        elif inner:
            raise ValueError(
                f"the state holds {sorted(inner)[:3]} for {type(self.strategy).__name__}, which keeps none"
            )
        self.load_defence_state(own)

    # -- aggregation --------------------------------------------------------------------------
    def rng(self, server_round: int) -> np.random.Generator:
        """This round's generator: from (seed, defence, round) only, whatever ran before."""
        return np.random.default_rng(derive_seed(self.seed, f"defence-{self.name}", server_round))

    def aggregate_updates(self, server_round: int, updates: Updates) -> Aggregate:
        """The defence's rule: the aggregate update and the accepted clients."""
        raise NotImplementedError

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # the wrapped strategy checks the replies and aggregates the metrics as it would alone
        reference, metrics = self.strategy.aggregate_train(server_round, replies)
        valid = [reply for reply in replies if not reply.has_error()]
        if reference is None or not valid:
            self.last_accepted = []
            return None, metrics
        updates = self.updates_of(valid)
        result = self.aggregate_updates(server_round, updates)
        arrays = self.arrays_of(updates, result)
        return arrays, self.report(updates.node_ids, result.accepted, metrics)

    def report(self, node_ids: list[int], accepted: list[int], metrics: MetricRecord | None) -> MetricRecord:
        """Remember the accepted clients; add their counts to the train metrics."""
        self.last_accepted = [node_ids[index] for index in sorted(accepted)]
        out = MetricRecord(dict(metrics or {}))
        out[ACCEPTED] = len(accepted)
        out[REJECTED] = len(node_ids) - len(accepted)
        return out

    def weights_of(self, replies: list[Message]) -> np.ndarray:
        """FedAvg's weights (the wrapped strategy's ``weighted_by_key``), or ones where it
        weights clients equally (FedBN's ``weighting = "uniform"``)."""
        if getattr(self.strategy, "weighting", None) == "uniform":
            return np.ones(len(replies))
        key = getattr(self.strategy, "weighted_by_key", "num-examples")
        weights = []
        for reply in replies:
            metrics = next(iter(reply.content.metric_records.values()), None)
            if metrics is None or key not in metrics:
                raise ValueError(f"the reply of node {reply.metadata.src_node_id} has no {key!r} metric to weight by")
            weights.append(float(metrics[key]))
        return np.asarray(weights, np.float64)

    def updates_of(self, replies: list[Message]) -> Updates:
        """The replies as update vectors against the remembered global arrays."""
        if self.global_arrays is None:
            raise ValueError(
                f"{type(self).__name__}.aggregate_train needs the global arrays of configure_train, which was not called"
            )
        records = []
        for reply in replies:
            found = list(reply.content.array_records.values())
            if len(found) != 1:
                raise ValueError(
                    f"the reply of node {reply.metadata.src_node_id} carries {len(found)} ArrayRecords, not 1"
                )
            records.append(found[0])
        first = records[0]
        layout: dict[str, tuple[slice, tuple[int, ...]]] = {}
        start = 0
        for key in first.keys():
            if key not in self.global_arrays:
                raise ValueError(f"the replies carry {key!r}, which the global arrays sent to the clients lack")
            array = first[key].numpy()
            if tuple(array.shape) != tuple(self.global_arrays[key].shape):
                raise ValueError(
                    f"{key!r} has shape {tuple(array.shape)} in the replies, {tuple(self.global_arrays[key].shape)} "
                    "in the global arrays"
                )
            if not is_statistic(key, array, self.include_statistics):
                layout[key] = (slice(start, start + array.size), tuple(array.shape))
                start += array.size
        global_vector = np.zeros(start)
        for key, (where, _) in layout.items():
            global_vector[where] = np.asarray(self.global_arrays[key].numpy(), np.float64).ravel()
        vectors = np.zeros((len(records), start))
        for row, (reply, record) in enumerate(zip(replies, records, strict=True)):
            if set(record.keys()) != set(first.keys()):
                raise ValueError(f"the reply of node {reply.metadata.src_node_id} carries other keys than the first")
            for key, (where, _) in layout.items():
                vectors[row, where] = np.asarray(record[key].numpy(), np.float64).ravel()
        vectors -= global_vector
        node_ids = [int(reply.metadata.src_node_id) for reply in replies]
        return Updates(node_ids, vectors, self.weights_of(replies), global_vector, layout, records)

    def arrays_of(self, updates: Updates, result: Aggregate) -> ArrayRecord:
        """The new global arrays: the global parameters plus the aggregate update; the
        statistics averaged over the accepted replies (kept when none was accepted)."""
        accepted, records = sorted(result.accepted), updates.records
        out: dict[str, Array] = {}
        for key in records[0].keys():
            dtype = records[0][key].numpy().dtype
            if key in updates.layout:
                where, shape = updates.layout[key]
                value = (updates.global_vector[where] + result.update[where]).reshape(shape)
            elif accepted:
                stacked = np.stack([np.asarray(records[i][key].numpy(), np.float64) for i in accepted])
                value = np.tensordot(updates.weights[accepted] / updates.weights[accepted].sum(), stacked, axes=1)
            else:
                value = np.asarray(self.global_arrays[key].numpy(), np.float64)
            if not np.issubdtype(dtype, np.floating):
                value = np.rint(value)
            out[key] = Array(np.asarray(value, dtype=dtype))
        return ArrayRecord(out)


@functools.cache
def defended(strategy_cls: type[Strategy], defence_cls: type[Defence]) -> type[Defence]:
    """``defence_cls`` with ``strategy_cls``'s ``client_trainer``, ``model_options``,
    ``personalized`` and ``validate_model`` as class attributes (one class per pair)."""
    attributes = {name: vars_of(strategy_cls, name) for name in CLASS_ATTRIBUTES if hasattr(strategy_cls, name)}
    attributes["__doc__"] = defence_cls.__doc__
    attributes["__module__"] = defence_cls.__module__
    return type(f"{defence_cls.__name__}Over{strategy_cls.__name__}", (defence_cls,), attributes)


def vars_of(cls: type, name: str) -> Any:
    """A class attribute as defined (a staticmethod stays one)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return getattr(cls, name)
