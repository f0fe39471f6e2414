"""Benchmark: fedsim's engines against a plain PyTorch loop and Flower's own simulation.

Every figure is a ratio of two timings taken in the same run, with the commands compared
interleaved (plain, in-process, ray, flower; plain, in-process, ...) and the median of
the repeats kept, so that a machine that slows down between minutes slows all of them.

- **W1** (``w1.toml``): 20 clients x 200 MNIST images, LeNet-5, batch 32, one local
  epoch, 5 rounds of FedAvg, no evaluation. The baseline is a plain PyTorch loop doing the
  same training (the same clients, batches and FedAvg average) in this process with one
  torch thread. An engine's time is the run's ``rounds_time_s`` (summary.json): the
  rounds, without the start-up (imports, data, Ray and its actors). Reported:
  ``inprocess_over_plain``, ``ray_over_plain`` (2 workers), ``ray_over_flower``, and
  ``command_over_rounds`` (the whole ``fedsim run`` command against its rounds).
- **Overhead per client update**: the MLP on ``digits`` with 100 clients x 3 rounds, where
  a client's training is tiny: (engine's rounds - plain loop) / client updates, in ms.
- **Scale**: ``synthetic`` data, one client per device, 10 clients sampled per round out
  of 100, 1,000 and 10,000 registered: seconds per round and the driver's peak RSS
  (keys ``<engine>/<registered>``). Then a lazy population (``[dataset] lazy = true``)
  with 1,000 clients sampled per round out of 10,000, 1,000,000 and 10,000,000 registered
  (keys ``<engine>/<registered>/lazy``), interleaved: seconds per round, the start-up
  (the whole command less its rounds), the driver's peak RSS, and per engine
  ``10000000_over_10000`` (seconds per round) and ``bytes_per_registered_client`` (the
  driver's peak RSS at 10M less at 10k, over the 9,990,000 clients between).
- **Vectorised clients** (``[engine] vectorize = K``, in-process): client updates per
  second at K = 1 (one client at a time), 4, 16 and 64, interleaved, on W1, on the MLP
  workload above and on FedBN's digit CNN on ``digits-domains`` (its mnist and synth
  domains, 10 clients, one round). Reported: ``updates_per_s`` by K and
  ``vectorized_over_sequential`` (best K over K = 1) for W1, and the same per workload
  under ``vectorized``.
- **GPU** (only where CUDA is available): client updates per second with 1, 4, 8 and 16
  workers sharing one GPU, for LeNet-5 and a ResNet-18-sized network, each worker
  sequential and vectorised; and the vectorised workloads above on the GPU.

    python experiments/bench/engines.py [--quick] [--json PATH] [--skip flower ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
W1 = ROOT / "experiments/bench/w1.toml"

# The per-update overhead workload: the MLP on digits, 100 clients x 3 rounds.
OVERHEAD = [
    "name=bench-overhead",
    "dataset.name=digits",
    "model.name=mlp",
    "partition.num_clients=100",
    "rounds=3",
]


# -- the baseline ------------------------------------------------------------------------
def plain_fedavg(config: Path, overrides: list[str]) -> float:
    """Seconds for a plain PyTorch FedAvg loop doing the experiment's training.

    One model; for every round and client: load the global weights, run the local epochs
    of SGD over the client's data in the order fedsim's clients use, add the weights
    into a sample-weighted sum on the spot. No messages, no files.
    """
    from fedsim.build import load_experiment
    from fedsim.data import load_dataset
    from fedsim.models import build_model
    from fedsim.seeding import derive_seed, torch_generator
    from fedsim.splitting import split_dataset
    from fedsim.training import batches

    torch.set_num_threads(1)
    experiment = load_experiment(config, overrides)
    dataset = load_dataset(experiment.dataset.name, **experiment.dataset.params)
    partition = split_dataset(experiment, dataset)
    clients = [
        (torch.as_tensor(dataset.x_train[idx]), torch.as_tensor(dataset.y_train[idx]))
        for idx in (partition[c] for c in range(partition.num_clients))
    ]
    settings = experiment.client
    model = build_model(experiment.model.name, dataset.input_shape, dataset.num_classes, **experiment.model.params)
    global_state = {key: value.clone() for key, value in model.state_dict().items()}
    total = sum(len(y) for _, y in clients)
    started = time.perf_counter()
    for server_round in range(1, experiment.rounds + 1):
        summed = {key: torch.zeros_like(value, dtype=torch.float64) for key, value in global_state.items()}
        for client, (x, y) in enumerate(clients):
            model.load_state_dict(global_state)
            optimizer = torch.optim.SGD(
                model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
            )
            generator = torch_generator(derive_seed(experiment.seed, "train", server_round, client))
            model.train()
            for _ in range(settings.local_epochs):
                for xb, yb in batches(x, y, settings.batch_size, generator):
                    optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(model(xb), yb).backward()
                    optimizer.step()
            with torch.no_grad():
                for key, value in model.state_dict().items():
                    summed[key] += value * (len(y) / total)
        global_state = {key: value.to(global_state[key].dtype) for key, value in summed.items()}
    return time.perf_counter() - started


# -- fedsim runs, each in a fresh process -------------------------------------------------
RUNNER = (
    "import resource, sys\n"
    "from fedsim.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def run_fedsim(config: Path, overrides: list[str]) -> dict:
    """One ``fedsim run`` in a fresh process: its rounds time, whole-command time and the
    driver's peak RSS."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-c", RUNNER, "run", str(config), "--quiet", "--out", folder]
        for override in overrides:
            command += ["--set", override]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        command_s = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"fedsim run {' '.join(overrides)} failed:\n{done.stderr}")
        summary = json.loads((Path(folder) / "summary.json").read_text())
    rss = next(line for line in done.stdout.splitlines() if line.startswith("peak-rss-kib"))
    return {
        "rounds_s": summary["rounds_time_s"],
        "command_s": command_s,
        "peak_rss_mib": int(rss.split()[1]) / 1024,
    }


ENGINE_OVERRIDES = {
    "inprocess": ["engine.name=inprocess"],
    "ray": ["engine.name=ray", "engine.num_workers=2", "engine.num_cpus=1"],
    "flower": ["engine.name=flower", "engine.num_cpus=1"],
}


def plain_script(config: Path) -> float:
    """Seconds for the plain loop as a script of its own: a fresh interpreter that imports
    PyTorch, loads the data and trains (what ``fedsim run``'s whole command compares to)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--plain-only", str(config)], check=True, cwd=ROOT)
    return time.perf_counter() - started


def compare(config: Path, overrides: list[str], engines: list[str], repeats: int, script: bool = False) -> dict:
    """Median seconds of the plain loop and of each engine's rounds, interleaved; with
    ``script``, also of the plain loop as a script of its own."""
    times: dict[str, list] = {"plain": [], "script": [], **{engine: [] for engine in engines}}
    plain_fedavg(config, overrides)  # warm: torch.optim's first optimizer imports torch._dynamo
    for _ in range(repeats):
        times["plain"].append(plain_fedavg(config, overrides))
        if script:
            times["script"].append(plain_script(config))
        for engine in engines:
            times[engine].append(run_fedsim(config, [*overrides, *ENGINE_OVERRIDES[engine]]))
    result = {"plain_s": statistics.median(times["plain"])}
    if script:
        result["plain_script_s"] = statistics.median(times["script"])
    for engine in engines:
        result[f"{engine}_s"] = statistics.median(run["rounds_s"] for run in times[engine])
        result[f"{engine}_command_s"] = statistics.median(run["command_s"] for run in times[engine])
    return result


def synthetic_devices(name: str, size: int, sampled: int, rounds: int) -> list[str]:
    """The scale studies' experiment: ``size`` synthetic devices of 25 samples, one client
    each, the MLP, ``sampled`` clients per round."""
    return [
        f"name={name}",
        "dataset.name=synthetic",
        f"dataset.num_devices={size}",
        "dataset.size_distribution=equal",
        "dataset.samples_per_device=25",
        "partition.name=natural",
        f"partition.num_clients={size}",
        "model.name=mlp",
        f"strategy.fraction_train={sampled / size}",
        f"rounds={rounds}",
    ]


def scale(engines: list[str], sizes: list[int], sampled: int, rounds: int) -> dict:
    """Seconds per round and driver peak RSS with ``sampled`` clients per round out of
    each number of registered clients (synthetic data, one client per device)."""
    results: dict = {}
    for size in sizes:
        overrides = synthetic_devices("bench-scale", size, sampled, rounds)
        for engine in engines:
            run = run_fedsim(W1, [*overrides, *ENGINE_OVERRIDES[engine]])
            results[f"{engine}/{size}"] = {
                "seconds_per_round": run["rounds_s"] / rounds,
                "peak_rss_mib": run["peak_rss_mib"],
                "command_s": run["command_s"],
            }
            print(
                f"  scale {engine:9s} {size:6d} clients: {run['rounds_s'] / rounds:.3f} s/round, "
                f"driver peak RSS {run['peak_rss_mib']:.0f} MiB"
            )
    return results


POPULATION_SIZES = [10_000, 1_000_000, 10_000_000]


def population_scale(engines: list[str], sizes: list[int], sampled: int, rounds: int, repeats: int) -> dict:
    """A lazy Synthetic population: seconds per round, start-up and driver peak RSS with
    ``sampled`` clients per round out of each number registered; the runs interleaved
    (size after size, engine after engine) and the median of ``repeats`` kept."""
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for size in sizes:
            overrides = [*synthetic_devices("bench-population", size, sampled, rounds), "dataset.lazy=true"]
            for engine in engines:
                runs.setdefault(f"{engine}/{size}/lazy", []).append(
                    run_fedsim(W1, [*overrides, *ENGINE_OVERRIDES[engine]])
                )
    results: dict = {}
    for key, measured in runs.items():
        rounds_s = statistics.median(run["rounds_s"] for run in measured)
        command_s = statistics.median(run["command_s"] for run in measured)
        results[key] = {
            "sampled": sampled,
            "seconds_per_round": rounds_s / rounds,
            "startup_s": command_s - rounds_s,
            "peak_rss_mib": statistics.median(run["peak_rss_mib"] for run in measured),
            "command_s": command_s,
        }
        print(
            f"  population {key:22s}: {rounds_s / rounds:.3f} s/round, start-up {command_s - rounds_s:.1f} s, "
            f"driver peak RSS {results[key]['peak_rss_mib']:.0f} MiB"
        )
    smallest, largest = min(sizes), max(sizes)
    for engine in engines:
        low, high = results[f"{engine}/{smallest}/lazy"], results[f"{engine}/{largest}/lazy"]
        ratio = high["seconds_per_round"] / low["seconds_per_round"]
        per_client = (high["peak_rss_mib"] - low["peak_rss_mib"]) * 2**20 / (largest - smallest)
        results[f"{engine}/{largest}_over_{smallest}"] = ratio
        results[f"{engine}/bytes_per_registered_client"] = per_client
        print(
            f"  population {engine:9s}: s/round at {largest:,} over {smallest:,} registered {ratio:.2f}x, "
            f"{per_client:.1f} bytes of driver RSS per registered client"
        )
    return results


# Vectorised-clients workloads: overrides of W1, and client updates per run
VECTOR_WORKLOADS = {
    "w1": ([], 20 * 5),
    "mlp-digits-100": (OVERHEAD, 100 * 3),
    "digitcnn-digits-domains": (
        [
            "name=bench-digitcnn",
            "dataset.name=digits-domains",
            "partition.name=dirichlet",
            "partition.num_clients=10",
            "partition.alpha=1.0",
            'dataset.domains=["mnist", "synth"]',  # 4,000 images: a CPU run of about 20 s
            "model.name=digitcnn",
            "rounds=1",
        ],
        10 * 1,
    ),
}
VECTOR_SIZES = [1, 4, 16, 64]


def vectorized(workloads: list[str], sizes: list[int], repeats: int, device: str = "cpu") -> dict:
    """Client updates per second of the in-process engine at each ``vectorize`` K (1 = one
    client at a time), the runs interleaved; the median of ``repeats``."""
    results: dict = {}
    for workload in workloads:
        overrides, updates = VECTOR_WORKLOADS[workload]
        times: dict[int, list[float]] = {k: [] for k in sizes}
        for _ in range(repeats):
            for k in sizes:
                run = run_fedsim(W1, [*overrides, f"engine.vectorize={k}", f"engine.device={device}"])
                times[k].append(run["rounds_s"])
        rates = {k: updates / statistics.median(seconds) for k, seconds in times.items()}
        best = max(rates, key=rates.get)
        results[workload] = {
            "updates_per_s": {str(k): rate for k, rate in rates.items()},
            "best_k": best,
            "vectorized_over_sequential": rates[best] / rates[1],
        }
        shown = "  ".join(f"K={k}: {rate:.3g}/s" for k, rate in rates.items())
        print(f"  {workload:24s} {shown}  (best K={best}: {rates[best] / rates[1]:.2f}x one at a time)")
    return results


def gpu(workers: list[int], quick: bool) -> dict:
    """Client updates per second with k Ray workers sharing one GPU, each 1/k of it, each
    training its clients one at a time and vectorised (``vectorize = "auto"``)."""
    models = {
        "lenet": ["model.name=lenet"],
        "resnet18-sized": ["model.name=resnet", "model.blocks=2", "model.width=128"],
    }
    clients, rounds = (32, 2) if quick else (64, 3)
    results: dict = {}
    for model, options in models.items():
        for k in workers:
            for vectorize in (1, "auto"):
                overrides = [
                    *options,
                    f"partition.num_clients={clients}",
                    f"rounds={rounds}",
                    "engine.name=ray",
                    f"engine.num_workers={k}",
                    f"engine.num_gpus={1 / k}",
                    "engine.device=cuda",
                    f"engine.vectorize={vectorize!r}" if vectorize == "auto" else "engine.vectorize=1",
                ]
                run = run_fedsim(W1, overrides)
                key = f"{model}/{k}" + ("/vectorized" if vectorize == "auto" else "")
                results[key] = clients * rounds / run["rounds_s"]
                print(f"  gpu {key:28s} {results[key]:.1f} client updates/s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller scale study")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["flower", "ray", "scale", "vectorized"],
        help="leave out an engine or the scale study",
    )
    parser.add_argument("--plain-only", metavar="CONFIG", help=argparse.SUPPRESS)  # the plain loop as a script
    args = parser.parse_args()
    torch.set_num_threads(1)
    from fedsim.flower_log import quiet_flower

    quiet_flower()  # Flower warns about fraction_evaluate = 0 whenever W1's strategy is built
    if args.plain_only:
        plain_fedavg(Path(args.plain_only), [])
        return
    engines = [engine for engine in ENGINE_OVERRIDES if engine not in args.skip]
    repeats = 1 if args.quick else 3

    print(f"W1 ({'quick, ' if args.quick else ''}{repeats} interleaved repeats):")
    w1 = compare(W1, [], engines, repeats, script=True)
    for engine in engines:
        print(f"  {engine:9s} rounds {w1[f'{engine}_s']:.2f} s  (whole command {w1[f'{engine}_command_s']:.2f} s)")
    print(f"  plain loop {w1['plain_s']:.2f} s  (as a script of its own {w1['plain_script_s']:.2f} s)")
    figures: dict = {"w1": w1, "repeats": repeats, "threads": torch.get_num_threads()}
    for engine in engines:
        figures[f"{engine}_over_plain"] = w1[f"{engine}_s"] / w1["plain_s"]
    if "ray" in engines and "flower" in engines:
        figures["ray_over_flower"] = w1["ray_s"] / w1["flower_s"]
    figures["command_over_rounds"] = w1["inprocess_command_s"] / w1["inprocess_s"]
    figures["command_over_plain_script"] = w1["inprocess_command_s"] / w1["plain_script_s"]

    print("Overhead per client update (MLP on digits, 100 clients x 3 rounds):")
    overhead = compare(W1, OVERHEAD, engines, repeats)
    updates = 100 * 3
    figures["overhead_ms_per_update"] = {
        engine: 1000 * (overhead[f"{engine}_s"] - overhead["plain_s"]) / updates for engine in engines
    }
    figures["overhead"] = overhead
    for engine, ms in figures["overhead_ms_per_update"].items():
        print(f"  {engine:9s} {ms:6.2f} ms per update")

    if "scale" not in args.skip:
        print("Scale (10 clients sampled per round):")
        sizes = [100, 1_000, 10_000]
        scaled = [e for e in engines if e != "flower"]
        figures["scale"] = scale(scaled, sizes, sampled=10, rounds=2 if args.quick else 3)
        print("Scale, a lazy population (1,000 clients sampled per round):")
        figures["scale"].update(
            population_scale(scaled, POPULATION_SIZES, 1000, rounds=2 if args.quick else 3, repeats=repeats)
        )

    if "vectorized" not in args.skip:
        print("Vectorised clients (in-process, client updates per second):")
        figures["vectorized"] = vectorized(list(VECTOR_WORKLOADS), VECTOR_SIZES, repeats)
        figures["updates_per_s"] = figures["vectorized"]["w1"]["updates_per_s"]
        figures["vectorized_over_sequential"] = figures["vectorized"]["w1"]["vectorized_over_sequential"]

    if torch.cuda.is_available():
        print(f"GPU ({torch.cuda.get_device_name(0)}):")
        figures["gpu_updates_per_s"] = gpu([1, 4, 8, 16], args.quick)
        if "vectorized" not in args.skip:
            figures["gpu_vectorized"] = vectorized(list(VECTOR_WORKLOADS), VECTOR_SIZES, repeats, device="cuda")
        figures["gpu"] = torch.cuda.get_device_name(0)
    else:
        figures["gpu"] = None
        print("GPU: none on this machine")

    for key in (
        "inprocess_over_plain",
        "ray_over_plain",
        "ray_over_flower",
        "command_over_rounds",
        "command_over_plain_script",
        "vectorized_over_sequential",
    ):
        if key in figures:
            print(f"{key}: {figures[key]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
