"""From an experiment's tables to the objects they name.

Each ``make_*`` function turns one table into its component; :func:`resolve` validates
them all up front, so a bad experiment fails before any data is loaded.
"""

from __future__ import annotations

import inspect
import math
import traceback
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedsim.config import Experiment
from fedsim.errors import ClientFailure, UserError
from fedsim.registry import (
    accepted_parameters,
    build,
    did_you_mean,
    first_line,
    lookup,
    resolve_class,
    validate_parameters,
)
from fedsim.trainer import ClientTrainer

STRATEGY_PLUGINS = "fedsim.strategies"
DEFENCE, DEFENCE_OPTIONS = "defence", "defence_options"  # [strategy] keys fedsim reads, not the strategy
NO_DEFENCE = "none"  # [strategy] defence = "none": no defence (a sweep's baseline)
ROOT_SET_SIZE = 100  # FLTrust's root set: the paper's 100 examples, drawn from the training data


def make_partitioner(experiment: Experiment):
    from partitioners import PARTITIONERS

    partitioner_cls = lookup(PARTITIONERS, experiment.partition.name, "partition")
    return build(partitioner_cls, experiment.partition.params, "[partition]")


def resolve_strategy(name: str) -> type[Strategy]:
    """A strategy class from a built-in name, a ``module:Class`` reference, or a plugin.

    Plugins are entry points in the ``fedsim.strategies`` group of any installed package.
    """
    from strategies import STRATEGIES

    return resolve_class(name, STRATEGIES, STRATEGY_PLUGINS, Strategy, "strategy", "[strategy] name")


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
        "total_rounds": experiment.rounds,  # a method that schedules by the run's length (FRAug's T)
        "min_available_nodes": num_clients,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
    }
    if experiment.client.local_test_fraction == 0:
        defaults["fraction_evaluate"] = 0.0  # no held-out data on clients: nothing to evaluate
    return defaults


def strategy_params(experiment: Experiment) -> dict[str, Any]:
    """The ``[strategy]`` keys that go to the strategy class: all but the defence's."""
    return {key: value for key, value in experiment.strategy.params.items() if key not in (DEFENCE, DEFENCE_OPTIONS)}


def defence_of(experiment: Experiment) -> tuple[type | None, dict[str, Any]]:
    """The defence class that ``[strategy] defence`` names (None without one, or with
    ``defence = "none"``, which lets a sweep compare defences with no defence) and its options."""
    from strategies.defences import DEFENCES

    params = experiment.strategy.params
    name, options = params.get(DEFENCE), params.get(DEFENCE_OPTIONS, {})
    if name is None or name == NO_DEFENCE:
        if DEFENCE_OPTIONS in params and (name is None or options):
            raise UserError("[strategy] defence_options is set but no defence; add defence = 'flame' (or another)")
        return None, {}
    if not isinstance(name, str):
        raise UserError(f"[strategy] defence = {name!r} must be a name (choose from: {', '.join(DEFENCES)})")
    if name not in DEFENCES:
        raise UserError(
            f"[strategy] defence = {name!r} is not a known defence{did_you_mean(name, DEFENCES)} "
            f"(choose from: {', '.join(DEFENCES)})"
        )
    if not isinstance(options, dict):
        raise UserError(f"[strategy] defence_options must be a table, e.g. defence_options = {{}}, got {options!r}")
    return DEFENCES[name], dict(options)


def make_defence(experiment: Experiment, strategy: Strategy, env=None, sampled: int | None = None) -> Strategy:
    """``strategy`` wrapped in the experiment's defence, if it names one. What a defence
    needs from the server (FLTrust's root set, DeepSight's model) comes from ``env``, the
    run's environment; without it (validation before the data exists) the options are
    checked, a defence that needs nothing from the server is built to run its own checks,
    and the strategy comes back unwrapped. ``sampled``, the clients a round samples where
    known, is checked against the fewest the defence needs (Krum's n >= 2f + 3)."""
    from strategies.defences.base import defended

    defence_cls, options = defence_of(experiment)
    if defence_cls is None:
        return strategy
    where = "[strategy] defence_options"
    fixed: dict[str, Any] = {"strategy": strategy, "seed": experiment.seed}
    if env is None:
        validate_parameters(defence_cls, options, where, reserved=[*fixed, *defence_cls.needs])
        if not defence_cls.needs:
            _check_defence_round_size(build(defence_cls, options, where, **fixed), sampled)
        return strategy
    fixed.update(_defence_needs(experiment, defence_cls, env))
    defence = build(defended(type(strategy), defence_cls), options, where, **fixed)
    _check_defence_round_size(defence, sampled)
    return defence


def _check_defence_round_size(defence, sampled: int | None) -> None:
    if sampled is not None and sampled < defence.min_clients():
        raise UserError(f"[strategy] defence = {defence.name!r}: {defence.too_few_clients(sampled)}")


def sample_size(strategy: Strategy, num_clients: int) -> int | None:
    """How many clients Flower's sampling takes per round from ``num_clients`` online
    (FedAvg's ``max(int(n * fraction_train), min_train_nodes)``), where the strategy says."""
    fraction, minimum = getattr(strategy, "fraction_train", None), getattr(strategy, "min_train_nodes", None)
    if not isinstance(fraction, (int, float)) or not isinstance(minimum, int) or fraction <= 0:
        return None
    return max(int(num_clients * fraction), minimum)


def _defence_needs(experiment: Experiment, defence_cls: type, env) -> dict[str, Any]:
    import numpy as np

    needs: dict[str, Any] = {}
    if "model_fn" in defence_cls.needs:
        needs["model_fn"] = env.new_model
    if "input_shape" in defence_cls.needs:
        needs["input_shape"] = env.dataset().input_shape
    if "root_update" in defence_cls.needs:
        from fedsim.seeding import derive_seed
        from strategies.defences.fltrust import root_trainer

        dataset, client = env.dataset(), experiment.client
        rng = np.random.default_rng(derive_seed(experiment.seed, "root-set"))
        root = rng.choice(len(dataset.y_train), min(ROOT_SET_SIZE, len(dataset.y_train)), replace=False)
        # the paper's server takes a client's local iterations: an average client's here
        num_clients = int(experiment.partition.params.get("num_clients", 1))
        per_client = len(dataset.y_train) * (1 - client.local_test_fraction) / max(num_clients, 1)
        batches_per_epoch = math.ceil(per_client / client.batch_size)
        needs["root_update"] = root_trainer(
            env.new_model,
            dataset.x_train[root],
            dataset.y_train[root],
            lr=client.lr,
            epochs=client.local_epochs,
            batch_size=client.batch_size,
            momentum=client.momentum,
            weight_decay=client.weight_decay,
            seed=experiment.seed,
            steps=client.local_epochs * batches_per_epoch,
        )
    return needs


def make_strategy(experiment: Experiment, num_clients: int, *, clients_known: bool = True, env=None) -> Strategy:
    """Build the experiment's strategy for ``num_clients`` clients, wrapped in its defence
    (:func:`make_defence`, which needs the run's ``env``). ``clients_known = False``
    (validation before the partition exists) skips the checks that need the real number."""
    strategy_cls = resolve_strategy(experiment.strategy.name)
    params = strategy_params(experiment)
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
    if not is_user_strategy(experiment.strategy.name):
        strategy = build(strategy_cls, params, "[strategy]", **fixed)
    else:  # the user's own code: whatever its constructor raises is one line that names it
        try:
            strategy = build(strategy_cls, params, "[strategy]", **fixed)  # its ValueErrors: its range checks
        except UserError:
            raise
        except Exception as error:
            raise UserError(
                f"[strategy] {experiment.strategy.name}(...) raised {type(error).__name__}: {first_line(error)}"
                f"{_user_code_location(error, strategy_cls)}; fix the strategy or its [strategy] keys"
            ) from None
    if clients_known:
        check_sampling(strategy, num_clients)
    return make_defence(experiment, strategy, env, sample_size(strategy, num_clients) if clients_known else None)


def check_sampling(strategy: Strategy, num_clients: int) -> None:
    """Refuse what Flower's sampling cannot do with ``num_clients`` clients: it waits forever
    for more clients than there are, and a round that samples none trains nobody."""
    for key in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes"):
        value = getattr(strategy, key, None)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if key == "min_evaluate_nodes" and getattr(strategy, "fraction_evaluate", None) == 0:
            continue  # no client evaluation: Flower never samples for it
        if value < 0:
            raise UserError(f"[strategy] {key} = {value} is invalid: it must be >= 0")
        if value > num_clients:
            raise UserError(
                f"[strategy] {key} = {value} exceeds the {num_clients} clients of the partition "
                f"(Flower would wait for them forever); set {key} <= {num_clients}"
            )
    sampled = sample_size(strategy, num_clients)
    if sampled is not None:
        fraction, minimum = strategy.fraction_train, strategy.min_train_nodes
        if sampled < 1:
            raise UserError(
                f"[strategy] fraction_train = {fraction} of {num_clients} clients samples no client in a round "
                f"(min_train_nodes = {minimum}); raise fraction_train or set min_train_nodes >= 1"
            )


def is_user_strategy(name: str) -> bool:
    """A ``module:Class`` strategy or a plugin's: the user's code, not fedsim's."""
    from strategies import STRATEGIES

    return name not in STRATEGIES


def _user_code_location(error: BaseException, strategy_cls: type) -> str:
    """Where in the strategy's own source file the error was raised, as " (file, line N)"."""
    try:
        source = inspect.getsourcefile(strategy_cls)
    except TypeError:
        return ""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == source]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def strategy_failure(experiment: Experiment, error: BaseException) -> UserError | None:
    """A one-line UserError for an exception that the user's own strategy raised while the
    run was under way (in ``configure_train``, ``aggregate_train``, ...), else None.

    Such an error is a mistake in the user's code, reported like a mistake in the input:
    one line naming the strategy, the method, the exception and where it was raised.
    fedsim's own strategies are not covered: an exception there is a bug with a traceback.
    """
    if isinstance(error, (UserError, ClientFailure)) or not is_user_strategy(experiment.strategy.name):
        return None  # fedsim's own reports (a client's failure stays one, exit code 1)
    try:
        source = inspect.getsourcefile(resolve_strategy(experiment.strategy.name))
    except (UserError, TypeError):
        return None
    frames = traceback.extract_tb(error.__traceback__)
    ours = [index for index, frame in enumerate(frames) if frame.filename == source]
    if not ours:
        return None
    # the outermost frame in the strategy's file is the method fedsim (or Flower) called
    method, innermost = frames[ours[0]].name, frames[ours[-1]]
    return UserError(
        f"[strategy] {experiment.strategy.name}: {method}() raised {type(error).__name__}: {first_line(error)} "
        f"({innermost.filename}, line {innermost.lineno}); fix the strategy, then run the same command again"
    )


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
    from fedsim.data.features import FEATURE_EXTRACTORS
    from fedsim.engine import ENGINES
    from fedsim.models import MODELS
    from partitioners import PARTITIONERS
    from strategies import STRATEGIES

    try:
        dataset = lookup(DATASETS, experiment.dataset.name, "dataset").loader
        extractor = lookup(FEATURE_EXTRACTORS, experiment.features.name, "features")
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
            from fedsim.attacks.plan import resolve_attack_tables

            resolved.attack = resolve_attack_tables(resolved, num_clients if known else None)
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


def parameter_defaults(component: Any) -> dict[str, Any]:
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

    try:
        model = build_model(experiment.model.name, input_shape, num_classes, **experiment.model.params)
    except (RuntimeError, MemoryError) as error:  # PyTorch cannot allocate a layer of that size
        options = ", ".join(f"{key} = {value!r}" for key, value in experiment.model.params.items()) or "its defaults"
        raise UserError(
            f"[model] {experiment.model.name!r} cannot be built with {options}: {first_line(error)}; "
            "choose smaller sizes"
        ) from None
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
