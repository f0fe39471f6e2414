"""``fedsim run``: run one experiment file."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from fedsim.errors import UserError

QUICKSTART = Path("experiments") / "quickstart.toml"

EPILOG_RUN = """\
examples:
  fedsim run                                   # experiments/quickstart.toml
  fedsim run experiments/quickstart.toml --set partition.alpha=0.1 --set seed=3
  fedsim run my.toml --set engine.name=ray --set engine.num_gpus=0.25 --out runs/ray-test

Without --out the run goes to runs/<name>-<hash of the resolved experiment>. Running the
same experiment again resumes it from its last checkpoint if it was interrupted (Ctrl-C,
SIGTERM, a crash or SIGKILL), or reports it if it finished; `fedsim run --resume RUN_DIR`
does the same from the run directory alone. One command at a time works on a run directory.
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
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.build import load_experiment
    from fedsim.runner import run_experiment

    if args.out is not None and not args.out.strip():
        raise UserError("--out '' names no folder; give a folder for the run, or leave --out out")
    if args.resume:
        experiment, args.out = resumed_experiment(args)
    else:
        experiment = load_experiment(args.config or default_config(), args.set)
    try:
        result = run_experiment(
            experiment, args.out, overwrite=args.overwrite, progress=not args.quiet, verbose=args.verbose
        )
    except Exception as error:
        raise_strategy_failure(experiment, error, verbose=args.verbose)
        raise
    if not args.quiet:
        print(result_line(experiment.name, result, overwrite="--overwrite"))
    return 0


def result_line(name: str, result, overwrite: str) -> str:
    """What a finished run prints: its final figures, its folder and whether it was resumed
    or had finished before (``overwrite`` says how to run it again)."""
    s = result.summary
    note = {"finished": f" (already finished; {overwrite} to run again)", "resume": " (resumed)"}.get(result.status, "")
    return (
        f"{name}: accuracy {format_metric(s['accuracy'])}  loss {format_metric(s['loss'])}  "
        f"rounds {s['rounds_completed']}  wall {s['wall_time_s']:.1f} s  -> {result.path}{note}"
    )


def resumed_experiment(args: argparse.Namespace):
    """``--resume RUN_DIR``: the experiment in the run directory's config.toml, run there."""
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.build import load_experiment

    if args.config or args.set or args.out or args.overwrite:
        raise UserError(
            "--resume takes its experiment from the run directory; give it alone "
            "(no CONFIG, --set, --out or --overwrite)"
        )
    folder = Path(args.resume)
    if not (folder / "config.toml").is_file():
        raise UserError(f"--resume {str(folder)!r}: no fedsim run in {str(folder)!r} (it has no config.toml)")
    return load_experiment(folder / "config.toml"), folder


def raise_strategy_failure(experiment, error: BaseException, *, verbose: bool = False) -> None:
    """Raise a one-line UserError if ``error`` came from the user's own strategy code (a
    ``module:Class`` strategy whose ``configure_train`` raised, say); return otherwise.
    With ``verbose``, the traceback is printed first."""
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.build import strategy_failure

    failure = strategy_failure(experiment, error)
    if failure is None:
        return
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    raise failure from None


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
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint (alone)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no result line")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
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


def make_folder(path: Path, option: str) -> None:
    """Create an output folder, or say in one line why it cannot be (a file in the way, a
    read-only or virtual file system such as /proc, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fedsim-write-test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        blocker = next((parent for parent in [path, *path.parents] if parent.is_file()), None)
        reason = f"{str(blocker)!r} is a file, not a folder" if blocker else (error.strerror or str(error))
        raise UserError(f"{option} {str(path)!r} cannot be written: {reason}; choose another {option}") from None
