"""Factories: from an experiment's tables to the components they name.

Each ``make_*`` function turns one table into its component, with the one-line errors of
:func:`fedsim.registry.build`; the strategy comes wrapped in the experiment's defence.
"""

from __future__ import annotations

import inspect
import traceback
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedsim.config import Experiment
from fedsim.engine import ENGINES
from fedsim.errors import ClientFailure, UserError
from fedsim.lookups import defence_of, is_user_strategy, resolve_strategy, strategy_params
from fedsim.observers import OBSERVER_PLUGINS, Observer
from fedsim.registry import accepted_parameters, build, first_line, lookup, resolve_class, validate_parameters
from partitioners import PARTITIONERS
from strategies.defences.base import ServerResources, defended


def make_partitioner(experiment: Experiment):
    partitioner_cls = lookup(PARTITIONERS, experiment.partition.name, "partition")
    return build(partitioner_cls, experiment.partition.params, "[partition]")


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


def make_defence(experiment: Experiment, strategy: Strategy, env=None, sampled: int | None = None) -> Strategy:
    """``strategy`` wrapped in the experiment's defence, if it names one. What a defence
    needs from the server (FLTrust's root set, DeepSight's model) comes from ``env``, the
    run's environment; without it (validation before the data exists) the options are
    checked, a defence that needs nothing from the server is built to run its own checks,
    and the strategy comes back unwrapped. ``sampled``, the clients a round samples where
    known, is checked against the fewest the defence needs (Krum's n >= 2f + 3)."""
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
    try:
        fixed.update(defence_cls.from_server(server_resources(experiment, env)))
    except ValueError as error:  # what the server cannot give the defence
        raise UserError(f"[strategy] defence = {experiment.strategy.params.get('defence')!r}: {error}") from None
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


def server_resources(experiment: Experiment, env) -> ServerResources:
    """What the run's server offers a defence (:meth:`Defence.from_server`)."""
    return ServerResources(
        new_model=env.new_model,
        dataset=env.dataset(),
        client=experiment.client,
        num_clients=int(experiment.partition.params.get("num_clients", 1)),
        seed=experiment.seed,
    )


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
    """The experiment's engine, built from its ``[engine]`` table."""
    return build(lookup(ENGINES, experiment.engine.name, "engine"), experiment.engine.params, "[engine]")


def observer_class(name: str) -> type[Observer]:
    """The observer class an ``[[observer]]`` table names: a ``"package.module:Class"``
    reference or an entry point of the group ``fedsim.observers``."""
    return resolve_class(name, {}, OBSERVER_PLUGINS, Observer, "observer", "[[observer]] name")


def make_observers(experiment: Experiment) -> list[Observer]:
    """The user's observers, built from the experiment's ``[[observer]]`` tables."""
    return [
        build(observer_class(table.name), table.params, f"[[observer]] #{number}")
        for number, table in enumerate(experiment.observer, start=1)
    ]
