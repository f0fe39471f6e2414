"""Is Mirage's success a backdoor in the weights, or its trigger fooling any model?

Mirage learns its trigger against the global model (its loss asks f(x + t) to be the target
class), so a high ASR can come from the pattern alone, as an adversarial perturbation,
with no backdoor trained into the weights. This control separates the two. For each seed
of an attack sweep's runs with no defence, it runs the same experiment without attackers
(a control run, in ``<sweep>/control-s<seed>``; a finished one is reused), then measures
each attacker's final learned trigger on three models:

- the attacked run's final global model (what the study reports);
- the control run's final model, trained without any attacker: the trigger alone;
- the control model with the trigger Mirage starts from (0.5 everywhere): the floor.

    python experiments/attacks/trigger_control.py runs/mirage-3-sweep [--seeds 1,2,3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fedsim import checkpoint
from fedsim.attack_plan import AttackPlan
from fedsim.build import load_experiment
from fedsim.environment import RunEnvironment
from fedsim.lookups import strategy_trainer
from fedsim.observers.attacks import AttackMetrics
from fedsim.runner import run_experiment
from fedsim.state import ClientStateStore
from fedsim.training import classification_metrics, predict
from partitioners import Partition


def accuracy(env: RunEnvironment, arrays, x, y) -> float:
    model = env.new_model()
    model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    device = env.enter(server=True)
    return float(classification_metrics(predict(model.to(device), x, device), y)["accuracy"])


def control(sweep: Path, seed: int) -> dict[str, dict[str, float]]:
    # the run with no defence: named for it in a sweep over defences, else just by its seed
    names = (f"defencenone-s{seed}", f"s{seed}")
    attacked_dir = next(
        path
        for path in sorted(sweep.iterdir())
        if path.is_dir() and path.name.endswith(names) and not path.name.startswith("control-")
    )
    experiment = load_experiment(attacked_dir / "config.toml")
    benign = load_experiment(attacked_dir / "config.toml", ["attack=[]", f"name={experiment.name}-control"])
    control_dir = sweep / f"control-s{seed}"
    run_experiment(benign, control_dir)
    env = RunEnvironment(experiment, attacked_dir)
    dataset = env.dataset()
    num_clients = Partition.load(attacked_dir / "partition.npz").num_clients
    plan = AttackPlan.from_experiment(experiment, num_clients)
    metrics = AttackMetrics(
        plan, dataset, ClientStateStore(attacked_dir / "client_state"), strategy_trainer(experiment)
    )
    attacked = checkpoint.load(attacked_dir / "checkpoint.npz").arrays
    clean = checkpoint.load(control_dir / "checkpoint.npz").arrays
    out = {}
    for attacker in plan.attackers:
        x, y = metrics.poisoned_test_set(attacker, experiment.rounds)
        attack = metrics.attacks[attacker.name]
        keep = attack.eligible(torch.as_tensor(dataset.y_test)).numpy()
        x_start = attack.trigger.apply(dataset.x_test[keep])  # the pattern Mirage starts from
        out[attacker.name] = {
            "attacked_model": accuracy(env, attacked, x, y),
            "control_model": accuracy(env, clean, x, y),
            "control_model_initial_trigger": accuracy(env, clean, x_start, y),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="an attack sweep folder, e.g. runs/mirage-3-sweep")
    parser.add_argument("--seeds", default="1,2,3", help="seeds of its runs with no defence (default 1,2,3)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results = {seed: control(args.sweep, seed) for seed in seeds}
    columns = ("attacked_model", "control_model", "control_model_initial_trigger")
    print("| ASR of each attacker's final trigger on | mean ± std over attackers and seeds |")
    print("| --- | ---: |")
    for column in columns:
        values = [row[column] for per_seed in results.values() for row in per_seed.values()]
        print(f"| {column.replace('_', ' ')} | {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
