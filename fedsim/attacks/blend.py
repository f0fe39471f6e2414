"""Blended injection (Chen et al., 2017): x' = (1 - alpha) x + alpha t over the whole image."""

from __future__ import annotations

from fedsim.attacks.base import AttackTrainer


class Blend(AttackTrainer):
    """Blend: ``poison_fraction`` of each batch is blended with a fixed pattern ``trigger``
    (default: uniform noise from seed 0, alpha 0.2) and relabelled to ``target``."""

    name = "blend"
    default_trigger = "blend"
    trigger_kinds = ("blend", "learnable")
