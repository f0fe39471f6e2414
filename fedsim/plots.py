"""The run's figures, drawn with matplotlib's file-only backend."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

# Agg draws to files with no display. A process that chose its backend before (a notebook's
# kernel names its inline one in MPLBACKEND; a script may have imported pyplot) keeps it:
# these figures are saved and closed under any backend, and switching would stop the
# notebook's own figures from showing.
if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fedsim import atomic  # noqa: E402

CURVES = {
    "accuracy": [
        ("server", "global", "accuracy", "global test"),
        ("federated", "evaluate", "accuracy", "clients (held-out)"),
    ],
    "loss": [
        ("server", "global", "loss", "global test"),
        ("federated", "evaluate", "loss", "clients (held-out)"),
        ("federated", "train", "train_loss", "clients (training)"),
    ],
}


def save_figure(figure: plt.Figure, path: Path) -> None:
    atomic.atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110, bbox_inches="tight"))
    plt.close(figure)


def plot_training(metrics: pd.DataFrame, path: Path, title: str, slot_starts: list[int] | None = None) -> None:
    """Accuracy and loss against round, on the global test set and on the clients; under a
    drift stream, a dashed line where each time slot after the first begins (its first
    round) and each slot's accuracy at its end."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for start in slot_starts or []:
        for axis in axes:
            axis.axvline(start - 0.5, color="grey", linestyle="--", linewidth=0.8)
    slots = metrics[(metrics.scope == "slot") & (metrics.metric == "accuracy")]
    if len(slots):
        axes[0].scatter(slots["round"], slots["value"], marker="s", color="black", zorder=3, label="end of slot")
    for axis, (quantity, curves) in zip(axes, CURVES.items()):
        for scope, ident, metric, label in curves:
            rows = metrics[(metrics.scope == scope) & (metrics.id == ident) & (metrics.metric == metric)]
            if len(rows):
                axis.plot(rows["round"], rows["value"], marker="o", markersize=3, label=label)
        axis.set_xlabel("round")
        axis.set_ylabel(quantity)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    axes[0].set_ylim(0, 1)
    figure.suptitle(title)
    save_figure(figure, path)


def plot_attacks(metrics: pd.DataFrame, path: Path, title: str, windows: dict[str, tuple[int, int] | None]) -> None:
    """Each attacker's success rate and the clean accuracy against round, with each
    attacker's window shaded (:mod:`fedsim.observers.attacks`)."""
    figure, axis = plt.subplots(figsize=(7, 3.8))
    rows = metrics[metrics.scope == "attacker"]
    shaded = set()
    for number, (name, window) in enumerate(windows.items()):
        colour = plt.cm.tab10(number % 10)
        if window is not None and window not in shaded:
            shaded.add(window)
            axis.axvspan(window[0] - 0.5, window[1] + 0.5, color="grey", alpha=0.12, linewidth=0)
        asr = rows[(rows.id == name) & (rows.metric == "asr")]
        if len(asr):
            axis.plot(asr["round"], asr["value"], marker="o", markersize=3, color=colour, label=f"ASR {name}")
    clean = rows[(rows.id == "all") & (rows.metric == "clean_accuracy")]
    if len(clean):
        axis.plot(clean["round"], clean["value"], color="black", linestyle="--", label="clean accuracy")
    axis.set_xlabel("round")
    axis.set_ylabel("rate")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axis.set_title(f"{title} (attack windows shaded)" if shaded else title)
    save_figure(figure, path)


HEATMAP_MAX_CLIENTS = 100  # more rows than this blur into one another at any figure size
MAX_TICKS = 40  # tick labels per axis; more are thinned to every k-th
TICK_FONT = 8  # points
CHAR_INCHES = 0.6 * TICK_FONT / 72  # a tick label character's typical width


def plot_heatmap(matrix: np.ndarray, path: Path, title: str, column_label: str, columns=None) -> None:
    """A clients x groups heatmap of sample counts, annotated when small enough to read.

    Beyond ``HEATMAP_MAX_CLIENTS`` clients only the first ones are drawn, and the title
    says so: 10,000 rows squeezed into a thousand pixels show nothing. Column labels are
    thinned, rotated and given room as their number and length need.
    """
    matrix, title = _first_clients(matrix, title)
    num_clients, num_columns = matrix.shape
    labels = [str(c) for c in columns] if columns is not None else None
    width = min(max(2.5 + 0.45 * num_columns, 4.0), 16.0)
    figure, axis = plt.subplots(
        figsize=(width, _height(num_clients, labels, width - 2.0, num_columns)), layout="constrained"
    )
    image = axis.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axis, label="samples")
    axis.set_xlabel(column_label)
    axis.set_ylabel("client")
    if labels is not None:
        _column_ticks(axis, labels, (width - 2.0) / num_columns)
    _row_ticks(axis, num_clients)
    if num_clients * num_columns <= 400:
        threshold = matrix.max() / 2
        for (row, col), value in np.ndenumerate(matrix):
            axis.text(
                col,
                row,
                str(value),
                ha="center",
                va="center",
                fontsize=7,
                color="black" if value > threshold else "white",
            )
    axis.set_title(title)
    save_figure(figure, path)


def plot_categories(
    matrix: np.ndarray,
    path: Path,
    title: str,
    names,
    *,
    column_label: str = "slot",
    columns=None,
    colours=None,
    legend_title: str | None = None,
) -> None:
    """A clients x columns map of categories (a concept id, a drift event): one colour per
    category, and a legend naming the categories that occur.

    ``names`` maps category values to names (a sequence: value = position); ``colours``
    likewise gives each value its colour (default: matplotlib's tab10 / tab20, so a value
    keeps its colour from plot to plot). Rows beyond ``HEATMAP_MAX_CLIENTS`` are cut as
    in :func:`plot_heatmap`.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    matrix, title = _first_clients(np.asarray(matrix, dtype=np.int64), title)
    names = dict(names) if hasattr(names, "items") else dict(enumerate(names))
    count = max(max(names, default=0), int(matrix.max(initial=0))) + 1
    if colours is None:
        palette = plt.get_cmap("tab10" if count <= 10 else "tab20" if count <= 20 else "turbo")
        colours = (
            list(palette.colors) if hasattr(palette, "colors") else [palette(k / (count - 1)) for k in range(count)]
        )
    colours = dict(colours) if hasattr(colours, "items") else dict(enumerate(colours))
    palette = [colours.get(k, "#888888") for k in range(count)]
    num_clients, num_columns = matrix.shape
    labels = [str(c) for c in (columns if columns is not None else range(num_columns))]
    present = [int(k) for k in np.unique(matrix)]
    legend_inches = 0.6 + CHAR_INCHES * max((len(names.get(k, str(k))) for k in present), default=4)
    plot_width = min(max(0.35 * num_columns, 2.5), 12.0)
    figure, axis = plt.subplots(
        figsize=(1.2 + plot_width + legend_inches, _height(num_clients, labels, plot_width, num_columns)),
        layout="constrained",
    )
    axis.imshow(
        matrix,
        aspect="auto",
        cmap=ListedColormap(palette),
        norm=BoundaryNorm(np.arange(count + 1) - 0.5, count),
        interpolation="nearest",
    )
    if num_clients <= 60 and num_columns <= 60:  # thin white lines between cells
        axis.set_xticks(np.arange(num_columns + 1) - 0.5, minor=True)
        axis.set_yticks(np.arange(num_clients + 1) - 0.5, minor=True)
        axis.grid(which="minor", color="white", linewidth=0.6)
        axis.tick_params(which="minor", length=0)
    axis.set_xlabel(column_label)
    axis.set_ylabel("client")
    _column_ticks(axis, labels, plot_width / num_columns)
    _row_ticks(axis, num_clients)
    handles = [Patch(facecolor=palette[k], edgecolor="0.6", label=names.get(k, str(k))) for k in present]
    axis.legend(
        handles=handles,
        title=legend_title,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=TICK_FONT,
        title_fontsize=TICK_FONT + 1,
        frameon=False,
    )
    axis.set_title(title)
    save_figure(figure, path)


def _first_clients(matrix: np.ndarray, title: str) -> tuple[np.ndarray, str]:
    if len(matrix) > HEATMAP_MAX_CLIENTS:
        title = f"{title}\n(the first {HEATMAP_MAX_CLIENTS} of {len(matrix):,} clients)"
        matrix = matrix[:HEATMAP_MAX_CLIENTS]
    return matrix, title


def _thinned(count: int) -> np.ndarray:
    """Every k-th position, so that at most ``MAX_TICKS`` are labelled."""
    return np.arange(0, count, max(1, -(-count // MAX_TICKS)))


def _height(num_rows: int, labels, plot_width: float, num_columns: int) -> float:
    """Figure height: rows of about 0.3 inch (capped), plus room for rotated column labels."""
    height = min(1.5 + 0.3 * num_rows, 12.0)
    if labels is not None and num_columns:
        rotation = _rotation(labels, plot_width / num_columns)
        longest = CHAR_INCHES * max((len(label) for label in labels), default=0)
        height += longest * {0: 0.0, 45: 0.7, 90: 1.0}[rotation]
    return height


def _rotation(labels, cell_inches: float) -> int:
    """0 when the longest label fits its column, 45 while tilted labels still clear one
    another, else 90."""
    spacing = cell_inches * (_thinned(len(labels))[1] if len(labels) > MAX_TICKS else 1)
    longest = CHAR_INCHES * max((len(label) for label in labels), default=0)
    if longest <= 0.9 * spacing:
        return 0
    return 45 if spacing >= 0.2 else 90


def _column_ticks(axis, labels, cell_inches: float) -> None:
    positions = _thinned(len(labels))
    rotation = _rotation(labels, cell_inches)
    axis.set_xticks(positions, [labels[i] for i in positions], fontsize=TICK_FONT, rotation=rotation)
    if rotation == 45:
        plt.setp(axis.get_xticklabels(), ha="right", rotation_mode="anchor")


def _row_ticks(axis, num_rows: int) -> None:
    positions = _thinned(num_rows)
    axis.set_yticks(positions, [str(i) for i in positions], fontsize=TICK_FONT)
