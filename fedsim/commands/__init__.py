"""The subcommands of ``fedsim``. Each module has ``register(subparsers)``, which adds its
parser and sets ``handler`` to a function of the parsed arguments returning an exit code."""

from fedsim.commands import data, listing, partition, report, run, sweep

COMMANDS = [run, sweep, report, partition, data, listing]
