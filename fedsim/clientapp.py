"""The generic Flower ClientApp that runs any registered algorithm's client trainer.

The app closes over a :class:`~fedsim.environment.RunEnvironment`, small and picklable,
so that Ray can ship it to its actors; the data, the model and the trainer come from the
process's :class:`~fedsim.worker.Worker`. Under Flower's own runtime (``flwr run``), where
the app is imported rather than shipped, it closes over a function that finds the run's
environment from the message's :class:`~flwr.app.Context` instead.

A client learns who it is from ``context.node_config["partition-id"]`` and everything
else from the message: the global arrays and the round's config (server round and local
training settings). It keeps its own state in the worker's :class:`~fedsim.state.ClientStateStore`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY

from fedsim.data import ClientData
from fedsim.environment import RunEnvironment
from fedsim.faults import FAULT_KEY, act_out
from fedsim.seeding import derive_seed, seed_torch_globally, torch_generator
from fedsim.trainer import RoundConfig
from fedsim.training import classification_metrics
from fedsim.worker import worker_for

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES = "num-examples"  # Flower strategies weight replies by this metric
DOMAIN_CORRECT = "domain-correct"
DOMAIN_COUNT = "domain-count"


def evaluation_metrics(logits: torch.Tensor, data: ClientData, num_domains: int) -> dict:
    """Loss, accuracy and example count; with domains, per-domain correct and total counts
    as fixed-length lists (every client's MetricRecord must have the same keys)."""
    metrics: dict = {**classification_metrics(logits, data.y_test), NUM_EXAMPLES: len(data.y_test)}
    if num_domains and data.domain_test is not None:
        correct = (logits.argmax(1).numpy() == data.y_test).astype(np.int64)
        metrics[DOMAIN_CORRECT] = np.bincount(data.domain_test, weights=correct, minlength=num_domains).tolist()
        metrics[DOMAIN_COUNT] = np.bincount(data.domain_test, minlength=num_domains).astype(float).tolist()
    return metrics


def client_id(context: Context) -> int:
    return int(context.node_config[PARTITION_ID_KEY])


def only(records: dict, kind: str):
    """The message's single record of a kind, whatever key the strategy stored it under."""
    if len(records) != 1:
        raise ValueError(f"expected one {kind} in the message, found {len(records)}: {list(records)}")
    return next(iter(records.values()))


def make_client_app(env: RunEnvironment | Callable[[Context], RunEnvironment]) -> ClientApp:
    """The ClientApp: train, evaluate, and a query that tells the server who this node is.

    ``env`` is the run's environment, or a function that returns it for a message's
    context, called for every message (so it should cache what it builds).
    """
    app = ClientApp()
    environment_for = env if callable(env) else (lambda _context: env)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        worker = worker_for(environment_for(context))
        client = client_id(context)
        config = RoundConfig.from_config(only(message.content.config_records, "ConfigRecord"), client)
        fault = config.extra.get(FAULT_KEY)  # an injected fault ([faults]) this client acts out
        act_out(fault, config.extra, None, None)
        server_round = config.server_round
        seed = derive_seed(worker.env.experiment.seed, "train", server_round, client)
        seed_torch_globally(seed, worker.device)  # dropout and any other global-RNG draw in the model
        data = worker.client_data(client)
        received = only(message.content.array_records, "ArrayRecord")
        result = worker.trainer.train(
            worker.model(),
            received,
            data,
            config,
            worker.state_store.load(client, server_round - 1),
            torch_generator(seed),
            worker.device,
        )
        worker.state_store.save(client, server_round, result.state)
        metrics = MetricRecord({**result.metrics, NUM_EXAMPLES: data.num_train})
        arrays = act_out(fault, config.extra, received, result.arrays)
        return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        worker = worker_for(environment_for(context))
        client = client_id(context)
        config = RoundConfig.from_config(only(message.content.config_records, "ConfigRecord"), client)
        data = worker.client_data(client)
        state = worker.state_store.load(client, config.server_round)
        arrays = only(message.content.array_records, "ArrayRecord")
        logits = worker.trainer.predict(worker.model(), arrays, data, config, state, worker.device)
        metrics = evaluation_metrics(logits, data, len(worker.dataset.domains))
        return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        reply = ConfigRecord({PARTITION_ID_KEY: client_id(context)})
        return Message(RecordDict({CONFIG_KEY: reply}), reply_to=message)

    return app
