"""``fedsim run``: run one experiment file."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsim.errors import UserError

QUICKSTART = Path("experiments") / "quickstart.toml"

EPILOG_RUN = """\
examples:
  fedsim run                                   # experiments/quickstart.toml
  fedsim run experiments/quickstart.toml --set partition.alpha=0.1 --set seed=3
  fedsim run my.toml --set engine.name=ray --set engine.num_gpus=0.25 --out runs/ray-test

Without --out the run goes to runs/<name>-<hash of the resolved experiment>. Running the
same experiment again resumes it if it was interrupted, or reports it if it finished.
"""


def default_config() -> Path:
    """experiments/quickstart.toml in the current folder, else in the source checkout that
    fedsim runs from (an editable install)."""
    if QUICKSTART.is_file():
        return QUICKSTART  # relative, so that errors name it as the user would
    checkout = Path(__file__).resolve().parents[2] / QUICKSTART
    if checkout.is_file():
        return checkout
    raise UserError(f"no CONFIG given and {QUICKSTART} was not found here; pass the path of an experiment file")


def format_metric(value: float | None) -> str:
    """A summary figure for the result line; a run can end without one (NaN, no evaluation)."""
    return "-" if value is None else f"{value:.4f}"


def execute(args: argparse.Namespace) -> int:
    from fedsim.config import load_experiment
    from fedsim.run import run_experiment

    experiment = load_experiment(args.config or default_config(), args.set)
    result = run_experiment(
        experiment, args.out, overwrite=args.overwrite, progress=not args.quiet, verbose=args.verbose
    )
    if not args.quiet:
        s = result.summary
        note = {"finished": " (already finished; --overwrite to run again)", "resume": " (resumed)"}.get(
            result.status, ""
        )
        print(
            f"{experiment.name}: accuracy {format_metric(s['accuracy'])}  loss {format_metric(s['loss'])}  "
            f"rounds {s['rounds_completed']}  wall {s['wall_time_s']:.1f} s  -> {result.path}{note}"
        )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "run",
        help="run an experiment file",
        description="Run a federated experiment described by a TOML file.",
        epilog=EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help=f"experiment file (default: {QUICKSTART})")
    add_override_arguments(parser)
    parser.add_argument("--out", help="run directory (default: runs/<name>-<hash>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in the run directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no result line")
    parser.add_argument("--verbose", action="store_true", help="show Flower's own log")
    parser.set_defaults(handler=execute)


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set section.key=value``, shared by every command that reads an experiment."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a value, e.g. --set partition.alpha=0.1 (repeatable; values are read as TOML)",
    )
