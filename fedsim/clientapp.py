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
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY

from fedsim.data import ClientData
from fedsim.environment import RunEnvironment
from fedsim.faults import FAULT_KEY, act_out
from fedsim.multimodel import PREFIX
from fedsim.seeding import derive_seed, seed_torch_globally, torch_generator
from fedsim.trainer import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DOMAIN_CORRECT,
    DOMAIN_COUNT,
    METRICS_KEY,
    NUM_EXAMPLES,
    ClientCall,
    ClientTrainer,
    RoundConfig,
    TrainResult,
)
from fedsim.training import classification_metrics
from fedsim.vectorize import train_clients
from fedsim.worker import Worker, worker_for

STATISTICS_KEY = "statistics"  # a query's answer as arrays


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


def received_arrays(records: dict, trainer: ClientTrainer):
    """What a trainer receives: the message's one ArrayRecord, or, for a trainer that takes
    several models (:mod:`fedsim.multimodel`), the dict of named model records."""
    if not trainer.takes_several_models:
        if len(records) > 1:
            raise ValueError(
                f"the strategy sent {len(records)} ArrayRecords ({', '.join(records)}) but its client trainer "
                f"{type(trainer).__name__} takes one model; a trainer for several sets takes_several_models = True"
            )
        return only(records, "ArrayRecord")
    unnamed = [key for key in records if not key.startswith(PREFIX)]
    if unnamed or not records:
        raise ValueError(f"{type(trainer).__name__} takes models named {PREFIX}0, {PREFIX}1, ...; got {list(records)}")
    return dict(records)


def reply_arrays(arrays) -> dict:
    """The reply's ArrayRecords: one under ``arrays``, or each named model under its name."""
    return dict(arrays) if isinstance(arrays, dict) else {ARRAYS_KEY: arrays}


@dataclass
class TrainRequest:
    """One client's train message, read: who, its round config, data, trainer and state."""

    message: Message
    worker: Worker
    client: int
    config: RoundConfig
    fault: str | None
    seed: int
    data: ClientData
    trainer: ClientTrainer
    received: ArrayRecord | dict[str, ArrayRecord]
    state: dict

    def client_call(self) -> ClientCall:
        """The trainer's call: the worker's model, what the client received, its data,
        config and state, the round's generator and the worker's device."""
        generator = torch_generator(self.seed)
        return ClientCall(
            self.worker.model(), self.received, self.data, self.config, self.state, generator, self.worker.device
        )

    def reply(self, result: TrainResult) -> Message:
        """Save the client's new state; the reply, with any fault acted out on its arrays."""
        self.worker.state_store.save(self.client, self.config.server_round, result.state)
        metrics = MetricRecord({**result.metrics, NUM_EXAMPLES: self.data.num_train})
        extra = self.config.extra
        if isinstance(result.arrays, dict):
            arrays = {
                name: act_out(self.fault, extra, self.received.get(name), record)
                for name, record in result.arrays.items()
            }
        else:
            arrays = act_out(self.fault, extra, self.received, result.arrays)
        return Message(RecordDict({**reply_arrays(arrays), METRICS_KEY: metrics}), reply_to=self.message)


def make_client_app(env: RunEnvironment | Callable[[Context], RunEnvironment]) -> ClientApp:
    """The ClientApp: train, evaluate, and a query that tells the server who this node is.

    ``env`` is the run's environment, or a function that returns it for a message's
    context, called for every message (so it should cache what it builds).
    """
    app = ClientApp()
    environment_for = env if callable(env) else (lambda _context: env)

    def prepare_train(message: Message, context: Context) -> TrainRequest:
        worker = worker_for(environment_for(context))
        client = client_id(context)
        config = RoundConfig.from_config(
            only(message.content.config_records, "ConfigRecord"), client, worker.env.experiment.seed
        )
        seed = derive_seed(worker.env.experiment.seed, "train", config.server_round, client)
        trainer = worker.trainer_for(client)
        return TrainRequest(
            message=message,
            worker=worker,
            client=client,
            config=config,
            fault=config.extra.get(FAULT_KEY),  # an injected fault ([faults]) this client acts out
            seed=seed,
            data=worker.client_data(client, config.server_round),
            trainer=trainer,
            received=received_arrays(message.content.array_records, trainer),
            state=worker.state_store.load(client, config.server_round - 1),
        )

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_alone(prepare_train(message, context))

    def train_alone(call: TrainRequest) -> Message:
        act_out(call.fault, call.config.extra, None, None)
        worker = call.worker
        seed_torch_globally(call.seed, worker.device)  # dropout and any other global-RNG draw in the model
        result = call.trainer.train(call.client_call())
        return call.reply(result)

    def train_many(messages: list[Message], contexts: list[Context]) -> list[Message]:
        """Train messages for many clients, up to ``[engine] vectorize`` of them at once
        (:mod:`fedsim.vectorize`): the same replies as :func:`train` one after another, to
        float rounding. Clients that cannot be trained together (an attacker, a fault to
        act out, a trainer or model the vectorised loop does not reproduce) take
        :func:`train` alone; their replies keep their places."""
        if worker_for(environment_for(contexts[0])).vectorize == 1:  # one at a time, as without it
            return [train(message, context) for message, context in zip(messages, contexts, strict=True)]
        replies: list[Message | None] = [None] * len(messages)
        together: list[tuple[int, TrainRequest]] = []
        for index, (message, context) in enumerate(zip(messages, contexts, strict=True)):
            call = prepare_train(message, context)
            if call.fault is None and call.worker.trains_together(call.trainer):
                together.append((index, call))
            else:
                replies[index] = train_alone(call)
        if together:
            worker = together[0][1].worker
            size = worker.vectorize
            for start in range(0, len(together), size):
                chunk = together[start : start + size]
                results = train_clients(worker.trainer, [call.client_call() for _, call in chunk])
                for (index, call), result in zip(chunk, results, strict=True):
                    replies[index] = call.reply(result)
        return replies

    app.train_many = train_many  # for fedsim's engines (fedsim.engine.tasks.run_tasks); Flower ignores it

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        worker = worker_for(environment_for(context))
        client = client_id(context)
        config = RoundConfig.from_config(
            only(message.content.config_records, "ConfigRecord"), client, worker.env.experiment.seed
        )
        data = worker.client_data(client, config.server_round)
        state = worker.state_store.load(client, config.server_round)
        trainer = worker.trainer_for(client)
        arrays = received_arrays(message.content.array_records, trainer)
        logits = trainer.predict(ClientCall(worker.model(), arrays, data, config, state, None, worker.device))
        metrics = evaluation_metrics(logits, data, len(worker.dataset.domains))
        return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        if not message.content.config_records:  # the server's start-up question: who are you?
            reply = ConfigRecord({PARTITION_ID_KEY: client_id(context)})
            return Message(RecordDict({CONFIG_KEY: reply}), reply_to=message)
        worker = worker_for(environment_for(context))  # a strategy's query (fedsim.serverapp.Federation.query)
        client = client_id(context)
        config = RoundConfig.from_config(
            only(message.content.config_records, "ConfigRecord"), client, worker.env.experiment.seed
        )
        data = worker.client_data(client, config.server_round)
        state = worker.state_store.load(client, config.server_round - 1)
        trainer = worker.trainer_for(client)
        arrays = received_arrays(message.content.array_records, trainer)
        result = trainer.query(ClientCall(worker.model(), arrays, data, config, state, None, worker.device))
        content = {METRICS_KEY: MetricRecord({**result.metrics, NUM_EXAMPLES: data.num_train})}
        if result.statistics:
            content[STATISTICS_KEY] = ArrayRecord(
                {key: Array(np.ascontiguousarray(v)) for key, v in result.statistics.items()}
            )
        return Message(RecordDict(content), reply_to=message)

    return app
