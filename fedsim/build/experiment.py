"""Validating an experiment: every table checked against the component it names, before
any data is loaded.

:func:`load_experiment` reads, overrides and validates an experiment file;
:func:`load_experiment_data` does the same for data already read (a dict), and
:func:`validate_experiment` validates data as it is. The schema of each
table is :mod:`fedsim.config`'s; here each component table (``[dataset]``, ``[model]``,
``[partition]``, ``[strategy]`` and its defence, ``[engine]``, ``[[attack]]``) is checked
against the signature of what it names, its defaults are spelled out, and the
components that can be built without data are built once to run their own checks.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedsim.build.attacks import resolve_attack_tables
from fedsim.build.factories import _strategy_defaults, make_engine, make_partitioner, make_strategy, observer_class
from fedsim.build.parameters import parameter_defaults
from fedsim.config import (
    SWEEP_TABLE,
    TABLE_NAMES,
    Experiment,
    ModelTable,
    ObserverTable,
    apply_overrides,
    parse_experiment,
    parse_override,
    read_experiment_file,
)
from fedsim.data import DATASETS
from fedsim.data.features import FEATURE_EXTRACTORS, NO_FEATURES
from fedsim.engine import ENGINES
from fedsim.errors import UserError
from fedsim.lookups import DEFENCE, DEFENCE_OPTIONS, defence_of, resolve_strategy, strategy_params, trainer_class
from fedsim.models import MODELS
from fedsim.observers.tracking import check_backends
from fedsim.registry import accepted_parameters, lookup, validate_parameters
from partitioners import PARTITIONERS
from strategies import STRATEGIES


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, override and validate an experiment file (its ``[sweep]`` table is ignored).

    An override that switches a component (``--set partition.name=shards``) keeps the
    file's other keys of that table only where the new component accepts them, so one
    file serves every scheme, strategy or model a sweep compares.
    """
    data = read_experiment_file(path)
    data.pop(SWEEP_TABLE, None)
    file_tables = {key: dict(value) for key, value in data.items() if isinstance(value, dict)}
    data = apply_overrides(data, overrides or [])
    paths = [parse_override(text)[0] for text in overrides or []]
    return validate_experiment(data, str(path), inherited=_inherited_keys(file_tables, data, paths))


def load_experiment_data(
    data: Mapping[str, Any], source: str = "experiment", settings: Mapping[str, Any] | None = None
) -> Experiment:
    """Override and validate experiment data, as :func:`load_experiment` does a file's.

    ``settings`` go on top as ``--set`` overrides do: a table given as a dict
    (``partition={"alpha": 0.1}``) is merged key by key into that table, anything else
    (``rounds=3``, an ``attack`` list) replaces the value. ``data`` is left unchanged.
    """
    data = copy.deepcopy(dict(data))
    data.pop(SWEEP_TABLE, None)
    file_tables = {key: dict(value) for key, value in data.items() if isinstance(value, dict)}
    paths: list[list[str]] = []
    for key, value in (settings or {}).items():
        if key in TABLE_NAMES and isinstance(value, Mapping) and isinstance(data.get(key, {}), dict):
            data.setdefault(key, {}).update(copy.deepcopy(dict(value)))
            paths += [[key, name] for name in value]
        else:
            data[key] = copy.deepcopy(value)
            paths.append([key])
    return validate_experiment(data, source, inherited=_inherited_keys(file_tables, data, paths))


def _inherited_keys(file_tables: dict[str, dict], data: dict[str, Any], paths: list[list[str]]) -> dict[str, set[str]]:
    """Per component table whose ``name`` an override changed: the keys it kept from the file
    (``paths``: the overridden keys, each as its path, ``["partition", "alpha"]``)."""
    overridden: dict[str, set[str]] = {}
    for path in paths:
        if len(path) == 2:
            overridden.setdefault(path[0], set()).add(path[1])
    inherited = {}
    for table, keys in overridden.items():
        before = file_tables.get(table, {})
        if "name" in keys and before.get("name") != data.get(table, {}).get("name"):
            inherited[table] = set(before) - {"name"} - keys
    return inherited


def validate_experiment(
    data: dict[str, Any], source: str = "experiment", inherited: dict[str, set[str]] | None = None
) -> Experiment:
    """Validate raw experiment data: its schema (:func:`fedsim.config.parse_experiment`),
    then every component table (:func:`resolve`)."""
    return resolve(parse_experiment(data, source), source, inherited)


def resolve(experiment: Experiment, source: str, inherited: dict[str, set[str]] | None = None) -> Experiment:
    """Validate every component table without loading data, and fill in the defaults.

    The returned experiment spells out every parameter a component will use, so the
    run directory's config.toml still describes the run if a default changes later.
    ``inherited`` names keys a table kept from the file after an override switched its
    component; those the new component does not accept are dropped, not refused.
    """
    try:
        dataset = lookup(DATASETS, experiment.dataset.name, "dataset").loader
        extractor = lookup(FEATURE_EXTRACTORS, experiment.features.name, "features")
        if experiment.model.name is None:
            model = ModelTable(**experiment.model.params, name=default_model(experiment))
            experiment = experiment.model_copy(update={"model": model})
        model_cls = lookup(MODELS, experiment.model.name, "model")
        partitioner_cls = lookup(PARTITIONERS, experiment.partition.name, "partition")
        strategy_cls = resolve_strategy(experiment.strategy.name)
        engine_cls = lookup(ENGINES, experiment.engine.name, "engine")
        trainer_class(strategy_cls)
        strategy_fixed = _strategy_defaults(experiment, num_clients=1)
        strategy_fixed["min_available_nodes"] = None  # known only once the partition exists
        tables = {  # table: (its component, what fedsim fills in, the registry the name picks from)
            "dataset": (dataset, {}, {name: entry.loader for name, entry in DATASETS.items()}),
            "features": (extractor, {"dataset": None}, FEATURE_EXTRACTORS),
            "model": (model_cls, {"input_shape": None, "num_classes": None}, MODELS),
            "partition": (partitioner_cls, {}, PARTITIONERS),
            "strategy": (strategy_cls, strategy_fixed, STRATEGIES),
            "engine": (engine_cls, {}, ENGINES),
        }
        data = experiment.to_dict()
        data.setdefault("features", {"name": experiment.features.name})  # to_dict leaves raw inputs out
        data["model"].update(_required_model_options(strategy_cls, model_cls, experiment))
        for table, (component, fixed, registry) in tables.items():
            params = strategy_params(experiment) if table == "strategy" else getattr(experiment, table).params
            kept = (DEFENCE, DEFENCE_OPTIONS) if table == "strategy" else ()  # fedsim's, whatever the strategy
            stale = {
                key
                for key in (inherited or {}).get(table, ())
                if key not in accepted_parameters(component) and key not in kept
            }
            params = {key: value for key, value in params.items() if key not in stale}
            for key in stale:
                del data[table][key]
            chosen = (getattr(experiment, table).name, registry)
            params = validate_parameters(component, params, f"[{table}]", reserved=fixed, chosen=chosen)
            data[table].update(params)  # coerced to the declared types: alpha = 1 becomes 1.0
            for key, default in parameter_defaults(component).items():
                if key not in data[table] and key not in fixed:
                    data[table][key] = default
            for key, value in fixed.items():
                if value is not None and key not in params and key in accepted_parameters(component):
                    data[table][key] = value
        defence_cls, options = defence_of(experiment)
        if defence_cls is not None:  # the defence's options, defaults filled in as for any component
            reserved = ["strategy", "seed", *defence_cls.needs]
            checked = validate_parameters(defence_cls, options, "[strategy] defence_options", reserved=reserved)
            defaults = {key: value for key, value in parameter_defaults(defence_cls).items() if key not in reserved}
            data["strategy"][DEFENCE_OPTIONS] = {**defaults, **checked}
        resolved = Experiment.model_validate(data)
        make_partitioner(resolved)
        # the strategy's own range checks, and its sampling where the file says how many clients
        num_clients = resolved.partition.params.get("num_clients")
        known = isinstance(num_clients, int) and not isinstance(num_clients, bool) and num_clients >= 1
        make_strategy(resolved, num_clients if known else 1, clients_known=known)
        make_engine(resolved)
        if resolved.attack:
            resolved.attack = resolve_attack_tables(resolved, num_clients if known else None)
        resolved.observer = [resolve_observer_table(table, number) for number, table in enumerate(resolved.observer, 1)]
        check_backends(resolved.tracking)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None
    return resolved


def default_model(experiment: Experiment) -> str:
    """The model an experiment without ``[model] name`` trains: its dataset's
    (:attr:`fedsim.data.DatasetInfo.model`), or the MLP on a ``[features]`` extractor's
    embeddings, which are flat vectors."""
    if experiment.features.name != NO_FEATURES:
        return FLAT_INPUTS_MODEL
    return DATASETS[experiment.dataset.name].model


FLAT_INPUTS_MODEL = "mlp"


def _required_model_options(strategy_cls: type[Strategy], model_cls: type, experiment: Experiment) -> dict[str, Any]:
    """The model options a strategy insists on (FedWon: ``norm = "none"``), checked
    against what the experiment asks for and what the model offers."""
    required = getattr(strategy_cls, "model_options", {})
    accepted = accepted_parameters(model_cls)
    for key, value in required.items():
        if key not in accepted:
            raise UserError(
                f"[model] strategy {experiment.strategy.name!r} needs a model with a {key!r} option; "
                f"model {experiment.model.name!r} has none"
            )
        chosen = experiment.model.params.get(key, value)
        if chosen != value:
            raise UserError(
                f"[model] {key} = {chosen!r} conflicts with strategy {experiment.strategy.name!r}, "
                f"which needs {key} = {value!r}; remove the key or set it to {value!r}"
            )
    return dict(required)


def resolve_observer_table(table: ObserverTable, number: int) -> ObserverTable:
    """An ``[[observer]]`` table checked against its class, defaults spelled out."""
    where = f"[[observer]] #{number}"
    cls = observer_class(table.name)
    params = validate_parameters(cls, table.params, where)
    defaults = {key: value for key, value in parameter_defaults(cls).items() if key not in params}
    return ObserverTable(name=table.name, **params, **defaults)
