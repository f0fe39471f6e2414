"""`fedsim partition`: the files it promises, the split `fedsim run` would train on, and
one-line errors for impossible requests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.cli import main
from fedsim.data import DATASETS, Dataset, DatasetInfo, load_dataset
from fedsim.splitting import split_dataset
from partitioners import Partition

from .conftest import QUICKSTART, TINY, tiny_experiment

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))


def partition_command(*overrides: str, out=None) -> list[str]:
    sets = [arg for override in (*TINY, *overrides) for arg in ("--set", override)]
    return ["partition", str(QUICKSTART), *sets, *(["--out", str(out)] if out else [])]


def test_writes_the_partition_skew_and_heatmap(tmp_path, capsys):
    out = tmp_path / "look"
    assert main(partition_command(out=out)) == 0
    printed = capsys.readouterr().out
    assert "mean Hellinger" in printed and str(out) in printed

    assert (out / "plots/partition_labels.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "plots/partition_clusters.png").exists()
    partition = Partition.load(out / "partition.npz")
    experiment = tiny_experiment()
    assert partition == split_dataset(experiment, load_dataset("digits")), "not the split `fedsim run` uses"
    skew = json.loads((out / "skew.json").read_text())
    assert skew["summary"]["mean_hellinger"] == pytest.approx(partition.skew().summary["mean_hellinger"])
    assert len(skew["clients"]["hellinger"]) == 4


def test_embedding_split_draws_its_clusters_and_embedding_distance(tmp_path):
    out = tmp_path / "emb"
    overrides = ("partition.name=embedding", "partition.clusters=4", "partition.min_size=5")
    assert main(partition_command(*overrides, out=out)) == 0
    assert (out / "plots/partition_clusters.png").read_bytes()[:8] == PNG_MAGIC
    skew = json.loads((out / "skew.json").read_text())
    assert all(value > 0 for value in skew["clients"]["frechet"])
    assert "mean_hellinger_cluster" in skew["summary"]
    assert sorted(Partition.load(out / "partition.npz").groups) == ["cluster"]


def test_run_describes_its_partition_as_fedsim_partition_does(tmp_path):
    from fedsim.runner import run_experiment

    overrides = ("partition.name=embedding", "partition.clusters=4", "partition.min_size=5", "rounds=1")
    assert main(partition_command(*overrides, out=tmp_path / "look")) == 0
    run_experiment(tiny_experiment(*overrides), tmp_path / "run")
    looked = json.loads((tmp_path / "look/skew.json").read_text())
    assert json.loads((tmp_path / "run/skew.json").read_text()) == looked
    assert "mean_frechet" in looked["summary"] and "mean_mmd" in looked["summary"]
    assert (tmp_path / "run/plots/partition.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "run/plots/partition_clusters.png").read_bytes()[:8] == PNG_MAGIC


def test_model_embedder_holds_out_its_public_split(tmp_path):
    out = tmp_path / "model"
    overrides = (
        "partition.name=embedding",
        'partition.sizes="equal"',
        "partition.embedder=model",
        'partition.embedder_options={model = "mlp", epochs = 1, public_fraction = 0.2}',
    )
    assert main(partition_command(*overrides, out=out)) == 0
    skew = json.loads((out / "skew.json").read_text())
    assert skew["summary"]["coverage"] == pytest.approx(0.8, abs=0.002)
    assert list((tmp_path / "cache").glob("embeddings-*.npz")), "the embeddings were not cached"


def test_default_folder_is_named_after_the_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(partition_command()) == 0
    fingerprint = tiny_experiment().fingerprint()
    assert (tmp_path / "runs" / f"quickstart-{fingerprint}-partition" / "partition.npz").is_file()


@pytest.mark.parametrize(
    "overrides, words",
    [
        (("partition.min_size=1000",), ["[partition]", "min_size"]),
        (("partition.name=embedding", "partition.clusters=5000"), ["[partition]", "clusters"]),
        (("partition.name=embedding", "partition.embedder=pixel"), ["embedder", "did you mean 'pixels'"]),
    ],
)
def test_impossible_requests_are_one_line_errors(overrides, words, tmp_path, capsys):
    assert main(partition_command(*overrides, out=tmp_path / "x")) == 2
    check_one_line_error(capsys, words)
    assert not (tmp_path / "x").exists()


def check_one_line_error(capsys, words):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    for word in words:
        assert word in err, err


def experiment_file(tmp_path, dataset: str, partition: str):
    """A tiny experiment whose [partition] table holds only the given keys."""
    path = tmp_path / "experiment.toml"
    path.write_text(
        f'name = "tiny"\nrounds = 1\n[dataset]\nname = "{dataset}"\n[model]\nname = "mlp"\n[partition]\n{partition}\n'
    )
    return str(path)


@pytest.mark.parametrize(
    "partition, words",
    [
        ('name = "domain"\nnum_clients = 4', ["[partition]", "'digits' has no domains"]),
        ('name = "pathological"\nnum_clients = 4\nclasses_per_client = 11', ["classes_per_client=11 exceeds"]),
        ('name = "shards"\nnum_clients = 400\nshards_per_client = 4', ["shards_per_client"]),
    ],
)
def test_schemes_without_alpha_give_one_line_errors(partition, words, tmp_path, capsys):
    config = experiment_file(tmp_path, "digits", partition)
    assert main(["partition", config, "--out", str(tmp_path / "x")]) == 2
    check_one_line_error(capsys, words)


def load_toy_domains() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(360, 1, 4, 4)).astype(np.float32)
    y, domain = np.tile(np.arange(3), 120), np.repeat(np.arange(3), 120)
    x += domain[:, None, None, None]
    return Dataset(
        "toy-domains", x[:300], y[:300], x[300:], y[300:], ("a", "b", "c"), ("p", "q", "r"), domain[:300], domain[300:]
    )


def test_domain_split_draws_its_domains(tmp_path, monkeypatch):
    info = DatasetInfo(load_toy_domains, "toy", (1, 4, 4), ("a", "b", "c"), ("p", "q", "r"))
    monkeypatch.setitem(DATASETS, "toy-domains", info)
    out = tmp_path / "dom"
    config = experiment_file(tmp_path, "toy-domains", 'name = "domain"\nnum_clients = 6')
    assert main(["partition", config, "--out", str(out)]) == 0
    assert (out / "plots/partition_domains.png").read_bytes()[:8] == PNG_MAGIC
    skew = json.loads((out / "skew.json").read_text())
    assert skew["summary"]["mean_hellinger_domain"] > 0.5
    assert all(value > 0 for value in skew["clients"]["frechet"])


def test_help_documents_the_default_folder(capsys):
    with pytest.raises(SystemExit):
        main(["partition", "--help"])
    out = capsys.readouterr().out
    assert "runs/<name>-<hash" in out and "--set" in out and "partition_labels.png" in out


def test_refuses_to_overwrite_a_run_directorys_partition(tmp_path, capsys):
    from fedsim.runner import run_experiment

    run_experiment(tiny_experiment("rounds=1"), tmp_path / "run")
    before = (tmp_path / "run/partition.npz").read_bytes()
    assert main(partition_command("partition.alpha=0.05", out=tmp_path / "run")) == 2
    check_one_line_error(capsys, ["is a run directory"])
    assert (tmp_path / "run/partition.npz").read_bytes() == before
