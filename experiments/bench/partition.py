"""Benchmark: fedsim's Dirichlet partitioner against Flower Datasets' DirichletPartitioner.

Both split the same labels with the same scheme (Hsu et al.: per class, Dir(alpha) over
clients, cut points floor(cumsum(p) * n_c), the whole draw repeated until every client
holds min_size), the same min_size (Flower's default, 10), no self-balancing, and
shuffled client indices on Flower's side. Flower's time is that of its first
``load_partition`` (which computes every partition, then selects one); the Arrow dataset
is built before the clock starts. Each side reports the median of several runs, and the
mean Hellinger distance of its split, to show the two draw the same kind of partition.

    python experiments/bench/partition.py            # 200,000 labels, 1,000 clients, alpha 0.5

Recorded on the project's shared 2-core machine (flwr-datasets 0.6.1, numpy 2.4): Flower
2.0-3.5 s, fedsim 16-18 ms, a speed-up of 121x-192x depending on the machine's load
(100x with 100 classes).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--clients", type=int, default=1_000)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--min-size", type=int, default=10)
    parser.add_argument("--flower-runs", type=int, default=3)
    parser.add_argument("--fedsim-runs", type=int, default=20)
    args = parser.parse_args()

    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    from partitioners import Dirichlet, Partition

    y = np.random.default_rng(0).integers(0, args.classes, args.labels)
    table = Dataset.from_dict({"label": y})

    flower_times, flower_split = [], None
    for seed in range(args.flower_runs):
        flower = DirichletPartitioner(
            num_partitions=args.clients,
            partition_by="label",
            alpha=args.alpha,
            min_partition_size=args.min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        flower.dataset = table
        started = time.perf_counter()
        with warnings.catch_warnings():  # Flower warns on every min-size redraw
            warnings.simplefilter("ignore")
            flower.load_partition(0)
        flower_times.append(time.perf_counter() - started)
        flower_split = flower

    fedsim_times, fedsim_split = [], None
    for seed in range(args.fedsim_runs):
        started = time.perf_counter()
        fedsim_split = Dirichlet(args.clients, alpha=args.alpha, min_size=args.min_size).split(y, seed=seed)
        fedsim_times.append(time.perf_counter() - started)

    flower_partition = Partition([np.asarray(flower_split._partition_id_to_indices[i]) for i in range(args.clients)], y)
    flower_s, fedsim_s = statistics.median(flower_times), statistics.median(fedsim_times)
    print(
        f"Dirichlet split of {args.labels:,} labels ({args.classes} classes) into {args.clients:,} clients, "
        f"alpha {args.alpha}, min size {args.min_size}"
    )
    print(
        f"  flwr_datasets DirichletPartitioner: median {flower_s * 1e3:8.1f} ms over {args.flower_runs} runs   "
        f"mean Hellinger {flower_partition.skew().summary['mean_hellinger']:.3f}"
    )
    print(
        f"  fedsim Dirichlet:                   median {fedsim_s * 1e3:8.1f} ms over {args.fedsim_runs} runs   "
        f"mean Hellinger {fedsim_split.skew().summary['mean_hellinger']:.3f}"
    )
    print(f"  speed-up: {flower_s / fedsim_s:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
