"""Reports: many run directories -> mean ± std over seeds, rounds to a target, and plots.

``fedsim report runs/quickstart-sweep --target 0.8`` reads every finished run under the
folder (its config.toml, summary.json and metrics.csv), groups the runs by the experiment
keys that differ between them (the seed aside), and gives per group the number of runs
and the mean ± sample std of each final metric of summary.json: accuracy, loss,
client_accuracy_mean and any other number there, dicts such as ``accuracy_by_domain``
flattened to one column per key. With a target it adds the first round at which the
global test metric reached it (mean over the runs that did, and how many did).

report.md and report.tex show the spread of the clients' accuracy (fairness) and the
array bytes exchanged, where the runs have them, in tables of their own after the main
one (:data:`SECTIONS`); report.csv keeps every column in one table.

It writes report.md and report.csv (report.tex with ``--format latex``), and two plots:
report_accuracy.png (the global test metric against round, mean line and ± std band per
group; report_<metric>.png for another ``--metric``) and report_final.png (the final
metric per group, with std error bars).
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedsim import atomic
from fedsim.errors import UserError
from fedsim.registry import did_you_mean, first_line
from fedsim.results import CLIENT_HOLDOUT

FORMATS = ("md", "csv", "latex")
FIRST_METRICS = ["accuracy", "loss", "client_accuracy_mean"]
# summary.json fields that describe the run rather than measure its result
BOOKKEEPING = {"seed", "rounds_completed", "num_clients", "wall_time_s", "rounds_time_s"}
NOT_GROUP_KEYS = {"seed", "description"}  # seeds are what a group averages over


@dataclass(frozen=True)
class Section:
    """summary.json numbers shown in a table of their own: a title, each column's short
    header, a factor the values are shown multiplied by and how many digits they keep."""

    title: str
    headers: dict[str, str]
    scale: float = 1.0
    digits: int = 3


SPREAD = ("p10", "p50", "p90", "min", "std", "worst10_mean")  # fedsim.observers.fairness
SECTIONS = (
    Section(
        "Clients' held-out accuracy at the last evaluation: percentiles, min, std, mean of the worst 10%",
        {f"client_accuracy_{stat}": stat for stat in SPREAD},
    ),
    Section(
        "Clients' held-out accuracy at the round of the best mean over clients",
        {"client_accuracy_best_round": "round", **{f"client_accuracy_{stat}_best": stat for stat in ("mean", *SPREAD)}},
    ),
    Section(
        "Array bytes exchanged over the run, in MB (10^6 bytes)",
        {"bytes_down_total": "down", "bytes_up_total": "up"},
        scale=1e-6,
    ),
)
DIGITS = {"client_accuracy_best_round": 1}  # a round, not a fraction


@dataclass(frozen=True)
class RunTable:
    """The finished runs found under some folders, one row per run (indexed by its path)."""

    configs: pd.DataFrame  # the resolved experiments, flattened to section.key columns
    results: pd.DataFrame  # summary.json, flattened (accuracy_by_domain.x, ...)
    curves: pd.DataFrame  # run, round, metric, value: the run's headline metrics per round
    unfinished: list[Path]


def find_runs(folders: list[str | Path]) -> list[Path]:
    """Run directories (folders holding a config.toml) at or below each folder; the search
    does not descend into a run directory."""
    found: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise UserError(f"{str(folder)!r} is not a folder")
        for root, dirs, files in os.walk(folder):
            if "config.toml" in files:
                found.append(Path(root))
                dirs.clear()
            else:
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return list(dict.fromkeys(found))


def read_runs(folders: list[str | Path]) -> RunTable:
    paths = find_runs(folders)
    finished = [path for path in paths if (path / "summary.json").is_file()]
    if not finished:
        where = ", ".join(map(str, folders))
        raise UserError(f"no finished runs in {where} (a finished run directory holds summary.json)")
    index = pd.Index([str(path) for path in finished], name="run")
    configs = pd.json_normalize([_read_toml(path / "config.toml") for path in finished], sep=".")
    summaries = [_read_summary(path / "summary.json") for path in finished]
    return RunTable(
        configs=_hashable(configs).set_index(index),
        results=pd.json_normalize(summaries, sep=".").set_index(index),
        curves=pd.concat(
            [_read_curves(path, summary.get("accuracy_evaluated_on")) for path, summary in zip(finished, summaries)],
            ignore_index=True,
        ),
        unfinished=[path for path in paths if path not in finished],
    )


def _read_text(path: Path) -> str:
    """A run's file as UTF-8 text, or a one-line error that names it."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as error:
        raise UserError(f"{path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UserError(
            f"{path} is not UTF-8 text: corrupt, or not fedsim's; leave its run out of the report"
        ) from None


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML: {error}") from None


def _read_summary(path: Path) -> dict:
    """A finished run's summary.json: a JSON object, else a one-line error that names it."""
    try:
        summary = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): "
            "corrupt or cut short; run the experiment again with --overwrite, or leave its run out of the report"
        ) from None
    if not isinstance(summary, dict):
        raise UserError(f"{path} holds a JSON {type(summary).__name__}, not fedsim's summary (a JSON object)")
    return summary


def _hashable(configs: pd.DataFrame) -> pd.DataFrame:
    """List values (model.hidden = [128, 64]) as their JSON text, so they can group."""
    return configs.map(lambda value: json.dumps(value) if isinstance(value, (list, dict)) else value)


def _read_curves(path: Path, evaluated_on: str | None) -> pd.DataFrame:
    """The per-round series behind the run's headline ``accuracy``: the global model on the
    test split, or for a personalised run (FedBN) the clients' held-out accuracy."""
    metrics = path / "metrics.csv"
    columns = ["run", "round", "metric", "value"]
    if not metrics.is_file():
        return pd.DataFrame(columns=columns)
    try:
        rows = pd.read_csv(metrics, dtype={"id": str, "scope": str, "metric": str})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:  # EmptyDataError is a ValueError
        raise UserError(f"{metrics} cannot be read as CSV ({first_line(error)}): corrupt, or not fedsim's") from None
    missing = [column for column in ("round", "scope", "id", "metric", "value") if column not in rows.columns]
    if missing:
        raise UserError(f"{metrics} has no {', '.join(missing)} column: corrupt, or not fedsim's metrics.csv")
    scope, ident = ("federated", "evaluate") if evaluated_on == CLIENT_HOLDOUT else ("server", "global")
    rows = rows[(rows["scope"] == scope) & (rows["id"] == ident)].assign(run=str(path))
    for column in ("round", "value"):
        numbers = pd.to_numeric(rows[column], errors="coerce")
        bad = rows[column][numbers.isna() & rows[column].notna()]
        if len(bad):
            raise UserError(f"{metrics}: {column} {bad.iloc[0]!r} is not a number: corrupt, or not fedsim's")
        rows = rows.assign(**{column: numbers})
    return rows[columns]


# --- grouping and statistics --------------------------------------------------------


def group_keys(configs: pd.DataFrame, by: list[str] | None = None) -> list[str]:
    """``by``, else the fewest keys that tell the groups apart.

    Keys that differ between runs are taken greedily, names first (strategy.name before
    the strategy's own parameters), skipping any key the chosen ones already determine:
    a grid over strategy.name groups by it alone, not also by fedprox's proximal_mu.
    """
    if by:
        for key in by:
            if key not in configs.columns:
                varied = ", ".join(_varied(configs)) or "none"
                raise UserError(
                    f"--by {key!r} is not a key of these experiments{did_you_mean(key, configs.columns)} "
                    f"(keys that differ between the runs: {varied})"
                )
        return list(by)
    candidates = sorted(
        _varied(configs),
        key=lambda key: (bool(configs[key].isna().any()), key.rsplit(".", 1)[-1] != "name"),
    )
    chosen: list[str] = []
    for key in candidates:
        if not chosen or configs.groupby(chosen, dropna=False)[key].nunique(dropna=False).max() > 1:
            chosen.append(key)
    return chosen or ["name"]  # runs that differ only by seed: one group, named by the experiment


def _varied(configs: pd.DataFrame) -> list[str]:
    return [key for key in configs.columns if key not in NOT_GROUP_KEYS and configs[key].nunique(dropna=False) > 1]


def metric_columns(results: pd.DataFrame) -> list[str]:
    """The numeric result fields of summary.json: the usual three first, then the rest."""
    numeric = []
    for column in results.columns:
        if column in BOOKKEEPING or column.startswith("versions."):
            continue
        values = results[column]
        as_numbers = pd.to_numeric(values, errors="coerce")
        if not pd.api.types.is_bool_dtype(values) and 0 < as_numbers.notna().sum() == values.notna().sum():
            numeric.append(column)
    return [m for m in FIRST_METRICS if m in numeric] + [m for m in numeric if m not in FIRST_METRICS]


def reaches(metric: str, values: pd.Series, target: float) -> pd.Series:
    """Losses reach a target from above, everything else (accuracies) from below."""
    return values <= target if "loss" in metric else values >= target


def rounds_to_target(curves: pd.DataFrame, metric: str, target: float) -> pd.Series:
    """Per run, the first round whose global ``metric`` reached ``target`` (NaN if never)."""
    rows = curves[curves["metric"] == metric]
    if rows.empty:
        raise UserError(f"--target: metrics.csv has no per-round global {metric!r} (try --metric accuracy)")
    hits = rows[reaches(metric, rows["value"], target)]
    first = hits.groupby("run")["round"].min()
    return first.reindex(rows["run"].unique()).astype(float)


def summarize(
    table: RunTable, keys: list[str], metrics: list[str], metric: str = "accuracy", target: float | None = None
) -> pd.DataFrame:
    """One row per group: its keys, ``n`` runs, ``<metric>_mean`` and ``<metric>_std`` per
    metric, and with a target ``rounds_to_target_mean``/``_std`` and ``runs_reaching_target``."""
    frame = table.configs[keys].join(table.results[metrics].apply(pd.to_numeric))
    if target is not None:
        frame["rounds_to_target"] = rounds_to_target(table.curves, metric, target)
        metrics = [*metrics, "rounds_to_target"]
    grouped = frame.groupby(keys, dropna=False, sort=True)
    stats = grouped[metrics].agg(["mean", "std"])
    stats.columns = [f"{name}_{stat}" for name, stat in stats.columns]
    stats.insert(0, "n", grouped.size())
    evaluated_on = table.results.get("accuracy_evaluated_on")
    if evaluated_on is not None and evaluated_on.nunique() > 1:  # FedBN beside FedAvg: say which is which
        stats.insert(
            1,
            "accuracy_evaluated_on",
            table.configs[keys].join(evaluated_on).groupby(keys, dropna=False)["accuracy_evaluated_on"].first(),
        )
    if target is not None:
        stats["runs_reaching_target"] = grouped["rounds_to_target"].count()
        stats["target"] = target
    return stats.reset_index()


# --- formats --------------------------------------------------------------------------


def display_table(
    summary: pd.DataFrame, keys: list[str], metrics: list[str], section: Section | None = None
) -> pd.DataFrame:
    """The table a paper shows: ``0.912 ± 0.004`` cells (the mean alone for one run); a
    section's table has its headers and scale, and no column but its own."""
    shown = summary[keys].astype(str).copy()
    shown["n"] = summary["n"]
    if section is None and "accuracy_evaluated_on" in summary:
        shown["accuracy on"] = summary["accuracy_evaluated_on"]
    for name in metrics:
        header, scale = (section.headers[name], section.scale) if section else (name, 1.0)
        digits = DIGITS.get(name, section.digits if section else 3)
        means, stds = summary[f"{name}_mean"] * scale, summary[f"{name}_std"] * scale
        shown[header] = [_mean_std(m, s, digits) for m, s in zip(means, stds)]
    if section is None and "target" in summary:
        label = f"rounds to {summary['target'].iloc[0]:g}"
        shown[label] = [
            f"{_mean_std(m, s, 1)} ({reached}/{n})"
            for m, s, reached, n in zip(
                summary["rounds_to_target_mean"],
                summary["rounds_to_target_std"],
                summary["runs_reaching_target"],
                summary["n"],
            )
        ]
    return shown


def _mean_std(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def to_markdown(shown: pd.DataFrame, keys: list[str]) -> str:
    """A GitHub table: keys left-aligned, numbers right-aligned."""
    # A key some runs lack (an option of one scheme only) is missing (NaN) in the others.
    cells = shown.astype(object).map(lambda value: "–" if pd.isna(value) else str(value).replace("|", r"\|"))
    align = ["---" if column in keys else "---:" for column in shown.columns]
    lines = [
        "| " + " | ".join(map(str, shown.columns)) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)),
    ]
    return "\n".join(lines) + "\n"


def to_latex(shown: pd.DataFrame) -> str:
    """A booktabs tabular; keys are escaped, ± becomes $\\pm$."""
    return shown.to_latex(index=False, escape=True).replace("±", r"$\pm$").replace("–", "--")


def render(summary: pd.DataFrame, keys: list[str], metrics: list[str], fmt: str) -> str:
    """report.csv: every column; report.md and report.tex: the main table, then each
    section the runs have (:data:`SECTIONS`), titled."""
    if fmt == "csv":
        return summary.to_csv(index=False)
    sections = [(section, [name for name in section.headers if name in metrics]) for section in SECTIONS]
    sections = [(section, names) for section, names in sections if names]
    elsewhere = {name for _, names in sections for name in names}
    main = display_table(summary, keys, [name for name in metrics if name not in elsewhere])
    if fmt == "latex":
        parts = [to_latex(main)]
        parts += [
            f"% {section.title}\n{to_latex(display_table(summary, keys, names, section))}"
            for section, names in sections
        ]
    else:
        parts = [to_markdown(main, keys)]
        parts += [
            f"**{section.title}**\n\n{to_markdown(display_table(summary, keys, names, section), keys)}"
            for section, names in sections
        ]
    return "\n".join(parts)


# --- plots ----------------------------------------------------------------------------


def group_label(keys: list[str], values: tuple) -> str:
    """``fedprox, alpha=0.1``: a name key shows only its value."""
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    return ", ".join(str(value) if leaf == "name" else f"{leaf}={value}" for leaf, value in zip(leaves, values))


def group_labels(summary: pd.DataFrame, keys: list[str]) -> list[str]:
    return [group_label(keys, values) for values in summary[keys].itertuples(index=False)]


def plot_curves(
    table: RunTable, keys: list[str], summary: pd.DataFrame, metric: str, target: float | None, path: Path
) -> bool:
    """The global ``metric`` against round: mean line and ± std band per group. False when
    metrics.csv has no such per-round series."""
    # lazy: matplotlib takes a second to import, paid only when a plot is drawn
    from matplotlib.ticker import MaxNLocator

    from fedsim.plots import plt, save_figure

    rows = table.curves[table.curves["metric"] == metric]
    if rows.empty:
        return False
    by_run = rows.pivot_table(index="run", columns="round", values="value")
    colors = {label: f"C{i % 10}" for i, label in enumerate(group_labels(summary, keys))}  # as in the bars
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for values, group in table.configs.loc[by_run.index].groupby(keys, dropna=False, sort=True):
        label = group_label(keys, values)
        curves = by_run.loc[group.index]
        mean, std = curves.mean(), curves.std().fillna(0.0)
        marker = "o" if len(mean) <= 30 else None  # dots stop helping once rounds crowd
        axis.plot(
            mean.index, mean, marker=marker, markersize=3, color=colors[label], label=f"{label} (n={len(curves)})"
        )
        axis.fill_between(mean.index, mean - std, mean + std, color=colors[label], alpha=0.2, linewidth=0)
    if target is not None:
        axis.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    axis.set_xlabel("round")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    evaluated_on = table.results.get("accuracy_evaluated_on", pd.Series(dtype=object))
    personalised = bool((evaluated_on == CLIENT_HOLDOUT).any())
    axis.set_ylabel(f"{metric} (personalised runs: on the clients)" if personalised else f"global test {metric}")
    axis.set_title(f"{metric} against round: mean ± std over seeds")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)
    return True


def plot_final(summary: pd.DataFrame, keys: list[str], metric: str, path: Path) -> None:
    """The final ``metric`` per group: bars of the mean, error bars of the std."""
    # lazy: matplotlib takes a second to import, paid only when a plot is drawn
    from fedsim.plots import plt, save_figure

    labels = group_labels(summary, keys)
    means, stds = summary[f"{metric}_mean"], summary[f"{metric}_std"].fillna(0.0)
    figure, axis = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 4.2))
    positions = np.arange(len(labels))
    colors = [f"C{i % 10}" for i in range(len(labels))]  # the groups' colours in plot_curves
    axis.bar(positions, means, yerr=stds, capsize=4, color=colors, alpha=0.8)
    for position, mean, std in zip(positions, means, stds):
        axis.annotate(
            f"{mean:.3f}", (position, mean + std), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8
        )
    crowded = max(map(len, labels)) > 8  # longer labels than a bar is wide: slant them
    axis.set_xticks(positions, labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    axis.set_ylabel(f"final {metric}")
    axis.set_title(f"final {metric}: mean ± std over seeds (n = {', '.join(map(str, summary['n'].unique()))})")
    axis.grid(alpha=0.3, axis="y")
    save_figure(figure, path)


# --- the whole report -----------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    text: str  # the table in the requested format
    files: list[Path]
    unfinished: list[Path]


def make_report(
    folders: list[str | Path],
    out: str | Path,
    *,
    by: list[str] | None = None,
    metric: str = "accuracy",
    target: float | None = None,
    fmt: str = "md",
) -> Report:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    table = read_runs(folders)
    keys = group_keys(table.configs, by)
    metrics = metric_columns(table.results)
    if metric not in metrics:
        raise UserError(
            f"--metric {metric!r} is not in the runs' summary.json{did_you_mean(metric, metrics)} "
            f"(choose from: {', '.join(metrics)})"
        )
    summary = summarize(table, keys, metrics, metric, target)
    out = Path(out)
    texts = {"md": render(summary, keys, metrics, "md"), "csv": render(summary, keys, metrics, "csv")}
    if fmt == "latex":
        texts["tex"] = render(summary, keys, metrics, "latex")
    files = []
    for suffix, text in texts.items():
        atomic.write_text(out / f"report.{suffix}", text)
        files.append(out / f"report.{suffix}")
    curves = out / f"report_{metric}.png"
    if plot_curves(table, keys, summary, metric, target, curves):
        files.append(curves)
    plot_final(summary, keys, metric, out / "report_final.png")
    files.append(out / "report_final.png")
    return Report(texts["tex" if fmt == "latex" else fmt], files, table.unfinished)
