"""``fedsim partition``: compute an experiment's partition and measure its skew, without training."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsim.commands.run import QUICKSTART, add_override_arguments, default_config, make_folder
from fedsim.errors import UserError

MAX_CLIENT_ROWS = 30  # beyond this the table shows the spread across clients instead

EPILOG_PARTITION = """\
examples:
  fedsim partition                                   # experiments/quickstart.toml
  fedsim partition experiments/quickstart.toml --set partition.alpha=0.1
  fedsim partition experiments/quickstart.toml --set partition.name=embedding --out /tmp/emb
  fedsim partition experiments/drift/feddaa-mnist5k.toml   # a drift stream, drawn slot by slot

Without --out the files go to runs/<name>-<hash of the resolved experiment>-partition:
  partition.npz                 the clients' index arrays, or a drift stream's views (partitioners.Partition.load),
                                or for a lazy population ([dataset] lazy = true) only its number of clients
  skew.json                     per-client and summary skew measures (of 1,000 sampled clients of a larger
                                lazy population: see its sample section)
  plots/partition_labels.png    clients x classes heatmap
  plots/partition_clusters.png  clients x clusters, for embedding splits
  plots/partition_domains.png   clients x domains, for datasets with domains
  plots/stream_concepts.png     clients x slots: each view's main concept, for drift streams
  plots/stream_events.png       clients x slots: the drift (real, virtual, label) into each slot
The partition is the one `fedsim run` trains on for the same experiment and seed.
"""


def default_out(experiment) -> Path:
    """``runs/<name>-<fingerprint>-partition``, beside the run folder of the same experiment."""
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.runner import default_out as run_folder

    folder = run_folder(experiment)
    return folder.with_name(f"{folder.name}-partition")


def execute(args: argparse.Namespace) -> int:
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.build import load_experiment
    from fedsim.environment import experiment_dataset
    from fedsim.splitting import describe_partition, split_dataset

    if args.out is not None and not args.out.strip():
        raise UserError("--out '' names no folder; give a folder for the partition, or leave --out out")
    experiment = load_experiment(args.config or default_config(), args.set)
    out = Path(args.out) if args.out else default_out(experiment)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a folder")
    if (out / "config.toml").exists():  # a run directory: its partition.npz is what it trains on
        raise UserError(f"--out {str(out)!r} is a run directory; write the partition to another folder")
    dataset = experiment_dataset(experiment)
    partition = split_dataset(experiment, dataset)

    make_folder(out, "--out")
    partition.save(out / "partition.npz")
    report = describe_partition(experiment, dataset, partition, out)
    print_report(experiment.name, report)
    print(f"-> {out}")
    return 0


def print_report(title: str, report) -> None:
    table = report.clients.set_index("client")
    if len(table) > MAX_CLIENT_ROWS:
        table = table.describe().loc[["mean", "std", "min", "50%", "max"]]
    print(f"{title}: skew per client")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    s = report.summary
    print(
        f"mean Hellinger {s['mean_hellinger']:.3f}  mean Jensen-Shannon {s['mean_jensen_shannon']:.3f}  "
        f"mean EMD {s['mean_emd']:.3f}  mean effective classes {s['mean_effective_classes']:.2f}  "
        f"Gini of sizes {s['gini_sizes']:.3f}  dealt {s['samples_dealt']} ({s['coverage']:.0%})"
    )


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "partition",
        help="compute an experiment's partition and its skew, without training",
        description="Split the experiment's dataset into its clients, measure how skewed the split is, "
        "and draw it, without training anything.",
        epilog=EPILOG_PARTITION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help=f"experiment file (default: {QUICKSTART})")
    add_override_arguments(parser)
    parser.add_argument("--out", help="output folder (default: runs/<name>-<hash>-partition)")
    parser.set_defaults(handler=execute)
