"""``fedsim list``: every registered component, one line each."""

from __future__ import annotations

import argparse
import sys


def execute(args: argparse.Namespace) -> int:
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.attacks import ATTACK_PLUGINS, ATTACKS
    from fedsim.data import DATASETS
    from fedsim.data.features import FEATURE_EXTRACTORS
    from fedsim.engine import ENGINES
    from fedsim.lookups import STRATEGY_PLUGINS
    from fedsim.models import MODELS
    from fedsim.registry import describe, plugin_table
    from partitioners import PARTITIONERS
    from strategies import STRATEGIES
    from strategies.defences import DEFENCES

    def section(title: str, rows: dict[str, str]) -> None:
        print(f"{title}:")
        width = max(map(len, rows), default=0)
        for name, text in rows.items():
            print(f"  {name:<{width}}  {text}")
        print()

    datasets = {}
    for name, info in DATASETS.items():
        shape = "x".join(map(str, info.shape))
        domains = f", domains: {', '.join(info.domains)}" if info.domains else ""
        where = "offline" if info.offline else f"needs local files: {_how_to_get(name)}"
        datasets[name] = (
            f"{info.description} [{len(info.classes)} classes, {shape}{domains}; default model {info.model}; {where}]"
        )
    section("datasets", datasets)
    section("partitioners", {name: describe(cls) for name, cls in PARTITIONERS.items()})
    section("models", {name: describe(cls) for name, cls in MODELS.items()})
    # Flower's own classes (FedAvg, FedProx) are described by the module that registers them
    strategies = {
        name: describe(cls if cls.__module__.startswith("strategies.") else sys.modules[f"strategies.{name}"])
        for name, cls in STRATEGIES.items()
    }
    strategies.update({name: f"plugin from {ep.value}" for name, ep in plugin_table(STRATEGY_PLUGINS).items()})
    section("strategies", strategies)
    section("engines", {name: describe(cls) for name, cls in ENGINES.items()})
    section("defences ([strategy] defence)", {name: describe(cls) for name, cls in DEFENCES.items()})
    attacks = {name: describe(cls) for name, cls in ATTACKS.items()}
    attacks.update({name: f"plugin from {ep.value}" for name, ep in plugin_table(ATTACK_PLUGINS).items()})
    section("attacks ([[attack]] method)", attacks)
    section("feature extractors ([features] name)", {name: describe(cls) for name, cls in FEATURE_EXTRACTORS.items()})
    return 0


def _how_to_get(name: str) -> str:
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.data.sources import SOURCES

    source = SOURCES.get(name)
    if source is not None and source.resources:
        return f"fedsim data download {name}"
    return f"see fedsim data info {name}"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "list",
        help="list datasets, partitioners, models, strategies, engines, defences, attacks and feature extractors",
        description="List every registered component, one line each.",
    )
    parser.set_defaults(handler=execute)
