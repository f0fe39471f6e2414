"""From a name in an experiment to the class it stands for, and nothing more.

What every process of a run (the server, a Ray worker, Flower's runtime) needs to rebuild
its collaborators from the experiment: the strategy class a ``[strategy] name`` picks
(built-in, a user's ``module:Class`` or an entry point), its client trainer, an attack's
class, the defence ``[strategy] defence`` names. Validating an experiment and building its
components is :mod:`fedsim.build`'s; this module checks only that a name resolves.
"""

from __future__ import annotations

import inspect
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedsim.attacks import ATTACK_PLUGINS, ATTACKS
from fedsim.attacks.base import AttackTrainer
from fedsim.config import Experiment
from fedsim.errors import UserError
from fedsim.registry import did_you_mean, resolve_class
from fedsim.trainer import ClientTrainer
from strategies import STRATEGIES
from strategies.defences import DEFENCES

STRATEGY_PLUGINS = "fedsim.strategies"  # the entry-point group of users' own strategies
DEFENCE, DEFENCE_OPTIONS = "defence", "defence_options"  # [strategy] keys fedsim reads, not the strategy
NO_DEFENCE = "none"  # [strategy] defence = "none": no defence (a sweep's baseline)


def resolve_strategy(name: str) -> type[Strategy]:
    """A strategy class from a built-in name, a ``module:Class`` reference, or a plugin.

    Plugins are entry points in the ``fedsim.strategies`` group of any installed package.
    """
    return resolve_class(name, STRATEGIES, STRATEGY_PLUGINS, Strategy, "strategy", "[strategy] name")


def trainer_class(strategy_cls: type[Strategy]) -> type[ClientTrainer]:
    """The strategy's ``client_trainer`` (a ClientTrainer subclass), else FedAvg's client."""
    trainer_cls = getattr(strategy_cls, "client_trainer", ClientTrainer)
    if not (inspect.isclass(trainer_cls) and issubclass(trainer_cls, ClientTrainer)):
        raise UserError(
            f"[strategy] {strategy_cls.__name__}.client_trainer must be a subclass of fedsim.trainer.ClientTrainer"
        )
    return trainer_cls


def strategy_trainer(experiment: Experiment) -> ClientTrainer:
    """A new instance of the client trainer of the experiment's strategy."""
    return trainer_class(resolve_strategy(experiment.strategy.name))()


def is_user_strategy(name: str) -> bool:
    """A ``module:Class`` strategy or a plugin's: the user's code, not fedsim's."""
    return name not in STRATEGIES


def attack_class(method: str) -> type[AttackTrainer]:
    """The attack named ``method``: fedsim's, a user's entry point in the group
    ``"fedsim.attacks"``, or a ``"package.module:Class"`` reference."""
    return resolve_class(method, ATTACKS, ATTACK_PLUGINS, AttackTrainer, "attack", "method")


def strategy_params(experiment: Experiment) -> dict[str, Any]:
    """The ``[strategy]`` keys that go to the strategy class: all but the defence's."""
    return {key: value for key, value in experiment.strategy.params.items() if key not in (DEFENCE, DEFENCE_OPTIONS)}


def defence_of(experiment: Experiment) -> tuple[type | None, dict[str, Any]]:
    """The defence class that ``[strategy] defence`` names (None without one, or with
    ``defence = "none"``, which lets a sweep compare defences with no defence) and its options."""
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
