"""Defences against poisoning and backdoors: robust aggregation wrapped around any strategy.

A defence is a Flower Strategy built as ``Defence(strategy, **options)`` around the
experiment's strategy (FedAvg, FedProx, FedBN, FedWon, ...): it passes everything to that
strategy but ``aggregate_train``, whose arrays it computes by its own rule
(:mod:`strategies.defences.base`). ``defend(strategy, "flame", **options)`` builds one by
name; ``last_accepted`` lists the node ids it accepted in the last round, a verdict on
each client where the class's ``filters`` is True (a rule that drops clients).

``DEFENCES`` maps a name to its class; each module is imported on first use.
"""

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedsim.registry import LazyRegistry
from strategies.defences.base import Defence, defended

DEFENCES = LazyRegistry(
    {
        "krum": "strategies.defences.flower:FlowerKrum",
        "multikrum": "strategies.defences.flower:FlowerMultiKrum",
        "fedmedian": "strategies.defences.flower:FlowerMedian",
        "fedtrimmedavg": "strategies.defences.flower:FlowerTrimmedAvg",
        "bulyan": "strategies.defences.flower:FlowerBulyan",
        "norm-clipping": "strategies.defences.norm_clipping:NormClipping",
        "weak-dp": "strategies.defences.weak_dp:WeakDP",
        "flame": "strategies.defences.flame:FLAME",
        "foolsgold": "strategies.defences.foolsgold:FoolsGold",
        "rlr": "strategies.defences.rlr:RLR",
        "fltrust": "strategies.defences.fltrust:FLTrust",
        "deepsight": "strategies.defences.deepsight:DeepSight",
    }
)


def defend(strategy: Strategy, defence: str | type[Defence], **options: Any) -> Defence:
    """``strategy`` wrapped in ``defence`` (a name in :data:`DEFENCES` or a Defence class),
    as an instance of :func:`~strategies.defences.base.defended`'s class."""
    if isinstance(defence, str):
        if defence not in DEFENCES:
            raise ValueError(f"defence {defence!r} is not known (choose from: {', '.join(sorted(DEFENCES))})")
        defence = DEFENCES[defence]
    return defended(type(strategy), defence)(strategy, **options)


__all__ = ["DEFENCES", "defend"]
