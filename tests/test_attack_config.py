"""``[[attack]]`` tables: who attacks, what benign clients see, per-attacker success rates,
detection counts, resume, and one-line errors for bad tables."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fedsim.attack_plan import AttackPlan
from fedsim.attacks.base import STATE_PREFIX
from fedsim.attacks.mirage import PATTERN
from fedsim.attacks.triggers import Trigger
from fedsim.build import check_attacks_fit_data, validate_experiment
from fedsim.data import Dataset
from fedsim.errors import UserError
from fedsim.observers.attacks import BENIGN, AttackMetrics
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from fedsim.state import ClientStateStore
from fedsim.trainer import ClientTrainer
from tests.conftest import interrupted_and_resumed, tiny_experiment

BADNETS = {"method": "badnets", "target": 1, "trigger": {"size": 2}}


def with_attacks(*tables: dict, overrides: tuple[str, ...] = ()):
    """The tiny experiment (4 clients, 8x8 digits, an MLP) with these ``[[attack]]`` tables."""
    data = tiny_experiment(*overrides).to_dict()
    return validate_experiment({**data, "attack": [dict(table) for table in tables]}, "test")


# -- who attacks ----------------------------------------------------------------------------
def test_counts_are_drawn_with_the_seed_from_the_clients_no_table_names():
    experiment = with_attacks({**BADNETS, "clients": [2]}, {**BADNETS, "target": 3, "count": 2})
    plan = AttackPlan.from_experiment(experiment, 4)
    named, drawn = plan.attackers
    assert named.clients == (2,) and len(drawn.clients) == 2 and 2 not in drawn.clients
    again = AttackPlan.from_experiment(experiment, 4)
    assert again.attackers[1].clients == drawn.clients, "the same seed draws the same clients"
    draws = {
        AttackPlan.from_experiment(experiment.model_copy(update={"seed": seed}), 4).attackers[1].clients
        for seed in range(8)
    }
    assert len(draws) > 1, "another seed draws other clients"


def test_a_benign_client_runs_the_strategys_own_trainer_and_an_attacker_the_attack_around_it():
    plan = AttackPlan.from_experiment(with_attacks({**BADNETS, "clients": [1]}), 4)
    trainer = ClientTrainer()
    assert plan.trainer_for(0, trainer) is trainer
    attack = plan.trainer_for(1, trainer)
    assert attack.trainer is trainer and attack.target == 1 and attack.trigger == Trigger(size=2)
    assert plan.trainer_for(1, trainer) is attack, "one attack instance per client, kept"


def test_a_dba_group_splits_one_patch_among_its_clients():
    dba = {"method": "dba", "target": 2, "trigger": {"size": 2}, "group": "g"}
    plan = AttackPlan.from_experiment(with_attacks({**dba, "clients": [0, 3]}, {**dba, "clients": [1]}), 4)
    parts = [plan.trainer_for(client, ClientTrainer()) for client in (0, 3, 1)]
    assert [(a.part, a.parts) for a in parts] == [(0, 3), (1, 3), (2, 3)]
    masks = [a.training_trigger().mask(8, 8) for a in parts]
    assert not (masks[0] & masks[1]).any() and (masks[0] | masks[1] | masks[2]).sum() == 4
    assert parts[0].test_trigger == Trigger(size=2), "measured with the full patch"


def test_a_dba_group_without_a_trigger_gets_the_reference_bars_and_its_options():
    dba = {"method": "dba", "target": 2, "group": "g", "options": {"scale": 4.0, "bar": [1, 2], "gap": 1}}
    plan = AttackPlan.from_experiment(with_attacks({**dba, "clients": [0, 3]}, {**dba, "clients": [1]}), 4)
    attacks = [plan.trainer_for(client, ClientTrainer()) for client in (0, 3, 1)]
    full = Trigger("bars", bars=3, bar=(1, 2), gap=1)
    assert all(a.test_trigger == full and a.scale == 4.0 for a in attacks)
    masks = [a.training_trigger().mask(8, 8) for a in attacks]
    assert not (masks[0] & masks[1]).any()
    np.testing.assert_array_equal(masks[0] | masks[1] | masks[2], full.mask(8, 8))
    with pytest.raises(UserError, match=r"\(dba\): a bar is \(height, width\), both >= 1; got \(0, 2\)"):
        with_attacks({**dba, "clients": [0], "options": {"bar": [0, 2]}})
    too_many = with_attacks({**dba, "clients": [0], "options": {"local_triggers": 20}})
    with pytest.raises(UserError, match=r"#1 trigger: 20 bars of 1x1 pixels.*do not fit a 8x8 image"):
        check_attacks_fit_data(too_many, (1, 8, 8), 10, 4)


def test_attackers_in_a_group_must_agree_on_what_they_collude_on():
    dba = {"method": "dba", "target": 2, "group": "g"}
    with pytest.raises(UserError, match="group 'g'.*same method, target, trigger and options"):
        AttackPlan.from_experiment(with_attacks({**dba, "clients": [0]}, {**dba, "target": 3, "clients": [1]}), 4)
    with pytest.raises(UserError, match="group 'g'.*same method, target, trigger and options"):
        other_bars = {**dba, "clients": [1], "options": {"bar": [1, 2]}}
        AttackPlan.from_experiment(with_attacks({**dba, "clients": [0]}, other_bars), 4)


# -- what benign clients receive ------------------------------------------------------------
def test_an_attacker_never_changes_what_a_benign_client_receives_or_trains(tmp_path):
    """Round 1: every client receives the same initial model, attackers or not, and the
    in-process engine trains the attacker (client 0) first in the same worker as the
    others; a benign client's training must be bit-identical to a run without attackers
    (no shared model, trainer, data or generator state leaks from the attack)."""
    attacked = run_experiment(
        with_attacks({**BADNETS, "clients": [0], "poison_fraction": 0.5}, overrides=("rounds=1",)), tmp_path / "a"
    )
    clean = run_experiment(tiny_experiment("rounds=1"), tmp_path / "c")

    def client_rows(run):
        metrics = RunDirectory(run.path).read_metrics()
        rows = metrics[(metrics.scope == "client") & (metrics["round"] == 1) & (metrics.metric == "train_loss")]
        return dict(zip(rows.id.astype(int), rows.value))

    with_attacker, without = client_rows(attacked), client_rows(clean)
    assert {c: with_attacker[c] for c in (1, 2, 3)} == {c: without[c] for c in (1, 2, 3)}
    assert with_attacker[0] != without[0], "the attacker did train on poisoned batches"
    assert set(with_attacker) == set(without), "an attacker reports the same metric keys as a benign client"


# -- success rates --------------------------------------------------------------------------
def tiny_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    y = np.arange(40) % 4
    return Dataset("t", x, y, x.copy(), y.copy(), classes=("0", "1", "2", "3"))


def test_the_attack_success_rate_excludes_the_target_class(tmp_path):
    experiment = with_attacks({**BADNETS, "clients": [0]})
    plan = AttackPlan.from_experiment(experiment, 4)
    dataset = tiny_dataset()
    metrics = AttackMetrics(plan, dataset, ClientStateStore(tmp_path), ClientTrainer())
    x, y = metrics.poisoned_test_set(plan.attackers[0], 1)
    assert len(x) == 30 and (y == 1).all(), "the 10 images of the target class 1 are left out"
    assert (x[:, :, -2:, -2:] == 1.0).all(), "every one carries the trigger"
    np.testing.assert_array_equal(x[:, :, :6, :], dataset.x_test[dataset.y_test != 1][:, :, :6, :])

    def triggered_means_target(_arrays, x=None, y=None):
        if x is None:  # the clean accuracy
            return {"accuracy": 0.5}
        predicted = np.where(x[:, 0, -1, -1] == 1.0, 1, 0)  # a backdoored model
        return {"accuracy": float((predicted == y).mean())}

    rows = {(r.id, r.metric): r.value for r in metrics.evaluation_rows(3, None, triggered_means_target)}
    assert rows[("0", "asr")] == 1.0 and rows[("all", "clean_accuracy")] == 0.5
    assert metrics.summary()["asr_by_attacker"] == {"0": 1.0}


def test_label_flipping_is_measured_on_its_source_class_without_a_trigger(tmp_path):
    experiment = with_attacks({"method": "label_flip", "target": 1, "clients": [0], "options": {"source": 3}})
    plan = AttackPlan.from_experiment(experiment, 4)
    dataset = tiny_dataset()
    x, y = AttackMetrics(plan, dataset, ClientStateStore(tmp_path), ClientTrainer()).poisoned_test_set(
        plan.attackers[0], 1
    )
    np.testing.assert_array_equal(x, dataset.x_test[dataset.y_test == 3])
    assert (y == 1).all()


def test_mirage_is_measured_with_the_pattern_its_clients_learned_most_recently(tmp_path):
    experiment = with_attacks({"method": "mirage", "target": 1, "clients": [0, 2]})
    plan = AttackPlan.from_experiment(experiment, 4)
    store = ClientStateStore(tmp_path)
    store.save(0, 2, {STATE_PREFIX + PATTERN: np.full((1, 8, 8), 0.1, dtype=np.float32)})
    store.save(2, 3, {STATE_PREFIX + PATTERN: np.full((1, 8, 8), 0.9, dtype=np.float32)})
    metrics = AttackMetrics(plan, tiny_dataset(), store, ClientTrainer())
    assert metrics.measured_trigger(plan.attackers[0], 1).pattern is None, "before any attack round: the start"
    assert np.allclose(metrics.measured_trigger(plan.attackers[0], 2).pattern, 0.1)
    assert np.allclose(metrics.measured_trigger(plan.attackers[0], 5).pattern, 0.9)


def test_detection_counts_attackers_in_their_window_and_benign_clients(tmp_path):
    experiment = with_attacks({**BADNETS, "clients": [0], "window": [2, 3]}, {**BADNETS, "target": 2, "clients": [1]})
    plan = AttackPlan.from_experiment(experiment, 4)
    metrics = AttackMetrics(plan, tiny_dataset(), ClientStateStore(tmp_path), ClientTrainer())
    assert metrics.detection_rows(1, [0, 1, 2, 3], None) == [], "no verdict without a filtering defence"
    metrics.detection_rows(1, [0, 1, 2, 3], [0, 2])  # attacker 0 is outside its window: not counted
    metrics.detection_rows(2, [0, 1, 2, 3], [2, 3])
    detection = metrics.summary()["detection"]
    assert detection["by_attacker"]["0"] == {"seen": 1, "rejected": 1, "tpr": 1.0}
    assert detection["by_attacker"]["1"] == {"seen": 2, "rejected": 2, "tpr": 1.0}
    assert metrics.detection[BENIGN] == {"seen": 4, "rejected": 1}
    assert detection["tpr"] == 1.0 and detection["fpr"] == 0.25


# -- whole runs -----------------------------------------------------------------------------
def test_a_run_reports_each_attacker_and_plots_the_window(tmp_path):
    experiment = with_attacks(
        {**BADNETS, "clients": [0], "window": [2, 2]},
        {**BADNETS, "target": 2, "clients": [1], "trigger": {"size": 2, "location": "top-left"}},
        overrides=(
            "rounds=3",
            "strategy.defence=multikrum",
            "strategy.defence_options={num_malicious_nodes=0,num_nodes_to_select=2}",
        ),
    )
    run = run_experiment(experiment, tmp_path / "run")
    summary = run.summary
    assert set(summary["asr_by_attacker"]) == {"0", "1"} and set(summary["asr_at_window_end"]) == {"0"}
    assert summary["asr_gap"] == pytest.approx(
        max(summary["asr_by_attacker"].values()) - min(summary["asr_by_attacker"].values())
    )
    assert summary["clean_accuracy"] == pytest.approx(summary["accuracy"])
    detection = summary["detection"]
    assert detection["attacker_replies"] == 1 + 3 and detection["benign_replies"] == 2 * 3
    metrics = RunDirectory(run.path).read_metrics()
    asr = metrics[(metrics.scope == "attacker") & (metrics.metric == "asr")]
    assert sorted(asr["round"].unique()) == [0, 1, 2, 3], "the chance level before training, then every round"
    assert (run.path / "plots" / "attack.png").stat().st_size > 0


@pytest.mark.parametrize("defence", ["norm-clipping", "fedmedian", "rlr"])
def test_a_rule_that_keeps_every_reply_reports_no_detection(defence, tmp_path):
    """Clipping, medians and RLR bound every client's influence and drop nobody: a
    detection rate of 0 of n would read as a defence that failed to filter."""
    from strategies.defences import DEFENCES

    assert DEFENCES[defence].filters is False
    experiment = with_attacks({**BADNETS, "clients": [0]}, overrides=("rounds=1", f"strategy.defence={defence}"))
    run = run_experiment(experiment, tmp_path / "run")
    assert run.summary["detection"] is None and run.summary["asr_by_attacker"]
    metrics = RunDirectory(run.path).read_metrics()
    assert not metrics.metric.isin(["seen", "rejected"]).any()


def test_an_attacked_run_resumes_exactly(tmp_path, monkeypatch):
    experiment = with_attacks(
        {"method": "mirage", "target": 1, "clients": [0], "options": {"iterations": 2, "detector_epochs": 2}},
        overrides=("rounds=3", "strategy.defence=flame"),
    )
    resumed = interrupted_and_resumed(experiment, tmp_path, monkeypatch)
    assert resumed.status == "resume"
    assert (tmp_path / "run/metrics.csv").read_bytes() == (tmp_path / "reference/metrics.csv").read_bytes()
    reference = json.loads((tmp_path / "reference/summary.json").read_text())
    for key in ("asr_by_attacker", "asr_peak_by_attacker", "clean_accuracy", "detection"):
        assert resumed.summary[key] == reference[key]


def test_experiments_without_attackers_keep_their_fingerprints():
    plain = tiny_experiment()
    assert "attack" not in plain.to_dict()
    assert with_attacks().fingerprint() == plain.fingerprint()
    assert with_attacks({**BADNETS, "clients": [0]}).fingerprint() != plain.fingerprint()


# -- bad tables -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "table, message",
    [
        ({**BADNETS, "clients": [0], "targte": 2}, r"\[\[attack\]\] #1 unknown key 'targte'; did you mean 'target'"),
        ({"method": "badnets", "clients": [0]}, r"\[\[attack\]\] #1 is missing the required key 'target'"),
        ({**BADNETS, "clients": [0], "count": 1}, r"either clients = \[ids\] or count = N"),
        ({**BADNETS}, r"either clients = \[ids\] or count = N"),
        ({**BADNETS, "clients": [0], "window": [5, 2]}, r"first <= last"),
        ({**BADNETS, "clients": [0], "poison_fraction": 1.5}, r"poison_fraction = 1.5 is invalid"),
        ({**BADNETS, "clients": [0], "method": "badnet"}, r"not a known attack; did you mean 'badnets'"),
        ({**BADNETS, "clients": [0], "options": {"gama": 2.0}}, r"#1 \(badnets\) options unknown key 'gama'"),
        ({**BADNETS, "clients": [0], "trigger": {"kind": "blend"}}, r"BadNets takes a 'patch' trigger"),
        ({**BADNETS, "clients": [0], "trigger": {"sise": 3}}, r"trigger: unknown key 'sise'; did you mean 'size'"),
        (
            {**BADNETS, "clients": [0], "options": {"target": 3}},
            r"options \['target'\] are keys of the \[\[attack\]\] table itself",
        ),
        ({**BADNETS, "clients": [9]}, r"clients \[9\] do not exist: the partition has 4 clients"),
        ({**BADNETS, "count": 5}, r"counts ask for 5 clients but only 4"),
        ({**BADNETS, "clients": [0], "name": "all"}, r"name 'all' is reserved"),
    ],
)
def test_bad_attack_tables_are_one_line_errors(table, message):
    with pytest.raises(UserError, match=message) as error:
        with_attacks(table)
    assert "\n" not in str(error.value)


def test_attacks_that_do_not_fit_the_data_fail_before_the_run(tmp_path):
    with pytest.raises(UserError, match=r"target = 12 is not a class: the dataset has 10"):
        run_experiment(with_attacks({**BADNETS, "clients": [0], "target": 12}), tmp_path / "a")
    with pytest.raises(UserError, match=r"trigger: a 9x9 patch does not fit a 8x8 image"):
        run_experiment(with_attacks({**BADNETS, "clients": [0], "trigger": {"size": 9}}), tmp_path / "b")
    assert not (tmp_path / "a" / "metrics.csv").exists()


def test_an_attack_refuses_a_strategy_with_several_models():
    with pytest.raises(UserError, match=r"attacks wrap trainers of one model"):
        with_attacks({**BADNETS, "clients": [0]}, overrides=("strategy.name=ifca", "strategy.num_models=2"))


def test_the_cli_reports_a_bad_attack_table_in_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        'name = "x"\nrounds = 1\n[partition]\nname = "iid"\nnum_clients = 2\n'
        '[[attack]]\nmethod = "mirage"\nclients = [0]\ntarget = 1\noptions = { step = -1, iteratons = 3 }\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "fedsim", "run", str(config), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "[[attack]] #1 (mirage) options" in result.stderr and "iteratons" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fedsim_list_names_the_attacks_defences_and_feature_extractors(capsys):
    from fedsim.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for section, member in [("attacks", "mirage"), ("defences", "flame"), ("feature extractors", "checkpoint")]:
        assert section in out and f"  {member} " in out


USER_ATTACK = '''
from fedsim.attacks.badnets import BadNets


class EveryOther(BadNets):
    """A user's attack: BadNets on every other batch."""

    def __init__(self, trainer, *, target, strength=2, **kwargs):
        self.strength = strength
        super().__init__(trainer, target=target, **kwargs)
'''


def test_a_users_attack_plugs_in_by_reference_or_entry_point(tmp_path, monkeypatch):
    (tmp_path / "my_attack.py").write_text(USER_ATTACK)
    monkeypatch.syspath_prepend(str(tmp_path))
    table = {"target": 1, "clients": [0], "options": {"strength": 5}}
    by_reference = with_attacks({**table, "method": "my_attack:EveryOther"})
    assert by_reference.attack[0].options == {"strength": 5}
    attack = AttackPlan.from_experiment(by_reference, 4).trainer_for(0, ClientTrainer())
    assert type(attack).__name__ == "EveryOther" and attack.strength == 5

    class EntryPoint:
        value = "my_attack:EveryOther"

        @staticmethod
        def load():
            import my_attack

            return my_attack.EveryOther

    monkeypatch.setattr("fedsim.registry.plugin_table", lambda group: {"every-other": EntryPoint()})
    by_plugin = with_attacks({**table, "method": "every-other"})
    assert type(AttackPlan.from_experiment(by_plugin, 4).trainer_for(0, ClientTrainer())).__name__ == "EveryOther"
    with pytest.raises(UserError, match="options unknown key 'strenght'; did you mean 'strength'"):
        with_attacks({**table, "method": "every-other", "options": {"strenght": 1}})
