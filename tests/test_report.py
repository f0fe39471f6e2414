"""fedsim report: grouping, mean ± std, rounds to target, formats and plots, on run
directories written here with known numbers."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from fedsim.build import validate_experiment
from fedsim.cli import main
from fedsim.report import find_runs, group_keys, read_runs
from fedsim.results import MetricRow, RunDirectory


def make_run(
    path, *, strategy="fedavg", alpha=0.5, seed=0, curve=(0.1, 0.5, 0.7), extra=None, finished=True, mu=0.1,
    personalised=False,
):  # fmt: skip
    """A run directory as fedsim writes it: config.toml, metrics.csv, summary.json. A
    personalised run (FedBN) reports its clients' held-out accuracy, not a global one."""
    table = {"name": "fedprox", "proximal_mu": mu} if strategy == "fedprox" else {"name": strategy}
    experiment = validate_experiment(
        {
            "name": "synthetic",
            "seed": seed,
            "rounds": len(curve) - 1,
            "dataset": {"name": "digits"},
            "partition": {"name": "dirichlet", "num_clients": 4, "alpha": alpha},
            "model": {"name": "mlp"},
            "strategy": table,
        }
    )
    run = RunDirectory(path)
    run.start(experiment)
    rows = []
    scope, ident = ("federated", "evaluate") if personalised else ("server", "global")
    for round_, accuracy in enumerate(curve):
        rows += [
            MetricRow(round_, scope, ident, "accuracy", accuracy),
            MetricRow(round_, scope, ident, "loss", 2.0 - accuracy),
            MetricRow(round_, "client", "0", "accuracy", 0.0),  # not a global row: ignored
        ]
    run.append_metrics(rows)
    if finished:
        summary = {"accuracy": curve[-1], "loss": 2.0 - curve[-1], "client_accuracy_mean": curve[-1] - 0.05}
        summary |= {"seed": seed, "rounds_completed": len(curve) - 1, "wall_time_s": 1.0, "versions": {"x": "1"}}
        summary["accuracy_evaluated_on"] = "client-holdout" if personalised else "global-test"
        run.write_summary(summary | (extra or {}))
    return path


@pytest.fixture
def grid(tmp_path):
    """fedavg and fedprox x alpha 0.1 and 1.0 x seeds 0, 1, 2, with known final accuracies."""
    finals = {}
    for strategy in ("fedavg", "fedprox"):
        for alpha in (0.1, 1.0):
            for seed in range(3):
                final = 0.5 + 0.2 * (strategy == "fedprox") + 0.1 * (alpha == 1.0) + 0.01 * seed
                curve = (0.1, 0.3 + 0.01 * seed, final)
                extra = {"accuracy_by_domain": {"mnist": final - 0.1, "svhn": final - 0.2}}
                make_run(tmp_path / f"{strategy}-alpha{alpha}-s{seed}", strategy=strategy, alpha=alpha, seed=seed,
                         curve=curve, extra=extra)  # fmt: skip
                finals[(strategy, alpha, seed)] = final
    return tmp_path, finals


def report_csv(capsys, *args) -> pd.DataFrame:
    capsys.readouterr()
    assert main(["report", *map(str, args), "--format", "csv"]) == 0
    return pd.read_csv(io.StringIO(capsys.readouterr().out))


def test_runs_are_grouped_by_the_keys_that_vary_with_mean_std_and_n(grid, capsys):
    folder, finals = grid
    table = report_csv(capsys, folder)
    assert list(table.columns[:3]) == ["strategy.name", "partition.alpha", "n"]  # not proximal_mu, not seed
    assert list(zip(table["strategy.name"], table["partition.alpha"])) == [
        ("fedavg", 0.1),
        ("fedavg", 1.0),
        ("fedprox", 0.1),
        ("fedprox", 1.0),
    ]
    for _, row in table.iterrows():
        values = [finals[(row["strategy.name"], row["partition.alpha"], seed)] for seed in range(3)]
        assert row["n"] == 3
        assert row["accuracy_mean"] == pytest.approx(np.mean(values))
        assert row["accuracy_std"] == pytest.approx(np.std(values, ddof=1))
        assert row["loss_mean"] == pytest.approx(2.0 - np.mean(values))
        assert row["client_accuracy_mean_mean"] == pytest.approx(np.mean(values) - 0.05)
        assert row["accuracy_by_domain.svhn_mean"] == pytest.approx(np.mean(values) - 0.2)
    assert not any(column.startswith(("seed", "wall_time_s", "rounds_completed", "versions")) for column in table)


def test_per_attacker_columns_appear_where_present(tmp_path, capsys):
    make_run(tmp_path / "a", seed=0, extra={"asr_by_attacker": {"label_flip": 0.2}})
    make_run(tmp_path / "b", seed=1, extra={"asr_by_attacker": {"label_flip": 0.4}})
    table = report_csv(capsys, tmp_path)
    assert table.loc[0, "asr_by_attacker.label_flip_mean"] == pytest.approx(0.3)
    assert table.loc[0, "name"] == "synthetic"  # only the seed differs: one group, named by the experiment


def test_rounds_to_target_is_the_first_round_reaching_it(tmp_path, capsys):
    curves = {0: (0.1, 0.85, 0.9), 1: (0.1, 0.5, 0.8), 2: (0.1, 0.5, 0.7)}  # rounds 1, 2 and never
    for seed, curve in curves.items():
        make_run(tmp_path / f"s{seed}", seed=seed, curve=curve)
    table = report_csv(capsys, tmp_path, "--target", 0.8)
    assert table.loc[0, "rounds_to_target_mean"] == pytest.approx(1.5)
    assert table.loc[0, "rounds_to_target_std"] == pytest.approx(np.std([1, 2], ddof=1))
    assert table.loc[0, "runs_reaching_target"] == 2
    assert table.loc[0, "target"] == 0.8
    assert main(["report", str(tmp_path), "--target", "0.8"]) == 0
    assert "| 1.5 ± 0.7 (2/3) |" in capsys.readouterr().out

    # A loss reaches its target from above: losses are 2 - accuracy, so <= 1.2 at rounds 1, 2, never.
    table = report_csv(capsys, tmp_path, "--metric", "loss", "--target", 1.2)
    assert table.loc[0, "rounds_to_target_mean"] == pytest.approx(1.5)
    assert table.loc[0, "runs_reaching_target"] == 2


def test_markdown_and_latex_tables(grid, capsys):
    folder, _ = grid
    assert main(["report", str(folder)]) == 0
    markdown = capsys.readouterr().out
    lines = markdown.splitlines()
    assert lines[0].startswith("| strategy.name | partition.alpha | n | accuracy | loss | client_accuracy_mean |")
    assert lines[1].startswith("| --- | --- | ---: | ---: |")
    assert lines[2].startswith("| fedavg | 0.1 | 3 | 0.510 ± 0.010 | 1.490 ± 0.010 |")
    assert len(lines) == 6
    assert (folder / "report.md").read_text() == markdown

    assert main(["report", str(folder), "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert r"strategy.name & partition.alpha & n & accuracy & loss & client\_accuracy\_mean" in latex
    assert r"fedavg & 0.1 & 3 & 0.510 $\pm$ 0.010" in latex
    assert latex.startswith(r"\begin{tabular}") and r"\bottomrule" in latex
    assert (folder / "report.tex").read_text() == latex


def test_report_files_and_plots(grid, capsys):
    folder, _ = grid
    out = folder / "report-out"
    assert main(["report", str(folder), "--out", str(out), "--target", "0.6"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert pd.read_csv(out / "report.csv").shape[0] == 4
    for name in ("report_accuracy.png", "report_final.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_by_chooses_the_groups(grid, capsys):
    folder, finals = grid
    table = report_csv(capsys, folder, "--by", "strategy.name")
    assert list(table["strategy.name"]) == ["fedavg", "fedprox"] and list(table["n"]) == [6, 6]
    fedavg = [value for (strategy, _, _), value in finals.items() if strategy == "fedavg"]
    assert table.loc[0, "accuracy_mean"] == pytest.approx(np.mean(fedavg))


def test_group_keys_skip_keys_the_others_determine(grid):
    folder, _ = grid
    configs = read_runs([folder]).configs
    assert "strategy.proximal_mu" in configs.columns  # it differs (fedprox only) ...
    assert group_keys(configs) == ["strategy.name", "partition.alpha"]  # ... but strategy.name decides it
    assert group_keys(configs, ["partition.alpha"]) == ["partition.alpha"]


def test_unfinished_runs_are_left_out_and_listed(tmp_path, capsys):
    make_run(tmp_path / "sweep" / "done", seed=0)
    make_run(tmp_path / "sweep" / "running", seed=1, finished=False)
    table = report_csv(capsys, tmp_path / "sweep")
    assert table.loc[0, "n"] == 1
    assert main(["report", str(tmp_path / "sweep")]) == 0
    assert "left out 1 unfinished runs" in capsys.readouterr().err


def test_a_dir_may_be_one_run_or_a_folder_of_sweeps(tmp_path):
    one = make_run(tmp_path / "a-sweep" / "s0", seed=0)
    make_run(tmp_path / "b-sweep" / "nested" / "s1", seed=1)
    (one / "client_state").mkdir()
    (one / "client_state" / "config.toml").write_text("")  # inside a run: never searched
    assert find_runs([one]) == [one]
    assert sorted(p.name for p in find_runs([tmp_path])) == ["s0", "s1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--by", "strategy.nam"],
            "--by 'strategy.nam' is not a key of these experiments; did you mean 'strategy.name'?",
        ),
        (["--metric", "acuracy"], "--metric 'acuracy' is not in the runs' summary.json; did you mean 'accuracy'?"),
        (["--metric", "accuracy_by_domain.mnist", "--target", "0.5"], "no per-round global 'accuracy_by_domain.mnist'"),
    ],
)
def test_bad_report_input_is_one_line_and_exit_code_2(grid, capsys, args, message):
    folder, _ = grid
    assert main(["report", str(folder), *args]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_nothing_to_report_is_one_line_and_exit_code_2(tmp_path, capsys):
    make_run(tmp_path / "running", finished=False)
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path), str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err


def test_summary_json_is_read_as_written(tmp_path, capsys):
    run = make_run(tmp_path / "r", curve=(0.1, 0.123456))
    summary = json.loads((run / "summary.json").read_text())
    table = report_csv(capsys, tmp_path)
    assert table.loc[0, "accuracy_mean"] == summary["accuracy"]
    assert np.isnan(table.loc[0, "accuracy_std"])  # one run: no spread
    assert main(["report", str(tmp_path)]) == 0
    assert "| synthetic | 1 | 0.123 |" in capsys.readouterr().out


def test_a_key_only_some_groups_have_shows_as_a_dash(tmp_path, capsys):
    """fedprox's proximal_mu tells two fedprox groups apart; fedavg has no such key."""
    make_run(tmp_path / "a", strategy="fedavg")
    make_run(tmp_path / "b", strategy="fedprox", mu=0.01)
    make_run(tmp_path / "c", strategy="fedprox", mu=1.0)
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| fed")]
    assert len(rows) == 3
    assert rows[0].startswith("| fedavg | – |")
    assert "| fedprox | 0.01 |" in table and "| fedprox | 1.0 |" in table


def test_personalised_runs_are_marked_and_followed_on_their_clients(tmp_path, capsys):
    """FedBN's accuracy is its clients' held-out accuracy: the table says so, and rounds to
    target read the clients' curve, not a global one it does not have."""
    make_run(tmp_path / "avg", strategy="fedavg", curve=(0.1, 0.5, 0.7))
    make_run(tmp_path / "bn", strategy="fedbn", curve=(0.1, 0.8, 0.9), personalised=True)
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--target", "0.75"]) == 0
    table = capsys.readouterr().out
    assert "accuracy on" in table
    bn_row = next(line for line in table.splitlines() if line.startswith("| fedbn"))
    assert "client-holdout" in bn_row and "1.0 (1/1)" in bn_row
    avg_row = next(line for line in table.splitlines() if line.startswith("| fedavg"))
    assert "global-test" in avg_row and "(0/1)" in avg_row


def test_fairness_and_traffic_are_tables_of_their_own_in_markdown_and_columns_in_csv(tmp_path, capsys):
    for seed in range(2):
        spread = {f"client_accuracy_{stat}": 0.1 * (seed + 1) for stat in ("p10", "p50", "min", "worst10_mean")}
        best = {"client_accuracy_best_round": 2 + seed, "client_accuracy_p10_best": 0.5}
        traffic = {"bytes_down_total": 2_000_000 * (seed + 1), "bytes_up_total": 1_000_000}
        make_run(tmp_path / f"s{seed}", seed=seed, extra=spread | best | traffic)
    table = report_csv(capsys, tmp_path)
    assert table.loc[0, "bytes_down_total_mean"] == 3_000_000
    assert table.loc[0, "client_accuracy_p10_mean"] == pytest.approx(0.15)
    assert main(["report", str(tmp_path)]) == 0
    markdown = capsys.readouterr().out
    main_table, last, at_best, traffic_table = markdown.split("\n\n**")
    assert "bytes" not in main_table and "p10" not in main_table and "client_accuracy_mean" in main_table
    assert last.startswith("Clients' held-out accuracy at the last evaluation")
    assert "| name | n | p10 | p50 | min | worst10_mean |" in last
    assert "| synthetic | 2 | 0.150 ± 0.071 |" in last
    assert "| name | n | round | p10 |" in at_best and "| synthetic | 2 | 2.5 ± 0.7 | 0.500 ± 0.000 |" in at_best
    assert traffic_table.startswith("Array bytes exchanged over the run, in MB")
    assert "| synthetic | 2 | 3.000 ± 1.414 | 1.000 ± 0.000 |" in traffic_table
