"""``fedsim sweep``: run an experiment over a grid of values and seeds, in parallel."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from fedsim.commands.run import add_override_arguments, default_config

EPILOG_SWEEP = """\
examples:
  fedsim sweep experiments/quickstart.toml --grid 'strategy={name="fedavg"},{name="fedprox",proximal_mu=0.01}' --seeds 0,1,2
  fedsim sweep exp.toml --grid partition.alpha=0.1,0.5,1.0 --grid client.lr=0.01,0.05 --seeds 0,1
  fedsim sweep exp.toml --grid 'model.hidden=[64],[128,64]' --set rounds=50 --workers 4
  fedsim sweep exp.toml --grid strategy.name=fedavg,fedbn   # a model with BatchNorm
  fedsim sweep exp.toml --seeds 0,1,2 --address auto   # Ray tasks on a running Ray cluster
  fedsim report runs/exp-sweep                                        # then: the table and plots

Grid values are TOML values, as with --set; commas inside [...], {...} or quotes do not
split, so a list value is written as a TOML list (quote it for the shell). A value of a
whole table, as in the strategy example, sets several keys of that table together and
keeps its other keys. The grid can also live in the experiment file, which `fedsim run`
ignores; --grid adds keys, or replaces every file key it overlaps (the same key, or one
inside the other: --grid strategy.name=a,b replaces a file's grid of whole strategy
tables), --set fixes a key it would vary (the grid then leaves that key alone), --seeds
replaces its seeds:

  [sweep]
  seeds = [0, 1, 2]
  grid = { "client.lr" = [0.01, 0.05], "partition.alpha" = [0.1, 0.5] }

Every run is validated before any starts. Each goes to OUT/<its grid values>-s<seed>, e.g.
OUT/lr0.05-alpha0.1-s2, and OUT/sweep.json lists every run and its status. Running the
same command again skips finished runs and resumes interrupted ones (after a crash or
Ctrl-C). Ctrl-C or SIGTERM stops every worker within seconds, each run at its last
checkpoint, and exits with code 130 (a second Ctrl-C kills the workers at once). A
failing run does not stop the others: failures are listed at the end (the traceback is
in the run's error.txt) and the exit code is 1.

The process backend (the default) starts fastest on one machine; Ray (--backend ray, or
--address) takes several seconds more to start but spreads a big grid over a Ray cluster (the
sweep folder must then be on storage every machine shares). Runs with engine.name = "ray" need --backend process.
"""


def execute(args: argparse.Namespace) -> int:
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.sweep import SweepInterrupted, make_spec, plan_sweep, run_sweep

    spec = make_spec(args.config or default_config(), args.grid, args.seeds, args.set)
    if args.dry_run:
        out, runs, statuses = plan_sweep(spec, args.out, args.overwrite)
        width = max(len(run.name) for run in runs)
        for run in runs:
            print(f"{run.name:<{width}}  {'finished' if statuses[run.name] == 'skipped' else 'to run'}")
        print(f"{len(runs)} runs -> {out}", file=sys.stderr)
        return 0
    started = time.monotonic()
    try:
        result = run_sweep(
            spec,
            args.out,
            workers=args.workers,
            backend=args.backend or ("ray" if args.address else "process"),
            address=args.address,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except SweepInterrupted as stopped:
        print(interrupted_line(stopped), file=sys.stderr)
        return 130
    failures = result.failures
    if not args.quiet:
        counts = ", ".join(f"{result.count(status)} {status}" for status in ("done", "resumed", "skipped", "failed"))
        print(f"sweep: {len(result.outcomes)} runs ({counts}) in {time.monotonic() - started:.1f} s -> {result.path}")
    if failures:
        print(
            f"{len(failures)} of {len(result.outcomes)} runs failed (tracebacks in their error.txt):", file=sys.stderr
        )
        for outcome in failures:
            print(f"  {outcome.name}: {outcome.error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"next: fedsim report {result.path}")
    return 0


def interrupted_line(stopped) -> str:
    """One line: what the signal stopped, and that the same command resumes it."""
    result = stopped.result
    how = "interrupted" if stopped.signum == signal.SIGINT else f"stopped by {signal.Signals(stopped.signum).name}"
    parts = [
        f"{result.count(status)} {label}"
        for status, label in (("interrupted", "stopped mid-run"), ("pending", "not started"))
        if result.count(status)
    ]
    finished = sum(result.count(status) for status in ("done", "resumed", "skipped"))
    parts.append(f"{finished} of {len(result.outcomes)} finished")
    return f"{how}: {', '.join(parts)}; run the same command again to resume -> {result.path}"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sweep",
        help="run an experiment over a grid of values and seeds, in parallel",
        description="Run the Cartesian product of grid values x seeds of an experiment, each run in its own "
        "run directory, in parallel worker processes or on Ray.",
        epilog=EPILOG_SWEEP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="experiment file (default: experiments/quickstart.toml)")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="SECTION.KEY=V1,V2",
        help="values to vary, e.g. --grid partition.alpha=0.1,0.5 (repeatable: the runs are every combination)",
    )
    parser.add_argument("--seeds", metavar="S1,S2", help="seeds, e.g. 0,1,2 (default: the experiment's seed)")
    add_override_arguments(parser)
    parser.add_argument("--out", help="sweep folder (default: runs/<name>-sweep)")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="runs at a time (default: one per CPU core, of the Ray cluster with ray)",
    )
    parser.add_argument(
        "--backend",
        choices=["process", "ray"],
        help="process: worker processes on this machine (the default; starts fastest); "
        "ray: Ray tasks, on a local Ray or a cluster (the default with --address)",
    )
    parser.add_argument(
        "--address", help="the Ray cluster to join (implies --backend ray), e.g. auto or ray://head:10001"
    )
    parser.add_argument("--overwrite", action="store_true", help="run every run again from scratch, finished or not")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the grid and list the runs and whether each has finished; run nothing",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar and no summary line (failures still listed)"
    )
    parser.set_defaults(handler=execute)
