"""fedsim.checks: the one idiom for parameter checks, and that the older ones are gone."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest

from fedsim import checks
from fedsim.checks import (
    check,
    check_bool,
    check_callable,
    check_choice,
    check_fraction,
    check_integer,
    check_number,
    check_positive,
)

ROOT = Path(__file__).resolve().parents[1]


def refused(call, *args, **kwargs) -> str:
    """The one-line message ``call`` refuses with."""
    with pytest.raises(ValueError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_check_raises_its_message():
    check(True, "never shown")
    assert refused(check, False, "threshold = 1 is FedAvg") == "threshold = 1 is FedAvg"


def test_integers():
    assert check_integer("num_seeds", 3, minimum=0) == 3
    assert type(check_integer("num_seeds", np.int64(3), minimum=0)) is int
    assert refused(check_integer, "num_seeds", -1, minimum=0) == "num_seeds must be an integer >= 0, got -1"
    assert refused(check_integer, "steps", 0, minimum=1) == "steps must be an integer >= 1, got 0"
    assert refused(check_integer, "k", 6, maximum=5) == "k must be an integer <= 5, got 6"
    assert refused(check_integer, "k", 0, minimum=1, maximum=5) == "k must be an integer in [1, 5], got 0"
    assert refused(check_integer, "seed", "seven") == "seed must be an integer, got 'seven'"
    assert refused(check_integer, "epochs", 2.0, minimum=1) == "epochs must be an integer >= 1, got 2.0"
    assert refused(check_integer, "x", np.int64(-2), minimum=0) == "x must be an integer >= 0, got -2"


@pytest.mark.parametrize("flag", [True, False, np.True_])
def test_bools_are_not_numbers(flag):
    assert "got" in refused(check_integer, "count", flag)
    assert "got" in refused(check_number, "lr", flag)
    assert "got" in refused(check_positive, "lr", flag)
    assert "got" in refused(check_fraction, "share", flag, allow_zero=True)


def test_numbers():
    assert check_number("lr", 1) == 1.0 and type(check_number("lr", np.float32(0.5))) is float
    assert refused(check_positive, "kappa", 0.0) == "kappa must be a finite number > 0, got 0.0"
    assert refused(check_positive, "alpha", 0.0) == "alpha must be a finite number > 0, got 0.0"
    assert refused(check_number, "noise", -0.1, at_least=0) == "noise must be a finite number >= 0, got -0.1"
    assert refused(check_number, "x", 2, below=1) == "x must be a finite number < 1, got 2"
    assert refused(check_number, "tau", 0.0, above=0, at_most=1) == "tau must be in (0, 1], got 0.0"
    assert refused(check_number, "momentum", 1.0, at_least=0, below=1) == "momentum must be in [0, 1), got 1.0"
    for value in (math.nan, math.inf, -math.inf):
        assert refused(check_number, "lr", value).startswith("lr must be a finite number, got ")
    assert refused(check_positive, "lr", math.inf) == "lr must be a finite number > 0, got inf"
    assert refused(check_number, "lr", "0.1") == "lr must be a finite number, got '0.1'"
    with pytest.raises(TypeError):
        check_number("lr", 1.0, above=0, at_least=0)


def test_fractions():
    assert check_fraction("share", 0.5) == 0.5
    assert check_fraction("share", 0, allow_zero=True) == 0.0
    assert refused(check_fraction, "share", 0) == "share must be in (0, 1), got 0"
    assert refused(check_fraction, "share", 1.0, allow_zero=True) == "share must be in [0, 1), got 1.0"


def test_choices_booleans_and_callables():
    assert check_choice("mode", "single", ("single", "multi")) == "single"
    assert refused(check_choice, "mode", "both", ("single", "multi")) == "mode must be 'single' or 'multi', got 'both'"
    assert (
        refused(check_choice, "anchor", "mean", ("both", "embedding", "prototype"))
        == "anchor must be one of 'both', 'embedding', 'prototype', got 'mean'"
    )
    assert "got ['a']" in refused(check_choice, "mode", ["a"], ("a", "b"))
    assert check_bool("clip_updates", np.False_) is False
    assert refused(check_bool, "clip_updates", "no") == "clip_updates must be true or false, got 'no'"
    assert refused(check_bool, "clip_updates", 1) == "clip_updates must be true or false, got 1"
    assert check_callable("model_fn", len) is len
    assert refused(check_callable, "model_fn", None) == "model_fn must be a callable, got NoneType"
    assert (
        refused(check_callable, "model_fn", 3, "a callable that builds the model")
        == "model_fn must be a callable that builds the model, got int"
    )


# -- one idiom: the older ones are gone ---------------------------------------------------
OLD_CHECKS = {"check_integer", "check_positive", "check_fraction", "check_choice", "_count", "_check_number"}


def _sources() -> list[Path]:
    return [
        path
        for folder in ("fedsim", "partitioners", "strategies")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != ROOT / "fedsim" / "checks.py"
    ]


def test_generic_checks_are_defined_only_in_fedsim_checks():
    defined = [
        f"{path.relative_to(ROOT)}: {node.name}"
        for path in _sources()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in OLD_CHECKS
    ]
    assert defined == []


def test_the_defences_use_fedsim_checks_own_check():
    from strategies.defences import base

    source = (ROOT / "strategies" / "defences" / "base.py").read_text(encoding="utf-8")
    assert not re.search(r"^def check\b", source, re.MULTILINE)
    assert getattr(base, "check", checks.check) is checks.check
