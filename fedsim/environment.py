"""What every process of a run needs to rebuild its world, small enough to pickle.

Ray ships the ClientApp, and with it this object, to its actors with every message, so
it holds only the experiment, the run directory and the engine's device and thread
settings. Everything heavy (the dataset, the partition, each client's data view) is
loaded lazily, once per process, and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsim.config import Experiment
from fedsim.data import ClientData, Dataset, client_view, load_dataset
from fedsim.models import build_model
from fedsim.seeding import derive_seed
from fedsim.state import ClientStateStore
from fedsim.trainer import ClientTrainer
from fedsim.training import resolve_device
from partitioners import Partition


@dataclass(frozen=True)
class RunEnvironment:
    experiment: Experiment
    run_dir: Path
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads per client; None = torch's default

    def enter(self, server: bool = False) -> torch.device:
        """Apply the thread setting to this process and return the torch device (for the
        ``server``'s evaluation, the CPU when this process sees no GPU).

        Clients and the server's evaluation use the same thread count on every engine:
        float sums depend on how work is split across threads, so equal thread counts
        make in-process and Ray runs agree to the last bit.
        """
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return resolve_device(self.device, fall_back_to_cpu=server)

    @property
    def state_store(self) -> ClientStateStore:
        return ClientStateStore(self.run_dir / "client_state")

    def dataset(self) -> Dataset:
        return load_dataset(self.experiment.dataset.name, **self.experiment.dataset.params)

    def partition(self) -> Partition:
        return _load_partition(self.run_dir / "partition.npz")

    def client_data(self, client: int) -> ClientData:
        run_key = (str(self.run_dir), self.experiment.fingerprint())
        views = _VIEWS.get(run_key)
        if views is None:  # a process keeps only the current run's views
            _VIEWS.clear()
            views = _VIEWS[run_key] = {}
        if client not in views:
            seed = derive_seed(self.experiment.seed, "local-split", client)
            views[client] = client_view(
                self.dataset(), self.partition()[client], self.experiment.client.local_test_fraction, seed
            )
        return views[client]

    def new_model(self) -> torch.nn.Module:
        dataset = self.dataset()
        return build_model(
            self.experiment.model.name, dataset.input_shape, dataset.num_classes, **self.experiment.model.params
        )

    def trainer(self) -> ClientTrainer:
        return _trainer_class(self.experiment.strategy.name)()


_VIEWS: dict[tuple[str, str], dict[int, ClientData]] = {}


@functools.cache
def _trainer_class(strategy_name: str) -> type[ClientTrainer]:
    """Resolved once per process: a plugin name would otherwise scan the entry points for
    every message."""
    from fedsim.components import resolve_strategy, trainer_class

    return trainer_class(resolve_strategy(strategy_name))


_PARTITIONS: dict[tuple[str, float], Partition] = {}


def _load_partition(path: Path) -> Partition:
    key = (str(path), path.stat().st_mtime)
    if key not in _PARTITIONS:
        _PARTITIONS.clear()
        _PARTITIONS[key] = Partition.load(path)
    return _PARTITIONS[key]
