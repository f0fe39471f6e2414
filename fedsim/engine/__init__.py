"""Engines: how the ServerApp's messages reach the simulated clients."""

from fedsim.engine.base import Engine, ServerMain
from fedsim.engine.inprocess import InProcessEngine, InProcessGrid
from fedsim.engine.ray import RayEngine

ENGINES: dict[str, type] = {
    "inprocess": InProcessEngine,
    "ray": RayEngine,
}

__all__ = ["ENGINES", "Engine", "InProcessEngine", "InProcessGrid", "RayEngine", "ServerMain"]
