"""The documentation: the site builds with ``mkdocs build --strict``, the README stays short,
and every code block of README.md and the pages under docs/ is exercised. A toml block is
validated as the experiment table it shows, a bash block's commands are parsed as their
tools would parse them (fedsim's, through fedsim's own parser and checks, without training),
a text block's ``$ fedsim ...`` lines print the errors it shows, and a python block runs,
here or in the test that owns its page."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.common.config import flatten_dict, parse_config_args

from fedsim.build import load_experiment, load_experiment_data
from fedsim.cli import main, make_parser
from fedsim.config import read_experiment_file
from fedsim.flower_app import read_run_config
from fedsim.runner import run_experiment
from fedsim.sweep import make_spec

from .conftest import QUICKSTART, ROOT, tiny_overrides
from .docs_pages import DOCS, code_block_after, code_blocks, page, pages

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Python blocks run by the test module that owns their page (which reads the page there)
RUN_ELSEWHERE = {
    "guide/python-api.md": "tests/test_api.py",
    "guide/own-strategy.md": "tests/test_custom_strategy.py",
    "guide/flower-app.md": "tests/test_plain_flower.py",
}
# ... and those this module runs
RUN_HERE = {"guide/observers.md", "guide/partitions.md"}
# what the command lines of bash blocks may start with (each checked below)
TOOLS = {"fedsim", "pip", "pytest", "mkdocs", "flwr", "export", "python"}


def blocks(language: str) -> list:
    """``pytest.param``s of every ``language`` block of every page, as (page, code)."""
    found = []
    for name in pages():
        for number, (_, code) in enumerate(code_blocks(page(name), language)):
            found.append(pytest.param(name, code, id=f"{name}#{number}"))
    return found


def commands(code: str) -> list[list[str]]:
    """A bash block's commands, split as the shell would (comments dropped, ``&&`` chains apart)."""
    found: list[list[str]] = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            found.append(words[:end])
            words = words[end + 1 :]
    return [words for words in found if words]


@pytest.fixture
def example_modules(tmp_path, monkeypatch):
    """The pages' example modules, importable as the pages name them: ``my_strategy`` (Your own
    strategy) and ``my_observers`` (Observers)."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "my_strategy.py").write_text(code_block_after(page("guide/own-strategy.md"), "`my_strategy.py`"))
    (folder / "my_observers.py").write_text(code_block_after(page("guide/observers.md"), "# Your own observer"))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(ROOT)  # the commands' experiment files are relative to the repository
    yield folder
    for name in ("my_strategy", "my_observers"):
        sys.modules.pop(name, None)


# -- the site --------------------------------------------------------------------------------


def test_the_site_builds_in_strict_mode(tmp_path):
    """Every page, link and docstring of the API reference without a warning; the home page
    shows the README's quickstart figures (a snippet of README.md)."""
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
        + ["--site-dir", str(site)],
        cwd=ROOT,  # the snippet's path, README.md, is relative to it
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about its successor
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    figure = re.search(r"^\| `quickstart\.toml` \(seed 0\) \| (\d\.\d{4}) \|", page("README.md"), re.MULTILINE)
    assert f"<td>{figure.group(1)}</td>" in (site / "index.html").read_text()
    assert 'id="fedsim.api.run"' in (site / "reference" / "api" / "index.html").read_text()
    for name in ("splits", "attacks", "feature-skew", "representation", "drift"):
        assert (site / "results" / name / "index.html").is_file()


def test_every_page_is_in_the_navigation():
    listed = set(re.findall(r"[\w/.-]+\.(?:md|ipynb)\b", (ROOT / "mkdocs.yml").read_text()))
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*") if path.suffix in (".md", ".ipynb")}
    assert on_disk - listed == set()


def test_the_readme_is_short_and_its_links_lead_somewhere():
    readme = page("README.md")
    assert len(readme.splitlines()) <= 150
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [target for target in targets if not target.startswith(("http://", "https://"))]
    assert local and [target for target in local if not (ROOT / target).exists()] == []


# -- the code blocks ---------------------------------------------------------------------------


def test_every_code_block_has_a_language_this_module_checks():
    languages = {language for name in pages() for language, _ in code_blocks(page(name))}
    # "" and text: diagrams, a layout and error output (text blocks are checked below)
    assert languages <= {"toml", "python", "bash", "text", ""}


@pytest.mark.parametrize(("name", "code"), blocks("python"))
def test_every_python_block_runs_somewhere(name, code):
    compile(code, name, "exec")
    assert name in RUN_HERE or name in RUN_ELSEWHERE, f"{name}: no test runs its python block"
    if name in RUN_ELSEWHERE:
        # the owner names the page, or finds it by its title
        title = page(name).splitlines()[0].lstrip("# ")
        owner = (ROOT / RUN_ELSEWHERE[name]).read_text()
        assert name in owner or title in owner, f"{RUN_ELSEWHERE[name]} does not read {name}"


def validate_toml_block(code: str, tmp_path: Path) -> None:
    """A whole experiment file loads; a pyproject fragment registers fedsim entry points; a
    [sweep] table makes a sweep of the quickstart; any other table, put into the quickstart
    in place of the file's own, validates."""
    data = tomllib.loads(code)
    if "project" in data:
        groups = data["project"]["entry-points"]
        assert groups and all(group.startswith("fedsim.") for group in groups)
        return
    if "rounds" in data:
        (tmp_path / "block.toml").write_text(code)
        load_experiment(tmp_path / "block.toml")
        return
    if "sweep" in data:
        (tmp_path / "sweep.toml").write_text(QUICKSTART.read_text() + "\n" + code)
        assert make_spec(tmp_path / "sweep.toml", [], None, []).grid
        return
    experiment = read_experiment_file(QUICKSTART)
    experiment.update(data)
    load_experiment_data(experiment, "block")


@pytest.mark.parametrize(("name", "code"), blocks("toml"))
def test_every_toml_block_is_a_valid_experiment_table(name, code, example_modules, tmp_path):
    validate_toml_block(code, tmp_path)


def check_command(words: list[str], tmp_path: Path) -> None:
    tool, args = words[0], words[1:]
    if tool == "fedsim":
        parsed = make_parser().parse_args(args)  # a usage error exits here
        if parsed.command in ("run", "partition"):
            load_experiment(parsed.config or QUICKSTART, parsed.set)
        elif parsed.command == "sweep":
            assert main([*args, "--dry-run", "--out", str(tmp_path / "sweep")]) == 0
    elif tool == "pip":
        extras = PYPROJECT["project"]["optional-dependencies"]
        for spec in args[args.index("-e") + 1 :]:
            named = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
            if named:  # the package itself, and the extras named exist
                assert set(filter(None, (named.group(1) or "").split(","))) <= set(extras), spec
    elif tool == "python":
        assert (ROOT / args[0]).is_file(), args[0]
    elif tool == "flwr":
        assert args[:2] == ["run", "."]
        given = parse_config_args([args[args.index("--run-config") + 1]])
        defaults = flatten_dict(PYPROJECT["tool"]["flwr"]["app"]["config"])
        assert set(given) <= set(defaults), set(given) - set(defaults)
        read_run_config({**defaults, **given}, ROOT)
    elif tool == "mkdocs":
        assert args[0] in ("serve", "build") and (ROOT / "mkdocs.yml").is_file()
    elif tool == "export":
        assert all(re.fullmatch(r"[A-Z_]+=\S*", arg) for arg in args)
    else:
        assert tool in TOOLS and not args, words


@pytest.mark.parametrize(("name", "code"), blocks("bash"))
def test_every_bash_command_parses(name, code, example_modules, tmp_path):
    found = commands(code)
    assert found
    for words in found:
        assert words[0] in TOOLS, f"{name}: {words[0]} is not a command this module checks"
        check_command(words, tmp_path)


@pytest.mark.parametrize(("name", "code"), blocks("text"))
def test_every_shown_error_is_the_one_fedsim_prints(name, code, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    shown = re.findall(r"^\$ (fedsim .*)\n(error: .*)$", code, re.MULTILINE)
    assert shown
    for command, error in shown:
        out = tmp_path / "run"
        assert main([*shlex.split(command)[1:], "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == error
        assert not out.exists()


# -- the python blocks this module runs ----------------------------------------------------------


def test_the_observer_example_records_its_rows(example_modules, tmp_path):
    """GapLogger (Observers), named by the page's [[observer]] table, on a tiny run."""
    text = page("guide/observers.md")
    (tmp_path / "experiment.toml").write_text(QUICKSTART.read_text() + "\n" + code_block_after(text, "```toml", "toml"))
    experiment = load_experiment(tmp_path / "experiment.toml", tiny_overrides("rounds=4"))
    run_experiment(experiment, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv", dtype={"id": str})
    gaps = metrics[(metrics.scope == "observer") & (metrics.metric == "loss_gap")]
    assert list(gaps["round"]) == [2, 4] and set(gaps["id"]) == {"gap"}  # every = 2
    assert np.isfinite(gaps["value"]).all()


def test_the_partitioner_example_runs():
    """The Python example of Partitions, on 20,000 labels of 10 classes."""
    pytest.importorskip("flwr_datasets")
    code = code_block_after(page("guide/partitions.md"), "In Python every scheme")
    scope = {"labels": np.repeat(np.arange(10), 2000)}
    exec(compile(code, "guide/partitions.md", "exec"), scope)
    assert len(scope["partition"]) == 100
    assert 0 < scope["partition"].skew().summary["mean_hellinger"] < 1
    assert scope["flower_partitioner"] is not None
