"""A catalogue of bad input: malformed experiment files and command lines.

Every case must end the same way: exit code 2, exactly one line on stderr that starts with
``error: `` and names the bad key or value (the words listed with the case), and no
traceback. tests/test_config.py holds a first, smaller catalogue; these cases extend it
without repeating it. The CLI runs in this process through ``fedsim.cli.main`` (fast);
a subprocess only where the real console script matters.

Decisions recorded here:

- Negative seeds are refused (``seed`` must be >= 0): NumPy's generators, which draw the
  partition, take no negative seed, and a seed is a label, not a quantity.
- ``fraction_train = 0`` is refused: Flower then skips training in every round, so the run
  "succeeds" having trained nobody. ``fraction_evaluate = 0`` stays valid (no client
  evaluation). A ``fraction_train`` that samples no client (possible only with
  ``min_train_nodes = 0``) and ``min_*_nodes`` above the number of clients (on which
  Flower waits forever) are refused too.
- No float anywhere takes NaN or infinity unless its type says so
  (``Annotated[float, pydantic.AllowInfNan(True)]``), and no number takes true/false.
- An exception raised by the user's own strategy code (``module:Class``) is the user's
  mistake: exit code 2 and one line naming the strategy, the method, the exception and the
  file and line, whether it comes from the module's import, the constructor or a method
  called mid-run (``configure_train``). ``--verbose`` adds the traceback. An exception in a
  simulated client stays a client failure (exit code 1, tests/test_custom_strategy.py).

RUN_DIRECTORY_CASES (damaged run directories) belong to the checkpoint and run-directory
code (fedsim/results.py, fedsim/runner.py), which is being rewritten: they state the
behaviour expected of it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from pathlib import Path
from typing import Annotated

import pydantic
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.build import load_experiment, validate_experiment
from fedsim.cli import main
from fedsim.config import (
    TABLE_NAMES,
    TABLES,
    Experiment,
    apply_overrides,
    parse_override,
    read_experiment_file,
)
from fedsim.errors import UserError
from fedsim.registry import validate_parameters

from .conftest import ROOT

# A valid experiment that runs in about a second: 2 clients on the 8x8 digits, a tiny MLP.
BASE = """\
name = "bad-input"
rounds = 1
evaluate_every = 0

[dataset]
name = "digits"

[partition]
name = "iid"
num_clients = 2

[model]
name = "mlp"
hidden = [8]
"""


def with_tables(snippet: str) -> str:
    """BASE with the snippet's keys merged in, table by table; a snippet's table that names
    its component replaces BASE's table (the other component's keys would not fit)."""
    data = tomllib.loads(BASE)
    for key, value in tomllib.loads(snippet).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict) and "name" not in value:
            data[key].update(value)
        else:
            data[key] = value
    return tomli_w.dumps(data)


def cli(argv: list[str]) -> int:
    """``fedsim ARGV`` in this process; argparse's usage errors exit through SystemExit."""
    try:
        return main([str(arg) for arg in argv])
    except SystemExit as exit_:
        return exit_.code


def assert_one_line_error(code: int, err: str, words: list[str], expected_code: int = 2) -> None:
    assert "Traceback" not in err, err
    assert code == expected_code, f"exit code {code}, stderr {err!r}"
    assert err.startswith("error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not exactly one line: {err!r}"
    for words_ in words:
        assert words_ in err, f"{words_!r} not in {err!r}"


def run_file(tmp_path: Path, text: str | bytes, *extra: str) -> list[str]:
    path = tmp_path / "experiment.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return ["run", str(path), "--out", str(tmp_path / "out"), "--quiet", *extra]


# --- experiment files: (what the file changes in BASE, words the error must contain) ------

FILE_CASES = {
    # NaN and infinity
    "lr inf": ("[client]\nlr = inf", ["[client] lr = inf", "finite"]),
    "lr nan": ("[client]\nlr = nan", ["[client] lr = nan", "finite"]),
    "lr -inf": ("[client]\nlr = -inf", ["[client] lr = -inf", "finite"]),
    "momentum nan": ("[client]\nmomentum = nan", ["[client] momentum = nan", "finite"]),
    "weight_decay inf": ("[client]\nweight_decay = inf", ["[client] weight_decay = inf", "finite"]),
    "local_test_fraction nan": ("[client]\nlocal_test_fraction = nan", ["[client] local_test_fraction", "finite"]),
    "fraction_train nan": ("[strategy]\nfraction_train = nan", ["[strategy] fraction_train = nan", "[0, 1]"]),
    "fraction_evaluate inf": ("[strategy]\nfraction_evaluate = inf", ["[strategy] fraction_evaluate = inf", "[0, 1]"]),
    "alpha nan": ('[partition]\nname = "dirichlet"\nnum_clients = 2\nalpha = nan', ["[partition] alpha", "nan"]),
    "exponent inf": (
        '[partition]\nname = "quantity"\nnum_clients = 2\ndistribution = "power-law"\nexponent = inf',
        ["[partition] exponent", "inf"],
    ),
    "proximal_mu nan": ('[strategy]\nname = "fedprox"\nproximal_mu = nan', ["[strategy] proximal_mu = nan", "finite"]),
    "clip_lambda inf": (
        '[model]\nname = "digitcnn"\n[strategy]\nname = "fedwon"\nclip_lambda = inf',
        ["[strategy] clip_lambda = inf", "finite"],
    ),
    "residual_gain inf": ('[model]\nname = "resnet"\nresidual_gain = inf', ["[model] residual_gain = inf", "finite"]),
    "test_fraction nan": ("[dataset]\ntest_fraction = nan", ["[dataset] test_fraction = nan", "finite"]),
    "ray num_cpus inf": ('[engine]\nname = "ray"\nnum_cpus = inf', ["[engine] num_cpus = inf", "finite"]),
    # clients that are never trained, or never come
    "fraction_train zero": ("[strategy]\nfraction_train = 0.0", ["fraction_train = 0", "trains no client"]),
    "fraction_train negative": ("[strategy]\nfraction_train = -0.5", ["[strategy] fraction_train = -0.5", "[0, 1]"]),
    "fraction samples no client": (
        "[strategy]\nfraction_train = 0.1\nmin_train_nodes = 0",
        ["fraction_train = 0.1 of 2 clients samples no client", "min_train_nodes >= 1"],
    ),
    "min_train_nodes above clients": (
        "[strategy]\nmin_train_nodes = 5",
        ["[strategy] min_train_nodes = 5 exceeds the 2 clients", "min_train_nodes <= 2"],
    ),
    "min_available_nodes above clients": (
        "[strategy]\nmin_available_nodes = 3",
        ["[strategy] min_available_nodes = 3 exceeds the 2 clients"],
    ),
    "evaluation without held-out data": (
        "[client]\nlocal_test_fraction = 0.0\n[strategy]\nfraction_evaluate = 0.5",
        ["fraction_evaluate > 0 needs held-out client data", "local_test_fraction > 0"],
    ),
    # wrong types
    "rounds boolean": ("rounds = true", ["rounds = true", "valid integer"]),
    "rounds fractional": ("rounds = 1.5", ["rounds = 1.5", "valid integer"]),
    "rounds quoted": ('rounds = "2"', ["rounds = '2'", "valid integer"]),
    "lr quoted": ('[client]\nlr = "0.1"', ["[client] lr = '0.1'", "valid number"]),
    "fraction_train text": ('[strategy]\nfraction_train = "half"', ["[strategy] fraction_train = 'half'", "number"]),
    "fraction_train boolean": ("[strategy]\nfraction_train = true", ["[strategy] fraction_train = true", "not true"]),
    "num_clients boolean": ("[partition]\nnum_clients = true", ["[partition] num_clients = true", "not true"]),
    "local_epochs fractional": ("[client]\nlocal_epochs = 2.5", ["[client] local_epochs = 2.5", "integer"]),
    "name not text": ("name = 3", ["name = 3", "valid string"]),
    "description not text": ("description = 5", ["description = 5", "valid string"]),
    "dataset name not text": ("[dataset]\nname = 5", ["[dataset] name = 5", "valid string"]),
    "hidden not a list": ('[model]\nhidden = "big"', ["[model] hidden = 'big'", "tuple"]),
    "domains not a list": ("[dataset]\ndomains = 5", ["[dataset] domains = 5", "tuple"]),
    "rounds inline table": ("rounds = { a = 1 }", ["rounds = {'a': 1}", "valid integer"]),
    # out of range
    "seed negative": ("seed = -1", ["seed = -1", "greater than or equal to 0"]),
    "evaluate_every negative": ("evaluate_every = -1", ["evaluate_every = -1", "greater than or equal to 0"]),
    "batch_size zero": ("[client]\nbatch_size = 0", ["[client] batch_size = 0", "greater than or equal to 1"]),
    "name empty": ('name = ""', ["name = ''", "pattern"]),
    "test_fraction one and a half": (
        "[dataset]\ntest_fraction = 1.5",
        ["[dataset] test_fraction = 1.5", "less than 1"],
    ),
    "test_fraction zero": ("[dataset]\ntest_fraction = 0.0", ["[dataset] test_fraction = 0.0", "greater than 0"]),
    "hidden negative": ("[model]\nhidden = [-5]", ["[model] hidden = [-5]", "greater than or equal to 1"]),
    "hidden zero": ("[model]\nhidden = [8, 0]", ["[model] hidden = [8, 0]", "greater than or equal to 1"]),
    "lenet channels zero": (
        '[model]\nname = "lenet"\nchannels = [0, 4]',
        ["[model] channels = [0, 4]", "greater than or equal to 1"],
    ),
    "hidden too large to build": (
        "[model]\nhidden = [9223372036854775807]",
        ["[model] 'mlp' cannot be built with hidden", "choose smaller sizes"],
    ),
    "num_threads absurd": (
        "[engine]\nnum_threads = 9223372036854775807",
        ["[engine] num_threads = 9223372036854775807", "less than or equal to 1024"],
    ),
    "partition num_clients zero": ("[partition]\nnum_clients = 0", ["[partition] num_clients", ">= 1", "0"]),
    # unknown names
    "unknown table": ("[clients]\nlr = 0.1", ["unknown key 'clients'", "did you mean 'client'"]),
    "unknown device": ('[engine]\ndevice = "tpu"', ["[engine] device = 'tpu'", "pattern"]),
    "unknown transform": (
        '[dataset]\ndomains = ["rotate-90", "bogus"]',
        ["[dataset] domains", "unknown transform 'bogus'"],
    ),
    "unknown embedder": (
        '[partition]\nname = "embedding"\nnum_clients = 2\nembedder = "bogus"',
        ["[partition] embedder = 'bogus' is not a known embedder"],
    ),
    # impossible partitions (found once the data is loaded)
    "more clients than samples": (
        "[partition]\nnum_clients = 100000",
        ["[partition] num_clients=100000 exceeds the 1437 samples", "lower num_clients"],
    ),
    "fitted sizes with fewer clients than classes": (
        '[partition]\nname = "label-mixture"\nnum_clients = 3',
        ["[partition] sizes='fit' needs num_clients >= the 10 groups", "sizes='equal'"],
    ),
    "natural split of a dataset without groups": (
        '[partition]\nname = "natural"\nnum_clients = 2',
        ["[partition] name = 'natural'", "'digits' has none"],
    ),
    "domain split not a multiple of the domains": (
        '[dataset]\ndomains = ["identity", "invert"]\n[partition]\nname = "domain"\nnum_clients = 3',
        ["[partition] num_clients=3 must be a multiple of the 2 domains"],
    ),
    "domain mixture without domains": (
        '[partition]\nname = "domain-mixture"\nnum_clients = 4',
        ["[partition] name = 'domain-mixture'", "has no domains"],
    ),
    "embeddings file missing": (
        '[partition]\nname = "embedding"\nnum_clients = 2\nembedder = "file"\nembedder_options = { path = "/nonexistent/e.npy" }',
        ["[partition] embedder_options.path = '/nonexistent/e.npy'", "no such file"],
    ),
    # missing or damaged dataset files (root: an empty folder, see test_file_case)
    "dataset files missing": (
        '[dataset]\nname = "cifar10"\nroot = "{root}"',
        ["cifar10: missing", "fedsim data download cifar10"],
    ),
    "image folders missing": ('[dataset]\nname = "pacs"\nroot = "{root}"', ["pacs: missing", "art_painting"]),
    "dataset file corrupt": (
        '[dataset]\nname = "mnist"\nroot = "{corrupt}"',
        ["mnist:", "is corrupt or not the expected file", "fedsim data download mnist"],
    ),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_file_case(case, tmp_path, capsys):
    snippet, words = FILE_CASES[case]
    root, corrupt = tmp_path / "empty-root", tmp_path / "corrupt-root"
    root.mkdir()
    (corrupt / "mnist").mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (corrupt / "mnist" / name).write_bytes(b"not an IDX file\n" * 4)
    text = with_tables(snippet.replace("{root}", str(root)).replace("{corrupt}", str(corrupt)))
    code = cli(run_file(tmp_path, text))
    assert_one_line_error(code, capsys.readouterr().err, words)


def test_component_floats_refuse_nan_and_infinity_unless_their_type_allows_them():
    """The generic rule of fedsim.registry.validate_parameters, for any component: every
    float a type hint holds (plain, Optional, Annotated, inside a tuple) refuses NaN and
    infinity; ``Annotated[float, pydantic.AllowInfNan(True)]`` opts out; no number takes a
    boolean."""

    def component(
        plain: float = 1.0,
        optional: Annotated[float, pydantic.Field(ge=0)] | None = None,
        sizes: tuple[float, ...] = (),
        count: int = 1,
        bound: Annotated[float, pydantic.AllowInfNan(True)] = math.inf,
    ):
        """A component with float parameters (its hints resolve in this module's globals)."""

    for key, value, shown in [
        ("plain", math.inf, "plain = inf"),
        ("plain", math.nan, "plain = nan"),
        ("optional", -math.inf, "optional = -inf"),
        ("sizes", [1.0, math.nan], "sizes = [1.0, nan]"),
        ("plain", True, "plain = true"),
        ("count", False, "count = false"),
    ]:
        with pytest.raises(UserError, match=rf"^\[x\] {re.escape(shown)} is invalid: "):
            validate_parameters(component, {key: value}, "[x]")
    assert validate_parameters(component, {"bound": math.inf}, "[x]") == {"bound": math.inf}
    assert validate_parameters(component, {"plain": 2, "optional": None}, "[x]") == {"plain": 2.0, "optional": None}


# --- files that are not TOML text at all --------------------------------------------------

BYTES_CASES = {
    "UTF-16 file": (BASE.encode("utf-16"), ["UTF-16", "save it as UTF-8"]),
    "UTF-16 big-endian file": (b"\xfe\xff" + BASE.encode("utf-16-be"), ["UTF-16", "save it as UTF-8"]),
    "random bytes": (bytes(range(256)) * 4, ["not a UTF-8 text file", "byte 0x80"]),
    "Latin-1 text": ('name = "caf\u00e9"\nrounds = 1\n'.encode("latin-1"), ["not a UTF-8 text file", "0xe9"]),
    "a NUL byte": ((BASE + "\x00\n").encode(), ["a NUL byte on line 15", "binary file"]),
    "empty file": (b"", ["missing required key 'name'"]),
    "only a comment": (b"# nothing here\n", ["missing required key 'name'"]),
    "deeply nested array": (b"name = 'x'\nrounds = 1\nseed = " + b"[" * 5000 + b"]" * 5000, ["not valid TOML"]),
}


@pytest.mark.parametrize("case", sorted(BYTES_CASES))
def test_bytes_case(case, tmp_path, capsys):
    raw, words = BYTES_CASES[case]
    code = cli(run_file(tmp_path, raw))
    assert_one_line_error(code, capsys.readouterr().err, words)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    """Notepad's UTF-8 with a BOM is still UTF-8: read, not refused."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_experiment(path).name == "bad-input"


# --- command lines: (argv, words); {tmp} is the test's folder, {file} a valid experiment ---

ARGV_CASES = {
    # where the experiment file should be
    "a folder as experiment file": (["run", "{tmp}", "--quiet"], ["is a folder", "give the path of a .toml file"]),
    # unwritable output folders
    "--out under a regular file": (
        ["run", "{file}", "--out", "{tmp}/a-file/run", "--quiet"],
        ["--out", "a-file"],
    ),
    "--out under /proc": (
        ["run", "{file}", "--out", "/proc/fedsim-test/run", "--quiet"],
        ["--out", "/proc/fedsim-test"],
    ),
    "--out empty": (["run", "{file}", "--out", "", "--quiet"], ["--out ''", "names no folder"]),
    # malformed --set
    "--set without a key": (["run", "{file}", "--set", "=3"], ["--set '=3'", "section.key=value"]),
    "--set without a section": (["run", "{file}", "--set", ".alpha=1"], ["--set '.alpha=1'", "section.key=value"]),
    "--set without a key in the section": (
        ["run", "{file}", "--set", "partition.=1"],
        ["--set 'partition.=1'", "section.key=value"],
    ),
    "--set with an empty level": (
        ["run", "{file}", "--set", "partition..alpha=1"],
        ["--set 'partition..alpha=1'", "section.key=value"],
    ),
    "--set three levels in a real table": (
        ["run", "{file}", "--set", "client.lr.x=1"],
        ["--set 'client.lr.x=1'", "at most two levels"],
    ),
    "--set unknown top-level key": (["run", "{file}", "--set", "nosuch=1"], ["unknown key 'nosuch'"]),
    "--set bad TOML value": (
        ["run", "{file}", "--set", "client.lr=[1, 2"],
        ["[client] lr = '[1, 2'", "valid number"],
    ),
    "--set empty value": (["run", "{file}", "--set", "client.lr="], ["[client] lr = ''", "valid number"]),
    "--set overflowing float": (["run", "{file}", "--set", "client.lr=1e999"], ["[client] lr = inf", "finite"]),
    "--set lr nan": (["run", "{file}", "--set", "client.lr=nan"], ["[client] lr = nan", "finite"]),
    "--set fraction_train nan": (
        ["run", "{file}", "--set", "strategy.fraction_train=nan"],
        ["[strategy] fraction_train = nan"],
    ),
    "--set seed negative": (["run", "{file}", "--set", "seed=-1"], ["seed = -1", "greater than or equal to 0"]),
    "--set seed fractional": (["run", "{file}", "--set", "seed=1.5"], ["seed = 1.5", "integer"]),
    "--set two values in one": (
        ["run", "{file}", "--set", "rounds=1\nseed = 2"],
        ["rounds = '1\\nseed = 2'", "valid integer"],
    ),
    "--set deeply nested value": (["run", "{file}", "--set", "rounds=" + "[" * 5000], ["--set", "nested too deeply"]),
    "--set missing its value": (["run", "{file}", "--set"], ["--set", "expected one argument"]),
    "run with two experiment files": (["run", "{file}", "{file}"], ["unrecognized arguments"]),
    # fedsim partition
    "partition misspelt key": (
        ["partition", "{file}", "--set", "partition.alhpa=0.1", "--out", "{tmp}/p"],
        ["[partition] unknown key 'alhpa'", "valid keys: name, num_clients"],
    ),
    "partition zero clients": (
        ["partition", "{file}", "--set", "partition.num_clients=0", "--out", "{tmp}/p"],
        ["[partition] num_clients", ">= 1"],
    ),
    "partition --out under a regular file": (
        ["partition", "{file}", "--out", "{tmp}/a-file/p"],
        ["--out", "a-file' is a file, not a folder"],
    ),
    "partition --out under /proc": (
        ["partition", "{file}", "--out", "/proc/fedsim-test"],
        ["--out '/proc/fedsim-test'"],
    ),
    "partition --out a file": (["partition", "{file}", "--out", "{tmp}/a-file"], ["a-file' is a file, not a folder"]),
    # fedsim report
    "report a folder without runs": (["report", "{tmp}/empty"], ["no finished runs"]),
    "report a missing folder": (["report", "{tmp}/missing"], ["missing' is not a folder"]),
    "report a file": (["report", "{tmp}/a-file"], ["a-file' is not a folder"]),
    "report no folder": (["report"], ["the following arguments are required: DIR"]),
    "report --target not a number": (["report", "{tmp}/empty", "--target", "high"], ["--target", "'high'"]),
    "report --target nan": (["report", "{tmp}/empty", "--target", "nan"], ["--target nan", "finite"]),
    "report --target inf": (["report", "{tmp}/empty", "--target", "inf"], ["--target inf", "finite"]),
    "report --format unknown": (["report", "{tmp}/empty", "--format", "html"], ["--format", "'html'", "'latex'"]),
    "report --out under a file": (["report", "{tmp}/empty", "--out", "{tmp}/a-file/r"], ["--out", "a-file"]),
    # fedsim data
    "data download unknown dataset": (["data", "download", "imagenet"], ["'imagenet'", "mnist"]),
    "data download embedded dataset": (["data", "download", "digits"], ["'digits'", "needs no download"]),
    "data download zero attempts": (["data", "download", "mnist", "--attempts", "0"], ["--attempts 0", "1 or more"]),
    "data info unknown dataset": (["data", "info", "minst"], ["'minst'", "did you mean 'mnist'"]),
    "data without an action": (["data"], ["choose an action", "download or info"]),
    "data unknown action": (["data", "fetch", "mnist"], ["'fetch'", "'download'"]),
    # fedsim list, fedsim
    "list with an extra argument": (["list", "datasets"], ["unrecognized arguments: datasets"]),
    "list with an unknown option": (["list", "--json"], ["unrecognized arguments: --json"]),
    "no command": ([], ["choose a command", "run"]),
}


@pytest.mark.parametrize("case", sorted(ARGV_CASES))
def test_argv_case(case, tmp_path, capsys, monkeypatch):
    argv, words = ARGV_CASES[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "experiment.toml").write_text(BASE)
    monkeypatch.setenv("FEDSIM_DATA", str(tmp_path / "data"))  # nothing may be downloaded into the real cache
    argv = [arg.replace("{tmp}", str(tmp_path)).replace("{file}", str(tmp_path / "experiment.toml")) for arg in argv]
    code = cli(argv)
    assert_one_line_error(code, capsys.readouterr().err, words)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a file without read permission")
def test_unreadable_experiment_file(tmp_path, capsys):
    path = tmp_path / "secret.toml"
    path.write_text(BASE)
    path.chmod(0)
    try:
        code = cli(["run", str(path), "--quiet"])
    finally:
        path.chmod(0o644)
    assert_one_line_error(code, capsys.readouterr().err, ["cannot read experiment file", "Permission denied"])


# --- the user's own strategy: (module source, words); the strategy is module:S --------------

STRATEGY_CASES = {
    "syntax error in the module": (
        "from flwr.serverapp.strategy import FedAvg\nclass S(FedAvg)\n    pass\n",
        ["cannot import module", "syntax error in", "line 2", "fix the module"],
    ),
    "the module raises when imported": (
        "from flwr.serverapp.strategy import FedAvg\nLIMIT = 1 / 0\n",
        ["cannot import module", "ZeroDivisionError: division by zero", "line 2"],
    ),
    "__init__ raises": (
        """
        from flwr.serverapp.strategy import FedAvg
        class S(FedAvg):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                raise RuntimeError("not configured")
        """,
        [":S(...) raised RuntimeError: not configured", "line 6"],
    ),
    "__init__ rejects its option": (
        """
        from flwr.serverapp.strategy import FedAvg
        class S(FedAvg):
            def __init__(self, *, level: float = 1.0, **kwargs):
                super().__init__(**kwargs)
                if level > 2:
                    raise ValueError(f"level must be <= 2, got {level}")
        """,
        ["[strategy] level must be <= 2, got 3.0"],  # a ValueError: the strategy's own range check
    ),
    "configure_train raises": (
        """
        from flwr.serverapp.strategy import FedAvg
        class S(FedAvg):
            def configure_train(self, server_round, arrays, config, grid):
                raise RuntimeError("no sampling today")
        """,
        [":S: configure_train() raised RuntimeError: no sampling today", "line 5", "fix the strategy"],
    ),
    "aggregate_train raises": (
        """
        from flwr.serverapp.strategy import FedAvg
        class S(FedAvg):
            def aggregate_train(self, server_round, replies):
                return {}["weights"]
        """,
        [":S: aggregate_train() raised KeyError: 'weights'", "line 5"],
    ),
    "not a strategy": ("class S:\n    pass\n", ["is not a subclass of flwr.serverapp.strategy.Strategy"]),
    "no such class": ("class T:\n    pass\n", ["has no 'S'"]),
}


@pytest.mark.parametrize("case", sorted(STRATEGY_CASES))
def test_strategy_case(case, tmp_path, capsys, monkeypatch):
    source, words = STRATEGY_CASES[case]
    module = "user_strategy_" + "".join(c if c.isalnum() else "_" for c in case)
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    options = "level = 3.0\n" if "option" in case else ""
    try:
        code = cli(run_file(tmp_path, with_tables(f'[strategy]\nname = "{module}:S"\n{options}')))
    finally:
        sys.modules.pop(module, None)
    assert_one_line_error(code, capsys.readouterr().err, words)


def test_a_strategy_error_mid_run_shows_its_traceback_with_verbose(tmp_path, capsys, monkeypatch):
    (tmp_path / "verbose_strategy.py").write_text(textwrap.dedent(STRATEGY_CASES["configure_train raises"][0]))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code = cli(run_file(tmp_path, with_tables('[strategy]\nname = "verbose_strategy:S"'), "--verbose"))
    finally:
        sys.modules.pop("verbose_strategy", None)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: [strategy] verbose_strategy:S")


# --- fedsim report on damaged run directories (report's own reading) ------------------------

SUMMARY = '{"accuracy": 0.5, "loss": 1.0}'
METRICS = "round,scope,id,metric,value\n0,server,global,accuracy,0.1\n1,server,global,accuracy,0.5\n"

REPORT_CASES = {
    "summary.json corrupt": ({"summary.json": "{accuracy: 0.5"}, [], ["summary.json is not valid JSON", "line 1"]),
    "summary.json cut short": ({"summary.json": '{"accuracy": 0.'}, [], ["summary.json is not valid JSON"]),
    "summary.json empty": ({"summary.json": ""}, [], ["summary.json is not valid JSON"]),
    "summary.json a list": ({"summary.json": "[1, 2]"}, [], ["summary.json holds a JSON list"]),
    "summary.json binary": ({"summary.json": bytes(range(256))}, [], ["summary.json is not UTF-8 text"]),
    "config.toml binary": ({"config.toml": bytes(range(256))}, [], ["config.toml is not UTF-8 text"]),
    "config.toml not TOML": ({"config.toml": "name = \n"}, [], ["config.toml: not valid TOML"]),
    "metrics.csv binary": ({"metrics.csv": b"\x00\x01garbage\xff"}, [], ["metrics.csv"]),
    "metrics.csv without its columns": ({"metrics.csv": "a,b\n1,2\n"}, [], ["metrics.csv has no round, scope"]),
    "metrics.csv with a word for a number": (
        {"metrics.csv": "round,scope,id,metric,value\n0,server,global,accuracy,high\n"},
        ["--target", "0.3"],
        ["metrics.csv: value 'high' is not a number"],
    ),
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report_case(case, tmp_path, capsys):
    files, args, words = REPORT_CASES[case]
    run = tmp_path / "runs" / "a-run"
    run.mkdir(parents=True)
    contents = {"config.toml": 'name = "a"\nseed = 0\n', "summary.json": SUMMARY, "metrics.csv": METRICS} | files
    for name, content in contents.items():
        (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    code = cli(["report", str(tmp_path / "runs"), *args])
    assert_one_line_error(code, capsys.readouterr().err, words)


# --- the console script itself: no traceback from a real process ---------------------------


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("UTF-16 file", ["UTF-16"]),
        ("configure_train raises", ["configure_train() raised RuntimeError: no sampling today"]),
    ],
)
def test_console_script_prints_one_line(case, words, tmp_path):
    if case in BYTES_CASES:
        (tmp_path / "experiment.toml").write_bytes(BYTES_CASES[case][0])
    else:
        (tmp_path / "subprocess_strategy.py").write_text(textwrap.dedent(STRATEGY_CASES[case][0]))
        (tmp_path / "experiment.toml").write_text(with_tables('[strategy]\nname = "subprocess_strategy:S"'))
    done = subprocess.run(
        [sys.executable, "-m", "fedsim", "run", "experiment.toml", "--out", "out", "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        timeout=300,
    )
    assert_one_line_error(done.returncode, done.stderr, words)


def unused_local_address() -> str:
    """A ``host:port`` on this machine that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize(
    ("case", "overrides", "words"),
    [
        (
            "unreachable Ray address",
            ["engine.name=ray", "engine.address={address}"],
            ["[engine] address = '{address}'", "no Ray cluster answers there", "ray start --head"],
        ),
        (
            "unreachable Ray address, Flower's engine",
            ["engine.name=flower", "engine.address={address}"],
            ["[engine] address = '{address}'", "no Ray cluster answers there"],
        ),
        (
            "missing dataset file",
            ["dataset.name=mnist", "dataset.root={root}"],
            ["mnist: missing", "fedsim data download mnist"],
        ),
        ("bad key", ["partition.alhpa=0.1"], ["[partition] unknown key 'alhpa'", "valid keys"]),
    ],
)
def test_console_script_says_what_a_newcomer_got_wrong_in_one_line(case, overrides, words, tmp_path):
    """Nothing of Ray's or Flower's own logs comes before fedsim's one line on stderr."""
    address, root = unused_local_address(), tmp_path / "no-data"
    root.mkdir()
    (tmp_path / "experiment.toml").write_text(BASE)
    sets = [f"--set={option.format(address=address, root=root)}" for option in overrides]
    done = subprocess.run(
        [sys.executable, "-m", "fedsim", "run", "experiment.toml", *sets, "--out", "out", "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        timeout=300,
    )
    assert_one_line_error(done.returncode, done.stderr, [words_.format(address=address) for words_ in words])


# --- run directories: what fedsim run should say about a damaged one -------------------------
# The checkpoint and run-directory code (fedsim/results.py, fedsim/runner.py) is being rewritten;
# these cases state the expected behaviour: one line naming the damaged file, exit code 2.


def _unfinish(run: Path) -> None:
    """Make a finished run look interrupted after its last checkpoint."""
    (run / "summary.json").unlink()


def _checkpoint(run: Path) -> Path:
    from fedsim.results import RunDirectory

    return RunDirectory(run).checkpoint


def _garbage_checkpoint(run: Path) -> None:
    _unfinish(run)
    _checkpoint(run).write_bytes(os.urandom(4096))


def _truncated_checkpoint(run: Path) -> None:
    _unfinish(run)
    data = _checkpoint(run).read_bytes()
    _checkpoint(run).write_bytes(data[: len(data) // 2])


def _empty_checkpoint(run: Path) -> None:
    _unfinish(run)
    _checkpoint(run).write_bytes(b"")


def _no_metrics(run: Path) -> None:
    _unfinish(run)
    (run / "metrics.csv").unlink()


def _no_partition(run: Path) -> None:
    _unfinish(run)
    (run / "partition.npz").unlink()


def _garbage_partition(run: Path) -> None:
    _unfinish(run)
    (run / "partition.npz").write_bytes(b"PK\x03\x04 not really a zip")


def _invalid_config(run: Path) -> None:
    (run / "config.toml").write_text("name = \n[[[")


def _binary_config(run: Path) -> None:
    (run / "config.toml").write_bytes(bytes(range(256)))


def _corrupt_summary(run: Path) -> None:
    (run / "summary.json").write_text('{"accuracy": 0.')


def _not_a_run(run: Path) -> None:
    shutil.rmtree(run)
    run.mkdir()
    (run / "notes.txt").write_text("my own files\n")


RUN_DIRECTORY_CASES = {
    "garbage checkpoint": (_garbage_checkpoint, ["checkpoint"]),
    "truncated checkpoint": (_truncated_checkpoint, ["checkpoint"]),
    "empty checkpoint": (_empty_checkpoint, ["checkpoint"]),
    "run folder without metrics.csv": (_no_metrics, ["metrics.csv"]),
    "run folder without partition.npz": (_no_partition, ["partition.npz"]),
    "garbage partition.npz": (_garbage_partition, ["partition.npz"]),
    "--out holding an invalid config.toml": (_invalid_config, ["config.toml"]),
    "--out holding a binary config.toml": (_binary_config, ["config.toml"]),
    "finished run with a corrupt summary.json": (_corrupt_summary, ["summary.json"]),
    "--out holding a non-fedsim folder": (_not_a_run, ["--out", "not a fedsim run"]),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 2-round run of BASE, copied by each case before it is damaged."""
    folder = tmp_path_factory.mktemp("finished")
    (folder / "experiment.toml").write_text(with_tables("rounds = 2"))
    assert main(["run", str(folder / "experiment.toml"), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder


@pytest.mark.parametrize("case", sorted(RUN_DIRECTORY_CASES))
def test_run_directory_case(case, finished_run, tmp_path, capsys):
    damage, words = RUN_DIRECTORY_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    damage(run)
    capsys.readouterr()
    code = cli(["run", str(finished_run / "experiment.toml"), "--out", str(run), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, words)


# --- fuzzing: the loader and --set never end in anything but a UserError or an Experiment -----


def _component_keys() -> tuple[dict[str, dict[str, list]], dict[str, list[str]]]:
    """Per table, every key it can hold (the parameters of every component of its registry)
    with the defaults those take; and every registered name per table."""
    import inspect

    from fedsim.data import DATASETS
    from fedsim.engine import ENGINES
    from fedsim.models import MODELS
    from fedsim.registry import accepted_parameters
    from partitioners import PARTITIONERS
    from strategies import STRATEGIES

    registries = {
        "dataset": {name: info.loader for name, info in DATASETS.items()},
        "partition": PARTITIONERS,
        "model": MODELS,
        "strategy": STRATEGIES,
        "engine": ENGINES,
    }
    keys: dict[str, dict[str, list]] = {}
    for table, registry in registries.items():
        keys[table] = {}
        for component in registry.values():
            for key, parameter in accepted_parameters(component).items():
                default = parameter.default
                known = [] if default in (inspect.Parameter.empty, None) or callable(default) else [default]
                keys[table].setdefault(key, []).extend(known)
    for table in TABLE_NAMES:  # tables with a fixed set of keys: [client], and any added later
        if table not in registries:
            fields = TABLES[table].model_fields.items()
            keys[table] = {key: [] if field.default is None else [field.default] for key, field in fields}
    return keys, {table: sorted(registry) for table, registry in registries.items()}


TABLE_KEYS, COMPONENT_NAMES = _component_keys()
TOP_KEYS = sorted(set(Experiment.model_fields) - set(TABLE_NAMES))
# No ':' in random text: a strategy or embedder name with one is imported as module:attribute,
# and a fuzzer that imports arbitrary installed modules (antigravity opens a browser) is no test.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=":"), max_size=12)
NUMBERS = st.one_of(
    st.integers(-3, 40),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, -0.0, 1e-320, 1e308]),
)
SCALARS = st.one_of(NUMBERS, st.booleans(), TEXT)
JUNK = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6
)
VALID = tomllib.loads(BASE)


def _like(default):
    """Values of the default's type, near the values that work."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(0, 12)
    if isinstance(default, float):
        return st.floats(0, 1.5)
    if isinstance(default, str):
        return st.just(default)
    if isinstance(default, (list, tuple)):
        return st.just(list(default)) | st.lists(st.integers(1, 16), max_size=3)
    return JUNK


def rarely(times: int):
    """True about once in ``times`` draws (hypothesis favours the ends of a range: not 0)."""
    return st.integers(0, times - 1).map(lambda pick: pick == times // 2)


def value_for(defaults: list):
    """Mostly a plausible value for a key with these defaults, now and then junk."""
    plausible = st.one_of(*map(_like, defaults)) if defaults else st.integers(0, 12)
    return rarely(4).flatmap(lambda junk: JUNK if junk else plausible)


TOP_VALUES = {
    "name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True) | TEXT,
    "description": TEXT,
}


@st.composite
def documents(draw) -> dict:
    """An experiment built from the real keys: BASE (or, now and then, nothing) with random
    keys set to mostly plausible values, a real component name most of the time, and
    sometimes junk: a junk value, a junk key, a table that is not a table."""
    document = {} if draw(rarely(5)) else json.loads(json.dumps(VALID))
    for key in draw(st.lists(st.sampled_from(TOP_KEYS), max_size=2)):
        document[key] = draw(TOP_VALUES.get(key, value_for([1])))
    for table in draw(st.lists(st.sampled_from(TABLE_NAMES), max_size=3)):
        entries = document.get(table) if isinstance(document.get(table), dict) else {}
        if table in COMPONENT_NAMES and draw(st.booleans()):
            entries["name"] = draw(TEXT if draw(rarely(6)) else st.sampled_from(COMPONENT_NAMES[table]))
        for key in draw(st.lists(st.sampled_from(sorted(TABLE_KEYS[table])), max_size=3)):
            entries[key] = draw(value_for(TABLE_KEYS[table][key]))
        document[table] = draw(JUNK) if draw(rarely(20)) else entries
    if draw(rarely(20)):
        document[draw(TEXT)] = draw(JUNK)
    return document


def _check_outcome(call):
    try:
        experiment = call()
    except UserError as error:
        message = str(error)
        assert message and "\n" not in message, repr(message)
        return None
    assert isinstance(experiment, Experiment)
    # what a run directory stores reads back as the same experiment
    assert validate_experiment(tomllib.loads(experiment.to_toml())).to_dict() == experiment.to_dict()
    return experiment


# 200 examples each keeps the suite fast; FEDSIM_FUZZ_EXAMPLES=5000 hunts longer.
FUZZ = settings(
    max_examples=int(os.environ.get("FEDSIM_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(documents())
def test_fuzz_validate_documents(document):
    _check_outcome(lambda: validate_experiment(document, "fuzz.toml"))


@FUZZ
@given(documents())
def test_fuzz_experiment_files(document):
    """The same documents through a file, as TOML text."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.toml"
        try:
            path.write_text(tomli_w.dumps(document), encoding="utf-8")
        except (TypeError, ValueError):  # a value TOML cannot write (tomli_w's own limits)
            return
        _check_outcome(lambda: load_experiment(path))


@FUZZ
@given(
    st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")))
)
def test_fuzz_junk_files(raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "junk.toml"
        path.write_bytes(raw)
        try:
            data = read_experiment_file(path)
        except UserError as error:
            assert "\n" not in str(error)
            return
        assert isinstance(data, dict)
        _check_outcome(lambda: validate_experiment(data, str(path)))


@FUZZ
@given(st.lists(st.text(max_size=40), max_size=3))
def test_fuzz_set_random_strings(overrides):
    for text in overrides:
        try:
            path, _ = parse_override(text)
        except UserError as error:
            assert "\n" not in str(error)
            continue
        assert path and all(path)
    _check_outcome(lambda: validate_experiment(apply_overrides(json.loads(json.dumps(VALID)), overrides), "fuzz"))


def _override_texts():
    """``key=value`` on the real keys (or junk keys), with TOML values or junk text."""

    def table_key(table: str):
        keys = sorted(TABLE_KEYS[table]) + (["name"] if table in COMPONENT_NAMES else [])
        return st.sampled_from(keys).flatmap(
            lambda key: st.tuples(st.just(f"{table}.{key}"), value_for(TABLE_KEYS[table].get(key, [])))
        )

    pair = st.one_of(
        st.sampled_from(TOP_KEYS).flatmap(lambda key: st.tuples(st.just(key), TOP_VALUES.get(key, value_for([1])))),
        st.sampled_from(TABLE_NAMES).flatmap(table_key),
        st.sampled_from(sorted(COMPONENT_NAMES)).flatmap(
            lambda table: st.tuples(st.just(f"{table}.name"), st.sampled_from(COMPONENT_NAMES[table]))
        ),
    )
    junk_pair = st.tuples(TEXT, JUNK)
    as_text = st.builds(
        lambda kv: f"{kv[0]}={_toml_text(kv[1])}", rarely(5).flatmap(lambda j: junk_pair if j else pair)
    )
    raw = st.builds(lambda key, text: f"{key}={text}", TEXT, st.text(max_size=20))
    return rarely(5).flatmap(lambda junk: raw if junk else as_text)


def _toml_text(value) -> str:
    """A value as TOML spells it (as one types it after --set key=)."""
    return tomli_w.dumps({"v": value})[4:].strip() if _dumpable(value) else str(value)


def _dumpable(value) -> bool:
    try:
        tomli_w.dumps({"v": value})
    except (TypeError, ValueError):
        return False
    return True


@FUZZ
@given(st.lists(_override_texts(), min_size=1, max_size=4))
def test_fuzz_set_real_keys(overrides):
    """--set on the real keys, with TOML or junk values, on a valid experiment file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "base.toml"
        path.write_text(BASE)
        _check_outcome(lambda: load_experiment(path, overrides))


def test_catalogue_size():
    """The catalogue holds at least 60 malformed files and command lines."""
    cases = [FILE_CASES, BYTES_CASES, ARGV_CASES, STRATEGY_CASES, REPORT_CASES, RUN_DIRECTORY_CASES]
    assert sum(map(len, cases)) >= 60
