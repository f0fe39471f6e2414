"""fedsim as a Flower App: ``flwr run .`` runs an experiment on Flower's own runtime.

``pyproject.toml`` names this module's ``server_app`` and ``client_app`` in
``[tool.flwr.app.components]``. Flower packs the repository into a FAB, installs it under
``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>/`` (the *app directory*), imports both
apps from there into its simulation process, runs the ServerApp there and ships the
ClientApp to Ray actors. The run config (``[tool.flwr.app.config]``, overridden with
``--run-config``) says which experiment to run:

- ``config``: the experiment file, relative to the app directory;
- ``out``: the run directory ("" = ``<app dir>/runs/flwr/<name>-<fingerprint>``; a relative
  path is taken relative to the app directory);
- ``set``: more ``--set`` overrides, separated by spaces, for keys the run config lacks;
- ``overwrite``: start the run over;
- every other key is a fedsim ``--set`` override (``partition.alpha=0.1``); "" leaves the
  file's value.

The ServerApp and every ClientApp rebuild the same experiment from the run config and the
same app directory, so they agree on the (absolute) run directory wherever Flower starts them.
"""

from __future__ import annotations

import functools
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsim.build import load_experiment, make_engine
from fedsim.clientapp import make_client_app
from fedsim.config import Experiment
from fedsim.environment import RunEnvironment
from fedsim.errors import UserError
from fedsim.results import RunDirectory

APP_DIR = Path(__file__).resolve().parents[1]
"""The Flower App's directory as the importing process sees it: the FAB's install folder in
Flower's simulation process, the repository in a checkout. A Ray actor may import this
module from elsewhere, so the ClientApp carries the simulation process's value
(:class:`EnvironmentFinder`)."""

DEFAULT_CONFIG = "experiments/quickstart.toml"
ENGINE = "flower"  # what the run directory's config.toml and summary.json record
SOURCE = "run config"
# run-config keys that are not experiment keys
CONTROL_KEYS = ("config", "out", "set", "overwrite")
NODE_SETTLE_S = 0.5  # the node list must stay this long unchanged before it is counted
NODE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class FlowerRun:
    """What a run config asks for."""

    experiment: Experiment
    out: Path  # absolute
    overwrite: bool = False


def run_config_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """The run config's experiment keys as fedsim ``--set`` overrides, in order: the keys
    (those set to "" left out), then the words of ``set``."""
    overrides = []
    for key, value in run_config.items():
        if key in CONTROL_KEYS or value == "":
            continue
        # A string is what one would type after `--set key=`; other values in TOML.
        text = value if isinstance(value, str) else tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
        overrides.append(f"{key}={text}")
    extra = run_config.get("set", "")
    if not isinstance(extra, str):
        raise UserError(f"{SOURCE}: set = {extra!r} must be a string of key=value overrides separated by spaces")
    try:
        overrides += shlex.split(extra)
    except ValueError as error:
        raise UserError(f"{SOURCE}: set = {extra!r} cannot be split into overrides: {error}") from None
    return overrides


def read_run_config(run_config: Mapping[str, Any], app_dir: Path = APP_DIR) -> FlowerRun:
    """The experiment, run directory and overwrite flag a run config asks for.

    The overrides go through :func:`fedsim.config.load_experiment`, as ``--set`` does, so a
    bad key or value is the same one-line :class:`~fedsim.errors.UserError`.
    """
    app_dir = Path(app_dir).resolve()
    config = run_config.get("config", DEFAULT_CONFIG) or DEFAULT_CONFIG
    out = run_config.get("out", "")
    overwrite = run_config.get("overwrite", False)
    for key, value, kind in (("config", config, str), ("out", out, str), ("overwrite", overwrite, bool)):
        if not isinstance(value, kind):
            raise UserError(f"{SOURCE}: {key} = {value!r} must be a {kind.__name__}")
    overrides = run_config_overrides(run_config)
    engines = [text for text in overrides if text.split("=", 1)[0].strip() == "engine.name"]
    if engines:
        raise UserError(
            f"{SOURCE}: {engines[-1]!r}: under `flwr run` the engine is Flower's runtime; "
            "remove engine.name (size the federation with --federation-config)"
        )
    path = app_dir / Path(config).expanduser()
    if not path.is_file():
        raise UserError(
            f"{SOURCE}: config = {config!r}: no experiment file {str(path)!r} "
            "(a relative path is taken from the app's directory)"
        )
    try:
        experiment = load_experiment(path, [*overrides, f'engine.name="{ENGINE}"'])
    except UserError as error:  # name the file as the run config does, as `fedsim run` would
        raise UserError(str(error).replace(str(path), config, 1)) from None
    if out:
        run_dir = app_dir / Path(out).expanduser()
    else:
        run_dir = app_dir / "runs" / "flwr" / f"{experiment.name}-{experiment.fingerprint()}"
    return FlowerRun(experiment, run_dir.resolve(), overwrite)


def environment(flower_run: FlowerRun) -> RunEnvironment:
    """The run's environment, with the device and thread count of fedsim's ``flower``
    engine (one torch thread per client unless ``engine.num_cpus`` says otherwise)."""
    engine = make_engine(flower_run.experiment)
    return RunEnvironment(flower_run.experiment, flower_run.out, engine.device, engine.client_threads)


class EnvironmentFinder:
    """The ClientApp's ``Context -> RunEnvironment``: built once per process, app
    directory and run config, then cached.

    It carries the app directory as data. Flower's Ray backend ships the ClientApp that
    the simulation process imported from the FAB to its actors with every message, but
    an actor imports fedsim's modules from wherever its own ``sys.path`` finds them first
    (Ray puts the driver's working directory there), so the actor's ``APP_DIR`` can
    differ from the ServerApp's; this object's ``app_dir`` cannot.
    """

    def __init__(self, app_dir: Path = APP_DIR) -> None:
        self.app_dir = str(app_dir)

    def __call__(self, context: Context) -> RunEnvironment:
        return _environment_for(self.app_dir, tuple(sorted(context.run_config.items())))


@functools.lru_cache(maxsize=4)
def _environment_for(app_dir: str, run_config: tuple[tuple[str, Any], ...]) -> RunEnvironment:
    return environment(read_run_config(dict(run_config), Path(app_dir)))


def count_nodes(grid: Grid, timeout_s: float = NODE_TIMEOUT_S) -> int:
    """The number of SuperNodes, once the list has stopped growing.

    Flower's simulation registers all of its SuperNodes at once, just after it starts
    the ServerApp; waiting for the count to settle covers that race.
    """
    deadline = time.monotonic() + timeout_s
    count, since = 0, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        elif count and time.monotonic() - since >= NODE_SETTLE_S:
            return count
        time.sleep(0.05)
    return count


def check_federation_size(num_nodes: int, num_clients: int) -> None:
    if num_nodes != num_clients:
        raise UserError(
            f"the federation has {num_nodes} SuperNodes but the experiment has {num_clients} clients; "
            f'run with --federation-config "num-supernodes={num_clients}", '
            f"or set partition.num_clients={num_nodes}"
        )


def _say(message: str, *args: Any) -> None:
    log(INFO, "fedsim: " + message, *args)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Prepare the run directory, run the federation on Flower's grid, write the summary."""
    try:
        _main(grid, context)
    except UserError as error:
        log(ERROR, "fedsim: error: %s", error)  # the one line to read in the run's log
        raise


def _main(grid: Grid, context: Context) -> None:
    # lazy: Flower imports this module in every client process too, which need none of it
    from fedsim.runner import finish_run, new_federation, open_run

    flower_run = read_run_config(context.run_config, APP_DIR)
    experiment = flower_run.experiment
    if RunDirectory(flower_run.out).status(experiment, flower_run.overwrite) == "finished":
        _say("%s has already finished (overwrite=true runs it again)", flower_run.out)
        return
    num_nodes = count_nodes(grid)
    expected = experiment.partition.params.get("num_clients")
    if isinstance(expected, int):  # known before the split: fail before writing anything
        check_federation_size(num_nodes, expected)
    with open_run(experiment, flower_run.out, overwrite=flower_run.overwrite) as prepared:
        check_federation_size(num_nodes, prepared.partition.num_clients)
        _say("%s run of %s in %s", prepared.status, experiment.name, prepared.run.path)

        def on_round(server_round: int, metrics: dict[str, float], **_) -> None:
            accuracy = metrics.get("accuracy")
            shown = f"{accuracy:.4f}" if accuracy is not None else "-"
            _say("round %d/%d, accuracy %s", server_round, experiment.rounds, shown)

        env = environment(flower_run)
        federation = new_federation(env, prepared, on_round)
        federation(grid, context)
        result = finish_run(experiment, prepared, federation)
    _say("finished: accuracy %s, summary in %s", result.summary.get("accuracy"), result.path / "summary.json")


client_app = make_client_app(EnvironmentFinder(APP_DIR))
