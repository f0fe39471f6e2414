"""Experiment files: every mistake is one line naming the key, exit code 2, no traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.build import load_experiment
from fedsim.cli import main
from fedsim.config import parse_override
from fedsim.errors import UserError

from .conftest import QUICKSTART

VALID = QUICKSTART.read_text()

# (what the file says, words the one-line error must contain)
MALFORMED = {
    "misspelt top-level key": ('name = "x"\nrounds = 2\nsed = 1\n', ["'sed'", "did you mean 'seed'"]),
    "missing rounds": ('name = "x"\n', ["missing", "rounds"]),
    "rounds zero": ('name = "x"\nrounds = 0\n', ["rounds", "0", "greater than or equal to 1"]),
    "seed not integer": ('name = "x"\nrounds = 1\nseed = "one"\n', ["seed", "'one'", "integer"]),
    "bad name": ('name = "a b"\nrounds = 1\n', ["name", "'a b'", "pattern"]),
    "not TOML": ('name = "x\nrounds = 1\n', ["not valid TOML"]),
    "table as value": ('name = "x"\nrounds = 1\nclient = 3\n', ["'client' must be a table"]),
    "unknown client key": (
        'name = "x"\nrounds = 1\n[client]\nbatchsize = 8\n',
        ["[client]", "'batchsize'", "did you mean 'batch_size'"],
    ),
    "negative lr": ('name = "x"\nrounds = 1\n[client]\nlr = -0.1\n', ["[client] lr", "-0.1", "greater than 0"]),
    "momentum one": ('name = "x"\nrounds = 1\n[client]\nmomentum = 1.0\n', ["[client] momentum", "less than 1"]),
    "unknown optimizer": (
        'name = "x"\nrounds = 1\n[client]\noptimizer = "lbfgs"\n',
        ["[client] optimizer", "'lbfgs'", "'sgd' or 'adam'"],
    ),
    "unknown dataset": ('name = "x"\nrounds = 1\n[dataset]\nname = "cifar"\n', ["[dataset]", "'cifar'", "choose from"]),
    "unknown partitioner": (
        'name = "x"\nrounds = 1\n[partition]\nname = "dirichelt"\n',
        ["[partition]", "did you mean 'dirichlet'"],
    ),
    "misspelt partition key": (
        'name = "x"\nrounds = 1\n[partition]\nname = "dirichlet"\nnum_clients = 4\nalhpa = 0.3\n',
        ["[partition]", "'alhpa'", "did you mean 'alpha'"],
    ),
    "another partitioner's key": (
        'name = "x"\nrounds = 1\n[partition]\nname = "iid"\nnum_clients = 4\nalpha = 0.3\n',
        ["[partition] 'alpha' is not an option of partition 'iid'", "'dirichlet'", "or remove alpha"],
    ),
    "negative alpha": (
        'name = "x"\nrounds = 1\n[partition]\nname = "dirichlet"\nnum_clients = 4\nalpha = -1\n',
        ["[partition]", "alpha", "> 0", "-1"],
    ),
    "alpha not a number": (
        'name = "x"\nrounds = 1\n[partition]\nname = "dirichlet"\nnum_clients = 4\nalpha = "big"\n',
        ["[partition] alpha", "'big'", "valid number"],
    ),
    "missing num_clients": (
        'name = "x"\nrounds = 1\n[partition]\nname = "dirichlet"\n',
        ["[partition]", "missing required key 'num_clients'"],
    ),
    "unknown model option": (
        'name = "x"\nrounds = 1\n[partition]\nnum_clients = 2\n[model]\nname = "lenet"\nkernel = 3\n',
        ["[model]", "'kernel'", "valid keys: name, channels, hidden"],
    ),
    "misspelt component name key": (
        'name = "x"\nrounds = 1\n[partition]\nnum_clients = 2\n[strategy]\nnme = "fedavg"\n',
        ["[strategy]", "'nme'", "did you mean 'name'"],
    ),
    "unknown strategy": (
        'name = "x"\nrounds = 1\n[partition]\nnum_clients = 2\n[strategy]\nname = "fedav"\n',
        ["[strategy]", "did you mean 'fedavg'"],
    ),
    "fraction above one": (
        'name = "x"\nrounds = 1\n[partition]\nnum_clients = 2\n[strategy]\nfraction_train = 1.5\n',
        ["[strategy] fraction_train", "1.5", "[0, 1]"],
    ),
    "strategy reference without module": (
        'name = "x"\nrounds = 1\n[partition]\nnum_clients = 2\n[strategy]\nname = "nosuchmodule:Thing"\n',
        ["cannot import module 'nosuchmodule'"],
    ),
    "unknown engine": (
        'name = "x"\nrounds = 1\n[partition]\nnum_clients = 2\n[engine]\nname = "dask"\n',
        ["[engine] name", "'dask'", "'inprocess', 'ray' or 'flower'"],
    ),
    "ray option on the in-process engine": (
        'name = "x"\nrounds = 1\n[partition]\nnum_clients = 2\n[engine]\nnum_gpus = 1\n',
        ["[engine] 'num_gpus' is not an option of engine 'inprocess'", "set [engine] name = 'ray'"],
    ),
    "negative gpu share": (
        'name = "x"\nrounds = 1\n[partition]\nnum_clients = 2\n[engine]\nname = "ray"\nnum_gpus = -0.5\n',
        ["[engine] num_gpus", "-0.5", "greater than or equal to 0"],
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_gives_one_line_error(case, tmp_path, capsys):
    text, expected = MALFORMED[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code = main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for words in expected:
        assert words in err, f"{words!r} not in {err!r}"
    assert not (tmp_path / "out").exists(), "a rejected experiment must not create its run directory"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("partition.alpha=0.05", 0.05),
        ("seed=7", 7),
        ("model.hidden=[16, 8]", [16, 8]),
        ("strategy.name=fedprox", "fedprox"),
        ("client.optimizer=adam", "adam"),
    ],
)
def test_set_reads_values_as_toml(override, expected):
    path, value = parse_override(override)
    assert value == expected
    extra = ["strategy.proximal_mu=0.1"] if "fedprox" in override else []
    experiment = load_experiment(QUICKSTART, [override, *extra])
    table = experiment.to_dict()
    found = table[path[0]][path[1]] if len(path) == 2 else table[path[0]]
    assert found == (expected if not isinstance(expected, list) else list(expected))


def test_set_coerces_to_the_declared_type():
    experiment = load_experiment(QUICKSTART, ["partition.alpha=1", "client.lr=1"])
    assert isinstance(experiment.partition.params["alpha"], float)
    assert isinstance(experiment.client.lr, float)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("partition", "must look like section.key=value"),
        ("clinet.lr=0.1", "did you mean 'client'"),
        ("a.b.c=1", "at most two levels"),
    ],
)
def test_bad_set_is_one_line(override, words, capsys):
    assert main(["run", str(QUICKSTART), "--set", override, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_resolved_experiment_spells_out_defaults():
    data = load_experiment(QUICKSTART).to_dict()
    assert data["partition"]["max_draws"] == 1000  # the Dirichlet partitioner's default
    assert data["model"]["channels"] == [6, 16]
    assert data["strategy"]["min_train_nodes"] == 1  # fedsim's default, not Flower's 2
    assert "min_available_nodes" not in data["strategy"]  # known only at run time
    assert data["engine"]["device"] == "auto"


def test_console_script_prints_no_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nrounds = 1\n[partition]\nname = "dirichlet"\nnum_clients = 4\nalpha = 0\n')
    done = subprocess.run(
        [sys.executable, "-m", "fedsim", "run", str(path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {path}: [partition] alpha must be a finite number > 0, got 0.0"


def test_missing_file_and_unknown_command(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ([], ["run", "list", "partition", "sweep", "report", "data"]),
        (["run"], ["--set", "--out", "--overwrite", "--quiet", "examples:"]),
        (["list"], ["registered component"]),
        (["partition"], ["--set", "--out", "partition_labels.png"]),
        (["sweep"], ["--grid", "--seeds", "--workers", "--backend", "[sweep]"]),
        (["report"], ["--by", "--target", "--format"]),
        (["data", "download"], ["--root", "SHA-256"]),
        (["data", "info"], ["NAME"]),
    ],
)
def test_help_describes_every_command(command, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out, (command, word)


def test_list_names_every_component(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist5k", "digits", "dirichlet", "iid", "lenet", "mlp", "fedavg", "fedprox", "inprocess", "ray"):
        assert f"  {name} " in out, name
    # every strategy is described by its paper, Flower's own classes included
    assert re.search(r"\n  fedavg +FedAvg \(McMahan et al\.", out) and re.search(
        r"\n  fedprox +FedProx \(Li et al\.", out
    )


def test_quickstart_is_valid_as_shipped():
    experiment = load_experiment(QUICKSTART)
    assert experiment.dataset.name == "mnist5k"
    assert experiment.partition.params["alpha"] == 0.5
    assert experiment.partition.params["num_clients"] == 10
    assert experiment.rounds == 20
    assert Path(QUICKSTART).read_text() == VALID


def test_switching_a_component_drops_the_files_keys_it_does_not_take():
    """quickstart.toml sets alpha and min_size for dirichlet; shards takes neither."""
    experiment = load_experiment(QUICKSTART, ["partition.name=shards"])
    assert experiment.partition.params == {"num_clients": 10, "shards_per_client": 2}
    # ... but a key given on the command line is still checked against the new component
    with pytest.raises(UserError, match=r"\[partition\] 'alpha' is not an option of partition 'shards'"):
        load_experiment(QUICKSTART, ["partition.name=shards", "partition.alpha=0.3"])
    # and without a switch, the file's keys are checked as always
    with pytest.raises(UserError, match="did you mean 'alpha'"):
        load_experiment(QUICKSTART, ["partition.alhpa=0.3"])


def test_skew_json_is_written_with_the_run(tmp_path):
    import json

    from fedsim.runner import run_experiment

    from .conftest import tiny_experiment

    run_experiment(tiny_experiment("rounds=1"), tmp_path / "run")
    skew = json.loads((tmp_path / "run/skew.json").read_text())
    assert skew["summary"]["num_clients"] == 4
    assert len(skew["clients"]["hellinger"]) == 4


def test_default_config_outside_the_checkout(tmp_path, monkeypatch):
    """From another folder, `fedsim run` still finds the quickstart of the checkout it runs from."""
    from fedsim.commands.run import default_config

    monkeypatch.chdir(tmp_path)
    assert default_config().resolve() == QUICKSTART.resolve()
    monkeypatch.chdir(QUICKSTART.parents[1])
    assert str(default_config()) == "experiments/quickstart.toml"  # errors name it as typed


def test_result_line_survives_a_missing_metric():
    from fedsim.commands.run import format_metric

    assert format_metric(None) == "-"
    assert format_metric(0.91234) == "0.9123"
