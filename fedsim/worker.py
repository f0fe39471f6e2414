"""The worker: what one process needs to run any of a run's simulated clients.

As in pfl-research, a process keeps one :class:`Worker` per run and loads everything
once: the dataset, the partition, each client's data view, one reusable model per
architecture (each client's weights are loaded into it in place; no model is built per
client), the client trainer, the state store and the device. The engines feed it lists
of client tasks (:func:`fedsim.engine.tasks.run_tasks`): the in-process engine runs them
in the driver, the Ray engine on a pool of actors, each holding one worker. The ClientApp
finds its process's worker with :func:`worker_for`, under every engine and under Flower's
own runtime.
"""

from __future__ import annotations

import gc

from torch import nn

from fedsim.data import ClientData, Dataset, client_view
from fedsim.environment import RunEnvironment
from fedsim.seeding import derive_seed
from fedsim.state import ClientStateStore
from fedsim.trainer import ClientTrainer
from partitioners import Partition


class Worker:
    """One run's clients, as seen from one process."""

    def __init__(self, env: RunEnvironment) -> None:
        from fedsim.components import resolve_strategy, trainer_class

        self.env = env
        self.device = env.enter()
        # torch.optim imports torch._dynamo (seconds) when it builds its first optimizer;
        # paying for it here keeps a one-off import out of the first client's time.
        import torch._dynamo  # noqa: F401

        self.dataset: Dataset = env.dataset()
        self.partition = Partition.load(env.run_dir / "partition.npz")
        self.state_store = ClientStateStore(env.run_dir / "client_state")
        self.trainer: ClientTrainer = trainer_class(resolve_strategy(env.experiment.strategy.name))()
        self._views: dict[int, ClientData] = {}
        self._model: nn.Module | None = None

    def client_data(self, client: int) -> ClientData:
        """The client's local training and held-out data, split once per process.

        Views of a disjoint partition together hold at most one copy of the training set.
        """
        if client not in self._views:
            seed = derive_seed(self.env.experiment.seed, "local-split", client)
            fraction = self.env.experiment.client.local_test_fraction
            self._views[client] = client_view(self.dataset, self.partition[client], fraction, seed)
        return self._views[client]

    def cached_clients(self) -> list[int]:
        """The clients whose data views this worker holds: those it has run."""
        return sorted(self._views)

    def model(self) -> nn.Module:
        """The run's model, on the worker's device, built once and reused by every client:
        a trainer's ``receive`` sets all of its parameters and buffers."""
        if self._model is None:
            self._model = self.env.new_model().to(self.device)
        return self._model


def settle_garbage_collector() -> None:
    """Leave every object loaded so far (PyTorch, Flower, the data: hundreds of thousands)
    out of Python's garbage-collector scans, which would otherwise walk them all each time
    the clients' many short-lived objects trigger a full collection (a tenth of a second
    each, several per run). Called once per process, after start-up; what start-up left
    as garbage stays (a full collection to free it would cost as much as it saves)."""
    gc.freeze()


_CURRENT: list[Worker] = []  # this process's worker: one run at a time


def worker_for(env: RunEnvironment) -> Worker:
    """This process's worker for the run ``env`` describes, made on first use."""
    if not _CURRENT or _CURRENT[0].env.key != env.key:
        _CURRENT[:] = [Worker(env)]
    worker = _CURRENT[0]
    env.enter()  # the thread count, in case something in this process changed it
    return worker
