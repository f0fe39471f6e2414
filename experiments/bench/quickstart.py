"""Benchmark: the quickstart against a plain PyTorch loop, measured in the same run.

The baseline trains the quickstart's network centrally on the same training images
(SGD, lr 0.05, momentum 0.9, batch 32, one torch thread like fedsim's clients) until it
reaches 0.95 test accuracy. Then the
whole `fedsim run` command (interpreter start-up, data, 10 clients x 20 FedAvg rounds,
plots) runs as a subprocess. The ratio of the two wall times is printed.

    python experiments/bench/quickstart.py [--quick] [--json PATH]

It takes about half a minute, so ``--quick`` runs the same thing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedsim.data import load_dataset
from fedsim.models import build_model
from fedsim.training import batches, classification_metrics, predict

ROOT = Path(__file__).resolve().parents[2]
TARGET = 0.95


def plain_pytorch(max_epochs: int = 30) -> tuple[float, int, float]:
    """Seconds to reach TARGET, the epochs it took, and the accuracy reached."""
    dataset = load_dataset("mnist5k")
    torch.manual_seed(0)
    model = build_model("lenet", dataset.input_shape, dataset.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.as_tensor(dataset.x_train), torch.as_tensor(dataset.y_train)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    accuracy, epochs = 0.0, 0
    while accuracy < TARGET and epochs < max_epochs:
        epochs += 1
        model.train()
        for xb, yb in batches(x, y, 32, generator):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        accuracy = classification_metrics(predict(model, dataset.x_test, torch.device("cpu")), dataset.y_test)[
            "accuracy"
        ]
    return time.perf_counter() - started, epochs, accuracy


def fedsim_quickstart() -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fedsim",
                "run",
                str(ROOT / "experiments/quickstart.toml"),
                "--quiet",
                "--out",
                folder,
            ],
            check=True,
        )
        elapsed = time.perf_counter() - started
        return elapsed, json.loads((Path(folder) / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the same benchmark (it is short already)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as fedsim's clients train by default, so the ratio is like for like
    load_dataset("mnist5k")  # fill the cache, so neither side pays for parsing the CSV
    baseline_s, epochs, baseline_accuracy = plain_pytorch()
    fedsim_s, summary = fedsim_quickstart()
    print(f"plain PyTorch, centralised: {baseline_accuracy:.4f} after {epochs} epochs in {baseline_s:.1f} s")
    print(
        f"fedsim quickstart (10 clients, 20 rounds): {summary['accuracy']:.4f} in {fedsim_s:.1f} s end to end "
        f"({summary['wall_time_s']:.1f} s of it the run, {summary['rounds_time_s']:.1f} s its rounds)"
    )
    print(f"ratio fedsim / plain: {fedsim_s / baseline_s:.1f}x")
    if args.json:
        figures = {
            "plain_s": baseline_s,
            "plain_epochs": epochs,
            "plain_accuracy": baseline_accuracy,
            "fedsim_command_s": fedsim_s,
            "fedsim_wall_time_s": summary["wall_time_s"],
            "fedsim_rounds_time_s": summary["rounds_time_s"],
            "fedsim_accuracy": summary["accuracy"],
            "fedsim_over_plain": fedsim_s / baseline_s,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
