"""The attack studies' tables, from the summary.json of the sweeps' runs.

Each row is one setting (a sweep folder, or a defence within it), mean ± std over its
seeds: the clean accuracy at the end, the mean over attackers of each one's ASR at the last
round of its window, the lowest attacker's and the gap (max - min) at that round, the mean
ASR at the end (after the window: how long the backdoors persist), and a filtering
defence's true- and false-positive rates (rejected attacker replies in their windows over
all of them; the same for benign replies).

    python experiments/attacks/tables.py runs/badnets-3-sweep runs/mirage-3-sweep ... [--json PATH]

A folder whose runs vary the defence gives one row per defence; the others one row each.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

SEED = re.compile(r"(?:^|-)s(\d+)$")
DEFENCE = re.compile(r"defence(.+?)(?:-defence_options.*)?-s\d+$")


def mean_std(values: list[float], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def figures(summary: dict) -> dict[str, float | None]:
    at_end = list((summary.get("asr_at_window_end") or {}).values())
    detection = summary.get("detection") or {}
    return {
        "clean": summary.get("clean_accuracy"),
        "asr_window_end": statistics.mean(at_end) if at_end else None,
        "lowest": min(at_end) if at_end else None,
        "gap": max(at_end) - min(at_end) if at_end else None,
        "asr_after": summary.get("asr_mean"),
        "tpr": detection.get("tpr"),
        "fpr": detection.get("fpr"),
    }


def rows_of(folder: Path) -> dict[str, list[dict]]:
    """The runs of one sweep folder, grouped by defence (or by the folder when all share one)."""
    groups: dict[str, list[dict]] = {}
    for run in sorted(folder.iterdir()):
        summary_path = run / "summary.json"
        if not run.is_dir() or not summary_path.exists() or not SEED.search(run.name):
            continue
        if run.name.startswith("control-"):  # trigger_control.py's runs without attackers
            continue
        found = DEFENCE.search(run.name)
        key = found.group(1) if found else folder.name.removesuffix("-sweep")
        groups.setdefault(key, []).append(figures(json.loads(summary_path.read_text())))
    return groups


def table(folders: list[Path]) -> tuple[str, dict]:
    lines = [
        "| setting | n | clean accuracy | mean ASR at window end | lowest attacker | gap (max - min) "
        "| mean ASR at the end | TPR / FPR |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    out = {}
    for folder in folders:
        for key, runs in rows_of(folder).items():
            name = key if len(rows_of(folder)) == 1 else f"{folder.name.removesuffix('-sweep')}: {key}"
            column = {field: [run[field] for run in runs] for field in runs[0]}
            out[name] = {field: values for field, values in column.items()}
            rates = (
                f"{mean_std(column['tpr'], 2)} / {mean_std(column['fpr'], 2)}"
                if any(v is not None for v in column["tpr"])
                else "-"
            )
            lines.append(
                f"| {name} | {len(runs)} | {mean_std(column['clean'], 3)} | {mean_std(column['asr_window_end'], 2)} "
                f"| {mean_std(column['lowest'], 2)} | {mean_std(column['gap'], 2)} | {mean_std(column['asr_after'], 2)} "
                f"| {rates} |"
            )
    return "\n".join(lines), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="sweep folders (runs/<name>-sweep)")
    parser.add_argument("--json", metavar="PATH", help="write every run's figures as JSON")
    args = parser.parse_args()
    text, figures_by_row = table(args.folders)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(figures_by_row, indent=2) + "\n")


if __name__ == "__main__":
    main()
