"""The run's figures, drawn with matplotlib's file-only backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

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


def plot_training(metrics: pd.DataFrame, path: Path, title: str) -> None:
    """Accuracy and loss against round, on the global test set and on the clients."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
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


HEATMAP_MAX_CLIENTS = 100  # more rows than this blur into one another at any figure size


def plot_heatmap(matrix: np.ndarray, path: Path, title: str, column_label: str, columns=None) -> None:
    """A clients x groups heatmap of sample counts, annotated when small enough to read.

    Beyond ``HEATMAP_MAX_CLIENTS`` clients only the first ones are drawn, and the title
    says so: 10,000 rows squeezed into a thousand pixels show nothing.
    """
    if len(matrix) > HEATMAP_MAX_CLIENTS:
        title = f"{title}\n(the first {HEATMAP_MAX_CLIENTS} of {len(matrix):,} clients)"
        matrix = matrix[:HEATMAP_MAX_CLIENTS]
    num_clients, num_columns = matrix.shape
    figure, axis = plt.subplots(figsize=(min(2 + 0.45 * num_columns, 14), min(1.5 + 0.3 * num_clients, 12)))
    image = axis.imshow(matrix, aspect="auto", cmap="viridis")
    figure.colorbar(image, ax=axis, label="samples")
    axis.set_xlabel(column_label)
    axis.set_ylabel("client")
    if columns is not None and num_columns <= 40:
        axis.set_xticks(range(num_columns), columns, rotation=90 if num_columns > 12 else 0)
    if num_clients <= 40:
        axis.set_yticks(range(num_clients))
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
