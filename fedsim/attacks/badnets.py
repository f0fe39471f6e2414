"""BadNets (Gu et al., 2017): a fixed pixel patch, poisoned samples relabelled to the target."""

from __future__ import annotations

from fedsim.attacks.base import AttackTrainer


class BadNets(AttackTrainer):
    """BadNets: ``poison_fraction`` of each batch gets a patch ``trigger`` (default: a 3x3
    patch of value 1 at the bottom-right corner) and the ``target`` label."""

    name = "badnets"
    default_trigger = "patch"
    trigger_kinds = ("patch",)
