"""Build: the one place that knows every registry.

It validates an experiment against the components its tables name
(:func:`load_experiment`, :func:`load_experiment_data`, :func:`validate_experiment`), builds them
(:func:`make_partitioner`, :func:`make_strategy` with its defence, :func:`make_engine`) and
checks what needs the data (:func:`check_model`, :func:`check_attacks_fit_data`). The
runtime (worker, engines, the server's round loop) never imports it: what a worker needs to
rebuild from the experiment, it finds through :mod:`fedsim.lookups`.
"""

from fedsim.build.attacks import check_attacks_fit_data, resolve_attack_tables
from fedsim.build.checks import check_model
from fedsim.build.experiment import load_experiment, load_experiment_data, resolve, validate_experiment
from fedsim.build.factories import (
    check_sampling,
    make_defence,
    make_engine,
    make_observers,
    make_partitioner,
    make_strategy,
    sample_size,
    strategy_failure,
)
from fedsim.build.parameters import parameter_defaults

__all__ = [
    "check_attacks_fit_data",
    "check_model",
    "check_sampling",
    "load_experiment",
    "load_experiment_data",
    "make_defence",
    "make_engine",
    "make_observers",
    "make_partitioner",
    "make_strategy",
    "parameter_defaults",
    "resolve",
    "resolve_attack_tables",
    "sample_size",
    "strategy_failure",
    "validate_experiment",
]
