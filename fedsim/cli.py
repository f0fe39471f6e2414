"""The ``fedsim`` command line: one module per command in :mod:`fedsim.commands`.

Every mistake in the input is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence

from fedsim import __version__
from fedsim.commands import COMMANDS
from fedsim.errors import ClientFailure, UserError
from fedsim.flower_log import quiet_flower


class _Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line like every other fedsim error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedsim",
        description="Federated-learning simulations of label and feature skew, on Flower.",
    )
    parser.add_argument("--version", action="version", version=f"fedsim {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.register(commands)
    return parser


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; SIGTERM stops it as Ctrl-C does (files being written are cleaned up,
    a run stays resumable, exit code 130)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        return _main(argv)
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        names = next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        print(f"error: fedsim: choose a command: {', '.join(names)} (see fedsim --help)", file=sys.stderr)
        return 2
    quiet_flower(getattr(args, "verbose", False))  # before an experiment builds its strategy
    try:
        return args.handler(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ClientFailure as error:
        if getattr(args, "verbose", False):
            print(error.details, file=sys.stderr)
            print(f"error: {error}", file=sys.stderr)
        else:
            hint = " (run again with --verbose for the client's traceback)" if hasattr(args, "verbose") else ""
            print(f"error: {error}{hint}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`fedsim list | head`): stop quietly, as a Unix tool does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        resumable = args.command in ("run", "sweep")
        hint = ": run the same command again to resume from the last checkpoint" if resumable else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
