"""Experiment tracking: ``[tracking] backends = ["tensorboard", "mlflow"]`` sends a run to
TensorBoard event files and an MLflow run, read back here with each tool's own reader:
the same figures as metrics.csv at the same rounds, the resolved experiment as params, the
summary and the plots; a resumed run continues both with exactly one value per step."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from fedsim.cli import main
from fedsim.errors import UserError
from fedsim.observers.tracking import MLflowTracker, flat_config, mlflow_key
from fedsim.results import RunDirectory
from fedsim.runner import run_experiment
from tests.conftest import QUICKSTART, tiny_experiment, tiny_overrides

BOTH = 'tracking.backends=["tensorboard", "mlflow"]'


def needs_both():
    pytest.importorskip(
        "tensorboard", reason='the tensorboard extra is not installed (pip install -e ".[tensorboard]")'
    )
    pytest.importorskip("mlflow", reason='the mlflow extra is not installed (pip install -e ".[mlflow]")')


def recorded(run_path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as series: tag -> [(round, value)], in the file's order."""
    series: dict[str, list[tuple[int, float]]] = {}
    metrics = RunDirectory(run_path).read_metrics()
    for r, scope, ident, metric, value in zip(
        metrics["round"], metrics.scope, metrics.id, metrics.metric, metrics.value
    ):
        series.setdefault(f"{scope}/{ident}/{metric}", []).append((int(r), float(value)))
    return series


def tensorboard_events(run_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def mlflow_client(run_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_path.resolve() / 'mlflow.db'}")


def mlflow_run_id(run_path) -> str:
    return json.loads((run_path / "mlflow_run.json").read_text())["run_id"]


def assert_one_value_per_step_as_recorded(run_path) -> None:
    """Both stores hold every series of metrics.csv, one value per round, equal to the file's
    (TensorBoard keeps 32-bit floats), and summary.json's numbers once, at the last round."""
    series = recorded(run_path)
    summary = json.loads((run_path / "summary.json").read_text())
    rounds = max(step for values in series.values() for step, _ in values)
    events = tensorboard_events(run_path)
    client, run_id = mlflow_client(run_path), mlflow_run_id(run_path)
    assert set(events.Tags()["scalars"]) >= set(series)
    for name, values in [*series.items(), ("summary/accuracy", [(rounds, summary["accuracy"])])]:
        steps = [step for step, _ in values]
        scalars = events.Scalars(name)
        assert [event.step for event in scalars] == steps, name
        np.testing.assert_allclose([event.value for event in scalars], [v for _, v in values], rtol=1e-6)
        history = sorted(client.get_metric_history(run_id, mlflow_key(name)), key=lambda metric: metric.step)
        assert [metric.step for metric in history] == steps, name
        assert [metric.value for metric in history] == [v for _, v in values], name
    assert [image.step for image in events.Images("plots/accuracy")] == [rounds]


def test_a_tracked_run_reads_back_in_tensorboard_and_mlflow(tmp_path, monkeypatch):
    needs_both()
    import mlflow
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = run_experiment(tiny_experiment("rounds=3", BOTH), tmp_path / "run")
    assert_one_value_per_step_as_recorded(run.path)

    # TensorBoard: the resolved experiment in the HParams dashboard, the plots as images
    events = tensorboard_events(run.path)
    hparams = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["client.lr"].number_value == pytest.approx(0.1)
    assert start.session_start_info.hparams["strategy.name"].string_value == "fedavg"
    assert {"plots/accuracy", "plots/partition"} <= set(events.Tags()["images"])

    # MLflow: one run in the experiment named after the experiment, its params, its artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{run.path.resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["quickstart"])
    assert len(runs) == 1 and runs.run_id[0] == mlflow_run_id(run.path)
    assert runs["status"][0] == "FINISHED"
    assert runs["params.client.lr"][0] == "0.1" and runs["params.strategy.name"][0] == "fedavg"
    assert runs["params.partition.num_clients"][0] == "4"
    assert runs["metrics.summary/accuracy"][0] == pytest.approx(run.summary["accuracy"])
    client = mlflow_client(run.path)
    artifacts = {artifact.path for artifact in client.list_artifacts(runs.run_id[0], "plots")}
    assert {"plots/accuracy.png", "plots/partition.png"} <= artifacts
    assert "config.toml" in {artifact.path for artifact in client.list_artifacts(runs.run_id[0])}


def _crash_at_checkpoint(monkeypatch, crash_round):
    original = RunDirectory.save_checkpoint

    def crash(self, checkpoint):
        if checkpoint.round == crash_round:
            raise KeyboardInterrupt
        original(self, checkpoint)

    monkeypatch.setattr(RunDirectory, "save_checkpoint", crash)


def _crash_after_mlflow_sent(monkeypatch, crash_round):
    """The round's rows are in MLflow, its checkpoint on disk, mlflow_run.json not yet updated."""
    original = MLflowTracker.save_state

    def crash(self, context):
        if self.sent_through == crash_round:
            raise KeyboardInterrupt
        original(self, context)

    monkeypatch.setattr(MLflowTracker, "save_state", crash)


def _crash_before_summary(monkeypatch):
    """Both trackers have sent the summary and the plots; summary.json is not written."""

    def crash(self, summary):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDirectory, "write_summary", crash)


@pytest.mark.parametrize(
    "crash, overrides",
    [
        # metrics.csv and TensorBoard hold rounds 3 and 4, MLflow and the checkpoint round 2
        (lambda monkeypatch: _crash_at_checkpoint(monkeypatch, 4), ["rounds=4", "checkpoint_every=2"]),
        (lambda monkeypatch: _crash_after_mlflow_sent(monkeypatch, 2), ["rounds=3"]),
        (_crash_before_summary, ["rounds=3"]),
    ],
    ids=["between-metrics-and-checkpoint", "between-mlflow-and-its-state", "before-summary-json"],
)
def test_a_resumed_run_continues_the_same_runs_with_one_value_per_step(crash, overrides, tmp_path, monkeypatch):
    needs_both()
    experiment = tiny_experiment(*overrides, BOTH)
    with monkeypatch.context() as patched:
        crash(patched)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(experiment, tmp_path / "run")
    run_id = mlflow_run_id(tmp_path / "run")
    result = run_experiment(experiment, tmp_path / "run")
    assert result.status == "resume"
    assert mlflow_run_id(result.path) == run_id
    client = mlflow_client(result.path)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert [run.info.run_id for run in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert len(list((result.path / "tensorboard").iterdir())) == 2, "one event file per process, in one folder"
    assert_one_value_per_step_as_recorded(result.path)


def test_without_tracking_the_experiment_keeps_its_fingerprint():
    experiment = tiny_experiment()
    assert "tracking" not in experiment.to_dict()
    assert tiny_experiment("tracking.backends=[]").fingerprint() == experiment.fingerprint()


def test_one_backend_may_be_named_without_brackets():
    pytest.importorskip(
        "tensorboard", reason='the tensorboard extra is not installed (pip install -e ".[tensorboard]")'
    )
    assert tiny_experiment("tracking.backends=tensorboard").tracking.backends == ["tensorboard"]


def _cli_error(capsys, *overrides: str) -> str:
    args = ["run", str(QUICKSTART), "--quiet"]
    for override in tiny_overrides(*overrides):
        args += ["--set", override]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_missing_package_is_a_one_line_error_naming_the_extra(backend, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, backend, None)  # as if not installed: import fails, find_spec finds nothing
    err = _cli_error(capsys, f'tracking.backends=["{backend}"]')
    assert f'[tracking] backends: "{backend}" needs the {backend} package: pip install -e ".[{backend}]"' in err


@pytest.mark.parametrize(
    "value, words",
    [
        ('["tensorbord"]', ["[tracking] backends", "unknown backend 'tensorbord'", "did you mean 'tensorboard'"]),
        ('["wandb"]', ["unknown backend 'wandb'", "choose from: tensorboard, mlflow"]),
        ('["mlflow", "mlflow"]', ["a backend is named twice"]),
    ],
)
def test_a_bad_backend_is_refused_in_one_line(value, words, capsys):
    err = _cli_error(capsys, f"tracking.backends={value}")
    for word in words:
        assert word in err, err


def test_an_unknown_tracking_key_gets_a_suggestion():
    with pytest.raises(UserError, match=r"\[tracking\] unknown key 'mlflow_url'; did you mean 'mlflow_uri'"):
        tiny_experiment("tracking.mlflow_url=http://localhost:5000")


def test_the_experiment_flattens_to_dotted_keys():
    data = {
        "rounds": 3,
        "client": {"lr": 0.1, "nesterov": True},
        "strategy": {"name": "fedavg", "defence_options": {"f": 1}},
        "attack": [{"method": "dba", "clients": [1, 2]}],
    }
    assert dict(flat_config(data)) == {
        "rounds": 3,
        "client.lr": 0.1,
        "client.nesterov": "true",
        "strategy.name": "fedavg",
        "strategy.defence_options.f": 1,
        "attack.0.method": "dba",
        "attack.0.clients": "[1, 2]",
    }


@pytest.mark.parametrize(
    "name, key",
    [
        ("client/3/accuracy", "client/3/accuracy"),
        ("domain/art painting/accuracy", "domain/art painting/accuracy"),
        ("attack/a:b/asr", "attack/a_b/asr"),
        ("client//loss", "client/_/loss"),
        ("x/../y", "x/__/y"),
        ("summary/faults.drop", "summary/faults.drop"),
    ],
)
def test_mlflow_keys_keep_to_the_characters_mlflow_allows(name, key):
    assert mlflow_key(name) == key
