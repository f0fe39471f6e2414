"""Flower's simulation can configure round 1 before its SuperNodes are registered, and a
strategy then samples too few clients: a reproduction with Flower alone.

Seen with flwr 1.42.0 (Ray backend, ray 2.55.1). ``flwr.simulation.run_simulation`` starts
the ServerApp's thread before the simulation registers its SuperNodes:

- ``flwr/simulation/run_simulation.py``, ``_main_loop``: ``run_serverapp_th(...)`` (line
  306; the thread starts at line 248), then ``vce.start_vce(...)`` (line 319);
- ``flwr/server/superlink/fleet/vce/vce_api.py``, ``start_vce``: ``_register_nodes(...)``
  (line 337) creates the nodes one by one in the LinkState, and only later does
  ``run_api`` (line 385) build the Ray backend.

A ServerApp that starts a strategy at once therefore finds fewer nodes than the
simulation will have, usually none. ``FedAvg.configure_train``
(``flwr/serverapp/strategy/fedavg.py``, lines 170-172) fixes the sample size from the nodes
online at that moment, ``max(int(len(grid.get_node_ids()) * fraction_train),
min_train_nodes)``, before ``sample_nodes`` (``flwr/serverapp/strategy/strategy_utils.py``,
lines 170-183) waits for ``min_available_nodes``; the wait never recomputes the size. With
``fraction_train=1.0`` and ``min_available_nodes=N``, round 1 trains ``min_train_nodes``
(default 2) of the N clients, chosen at random; the others first train in round 2.
``configure_evaluate`` (lines 283-285) has the same shape. Every strategy that counts the
nodes this way (FedProx, FedXgbCyclic, ... and any subclass) is affected; so is a stateful
ClientApp whose round-1 ``context.state`` a test expects to be filled.

This script counts it. Each run is one ``run_simulation`` with N SuperNodes and one round:
the ServerApp runs ``FedAvg(fraction_train=1.0, fraction_evaluate=1.0,
min_available_nodes=N)``; each ClientApp writes its ``context.state`` when it trains and
reports in evaluation whether that state is present. The ServerApp starts the strategy

- ``at-once``: at once (as Flower's examples do);
- ``sleep``: after sleeping ``--sleep`` seconds (a control);
- ``wait-all``: once ``grid.get_node_ids()`` lists all N nodes (a control; the fix);

each with one Ray actor and with two (``backend_config``'s ``client_resources`` and
``init_args`` ``num_cpus``). The table gives, per setting, the runs in which round 1
trained fewer than N clients, and the runs in which a client evaluated in round 1 had no
state of its own.

    python experiments/bench/flower_registration_race.py [--runs 20] [--clients 3] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from importlib import metadata

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

MODES = ("at-once", "sleep", "wait-all")
ACTORS = (1, 2)
TRAINED_KEY = "trained-in-round"  # what a client writes to its context.state when it trains


# -- the ClientApp: state written in training, its presence reported in evaluation ------------
client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    server_round = int(message.content["config"]["server-round"])
    context.state[TRAINED_KEY] = ConfigRecord({"round": server_round})
    metrics = MetricRecord({"num-examples": 1})
    return Message(RecordDict({"arrays": message.content["arrays"], "metrics": metrics}), reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    metrics = MetricRecord({"state-present": int(TRAINED_KEY in context.state), "num-examples": 1})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


# -- the ServerApp: FedAvg, counting what it saw ------------------------------------------------
class CountingFedAvg(FedAvg):
    """FedAvg that records the nodes online when round 1 was configured, the clients that
    trained, and how many evaluated clients had state of their own."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.counts: dict[str, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.counts["online-at-configure"] = len(list(grid.get_node_ids()))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.counts["trained"] = sum(not reply.has_error() for reply in replies)
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = [reply for reply in replies if not reply.has_error()]
        self.counts["evaluated"] = len(replies)
        self.counts["with-state"] = sum(int(reply.content["metrics"]["state-present"]) for reply in replies)
        return super().aggregate_evaluate(server_round, replies)


def server_app_for(mode: str, num_clients: int, sleep_s: float, found: dict[str, int]) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if mode == "sleep":
            time.sleep(sleep_s)
        elif mode == "wait-all":
            while len(list(grid.get_node_ids())) < num_clients:
                time.sleep(0.01)
        strategy = CountingFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=num_clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=1, timeout=300)
        found.update(strategy.counts)

    return server_app


def one_run(mode: str, actors: int, num_clients: int, sleep_s: float) -> dict[str, int]:
    found: dict[str, int] = {}
    backend_config = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": actors}}
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(
            server_app_for(mode, num_clients, sleep_s, found), client_app, num_clients, backend_config=backend_config
        )
    finally:  # Flower's Ray backend sets PYTHONPATH to this process's sys.path
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    logging.getLogger("flwr").setLevel(logging.WARNING)  # run_simulation resets Flower's console log
    return found


def summarise(runs: list[dict[str, int]], num_clients: int) -> dict[str, float]:
    return {
        "runs": len(runs),
        "round 1 trained < N": sum(run.get("trained", 0) < num_clients for run in runs),
        "mean trained": sum(run.get("trained", 0) for run in runs) / max(len(runs), 1),
        "a client without state": sum(run.get("with-state", 0) < run.get("evaluated", 0) for run in runs),
        "mean online at configure": sum(run.get("online-at-configure", 0) for run in runs) / max(len(runs), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per setting (default 20)")
    parser.add_argument("--clients", type=int, default=3, help="SuperNodes, and min_available_nodes (default 3)")
    parser.add_argument("--sleep", type=float, default=1.0, help="the sleep control's wait in seconds (default 1)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--actors", nargs="+", type=int, default=list(ACTORS), help="Ray actors (default 1 2)")
    parser.add_argument("--quick", action="store_true", help="3 runs per setting")
    parser.add_argument("--json", metavar="PATH", help="write every run's counts and the table as JSON")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning
    logging.getLogger("flwr").setLevel(logging.WARNING)

    settings = [(actors, mode) for actors in args.actors for mode in args.modes]
    found: dict[str, list[dict[str, int]]] = {}
    for actors, mode in settings:
        name = f"{actors} actor{'s' if actors > 1 else ''}, {mode}"
        found[name] = []
        for index in range(runs):
            counts = one_run(mode, actors, args.clients, args.sleep)
            found[name].append(counts)
            print(f"{name}, run {index + 1}/{runs}: {counts}", file=sys.stderr, flush=True)

    table = {name: summarise(counts, args.clients) for name, counts in found.items()}
    flwr_version, ray_version = metadata.version("flwr"), metadata.version("ray")
    print(f"flwr {flwr_version}, ray {ray_version}; N = {args.clients} SuperNodes, {runs} runs per setting")
    columns = list(next(iter(table.values())))
    print(f"{'setting':<20}" + "".join(f"  {column}" for column in columns))
    for name, row in table.items():
        print(f"{name:<20}" + "".join(f"  {row[column]:>{len(column)}.3g}" for column in columns))
    if args.json:
        report = {"flwr": flwr_version, "ray": ray_version, "clients": args.clients, "runs": runs}
        with open(args.json, "w") as out:
            json.dump({**report, "table": table, "counts": found}, out, indent=2)
            out.write("\n")


if __name__ == "__main__":
    main()
