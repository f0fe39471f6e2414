"""The ``flower`` engine: Flower's own simulation runtime (``flwr.simulation.run_simulation``).

Kept for comparison with fedsim's engines and for fidelity to Flower's runtime: each
message is serialised, queued, and handled by a ClientApp in a Ray actor, as in a Flower
deployment. Each client gets ``num_cpus`` CPUs and ``num_gpus`` GPUs (fractions allowed).
It is several times slower than the ``ray`` engine on small models (``experiments/bench/
engines.py``), and learns which node is which client by asking every node once at start-up.
"""

from __future__ import annotations

from typing import Annotated

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from pydantic import Field

from fedsim.engine.base import ServerMain
from fedsim.engine.inprocess import Device
from fedsim.engine.ray import check_address_form, check_reachable, quiet_ray_environment
from fedsim.environment import RunEnvironment
from fedsim.flower_log import ray_log_options
from partitioners import Partition


class FlowerEngine:
    """Flower's stock simulation engine on Ray: one actor per concurrent client."""

    def __init__(
        self,
        num_cpus: Annotated[float, Field(gt=0)] = 1.0,
        num_gpus: Annotated[float, Field(ge=0)] = 0.0,
        address: str | None = None,
        device: Device = "auto",
    ) -> None:
        check_address_form(address)
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
        init_args = ray_log_options()
        if self.address:
            init_args["address"] = self.address
        return {
            "client_resources": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "init_args": init_args,
        }

    def execute(
        self, server_main: ServerMain, client_app: ClientApp, env: RunEnvironment, partition: Partition
    ) -> None:
        from flwr.simulation import run_simulation

        check_reachable(self.address, "[engine] address")  # else Ray retries it for minutes, logging each try
        quiet_ray_environment()
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            server_main(grid, context)

        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=partition.num_clients,
            backend_config=self.backend_config(),
        )
