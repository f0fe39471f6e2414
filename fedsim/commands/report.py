"""``fedsim report``: compare runs, mean ± std over seeds, as a table and plots."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fedsim.commands.run import make_folder
from fedsim.errors import UserError

EPILOG_REPORT = """\
examples:
  fedsim report runs/quickstart-sweep                       # a sweep folder: every run inside
  fedsim report runs/quickstart-sweep --target 0.8          # + rounds to reach 80% accuracy
  fedsim report runs/a-sweep runs/b-sweep --out reports/ab --format latex
  fedsim report runs/alpha-sweep --by strategy.name         # pool the other keys' runs

A DIR is a run directory or any folder above run directories (a sweep folder, runs/).
Unfinished runs are left out and listed. Runs are grouped by the experiment keys that
differ between them, the seed aside (--by chooses them). Each group gets the number of
runs and the mean ± sample std of every number in summary.json (accuracy, loss,
client_accuracy_mean, per-domain and per-attacker entries where present); --target adds
the first round at which the global test metric reached the target (mean over the runs
that reached it, and how many did). The table is printed in --format and written to
report.md and report.csv (report.tex for latex) in --out, with report_accuracy.png
(metric against round, mean and std band per group) and report_final.png (final metric,
bars with std error bars).
"""


def execute(args: argparse.Namespace) -> int:
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.report import make_report

    if args.out is None and len(args.dirs) > 1:
        raise UserError("several DIRs given: choose where the report goes with --out")
    if args.target is not None and not math.isfinite(args.target):
        raise UserError(f"--target {args.target} is not a finite number; give the value to reach, e.g. --target 0.8")
    if args.out is not None and not args.out.strip():
        raise UserError("--out '' names no folder; give a folder for the report")
    if args.out is not None:
        make_folder(Path(args.out), "--out")
    elif Path(args.dirs[0]).is_dir():  # a missing DIR is reported as such by make_report
        try:
            make_folder(Path(args.dirs[0]), "DIR")
        except UserError:
            raise UserError(
                f"the report goes into {args.dirs[0]!r}, which cannot be written; choose a folder with --out"
            ) from None
    report = make_report(
        args.dirs,
        args.out or args.dirs[0],
        by=args.by,
        metric=args.metric,
        target=args.target,
        fmt=args.format,
    )
    print(report.text, end="")
    if report.unfinished:
        names = ", ".join(str(path) for path in report.unfinished[:5])
        more = f" and {len(report.unfinished) - 5} more" if len(report.unfinished) > 5 else ""
        print(f"left out {len(report.unfinished)} unfinished runs: {names}{more}", file=sys.stderr)
    print(f"wrote {', '.join(str(path) for path in report.files)}", file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report",
        help="compare runs: mean ± std over seeds, rounds to a target, plots",
        description="Group finished runs by the keys that differ between them and report mean ± std over "
        "seeds of their final metrics, as a table (md, csv, latex) and comparison plots.",
        epilog=EPILOG_REPORT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="sweep folders, run directories, or folders of them")
    parser.add_argument(
        "--by",
        nargs="+",
        action="extend",
        metavar="KEY",
        help="group by these experiment keys, e.g. --by strategy.name partition.alpha, after the DIRs "
        "(default: the keys that differ between the runs)",
    )
    parser.add_argument(
        "--metric", default="accuracy", help="the metric of the plots and of --target (default: accuracy)"
    )
    parser.add_argument(
        "--target",
        type=float,
        metavar="VALUE",
        help="add the first round the global metric reaches VALUE, e.g. 0.8 (a loss reaches it from above)",
    )
    parser.add_argument("--format", choices=["md", "csv", "latex"], default="md", help="printed table (default: md)")
    parser.add_argument("--out", help="folder for report.* and the plots (default: the DIR, when only one is given)")
    parser.set_defaults(handler=execute)
