"""GPU checks: every GPU code path of fedsim run once with assertions, then throughput figures.

Checks (each a function that returns its figures and asserts its property; one that cannot
run on the device raises :class:`Skipped` with the reason):

- ``vectorized_equals_sequential``: FedAvg with LeNet-5 on mnist5k, 5 clients, 2 rounds,
  trained one at a time and with ``[engine] vectorize = 3``: the same final global arrays
  within :data:`TOLERANCE` for the device (TF32 off); the vectorised
  run went through :func:`fedsim.vectorize.train_clients` in groups of 3 on the device, with
  the stacked plan (on a GPU: every layer on the folded activations, none client by client).
- ``device_auto``: ``[engine] device = "auto"`` trains on CUDA where this process sees a
  GPU, else on the CPU (read from the in-process worker's device and its model's weights).
- ``fractional_gpu_workers``: the Ray engine with 4 workers of ``num_gpus = 0.25`` and
  ``device = "auto"``: the engine resolves "auto" to CUDA, the 4 workers hold a quarter of
  the GPU each at once (Ray's free GPU drops by exactly 1), and the final arrays equal the
  in-process engine's on the GPU within :data:`TOLERANCE`. CUDA only (Ray needs a GPU).
- ``fedbn`` and ``fedwon``: 2 rounds on the device, finite accuracy; FedBN keeps each
  client's BatchNorm layers in its client state.
- ``mirage``: one round with one Mirage attacker on the device: summary.json's
  ``asr_by_attacker`` has the attacker's ASR in [0, 1].

Throughput: client updates per second with 1, 4, 8 and 16 Ray workers per device (on a
GPU each holds 1/k of it; on the CPU 1/k of the CPUs), each training its clients one at a
time (``vectorize = 1``) and vectorised (``vectorize = K``, its share of the round's
clients, at most 8 at once for the ResNet), for LeNet-5 and a ResNet-18-sized network
(fedsim's CIFAR-style ``resnet`` with 2 blocks per stage at width 128: 11.1M parameters),
on W1 (mnist5k, batch 32, one local epoch). Each figure is the run's ``rounds_time_s`` from
a fresh ``fedsim run`` process (start-up excluded), the runs interleaved per worker count.
``--quick``: 1 and 4 workers, LeNet-5 only, 2 rounds of 16 clients.

    python experiments/bench/gpu_check.py [--device cuda|cpu] [--quick] [--json PATH]

Exits with status 1 and a one-line message when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "experiments" / "quickstart.toml"

# The tests' tiny experiment (tests/conftest.py): 4 clients on the 8x8 digits, 2 rounds.
TINY = [
    "dataset.name=digits",
    "partition.name=dirichlet",
    "partition.num_clients=4",
    "partition.alpha=1.0",
    "rounds=2",
    "client.lr=0.1",
]
# FedBN's digit CNN (BatchNorm) at lr 0.01, as in tests/test_vectorized_engine.py, on the
# 8x8 digits: fedsim warns that it is meant for 20x20 and larger; here it only has to run
# (on mnist5k's 28x28 a CPU takes 30 s per strategy).
DIGITCNN = ["model.name=digitcnn", "client.lr=0.01"]
# Vectorised against one at a time: LeNet-5's convolutions on 28x28 images, 5 clients.
VECTOR_CASE = ["dataset.name=mnist5k", "model.name=lenet", "client.lr=0.05", "partition.num_clients=5"]

# Final global arrays, vectorised against one at a time / Ray against in-process:
# (rtol, atol) per device type. The CPU pins the tests' figures; on a GPU cuDNN picks
# different convolution algorithms, with atomic (unordered) sums in their backward, for a
# grouped convolution over K clients and for K single ones.
TOLERANCE = {"cpu": (1e-4, 1e-5), "cuda": (1e-3, 1e-5)}


class Skipped(Exception):
    """A check that cannot run on this device; the message says why."""


# -- helpers -----------------------------------------------------------------------------
def experiment(device: str, *overrides: str, attacks: list[dict] | None = None):
    """The tiny experiment on ``device`` (the MLP unless ``overrides`` name a model), with
    ``attacks`` as its ``[[attack]]`` tables."""
    from fedsim.build import load_experiment, validate_experiment

    model = [] if any(o.startswith("model.name=") for o in overrides) else ["model.name=mlp", "model.hidden=[32]"]
    loaded = load_experiment(QUICKSTART, [*TINY, *model, f"engine.device={device}", *overrides])
    if attacks:
        loaded = validate_experiment({**loaded.to_dict(), "attack": attacks}, "gpu_check")
    return loaded


def run(experiment_, out: Path):
    """Run ``experiment_`` into ``out`` (overwriting) in this process."""
    from fedsim.runner import run_experiment

    return run_experiment(experiment_, out, overwrite=True)


def final_arrays(result) -> dict[str, np.ndarray]:
    """The global model's arrays from a finished run's checkpoint."""
    from fedsim.build import validate_experiment
    from fedsim.results import RunDirectory

    config = validate_experiment(tomllib.loads((result.path / "config.toml").read_text()), "gpu_check")
    checkpoint = RunDirectory(result.path).load_checkpoint(config)
    return {key: array.numpy() for key, array in checkpoint.arrays.items()}


def compare_arrays(reference: dict, other: dict, device_type: str) -> float:
    """Assert ``other`` equals ``reference`` within :data:`TOLERANCE`; the largest absolute
    difference."""
    rtol, atol = TOLERANCE[device_type]
    assert reference.keys() == other.keys(), f"different arrays: {sorted(reference.keys() ^ other.keys())}"
    largest = 0.0
    for key in reference:
        a, b = np.asarray(reference[key], dtype=np.float64), np.asarray(other[key], dtype=np.float64)
        difference = float(np.max(np.abs(a - b), initial=0.0))
        assert np.allclose(b, a, rtol=rtol, atol=atol), (
            f"{key}: largest difference {difference:.3g}, beyond rtol {rtol:g} and atol {atol:g}"
        )
        largest = max(largest, difference)
    return largest


def worker_device() -> tuple[str, str]:
    """The in-process worker's device and the device its model's weights are on."""
    from fedsim import worker

    assert worker._CURRENT, "no worker in this process: the run did not train in-process"
    current = worker._CURRENT[0]
    return str(current.device), str(next(current.model().parameters()).device)


def assert_on(device: str) -> dict:
    """Assert the in-process worker trained on ``device``'s type; its devices."""
    trained, weights = worker_device()
    wanted = torch.device(device).type
    assert torch.device(trained).type == wanted, f"the worker trained on {trained}, not {wanted}"
    assert torch.device(weights).type == wanted, f"the model's weights are on {weights}, not {wanted}"
    return {"worker_device": trained, "weights_device": weights}


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# -- the checks --------------------------------------------------------------------------
def check_vectorized_equals_sequential(device: str, work: Path) -> dict:
    """Vectorised (K = 3, the folded layout on a GPU) against one at a time: the same final
    arrays within :data:`TOLERANCE`, trained in groups of 3 on ``device``. cuDNN's TF32
    convolutions are off for the two runs, so that the difference is the layout's alone."""
    import fedsim.clientapp
    from fedsim.vectorize.plan import build_plan

    overrides = VECTOR_CASE
    groups: list[tuple[int, str]] = []
    original = fedsim.clientapp.train_clients

    def spy(trainer, calls):
        groups.append((len(calls), str(calls[0].device)))
        return original(trainer, calls)

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        sequential = run(experiment(device, *overrides), work / "sequential")
        fedsim.clientapp.train_clients = spy
        together = run(experiment(device, *overrides, "engine.vectorize=3"), work / "vectorized")
    finally:
        fedsim.clientapp.train_clients = original
        torch.backends.cudnn.allow_tf32 = tf32
    devices = assert_on(device)
    assert groups, "no client trained vectorised"
    assert max(size for size, _ in groups) == 3, f"group sizes {[size for size, _ in groups]}, none of 3"
    kind = torch.device(device).type
    assert {torch.device(where).type for _, where in groups} == {kind}, f"groups trained on {groups}"

    from fedsim import worker

    current = worker._CURRENT[0]
    # the stacked plan the run used (Unsupported here: the vmap fallback ran instead)
    plan = build_plan(current.model(), current.dataset.input_shape, torch.float32, torch.device(device), 32)
    steps = [s for item in plan.program for s in (item if isinstance(item, list) else [item])]
    forms = sorted({s.form for s in steps if s.kind == "layer"})
    if kind == "cuda":
        assert forms == ["folded"], f"on the GPU every layer should run on the folded activations: forms {forms}"
    largest = compare_arrays(final_arrays(sequential), final_arrays(together), kind)
    return {
        "workload": "lenet, mnist5k, 5 clients, 2 rounds",
        "vectorize": 3,
        "groups": [size for size, _ in groups],
        "layer_forms": forms,
        "max_abs_difference": largest,
        "tolerance": dict(zip(("rtol", "atol"), TOLERANCE[kind], strict=True)),
        **devices,
    }


def check_device_auto(device: str, work: Path) -> dict:
    """``device = "auto"``: CUDA where this process sees a GPU, else the CPU; with
    ``--device cuda``, CUDA."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        assert expected == "cuda", "--device cuda, but this process sees no GPU"
    result = run(experiment("auto", "rounds=1"), work / "auto")
    devices = assert_on(expected)
    assert finite(result.summary["accuracy"]), f"accuracy {result.summary['accuracy']}"
    return {"expected": expected, **devices}


def check_fractional_gpu_workers(device: str, work: Path) -> dict:
    """4 Ray workers of ``num_gpus = 0.25`` share one GPU with ``device = "auto"``: "auto"
    resolves to CUDA, the 4 hold a GPU's worth at once, and the run ends as in-process."""
    if torch.device(device).type != "cuda":
        raise Skipped("fractional num_gpus needs a GPU resource in Ray (run with --device cuda on a GPU)")
    import ray

    import fedsim.engine.ray as ray_engine
    from fedsim.build import make_engine

    overrides = ["partition.num_clients=8"]
    reference = run(experiment(device, *overrides), work / "inprocess")
    on_ray = experiment(
        "auto", *overrides, "engine.name=ray", "engine.num_workers=4", "engine.num_gpus=0.25", "engine.num_cpus=1"
    )
    engine = make_engine(on_ray)
    try:
        layout, resolved = engine.layout(), engine.device
    finally:
        if engine._started_ray:
            ray.shutdown()
    assert layout == (4, 0.25), f"layout {layout}, not 4 workers of 0.25 GPU"
    assert resolved == "cuda", f"device = 'auto' with num_gpus = 0.25 resolved to {resolved}"

    seen: dict = {}
    original = ray_engine.WorkerPool

    class WatchedPool(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["pids"] = list(self.pids)
            seen["gpu_total"] = ray.cluster_resources().get("GPU", 0.0)
            seen["gpu_free"] = ray.available_resources().get("GPU", 0.0)

    ray_engine.WorkerPool = WatchedPool
    try:
        result = run(on_ray, work / "ray")
    finally:
        ray_engine.WorkerPool = original
    assert len(set(seen.get("pids", []))) == 4, f"worker processes {seen.get('pids')}, not 4"
    held = seen["gpu_total"] - seen["gpu_free"]
    assert abs(held - 1.0) < 1e-6, f"the workers hold {held} GPUs, not 4 x 0.25"
    largest = compare_arrays(final_arrays(reference), final_arrays(result), "cuda")
    assert finite(result.summary["accuracy"]), f"accuracy {result.summary['accuracy']}"
    return {"workers": 4, "num_gpus": 0.25, "gpus_held": held, "max_abs_difference": largest}


def check_fedbn(device: str, work: Path) -> dict:
    """FedBN, 2 rounds on ``device``: finite accuracy, BatchNorm kept in client state."""
    result = run(experiment(device, *DIGITCNN, "strategy.name=fedbn"), work / "fedbn")
    devices = assert_on(device)
    accuracy = result.summary["accuracy"]
    assert finite(accuracy), f"FedBN accuracy {accuracy}"
    states = sorted((result.path / "client_state").rglob("*.npz"))
    assert states, "FedBN kept no client state (its BatchNorm layers)"
    return {"accuracy": accuracy, "client_state_files": len(states), **devices}


def check_fedwon(device: str, work: Path) -> dict:
    """FedWon, 2 rounds on ``device``: finite accuracy."""
    result = run(experiment(device, *DIGITCNN, "strategy.name=fedwon"), work / "fedwon")
    devices = assert_on(device)
    accuracy = result.summary["accuracy"]
    assert finite(accuracy), f"FedWon accuracy {accuracy}"
    return {"accuracy": accuracy, **devices}


def check_mirage(device: str, work: Path) -> dict:
    """One round with a Mirage attacker (client 0) on ``device``: its ASR in [0, 1]."""
    attack = {"name": "m", "method": "mirage", "target": 1, "clients": [0]}
    attack["options"] = {"iterations": 2, "detector_epochs": 2}
    result = run(experiment(device, "rounds=1", attacks=[attack]), work / "mirage")
    devices = assert_on(device)
    asr = (result.summary.get("asr_by_attacker") or {}).get("m")
    assert finite(asr) and 0.0 <= asr <= 1.0, f"Mirage ASR {asr}"
    return {"asr": asr, "accuracy": result.summary["accuracy"], **devices}


CHECKS: dict[str, Callable[[str, Path], dict]] = {
    "vectorized_equals_sequential": check_vectorized_equals_sequential,
    "device_auto": check_device_auto,
    "fractional_gpu_workers": check_fractional_gpu_workers,
    "fedbn": check_fedbn,
    "fedwon": check_fedwon,
    "mirage": check_mirage,
}


def run_check(name: str, device: str) -> dict:
    """One check in a fresh folder: ``{"status": "passed", **figures}``, ``{"status":
    "skipped", "reason": ...}`` or ``{"status": "failed", "error": ...}`` (one line)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        try:
            outcome = {"status": "passed", **CHECKS[name](device, Path(folder))}
        except Skipped as reason:
            outcome = {"status": "skipped", "reason": str(reason)}
        except Exception as error:  # noqa: BLE001 - a failed check is reported, the others still run
            first = (str(error).strip().splitlines() or [""])[0]
            outcome = {"status": "failed", "error": f"{type(error).__name__}: {first}"}
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    return outcome


# -- throughput --------------------------------------------------------------------------
MODELS = {
    "lenet": ["model.name=lenet"],
    "resnet18-sized": ["model.name=resnet", "model.blocks=2", "model.width=128"],
}
MAX_VECTORIZE = {"lenet": None, "resnet18-sized": 8}


def throughput(device: str, models: list[str], workers: list[int], clients: int, rounds: int) -> list[dict]:
    """Client updates per second of the Ray engine with k workers sharing ``device`` (1/k
    of the GPU, or of the CPUs, each), one client at a time and vectorised, interleaved."""
    sys.path.insert(0, str(Path(__file__).parent))
    from engines import W1, run_fedsim  # the engines benchmark's fresh-process runner

    cpus = os.cpu_count() or 1
    rows = []
    for model in models:
        for k in workers:
            share = [f"engine.num_gpus={1 / k}"] if device.startswith("cuda") else [f"engine.num_cpus={cpus / k}"]
            for mode in ("sequential", "vectorized"):
                size = 1
                if mode == "vectorized":
                    size = math.ceil(clients / k)
                    if MAX_VECTORIZE[model]:
                        size = min(size, MAX_VECTORIZE[model])
                overrides = [
                    *MODELS[model],
                    f"partition.num_clients={clients}",
                    f"rounds={rounds}",
                    "engine.name=ray",
                    f"engine.num_workers={k}",
                    *share,
                    f"engine.device={device}",
                    f"engine.vectorize={size}",
                ]
                seconds = run_fedsim(W1, overrides)["rounds_s"]
                row = {
                    "model": model,
                    "workers": k,
                    "mode": mode,
                    "vectorize": size,
                    "clients": clients,
                    "rounds": rounds,
                    "rounds_s": seconds,
                    "updates_per_s": clients * rounds / seconds,
                }
                rows.append(row)
                print(f"  {model:15s} {k:2d} workers {mode:10s} (K={size:2d}): {row['updates_per_s']:8.1f} updates/s")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: the same checks on the CPU")
    parser.add_argument("--quick", action="store_true", help="1 and 4 workers, LeNet-5 only, 2 rounds of 16 clients")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--skip-throughput", action="store_true", help="the checks only")
    args = parser.parse_args(argv)
    device = args.device
    if torch.device(device).type not in ("cuda", "cpu"):
        print(f"gpu_check: --device {device!r}: use cuda or cpu", file=sys.stderr)
        return 2
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    from fedsim.flower_log import quiet_flower

    quiet_flower()
    started = time.perf_counter()
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    figures: dict = {"device": device, "torch": torch.__version__, "cuda_device_name": name, "checks": {}}
    print(f"gpu_check on {device}{f' ({name})' if name else ''}, torch {torch.__version__}")
    for check in CHECKS:
        outcome = figures["checks"][check] = run_check(check, device)
        detail = {"passed": "", "skipped": f": {outcome.get('reason')}", "failed": f": {outcome.get('error')}"}
        print(f"  {check:30s} {outcome['status']}{detail[outcome['status']]} ({outcome['seconds']:.1f} s)")

    if args.skip_throughput:
        figures["throughput"] = []
    else:
        models, workers = (["lenet"], [1, 4]) if args.quick else (list(MODELS), [1, 4, 8, 16])
        clients, rounds = (16, 2) if args.quick else (32, 2)
        print(f"Throughput (client updates per second, {clients} clients x {rounds} rounds, Ray workers on {device}):")
        figures["throughput"] = throughput(device, models, workers, clients, rounds)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print(f"done in {figures['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    failed = [f"{check} ({o['error']})" for check, o in figures["checks"].items() if o["status"] == "failed"]
    if failed:
        print(f"gpu_check: failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
