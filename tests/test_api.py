"""fedsim from Python: ``fedsim.run`` on a dict and on a file with keyword overrides, checked
as ``--set`` is; ``fedsim.load_run`` reading back exactly what the run directory holds; the
example of docs/guide/python-api.md and the example notebook, run for real."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

import fedsim
from fedsim.build import load_experiment, load_experiment_data
from fedsim.config import TABLES, read_experiment_file
from fedsim.errors import UserError
from fedsim.results import RunDirectory

from .conftest import QUICKSTART, ROOT, TINY
from .docs_pages import code_block_after, page

# conftest's TINY --set overrides, as keywords
TINY_SETTINGS = {
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "hidden": [32]},
    "partition": {"name": "dirichlet", "num_clients": 4, "alpha": 1.0},
    "rounds": 2,
    "client": {"lr": 0.1},
}
TINY_DICT = {
    "name": "tiny",
    "rounds": 2,
    "dataset": {"name": "digits"},
    "partition": {"name": "dirichlet", "num_clients": 4, "alpha": 1.0},
    "model": {"name": "mlp", "hidden": [32]},
    "client": {"lr": 0.1},
    "strategy": {"name": "fedavg"},
}
NOTEBOOK = ROOT / "docs" / "notebooks" / "quickstart.ipynb"
PYTHON_API_PAGE = "guide/python-api.md"


def read_back(path: Path) -> tuple[dict, pd.DataFrame, dict]:
    """summary.json, metrics.csv and config.toml as they are on disk."""
    summary = json.loads((path / "summary.json").read_text())
    metrics = pd.read_csv(path / "metrics.csv", dtype={"id": str})
    config = tomllib.loads((path / "config.toml").read_text())
    return summary, metrics, config


# -- running ----------------------------------------------------------------------------------


def test_run_on_a_dict_returns_what_the_run_directory_holds(tmp_path):
    given = copy.deepcopy(TINY_DICT)
    run = fedsim.run(given, out=tmp_path / "run")
    assert given == TINY_DICT, "the caller's dict is left as it was"
    assert isinstance(run, fedsim.Run)
    assert run.path == tmp_path / "run"
    summary, metrics, config = read_back(run.path)
    assert run.summary == summary
    pd.testing.assert_frame_equal(run.metrics, metrics)
    assert list(run.metrics.columns) == ["round", "scope", "id", "metric", "value"]
    assert run.config == config
    assert config["rounds"] == 2 and config["partition"]["num_clients"] == 4
    assert summary["name"] == "tiny" and summary["rounds_completed"] == 2


def test_keyword_overrides_are_validated_as_set_overrides_are(tmp_path, monkeypatch):
    """The same experiment as conftest's TINY ``--set`` list, in the folder `fedsim run`
    would choose (runs/<name>-<hash> under the current folder)."""
    monkeypatch.chdir(tmp_path)
    expected = load_experiment(QUICKSTART, TINY)
    run = fedsim.run(QUICKSTART, **TINY_SETTINGS)
    assert run.path == Path("runs") / f"quickstart-{expected.fingerprint()}"
    assert run.config == json.loads(json.dumps(expected.to_dict()))
    assert run.summary["fingerprint"] == expected.fingerprint()


def test_switching_a_component_drops_the_files_keys_the_new_one_refuses():
    """As ``--set strategy.name=fedprox``: fedavg's keys in the file that fedprox does not
    take are dropped, the keys given are checked."""
    fedprox = {"name": "fedprox", "proximal_mu": 0.01}
    from_keywords = load_experiment_data(
        read_experiment_file(QUICKSTART), str(QUICKSTART), {**TINY_SETTINGS, "strategy": fedprox}
    )
    from_set = load_experiment(QUICKSTART, [*TINY, "strategy.name=fedprox", "strategy.proximal_mu=0.01"])
    assert from_keywords.to_dict() == from_set.to_dict()


def test_an_interrupted_run_is_resumed_and_a_finished_one_read_back(tmp_path, monkeypatch):
    reference = fedsim.run(TINY_DICT, out=tmp_path / "reference")
    original = RunDirectory.save_checkpoint

    def crash(self, checkpoint):
        if checkpoint.round == 2:
            raise KeyboardInterrupt  # as Ctrl-C in the notebook while round 2 is saved
        original(self, checkpoint)

    monkeypatch.setattr(RunDirectory, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        fedsim.run(TINY_DICT, out=tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(UserError, match="has not finished"):
        fedsim.load_run(tmp_path / "run")
    monkeypatch.setattr(RunDirectory, "save_checkpoint", original)
    resumed = fedsim.run(TINY_DICT, out=tmp_path / "run")
    pd.testing.assert_frame_equal(resumed.metrics, reference.metrics)
    written = (tmp_path / "run" / "summary.json").stat().st_mtime_ns
    again = fedsim.run(TINY_DICT, out=tmp_path / "run")
    assert again.summary == resumed.summary
    assert (tmp_path / "run" / "summary.json").stat().st_mtime_ns == written, "a finished run is not run again"


# -- mistakes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "override"),
    [
        ({"partition": {"alhpa": 0.1}}, "partition.alhpa=0.1"),
        ({"rouns": 3}, "rouns=3"),
        ({"client": {"lr": 0}}, "client.lr=0"),
        ({"engine": {"num_gpus": 0.5}}, "engine.num_gpus=0.5"),
    ],
)
def test_a_bad_keyword_is_the_clis_one_line_error(settings, override, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as from_python:
        fedsim.run(QUICKSTART, **settings)
    with pytest.raises(UserError) as from_cli:
        load_experiment(QUICKSTART, [override])
    assert str(from_python.value) == str(from_cli.value)
    assert "\n" not in str(from_python.value)
    assert override.split("=")[0].split(".")[-1] in str(from_python.value), "the message names the key"
    assert not (tmp_path / "runs").exists(), "nothing is written before the experiment is valid"


@pytest.mark.parametrize(
    ("experiment", "settings", "message"),
    [
        (
            {**TINY_DICT, "partiton": {"alpha": 0.1}},
            {},
            "experiment: unknown key 'partiton'; did you mean 'partition'?",
        ),
        (TINY_DICT, {"partition.alpha": 0.1}, "give a table's keys as a dict, e.g. partition={'alpha': ...}"),
        (TINY_DICT, {"seed": None}, "seed = None: TOML has no null"),
        (TINY_DICT, {"client": {"lr": object()}}, "client.lr = <object object"),
        (3, {}, "experiment must be the path of a TOML experiment file or a dict of its tables, not int"),
        ("no-such-file.toml", {}, "experiment file 'no-such-file.toml' not found"),
    ],
)
def test_python_mistakes_are_one_line_errors(experiment, settings, message):
    with pytest.raises(UserError) as caught:
        fedsim.run(experiment, **settings)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_numpy_numbers_tuples_and_paths_are_read_as_toml_values(tmp_path):
    """What a notebook computes (np.linspace, a tuple) is taken as the TOML value it stands for."""
    np = pytest.importorskip("numpy")
    run = fedsim.run(
        TINY_DICT,
        out=tmp_path / "run",
        partition={"alpha": np.linspace(0.5, 1.0, 2)[0], "num_clients": np.int64(4)},
        model={"hidden": (16,)},
    )
    assert run.config["partition"]["alpha"] == 0.5 and run.config["partition"]["num_clients"] == 4
    assert run.config["model"]["hidden"] == [16]


def test_the_keywords_of_run_are_no_experiment_keys():
    assert {"out", "overwrite", "quiet"}.isdisjoint(TABLES)


# -- reading a run back -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> fedsim.Run:
    return fedsim.run(TINY_DICT, out=tmp_path_factory.mktemp("api") / "run")


def test_load_run_reads_the_files_as_they_are(finished):
    run = fedsim.load_run(finished.path)
    summary, metrics, config = read_back(finished.path)
    assert run.summary == summary
    pd.testing.assert_frame_equal(run.metrics, metrics)
    assert run.config == config


def test_history_is_the_headline_curve_by_default(finished):
    accuracy = finished.history()
    rows = finished.metrics.query("scope == 'server' and id == 'global' and metric == 'accuracy'")
    assert accuracy.name == "accuracy" and accuracy.index.name == "round"
    assert list(accuracy.index) == [0, 1, 2]
    assert accuracy.tolist() == rows["value"].tolist()
    assert accuracy.iloc[-1] == finished.summary["accuracy"]
    losses = finished.history("loss", scope="client", id=2)
    assert list(losses.index) == [1, 2]
    evaluate = finished.history(scope="federated", id="evaluate")
    assert list(evaluate.index) == [1, 2]


def test_a_personalised_runs_headline_curve_is_the_clients(tmp_path):
    run = fedsim.run(
        TINY_DICT, out=tmp_path / "fedbn", strategy={"name": "fedbn"}, model={"name": "resnet", "width": 4}
    )
    assert run.summary["accuracy_evaluated_on"] == "client-holdout"
    rows = run.metrics.query("scope == 'federated' and id == 'evaluate' and metric == 'accuracy'")
    assert run.history().tolist() == rows["value"].tolist()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"scope": "client"}, "scope 'client' has 'accuracy' for several ids (0, 1, 2, 3); choose one with id="),
        (
            {"metric": "acuracy"},
            "metrics.csv has no 'acuracy' for scope 'server', id 'global'; did you mean 'accuracy'?",
        ),
        ({"scope": "severs"}, "metrics.csv has no scope 'severs'; did you mean 'server'?"),
        ({"scope": "client", "id": 9}, "no such id there"),
    ],
)
def test_history_names_what_is_missing(finished, arguments, message):
    with pytest.raises(UserError) as caught:
        finished.history(**arguments)
    assert message in str(caught.value)


def test_the_repr_says_which_run_and_how_it_ended(finished):
    text = repr(finished)
    assert text.startswith(f"Run({str(finished.path)!r}: tiny, fedavg on digits, 4 clients, 2 rounds, accuracy ")
    assert f"{finished.summary['accuracy']:.4f}" in text


def test_load_run_on_a_folder_that_holds_no_finished_run(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        fedsim.load_run(tmp_path / "nothing")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a run directory"):
        fedsim.load_run(tmp_path / "file")
    with pytest.raises(UserError, match=r"is not a fedsim run directory \(it has no config.toml\)"):
        fedsim.load_run(tmp_path)
    (tmp_path / "config.toml").write_text('name = "x"\n')
    with pytest.raises(UserError, match=r"has not finished \(it has no summary.json yet\)"):
        fedsim.load_run(tmp_path)
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="has no metrics.csv"):
        fedsim.load_run(tmp_path)
    (tmp_path / "metrics.csv").write_text("round,scope,id,metric,value\n")
    with pytest.raises(UserError, match="holds a JSON list, not fedsim's summary"):
        fedsim.load_run(tmp_path)


# -- the package ------------------------------------------------------------------------------


def test_import_fedsim_loads_neither_torch_nor_flower_nor_pandas():
    code = "import sys, fedsim; print(sorted(m for m in ('torch', 'flwr', 'pandas') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_fedsim_run_is_the_function_once_the_runner_module_is_imported():
    """fedsim.run is the API's function, with the runner module (fedsim.runner) loaded too."""
    from fedsim import load_run, run
    from fedsim.runner import run_experiment  # noqa: F401 - the submodule, loaded

    assert run is fedsim.run is fedsim.api.run and callable(fedsim.run)
    assert load_run is fedsim.load_run is fedsim.api.load_run
    assert {"run", "load_run", "Run"} <= set(dir(fedsim))
    with pytest.raises(AttributeError):
        fedsim.no_such_name  # noqa: B018


# -- the docs' example and the notebook ------------------------------------------------------


def docs_example() -> str:
    return code_block_after(page(PYTHON_API_PAGE), "# Python API")


def test_the_docs_page_is_short():
    section = page(PYTHON_API_PAGE).split("\n", 1)[1]  # below its title
    assert len(section.strip().splitlines()) <= 20


def test_the_docs_example_runs(tmp_path):
    (tmp_path / "experiments").mkdir()
    shutil.copy(QUICKSTART, tmp_path / "experiments")
    done = subprocess.run([sys.executable, "-c", docs_example()], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("Run('runs/quickstart-")
    assert "'alpha': 0.1" in done.stdout


def test_the_notebook_is_kept_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_the_notebook_runs_on_this_venvs_kernel(tmp_path, monkeypatch):
    """Every cell runs, on the python3 kernel of the interpreter running the tests (this
    venv's, as `pip install -e .[test]` installs it), with its runs in tmp_path; its plots
    show inline (fedsim's own figures do not take the notebook's backend away)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    probe = "import sys\nprint(sys.executable)\nprint(sys.prefix)"
    notebook.cells.append(nbformat.v4.new_code_cell(probe))
    out = tmp_path / "runs"
    monkeypatch.setenv("FEDSIM_NOTEBOOK_OUT", str(out))
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # a cell that raises fails here, with its traceback

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2, "both plots show inline"
    assert notebook.cells[-1].outputs[0].text.split() == [sys.executable, sys.prefix]
    assert sorted(path.name for path in out.iterdir()) == ["alpha-0.1", "alpha-0.5", "alpha-1.0"]
    assert all((path / "summary.json").is_file() for path in out.iterdir())
