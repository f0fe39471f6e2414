"""The results of four runs as SHA-256 digests of their metrics.csv, to show that a change to
fedsim's structure changed no result: run it before and after, on the same machine (float
sums, and so the last bits, depend on the CPU's kernels), and compare.

- ``quickstart``: ``experiments/quickstart.toml`` as it is (FedAvg, 20 rounds);
- ``fedbn``: ``experiments/feature-skew/cross-silo.toml`` with FedBN, 4 rounds;
- ``feddaa``: ``experiments/drift/feddaa-mnist5k.toml`` with FedDAA, 3 slots of 2 rounds;
- ``mirage-flame``: ``experiments/attacks/mirage-3.toml`` under FLAME, 10 rounds (two of
  them in the attack window).

    python experiments/bench/identity.py [--quick] [--json PATH] [--check PATH]

``--check PATH`` compares with digests an earlier run wrote with ``--json`` and exits 1 on
a difference. ``--quick`` leaves out the quickstart (the longest).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = {
    "quickstart": ("experiments/quickstart.toml", []),
    "fedbn": ("experiments/feature-skew/cross-silo.toml", ["strategy.name=fedbn", "rounds=4", "evaluate_every=1"]),
    "feddaa": (
        "experiments/drift/feddaa-mnist5k.toml",
        ["strategy.name=feddaa", "partition.num_slots=3", "partition.rounds_per_slot=2", "rounds=6"],
    ),
    "mirage-flame": ("experiments/attacks/mirage-3.toml", ["strategy.defence=flame", "rounds=10"]),
}


def digest(config: str, overrides: list[str], folder: Path) -> str:
    sets = [part for override in overrides for part in ("--set", override)]
    command = [sys.executable, "-m", "fedsim", "run", str(ROOT / config), *sets, "--out", str(folder), "--quiet"]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return hashlib.sha256((folder / "metrics.csv").read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave out the quickstart")
    parser.add_argument("--json", metavar="PATH", help="write the digests as JSON")
    parser.add_argument("--check", metavar="PATH", help="compare with digests written earlier; exit 1 on a difference")
    args = parser.parse_args()
    names = [name for name in RUNS if not (args.quick and name == "quickstart")]
    digests = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            digests[name] = digest(*RUNS[name], Path(folder) / name)
            print(f"{name:>13}: {digests[name]}")
    if args.json:
        Path(args.json).write_text(json.dumps(digests, indent=2) + "\n")
    if args.check:
        expected = json.loads(Path(args.check).read_text())
        differ = [name for name in digests if name in expected and expected[name] != digests[name]]
        for name in differ:
            print(f"{name}: differs from {args.check}", file=sys.stderr)
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
