"""Engines: how the ServerApp's messages reach the simulated clients.

``inprocess`` runs every client in the driver; ``ray`` runs them on a pool of Ray actor
workers (many CPUs or GPUs, a Ray cluster); ``flower`` is Flower's own simulation runtime.
"""

from fedsim.engine.base import Engine, ServerMain
from fedsim.engine.flower import FlowerEngine
from fedsim.engine.inprocess import InProcessEngine, InProcessGrid
from fedsim.engine.ray import RayEngine

ENGINES: dict[str, type] = {
    "inprocess": InProcessEngine,
    "ray": RayEngine,
    "flower": FlowerEngine,
}

__all__ = ["ENGINES", "Engine", "FlowerEngine", "InProcessEngine", "InProcessGrid", "RayEngine", "ServerMain"]
