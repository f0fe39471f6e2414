"""The worker: what one process needs to run any of a run's simulated clients.

As in pfl-research, a process keeps one :class:`Worker` per run and loads everything
once: the dataset, the partition, each client's data view, one reusable model per
architecture (each client's weights are loaded into it in place; no model is built per
client), the client trainer (and, for attacking clients, the attack around it), the
state store and the device. The engines feed it lists
of client tasks (:func:`fedsim.engine.tasks.run_tasks`): the in-process engine runs them
in the driver, the Ray engine on a pool of actors, each holding one worker. The ClientApp
finds its process's worker with :func:`worker_for`, under every engine and under Flower's
own runtime.
"""

from __future__ import annotations

import functools
import gc

from torch import nn

from fedsim.attack_plan import AttackPlan
from fedsim.data import ClientData, Dataset
from fedsim.data.dataset import local_split
from fedsim.data.population import Population
from fedsim.data.transforms import view_samples
from fedsim.environment import RunEnvironment
from fedsim.lookups import strategy_trainer
from fedsim.notices import note, warn
from fedsim.seeding import derive_seed
from fedsim.state import ClientStateStore
from fedsim.trainer import ClientTrainer
from fedsim.vectorize import auto_k, vectorizable
from partitioners import Partition

POPULATION_VIEWS = 2048  # a lazy population's client views a worker keeps (the latest)


class Worker:
    """One run's clients, as seen from one process."""

    def __init__(self, env: RunEnvironment) -> None:
        self.env = env
        self.device = env.enter()
        # torch.optim imports torch._dynamo (seconds) when it builds its first optimizer;
        # paying for it here keeps a one-off import out of the first client's time.
        import torch._dynamo  # noqa: F401

        self.dataset: Dataset | Population = env.dataset()
        self.partition = Partition.load(env.run_dir / "partition.npz")
        self.state_store = ClientStateStore(env.run_dir / "client_state")
        self.trainer: ClientTrainer = strategy_trainer(env.experiment)
        self.attacks = AttackPlan.from_experiment(env.experiment, self.partition.num_clients)
        self._views: dict[tuple[int, int], ClientData] = {}
        self._model: nn.Module | None = None

    # -- vectorised clients ([engine] vectorize, fedsim.vectorize) -------------------------
    @functools.cached_property
    def vectorize(self) -> int:
        """How many clients this worker trains at once: ``[engine] vectorize`` (1: one at a
        time), or for ``"auto"`` what :func:`fedsim.vectorize.auto_k` chooses."""
        wanted = self.env.experiment.engine.params.get("vectorize", 1)
        if wanted != "auto":
            return int(wanted)
        shape = self.dataset.input_shape
        chosen, why = auto_k(
            self.model(), self.env.experiment.client.batch_size, shape, self.device, max_k=self.partition.num_clients
        )
        note(f"[engine] vectorize = 'auto': {why}")
        return chosen

    @functools.cached_property
    def _why_not_vectorised(self) -> str | None:
        """Why the strategy's clients cannot train together (None: they can), said once."""
        ok, reason = vectorizable(self.trainer)
        if ok and any(isinstance(m, nn.modules.dropout._DropoutNd) for m in self.model().modules()):
            ok, reason = False, "the model draws dropout masks from the global generator"
        if not ok:
            warn(f"[engine] vectorize: clients train one at a time: {reason}")
        return None if ok else reason

    def trains_together(self, trainer: ClientTrainer) -> bool:
        """Whether a client with this trainer can join a vectorised group: the strategy's own
        trainer (an attacker's is not), and one :func:`fedsim.vectorize.vectorizable` accepts
        (which refuses a trainer that takes several models)."""
        return self.vectorize > 1 and trainer is self.trainer and self._why_not_vectorised is None

    def trainer_for(self, client: int) -> ClientTrainer:
        """What ``client`` runs: the strategy's trainer, or, for a client an ``[[attack]]``
        controls, the attack wrapped around it (:mod:`fedsim.attack_plan`)."""
        return self.attacks.trainer_for(client, self.trainer)

    def client_data(self, client: int, server_round: int) -> ClientData:
        """The client's local training and held-out data in ``server_round``: its view of
        the round's slot (a static partition has one), split once per process.

        Views of a disjoint partition together hold at most one copy of the training set;
        a drift stream's views of slots this worker has moved past are dropped, and of a lazy
        population's clients only the last :data:`POPULATION_VIEWS` are kept.
        """
        return self.client_data_at(client, self.partition.slot_of(server_round))

    def client_data_at(self, client: int, slot: int) -> ClientData:
        """The client's data in time slot ``slot``."""
        key = (client, slot)
        if key not in self._views:
            if isinstance(self.dataset, Population) and len(self._views) >= POPULATION_VIEWS:
                del self._views[next(iter(self._views))]  # the oldest: a population's data is remade on demand
            self._views[key] = self._load_view(client, slot)
            stale = [old for old in self._views if old[0] == client and old[1] < slot - 1]
            for old in stale:  # a method looks back one slot at most through `earlier`; more is rebuilt
                del self._views[old]
        return self._views[key]

    def _load_view(self, client: int, slot: int) -> ClientData:
        experiment = self.env.experiment
        fraction = experiment.client.local_test_fraction
        if isinstance(self.dataset, Population):  # made now from (data seed, client), as the natural split would
            x, y = self.dataset.client_samples(client)
            return local_split(x, y, None, fraction, derive_seed(experiment.seed, "local-split", client))
        view = self.partition.view_at(client, slot)
        if self.partition.num_slots == 1 and view.is_plain:  # as before drift streams: same seeds, same split
            seed = derive_seed(experiment.seed, "local-split", client)
            return local_split(*view_samples(self.dataset, view, None, (), 0), fraction, seed)
        partition = self.partition
        samples = view_samples(
            self.dataset, view, partition.label_maps, partition.transform_specs, derive_seed(experiment.seed, "view")
        )
        seed = derive_seed(experiment.seed, "local-split", client, slot)
        earlier = (lambda before: self.client_data_at(client, before)) if slot > 0 else None
        return local_split(
            *samples, fraction, seed, slot=slot, concept=view.concept, transform=view.transform, earlier=earlier
        )

    def cached_clients(self) -> list[int]:
        """The clients whose data views this worker holds: those it has run."""
        return sorted({client for client, _slot in self._views})

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
