"""Validating ``[[attack]]`` tables: against each method without data, then against the
data (targets are classes, triggers fit the images)."""

from __future__ import annotations

import torch

from fedsim.attack_plan import PLAN_ARGUMENTS, Attacker, AttackPlan, splits_trigger, trigger_of
from fedsim.build.parameters import parameter_defaults
from fedsim.errors import UserError
from fedsim.lookups import attack_class, strategy_trainer
from fedsim.registry import validate_parameters


def resolve_attack_tables(experiment, num_clients: int | None) -> list:
    """Each ``[[attack]]`` table checked against its method without data (the method
    exists, takes the options, and accepts the trigger and the strategy's trainer), with
    its options coerced and their defaults spelled out, as for any component. With
    ``num_clients`` known, the clients are resolved too."""
    trainer = strategy_trainer(experiment)
    resolved = []
    for number, table in enumerate(experiment.attack, start=1):
        where = f"[[attack]] #{number} ({table.method})"
        try:
            cls = attack_class(table.method)
        except UserError as error:
            raise UserError(f"[[attack]] #{number}: {error}") from None
        reserved = [key for key in table.options if key in PLAN_ARGUMENTS]
        if reserved:
            raise UserError(f"{where} options {reserved} are keys of the [[attack]] table itself, not options")
        options = validate_parameters(cls, table.options, f"{where} options", reserved=PLAN_ARGUMENTS)
        defaults = {key: value for key, value in parameter_defaults(cls).items() if key not in PLAN_ARGUMENTS}
        table = table.model_copy(update={"options": {**defaults, **options}})
        size = len(table.clients) if table.clients is not None else table.count
        attacker = Attacker(
            name=table.name or str(number - 1),
            method=table.method,
            clients=tuple(range(size)),
            target=table.target,
            trigger=trigger_of(table.trigger),
            poison_fraction=table.poison_fraction,
            window=tuple(table.window) if table.window else None,
            options=dict(table.options),
        )
        parts = {client: (client, size) for client in range(size)} if splits_trigger(cls) else {}
        try:
            AttackPlan([], parts).build(attacker, trainer)
        except (TypeError, ValueError) as error:
            raise UserError(f"{where}: {error}") from None
        resolved.append(table)
    if num_clients is not None and resolved:
        AttackPlan.from_experiment(experiment, num_clients)
    return resolved


def check_attacks_fit_data(experiment, input_shape: tuple[int, ...], num_classes: int, num_clients: int) -> None:
    """What needs the data: targets are classes, triggers fit the images."""
    plan = AttackPlan.from_experiment(experiment, num_clients)
    trainer = strategy_trainer(experiment)
    for number, attacker in enumerate(plan.attackers, start=1):
        if attacker.target >= num_classes:
            raise UserError(
                f"[[attack]] #{number} target = {attacker.target} is not a class: the dataset has {num_classes} "
                f"(labels 0 to {num_classes - 1})"
            )
        attack = plan.build(attacker, trainer)
        trigger = attack.training_trigger() or attack.test_trigger
        if trigger is None:
            continue
        if len(input_shape) != 3:
            raise UserError(
                f"[[attack]] #{number} ({attacker.method}) stamps a trigger on images, but the inputs have shape "
                f"{tuple(input_shape)}; use a method without one (label_flip) or images (no [features])"
            )
        try:
            trigger.apply(torch.zeros(1, *input_shape))
            attack.test_trigger.apply(torch.zeros(1, *input_shape))
        except ValueError as error:
            raise UserError(f"[[attack]] #{number} trigger: {error}") from None
