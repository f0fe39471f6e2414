"""The layers of fedsim hold: `lint-imports` keeps the contracts in pyproject.toml (each layer
imports only the layers below it, a Ray worker's modules never reach the validation
layer, no cycle among a package's modules, function-level imports included), and every
import of a project module inside a function is a lazy import for start-up time that says
so in a ``# lazy:`` comment, never a way around a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("fedsim", "strategies", "partitioners")


def test_the_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def function_level_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, whether a ``# lazy:`` comment precedes its block) for each import of
    a project module inside a function of ``path``."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        block_commented = False
        previous_was_import = False
        for statement in function.body:
            is_import = isinstance(statement, (ast.Import, ast.ImportFrom))
            if not is_import:
                previous_was_import = False
                continue
            if not previous_was_import:  # the first import of a block: is the line above a lazy comment?
                above = lines[statement.lineno - 2].strip() if statement.lineno >= 2 else ""
                block_commented = above.startswith("# lazy:")
            previous_was_import = True
            names = [alias.name for alias in statement.names] if isinstance(statement, ast.Import) else []
            module = statement.module if isinstance(statement, ast.ImportFrom) else names[0]
            if module and module.split(".")[0] in PACKAGES:
                found.append((statement.lineno, module, block_commented))
    return found


def test_every_function_level_import_is_a_lazy_one_that_says_why():
    unexplained = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module, commented in function_level_imports(path):
                if not commented:
                    unexplained.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not unexplained, "function-level imports without a '# lazy:' comment:\n" + "\n".join(unexplained)


def test_every_module_of_fedsim_is_in_a_layer():
    """A new top-level module must be placed in a layer, or the contract says nothing of it."""
    import re
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    listed = {name.strip() for layer in contract["layers"] for name in re.split(r"[:|]", layer)}
    modules = {
        f"fedsim.{path.stem if path.is_file() else path.name}"
        for path in (ROOT / "fedsim").iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()
    }
    assert modules - listed == set(), "put these modules in a layer of pyproject.toml's contract"
