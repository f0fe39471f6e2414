"""fedsim's client halves, for a plain Flower app with your own model and data.

A strategy in ``strategies/`` is an ordinary Flower strategy for the ServerApp, but FedBN
and FedWon also need their clients to do something special (keep BatchNorm local; clip
gradients adaptively), and refuse replies from a ClientApp that does not. This module
gives a plain Flower app that client half:

- :func:`client_app` builds a complete ClientApp that trains and evaluates your model
  (``model_fn``) on your data (``data_fn``) the way the strategy's clients do under
  ``fedsim run``: its fedsim client trainer (``client_trainer``), local SGD configured by
  the train ConfigRecord (``lr``, ``local-epochs``, ``batch-size``, ``momentum``,
  ``weight-decay``, ``optimizer``), per-client state kept in Flower's ``context.state``.
- :func:`fedbn_mod` is a Flower Mod that makes any ClientApp, with a training loop of
  your own, keep its BatchNorm layers local for FedBN: ``ClientApp(mods=[fedbn_mod])``.

Both record, next to the state they keep, the round they wrote it in, and this process
remembers the last round each client wrote (:class:`fedsim.state.WrittenRounds`): a client
that finds its state older than a round it wrote it in (a lost update of
``context.state``) raises a one-line UserError, which fedsim's strategies raise again on
the server to stop the run (:mod:`strategies.flower_start`).

The strategies are re-exported for convenience: :class:`FedAvg`, :class:`FedProx`,
:class:`FedBN`, :class:`FedWon`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import PARTITION_ID_KEY
from torch import nn

from fedsim.clientapp import client_id, evaluation_metrics, only
from fedsim.data import ClientData
from fedsim.lookups import trainer_class
from fedsim.seeding import derive_seed, seed_torch_globally, torch_generator
from fedsim.state import WrittenRounds
from fedsim.trainer import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, ClientCall, ClientState, RoundConfig
from fedsim.training import resolve_device
from strategies import FedAvg, FedBN, FedProx, FedWon
from strategies.fedbn import batchnorm_keys_by_name

__all__ = ["FedAvg", "FedBN", "FedProx", "FedWon", "client_app", "fedbn_mod"]

STATE_KEY = "fedsim.client-state"  # client_app: the trainer's per-client state in context.state
BATCHNORM_KEY = "fedsim.fedbn-batchnorm"  # fedbn_mod: the client's own BatchNorm arrays in context.state
STATE_ROUNDS_KEY = "fedsim.state-rounds"  # context.state: the round each of the above was written in

# the last round this process saw each client write each record: (run id, node id, key) -> round
_WRITTEN = WrittenRounds()

DataFn = Callable[[Context], "ClientData | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]"]


def client_app(
    strategy: type | object,
    model_fn: Callable[[], nn.Module],
    data_fn: DataFn,
    *,
    device: str = "auto",
    seed: int = 0,
    mods: list[Mod] | None = None,
) -> ClientApp:
    """A Flower ClientApp that runs ``strategy``'s fedsim client trainer on your model and data.

    ``strategy`` is a strategy class (or instance) from ``strategies/`` or one of your own
    with a ``client_trainer``; ``model_fn()`` builds your torch model (once per message;
    every parameter and buffer is then loaded from the server's arrays); ``data_fn(context)``
    returns the client's data as a :class:`fedsim.data.ClientData` or a tuple
    ``(x_train, y_train, x_test, y_test)`` of numpy arrays, and is called once per message
    (cache there what is costly to load). The client is ``context.node_config["partition-id"]``,
    and round r's training draws its randomness from ``derive_seed(seed, "train", r, client)``.
    Train replies carry the arrays and ``train_loss`` and ``num-examples``; evaluate replies
    ``loss``, ``accuracy`` and ``num-examples`` on the held-out data. ``mods`` are Flower
    Mods for the app, as in ``ClientApp(mods=...)``.
    """
    strategy_cls = strategy if inspect.isclass(strategy) else type(strategy)
    trainer = trainer_class(strategy_cls)()
    app = ClientApp(mods=mods)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        client = client_id(context)
        config = _round_config(message, client, seed)
        torch_device = resolve_device(device)
        train_seed = derive_seed(seed, "train", config.server_round, client)
        seed_torch_globally(train_seed, torch_device)  # dropout and any other global-RNG draw
        data = _client_data(data_fn(context))
        arrays = only(message.content.array_records, "ArrayRecord")
        generator = torch_generator(train_seed)
        state = _load_state(context, config.server_round - 1)
        result = trainer.train(ClientCall(model_fn(), arrays, data, config, state, generator, torch_device))
        if result.state:
            context.state[STATE_KEY] = ArrayRecord(
                {key: Array(np.asarray(value)) for key, value in result.state.items()}
            )
            _wrote(context, STATE_KEY, config.server_round)
        metrics = MetricRecord({**result.metrics, NUM_EXAMPLES: data.num_train})
        return Message(RecordDict({ARRAYS_KEY: result.arrays, METRICS_KEY: metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        client = client_id(context)
        config = _round_config(message, client, seed)
        data = _client_data(data_fn(context))
        arrays = only(message.content.array_records, "ArrayRecord")
        state = _load_state(context, config.server_round)
        logits = trainer.predict(ClientCall(model_fn(), arrays, data, config, state, None, resolve_device(device)))
        metrics = evaluation_metrics(logits, data, num_domains=0)
        return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=message)

    return app


def _round_config(message: Message, client: int, seed: int) -> RoundConfig:
    records = message.content.config_records
    return RoundConfig.from_config(only(records, "ConfigRecord") if records else ConfigRecord(), client, seed)


def _load_state(context: Context, as_of_round: int) -> ClientState:
    """The trainer's state for a message of round ``as_of_round`` + 1 (training) or
    ``as_of_round`` (evaluation), checked against the client's last write."""
    record = context.state.array_records.get(STATE_KEY)
    _check_state(context, STATE_KEY, record is not None, as_of_round)
    return {} if record is None else {key: array.numpy() for key, array in record.items()}


def _client_name(context: Context) -> object:
    """The client as a message names it: its partition id in a simulation, else its node id."""
    return context.node_config.get(PARTITION_ID_KEY, context.node_id)


def _wrote(context: Context, key: str, server_round: int) -> None:
    """Record that this client wrote ``context.state[key]`` in ``server_round``."""
    rounds = context.state.config_records.get(STATE_ROUNDS_KEY, ConfigRecord())
    rounds[key] = server_round
    context.state[STATE_ROUNDS_KEY] = rounds
    _WRITTEN.wrote((context.run_id, context.node_id, key), server_round)


def _check_state(context: Context, key: str, present: bool, as_of_round: int) -> None:
    """Raise a one-line UserError if ``context.state[key]`` is older than the last round
    this process saw the client write it in (:class:`fedsim.state.WrittenRounds`)."""
    rounds = context.state.config_records.get(STATE_ROUNDS_KEY)
    found = int(rounds[key]) if present and rounds is not None and key in rounds else None
    _WRITTEN.check((context.run_id, context.node_id, key), _client_name(context), found, as_of_round)


def _server_round(message: Message) -> int | None:
    """The round a message's config names (``server-round``, stamped by Flower's strategies), or None."""
    for record in message.content.config_records.values():
        if "server-round" in record:
            return int(record["server-round"])
    return None


def _client_data(data) -> ClientData:
    """A ClientData from data_fn's answer; floating-point inputs as float32, labels as int64."""
    if not isinstance(data, ClientData):
        if not (isinstance(data, (tuple, list)) and len(data) == 4):
            raise TypeError(
                "data_fn must return a fedsim.data.ClientData or a tuple (x_train, y_train, x_test, y_test), "
                f"got {type(data).__name__}"
            )
        data = ClientData(*(np.asarray(part) for part in data))

    def inputs(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        return x.astype(np.float32, copy=False) if np.issubdtype(x.dtype, np.floating) else x

    return ClientData(
        inputs(data.x_train),
        np.asarray(data.y_train).astype(np.int64, copy=False),
        inputs(data.x_test),
        np.asarray(data.y_test).astype(np.int64, copy=False),
        data.domain_test,
    )


def fedbn_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower Mod that keeps a ClientApp's BatchNorm layers local, for FedBN.

    On a train or evaluate message, once this client has BatchNorm arrays of its own (in
    ``context.state``), they replace those in the incoming ArrayRecord (a new record; the
    received one is left alone); until then the client uses the BatchNorm values FedBN's
    server sends, the initial model's. A train reply's BatchNorm arrays (recognised by
    name: see :func:`strategies.fedbn.batchnorm_keys_by_name`) are moved out of it into
    ``context.state``, with the round (the message config's ``server-round``) they were
    written in; BatchNorm older than this client's last write stops the run (see the
    module docstring). Use ``ClientApp(mods=[fedbn_mod])`` or a handler's ``mods=``.
    """
    kind = message.metadata.message_type.split(".")[0]
    if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or not message.has_content():
        return call_next(message, context)
    own = context.state.array_records.get(BATCHNORM_KEY)
    server_round = _server_round(message)
    if server_round is not None:
        _check_state(context, BATCHNORM_KEY, own is not None, server_round - (kind == MessageType.TRAIN))
    if own is not None:
        message = _with_own_batchnorm(message, own)
    reply = call_next(message, context)
    if kind == MessageType.TRAIN and reply.has_content():
        kept: dict[str, Array] = {}
        for name, record in list(reply.content.array_records.items()):
            batchnorm = batchnorm_keys_by_name(record.keys())
            if batchnorm:
                kept.update({key: record[key] for key in record.keys() if key in batchnorm})
                reply.content[name] = ArrayRecord({key: record[key] for key in record.keys() if key not in batchnorm})
        if kept:
            context.state[BATCHNORM_KEY] = ArrayRecord(kept)
            if server_round is not None:
                _wrote(context, BATCHNORM_KEY, server_round)
    return reply


def _with_own_batchnorm(message: Message, own: ArrayRecord) -> Message:
    """A copy of the message whose ArrayRecords hold the client's own BatchNorm arrays
    in place of the server's."""
    content = {}
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            record = ArrayRecord({key: own[key] if key in own else record[key] for key in record.keys()})
        content[name] = record
    return Message(content=RecordDict(content), metadata=copy.copy(message.metadata))
