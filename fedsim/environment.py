"""What every process of a run needs to rebuild its world, small enough to pickle.

Engines ship the ClientApp, and with it this object, to other processes (Ray actors,
Flower's runtime), so it holds only the experiment, the run directory and the engine's
device and thread settings. Everything heavy is loaded once per process by that
process's :class:`fedsim.worker.Worker`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsim.config import Experiment
from fedsim.data import Dataset, load_dataset
from fedsim.data.features import with_features
from fedsim.data.population import Population
from fedsim.models import build_model
from fedsim.training import resolve_device


def experiment_dataset(experiment: Experiment) -> Dataset | Population:
    """The experiment's dataset (or lazy population), through its ``[features]`` extractor
    when it names one."""
    dataset = load_dataset(experiment.dataset.name, **experiment.dataset.params)
    return with_features(dataset, experiment.features.name, **experiment.features.params)


@dataclass(frozen=True)
class RunEnvironment:
    experiment: Experiment
    run_dir: Path
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads per client; None = torch's default

    @functools.cached_property
    def key(self) -> tuple:
        """What tells runs apart, cheap to compare (unlike the experiment itself)."""
        return (str(self.run_dir), self.experiment.fingerprint(), self.device, self.threads)

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

    def dataset(self) -> Dataset | Population:
        return experiment_dataset(self.experiment)

    def new_model(self) -> torch.nn.Module:
        dataset = self.dataset()
        return build_model(
            self.experiment.model.name, dataset.input_shape, dataset.num_classes, **self.experiment.model.params
        )
