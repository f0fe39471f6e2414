"""From an experiment's tables to the objects they name.

Each ``make_*`` function turns one table into its component; :func:`resolve` validates
them all up front, so a bad experiment fails before any data is loaded.
"""

from __future__ import annotations

import inspect
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedsim.config import Experiment
from fedsim.errors import UserError
from fedsim.registry import (
    accepted_parameters,
    build,
    did_you_mean,
    load_reference,
    lookup,
    plugin_table,
    validate_parameters,
)
from fedsim.trainer import ClientTrainer

STRATEGY_PLUGINS = "fedsim.strategies"


def make_partitioner(experiment: Experiment):
    from partitioners import PARTITIONERS

    partitioner_cls = lookup(PARTITIONERS, experiment.partition.name, "partition")
    return build(partitioner_cls, experiment.partition.params, "[partition]")


def resolve_strategy(name: str) -> type[Strategy]:
    """A strategy class from a built-in name, a ``module:Class`` reference, or a plugin.

    Plugins are entry points in the ``fedsim.strategies`` group of any installed package.
    """
    from strategies import STRATEGIES

    if ":" in name:
        strategy_cls = load_reference(name, "strategy")
    elif name in STRATEGIES:
        strategy_cls = STRATEGIES[name]
    else:
        plugins = plugin_table(STRATEGY_PLUGINS)
        if name not in plugins:
            known = sorted({*STRATEGIES, *plugins})
            raise UserError(
                f"[strategy] name = {name!r} is not a known strategy{did_you_mean(name, known)} "
                f"(choose from: {', '.join(known)}, or give 'package.module:ClassName')"
            )
        strategy_cls = plugins[name].load()
    if not (inspect.isclass(strategy_cls) and issubclass(strategy_cls, Strategy)):
        raise UserError(f"[strategy] {name!r} is not a subclass of flwr.serverapp.strategy.Strategy")
    return strategy_cls


def trainer_class(strategy_cls: type[Strategy]) -> type[ClientTrainer]:
    """The strategy's ``client_trainer`` (a ClientTrainer subclass), else FedAvg's client."""
    trainer_cls = getattr(strategy_cls, "client_trainer", ClientTrainer)
    if not (inspect.isclass(trainer_cls) and issubclass(trainer_cls, ClientTrainer)):
        raise UserError(
            f"[strategy] {strategy_cls.__name__}.client_trainer must be a subclass of fedsim.trainer.ClientTrainer"
        )
    return trainer_cls


def _strategy_defaults(experiment: Experiment, num_clients: int) -> dict[str, Any]:
    """What fedsim fills in for a Flower strategy unless the experiment says otherwise.

    Simulated clients are all online, so the run never waits for more; a run samples at
    least one client per round (Flower's default minimum of 2 would break 1-client runs).
    """
    defaults: dict[str, Any] = {
        "min_available_nodes": num_clients,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
    }
    if experiment.client.local_test_fraction == 0:
        defaults["fraction_evaluate"] = 0.0  # no held-out data on clients: nothing to evaluate
    return defaults


def make_strategy(experiment: Experiment, num_clients: int) -> Strategy:
    strategy_cls = resolve_strategy(experiment.strategy.name)
    params = experiment.strategy.params
    if experiment.client.local_test_fraction == 0 and params.get("fraction_evaluate", 0) > 0:
        raise UserError(
            "[strategy] fraction_evaluate > 0 needs held-out client data; "
            "set [client] local_test_fraction > 0 or fraction_evaluate = 0"
        )
    accepted = accepted_parameters(strategy_cls)
    fixed = {
        key: value
        for key, value in _strategy_defaults(experiment, num_clients).items()
        if key in accepted and key not in params
    }
    return build(strategy_cls, params, "[strategy]", **fixed)


def make_engine(experiment: Experiment):
    from fedsim.engine import ENGINES

    engine_cls = lookup(ENGINES, experiment.engine.name, "engine")
    return build(engine_cls, experiment.engine.params, "[engine]")


def resolve(experiment: Experiment, source: str, inherited: dict[str, set[str]] | None = None) -> Experiment:
    """Validate every component table without loading data, and fill in the defaults.

    The returned experiment spells out every parameter a component will use, so the
    run directory's config.toml still describes the run if a default changes later.
    ``inherited`` names keys a table kept from the file after an override switched its
    component; those the new component does not accept are dropped, not refused.
    """
    from fedsim.data import DATASETS
    from fedsim.engine import ENGINES
    from fedsim.models import MODELS
    from partitioners import PARTITIONERS
    from strategies import STRATEGIES

    try:
        dataset = lookup(DATASETS, experiment.dataset.name, "dataset").loader
        model_cls = lookup(MODELS, experiment.model.name, "model")
        partitioner_cls = lookup(PARTITIONERS, experiment.partition.name, "partition")
        strategy_cls = resolve_strategy(experiment.strategy.name)
        engine_cls = lookup(ENGINES, experiment.engine.name, "engine")
        trainer_class(strategy_cls)
        strategy_fixed = _strategy_defaults(experiment, num_clients=1)
        strategy_fixed["min_available_nodes"] = None  # known only once the partition exists
        tables = {  # table: (its component, what fedsim fills in, the registry the name picks from)
            "dataset": (dataset, {}, {name: entry.loader for name, entry in DATASETS.items()}),
            "model": (model_cls, {"input_shape": None, "num_classes": None}, MODELS),
            "partition": (partitioner_cls, {}, PARTITIONERS),
            "strategy": (strategy_cls, strategy_fixed, STRATEGIES),
            "engine": (engine_cls, {}, ENGINES),
        }
        data = experiment.to_dict()
        data["model"].update(_required_model_options(strategy_cls, model_cls, experiment))
        for table, (component, fixed, registry) in tables.items():
            params = getattr(experiment, table).params
            stale = {key for key in (inherited or {}).get(table, ()) if key not in accepted_parameters(component)}
            params = {key: value for key, value in params.items() if key not in stale}
            for key in stale:
                del data[table][key]
            chosen = (getattr(experiment, table).name, registry)
            params = validate_parameters(component, params, f"[{table}]", reserved=fixed, chosen=chosen)
            data[table].update(params)  # coerced to the declared types: alpha = 1 becomes 1.0
            for key, default in _defaults(component).items():
                if key not in data[table] and key not in fixed:
                    data[table][key] = default
            for key, value in fixed.items():
                if value is not None and key not in params and key in accepted_parameters(component):
                    data[table][key] = value
        resolved = Experiment.model_validate(data)
        make_partitioner(resolved)
        make_strategy(resolved, num_clients=1)  # the strategy's own range checks
        make_engine(resolved)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None
    return resolved


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


def _defaults(component: Any) -> dict[str, Any]:
    """The parameter defaults that a TOML file can hold (no None, no callables)."""

    def representable(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(representable(v) for v in value)
        return isinstance(value, (bool, int, float, str))

    return {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in accepted_parameters(component).items()
        if p.default is not inspect.Parameter.empty and representable(p.default)
    }


def check_model(experiment: Experiment, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Build the model and push a small batch through it, before a run writes anything:
    a model that does not fit the data, or that the strategy cannot train, is a
    one-line error. A strategy may check the model with a ``validate_model(model)``
    class method that raises ValueError."""
    import torch

    from fedsim.models import build_model

    model = build_model(experiment.model.name, input_shape, num_classes, **experiment.model.params)
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, *input_shape))
    except RuntimeError as error:
        shape = "x".join(map(str, input_shape))
        message = str(error).strip().splitlines()[0]
        raise UserError(f"[model] {experiment.model.name!r} does not fit inputs of shape {shape}: {message}") from None
    if tuple(logits.shape) != (2, num_classes):
        raise UserError(
            f"[model] {experiment.model.name!r} gives outputs of shape {tuple(logits.shape)[1:]}, not ({num_classes},)"
        )
    validate_model = getattr(resolve_strategy(experiment.strategy.name), "validate_model", None)
    if validate_model is not None:
        try:
            validate_model(model)
        except ValueError as error:
            raise UserError(f"[strategy] {experiment.strategy.name}: {error}") from None
