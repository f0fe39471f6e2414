"""Benchmark: what one attacking client's round costs against a benign client's round.

The client is W1-sized (``w1.toml``): 200 MNIST images (mnist5k, the first 200 training
images), LeNet-5, one torch thread. Its benign round is FedAvg's local training with
W1's settings (batch 32, one epoch, SGD lr 0.05, momentum 0.9). Its attacking rounds run
each attack below around the same trainer, from the same global model, target 1:

- ``badnets``: the same training on poisoned batches (8 of 64 per batch);
- ``mirage``: Mirage's trigger search (50 iterations, each retraining its detector for 30
  epochs and taking a sign step per training batch holding target-class samples), then
  its own poisoned training (5 epochs at lr 0.01).

After one untimed warm-up round, the rounds are interleaved (benign, badnets, mirage; benign, ...) and the median of the
repeats is kept; reported are seconds per round and ``<attack>_over_benign``, the ratio
measured in the same run.

    python experiments/bench/attacks.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from flwr.app import ArrayRecord

from fedsim.attacks import ATTACKS
from fedsim.data import ClientData, load_dataset
from fedsim.models import build_model
from fedsim.trainer import ClientCall, ClientTrainer, RoundConfig

CLIENT_SIZE = 200  # a W1 client's images
TARGET = 1
ATTACKS_TIMED = ("badnets", "mirage")


def w1_client() -> tuple[ClientData, tuple[int, ...]]:
    dataset = load_dataset("mnist5k")
    x, y = dataset.x_train[:CLIENT_SIZE], dataset.y_train[:CLIENT_SIZE]
    return ClientData(x, y, x[:0], y[:0]), dataset.input_shape


def one_round(trainer, data: ClientData, input_shape, arrays: ArrayRecord, config: RoundConfig) -> float:
    model = build_model("lenet", input_shape, 10)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    trainer.train(ClientCall(model, arrays, data, config, {}, generator, torch.device("cpu")))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, input_shape = w1_client()
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("lenet", input_shape, 10).state_dict())
    config = RoundConfig(server_round=1, client=0, local_epochs=1, batch_size=32, lr=0.05, momentum=0.9)
    benign = ClientTrainer()
    trainers = {"benign": benign, **{name: ATTACKS[name](benign, target=TARGET) for name in ATTACKS_TIMED}}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    one_round(benign, data, input_shape, arrays, config)  # warm-up: first-call costs in torch
    for _ in range(1 if args.quick else 3):
        for name, trainer in trainers.items():
            times[name].append(one_round(trainer, data, input_shape, arrays, config))
    seconds = {name: statistics.median(values) for name, values in times.items()}
    figures = {
        "client_images": CLIENT_SIZE,
        "seconds_per_round": seconds,
        **{f"{name}_over_benign": seconds[name] / seconds["benign"] for name in ATTACKS_TIMED},
    }
    for name, value in seconds.items():
        print(f"{name:>8}: {value:7.3f} s per round")
    for name in ATTACKS_TIMED:
        print(f"{name} over benign: {figures[f'{name}_over_benign']:.1f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
