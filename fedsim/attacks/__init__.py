"""Backdoor and poisoning attacks: client behaviours wrapped around the strategy's trainer.

Each attack is an :class:`fedsim.attacks.base.AttackTrainer` subclass, one module each,
constructed as ``Attack(strategy_trainer, target=..., trigger=..., poison_fraction=...,
window=..., **method_options)``; it delegates to the wrapped trainer everything it does not
change, so it composes with any strategy (FedBN and FedWon included). Triggers are
:class:`fedsim.attacks.triggers.Trigger`.

``ATTACKS`` maps a method name to its class. A user's own attack (an ``AttackTrainer``
subclass) registers as an entry point in the group ``"fedsim.attacks"``
(:data:`ATTACK_PLUGINS`) of any installed package, e.g. in its ``pyproject.toml``::

    [project.entry-points."fedsim.attacks"]
    my_attack = "my_package.my_attack:MyAttack"
"""

from fedsim.registry import LazyRegistry

ATTACK_PLUGINS = "fedsim.attacks"  # the entry-point group of users' own attacks

# Each module is imported on first use, as strategies are.
ATTACKS = LazyRegistry(
    {
        "badnets": "fedsim.attacks.badnets:BadNets",
        "blend": "fedsim.attacks.blend:Blend",
        "dba": "fedsim.attacks.dba:DBA",
        "label_flip": "fedsim.attacks.label_flip:LabelFlip",
        "model_replacement": "fedsim.attacks.model_replacement:ModelReplacement",
        "neurotoxin": "fedsim.attacks.neurotoxin:Neurotoxin",
        "mirage": "fedsim.attacks.mirage:Mirage",
    }
)

__all__ = ["ATTACKS", "ATTACK_PLUGINS"]
