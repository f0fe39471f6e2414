"""The Ray engine: Flower's simulation engine, clients in Ray actors.

Each client gets ``num_cpus`` CPUs and ``num_gpus`` GPUs (fractions allowed: 0.25 puts
four clients on one GPU). ``address`` joins an existing Ray cluster (``"auto"`` finds
the local head node), so one experiment scales past one machine; the run directory must
then be on storage every machine can read.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from pydantic import Field

from fedsim.engine.base import ServerMain
from fedsim.engine.inprocess import Device


class RayEngine:
    """Flower's simulation engine on Ray: clients in actors, on CPUs or GPU fractions."""

    def __init__(
        self,
        num_cpus: Annotated[float, Field(gt=0)] = 1.0,
        num_gpus: Annotated[float, Field(ge=0)] = 0.0,
        address: str | None = None,
        device: Device = "auto",
    ) -> None:
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.address = address
        # "auto" follows the resources: a client given no GPU share trains on the CPU
        # even where the machine has GPUs.
        self.device = ("cuda" if num_gpus > 0 else "cpu") if device == "auto" else device

    @property
    def client_threads(self) -> int:
        """Ray gives each client actor ``num_cpus`` CPUs; torch uses that many threads."""
        return max(1, int(self.num_cpus))

    def backend_config(self) -> dict:
        init_args: dict = {"logging_level": logging.ERROR, "log_to_driver": False}
        if self.address:
            init_args["address"] = self.address
        return {
            "client_resources": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "init_args": init_args,
        }

    def execute(self, server_main: ServerMain, client_app: ClientApp, num_clients: int) -> None:
        from flwr.simulation import run_simulation

        # Keep Ray from rewriting CUDA_VISIBLE_DEVICES for GPU-less actors (its future
        # default, and silences its warning); `device` above already decides.
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            server_main(grid, context)

        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=self.backend_config(),
        )
