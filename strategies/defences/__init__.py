"""Defences against poisoning and backdoors: robust aggregation wrapped around any strategy.

A defence is a Flower Strategy built as ``Defence(strategy, **options)`` around the
experiment's strategy (FedAvg, FedProx, FedBN, FedWon, ...): it passes everything to that
strategy but ``aggregate_train``, whose arrays it computes by its own rule
(:mod:`strategies.defences.base`). ``defend(strategy, "flame", **options)`` builds one by
name; ``last_accepted`` lists the node ids it accepted in the last round, a verdict on
each client where the class's ``filters`` is True (a rule that drops clients).

``DEFENCES`` maps a name to its class; each module is imported on first use.
"""

from fedsim.registry import LazyRegistry

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


def defend(strategy, defence, **options):
    """``strategy`` wrapped in ``defence`` (a name in :data:`DEFENCES` or a Defence class);
    see :func:`strategies.defences.base.defend`."""
    from strategies.defences.base import defend as build

    return build(strategy, defence, **options)


__all__ = ["DEFENCES", "defend"]
