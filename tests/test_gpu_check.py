"""experiments/bench/gpu_check.py: its checks pass (or say why they cannot run) on the CPU,
and its CUDA run passes where a GPU is visible."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "experiments" / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path, *arguments: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments, "--json", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done, json.loads(out.read_text())


def assert_report(figures: dict, device: str, workers: list[int]) -> None:
    assert figures["device"] == device and figures["torch"] == torch.__version__
    assert (figures["cuda_device_name"] is None) == (device == "cpu")
    gpu_check = load_script()
    assert set(figures["checks"]) == set(gpu_check.CHECKS)
    for name, outcome in figures["checks"].items():
        assert outcome["status"] in ("passed", "skipped"), (name, outcome)
        if outcome["status"] == "skipped":
            assert outcome["reason"], name
    rows = figures["throughput"]
    assert {(r["model"], r["workers"], r["mode"]) for r in rows} == {
        ("lenet", k, mode) for k in workers for mode in ("sequential", "vectorized")
    }
    for row in rows:
        assert row["updates_per_s"] > 0 and row["updates_per_s"] == pytest.approx(
            row["clients"] * row["rounds"] / row["rounds_s"]
        )
        assert (row["vectorize"] == 1) == (row["mode"] == "sequential")


def test_checks_pass_on_the_cpu_and_the_fractional_gpu_check_says_why_it_cannot(tmp_path):
    """Two of the checks called directly (the small version of the next test)."""
    gpu_check = load_script()
    vectorized = gpu_check.run_check("vectorized_equals_sequential", "cpu")
    assert vectorized["status"] == "passed", vectorized
    assert max(vectorized["groups"]) == 3 and vectorized["worker_device"] == "cpu"
    assert vectorized["max_abs_difference"] <= 1e-5
    auto = gpu_check.run_check("device_auto", "cpu")
    assert auto["status"] == "passed" and auto["worker_device"] == auto["expected"], auto
    fractional = gpu_check.run_check("fractional_gpu_workers", "cpu")
    assert fractional["status"] == "skipped" and "GPU" in fractional["reason"]


def test_a_failing_check_is_reported_in_one_line(monkeypatch):
    gpu_check = load_script()

    def broken(device, work):
        raise AssertionError("the arrays differ\nsecond line")

    monkeypatch.setitem(gpu_check.CHECKS, "device_auto", broken)
    outcome = gpu_check.run_check("device_auto", "cpu")
    assert outcome["status"] == "failed" and outcome["error"] == "AssertionError: the arrays differ"


def test_the_comparison_fails_beyond_the_tolerance():
    gpu_check = load_script()
    reference = {"w": torch.zeros(3).numpy()}
    assert gpu_check.compare_arrays(reference, {"w": reference["w"] + 1e-7}, "cpu") == pytest.approx(1e-7)
    with pytest.raises(AssertionError, match="w: largest difference"):
        gpu_check.compare_arrays(reference, {"w": reference["w"] + 1e-3}, "cpu")


@pytest.mark.slow  # every check and four Ray runs: minutes on two CPU cores
@pytest.mark.ray
def test_the_quick_cpu_run_writes_its_report(tmp_path):
    done, figures = run_script(tmp_path, "--device", "cpu", "--quick")
    assert_report(figures, "cpu", [1, 4])
    skipped = {name for name, outcome in figures["checks"].items() if outcome["status"] == "skipped"}
    assert skipped == {"fractional_gpu_workers"}, figures["checks"]
    assert re.search(r"fractional_gpu_workers +skipped: \S", done.stdout), done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch sees no GPU here")
def test_the_quick_cuda_run_passes(tmp_path):
    _, figures = run_script(tmp_path, "--device", "cuda", "--quick")
    assert_report(figures, "cuda", [1, 4])
    assert all(outcome["status"] == "passed" for outcome in figures["checks"].values()), figures["checks"]
