"""The grid of a sweep, from ``--grid``/``--seeds`` on the command line and the experiment's
``[sweep]`` table, checked so that no two keys set the same value."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.config import apply_overrides, load_sweep_table, parse_override
from fedsim.errors import UserError
from fedsim.registry import did_you_mean

SWEEP_KEYS = ("grid", "seeds")


@dataclass(frozen=True)
class SweepSpec:
    """What to run: an experiment file, the values to vary, the seeds and fixed overrides."""

    config: Path
    grid: dict[str, list[Any]]
    seeds: list[int] | None  # None: every run keeps the experiment's own seed
    overrides: list[str] = field(default_factory=list)  # --set, the same for every run


def make_spec(config: str | Path, grid_options: list[str], seeds_option: str | None, overrides: list[str]) -> SweepSpec:
    """The sweep of ``config``'s ``[sweep]`` table, with ``--grid`` keys added or replacing
    the file's keys they overlap, ``--seeds`` replacing its seeds, and ``--set`` fixing a
    key the table would vary."""
    config = Path(config)
    table = load_sweep_table(config)
    for key in table:
        if key not in SWEEP_KEYS:
            raise UserError(
                f"{config}: [sweep] unknown key {key!r}{did_you_mean(key, SWEEP_KEYS)} (valid keys: grid, seeds)"
            )
    file_grid = _table_grid(config, table.get("grid", {}))
    fixed = [".".join(parse_override(text)[0]) for text in overrides]
    # --set fixes what the file's grid would vary: the grid leaves that key alone
    file_grid = {key: values for key, values in file_grid.items() if not any(_overlap(key, f) for f in fixed)}
    given: dict[str, list[Any]] = {}
    for text in grid_options:
        key, values = parse_grid_option(text)
        for other in given:
            if other == key:
                raise UserError(f"--grid {key} is given twice; list all its values in one --grid {key}=v1,v2")
            if _overlap(key, other):
                inner, example = _overlap_example({**given, key: values}, other, key)
                raise UserError(
                    f"--grid {other} and --grid {key} overlap (both vary {inner}); "
                    f"vary it in one --grid, e.g. --grid '{example}'"
                )
        given[key] = values
    for key in given:
        for f in fixed:
            if _overlap(key, f):
                raise UserError(f"--set {f} and --grid {key} both set {min(key, f, key=len)}; keep one of them")
    grid = _replace_file_keys(file_grid, given)
    if seeds_option is not None:
        seeds = parse_seeds(seeds_option)
    elif "seeds" in table:
        seeds = _table_seeds(config, table["seeds"])
    else:
        seeds = None
    return SweepSpec(config, grid, seeds, list(overrides))


def _replace_file_keys(file_grid: dict[str, list[Any]], given: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The file's grid with every key that a ``--grid`` key overlaps replaced by it, in
    the file key's place (names list the values in grid order); other ``--grid`` keys
    come after. ``--grid strategy.name=...`` replaces the file's ``strategy`` tables, and
    ``--grid strategy=...`` the file's ``strategy.*`` keys."""
    grid: dict[str, list[Any]] = {}
    for key, values in file_grid.items():
        covering = [flag for flag in given if _overlap(flag, key)]
        for flag in covering:
            _check_replacement(flag, given[flag], key, values)
            grid.setdefault(flag, given[flag])
        if not covering:
            grid[key] = values
    for flag, values in given.items():
        grid.setdefault(flag, values)
    return grid


def _check_replacement(flag: str, flag_values: list[Any], key: str, values: list[Any]) -> None:
    """A ``--grid`` key inside a table that the file's grid varies whole replaces those
    tables, dropping whatever else they vary. That is what a ``name`` key means (the
    table's other keys are the named component's options), and harmless where the tables
    set nothing else; otherwise what to run is unclear, and the user writes whole tables."""
    if not flag.startswith(key + "."):
        return  # the same key, or a whole table replacing the file's keys inside it
    leaf = flag.split(".", 1)[1]
    others = sorted({sub for value in values if isinstance(value, dict) for sub in value} - {leaf})
    if leaf == "name" or not others:
        return
    _inner, example = _overlap_example({key: values, flag: flag_values}, key, flag)
    raise UserError(
        f"--grid {flag} would replace the experiment file's [sweep] grid {key!r}, whose tables also set "
        f"{', '.join(others)}; give whole tables, e.g. --grid '{example}', or fix {key}.{others[0]} with --set"
    )


def _overlap_example(grid: dict[str, list[Any]], first: str, second: str, sep: str = ",") -> tuple[str, str]:
    """For two overlapping grid keys: the inner key, and the outer key's tables with the
    inner key's values written into them, the one way to vary both."""
    wide, narrow = sorted((first, second), key=len)
    leaf = narrow.split(".", 1)[1]
    tables = [value for value in grid[wide] if isinstance(value, dict)]
    table = next((value for value in tables if leaf in value), tables[0] if tables else {})
    examples = [toml_value({**table, leaf: value}) for value in grid[narrow][:2]]
    return narrow, f"{wide}={sep.join(examples)}{sep + '...' if len(grid[narrow]) > 2 else ''}"


def _overlap(key: str, other: str) -> bool:
    """Whether two dotted keys set some value in common: ``strategy`` and ``strategy.name`` do."""
    return key == other or key.startswith(other + ".") or other.startswith(key + ".")


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """``section.key=v1,v2,...`` -> the key and its TOML-typed values.

    Commas inside brackets, braces or quotes do not split, so list values are written as
    TOML lists: ``model.hidden=[64],[128,64]`` gives the two values [64] and [128, 64].
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise UserError(f"--grid {text!r} must look like section.key=value1,value2, e.g. partition.alpha=0.1,0.5")
    pieces = split_values(raw, f"--grid {text!r}")
    if any(not piece for piece in pieces):
        raise UserError(f"--grid {text!r} has an empty value; separate values with single commas")
    values = [parse_override(f"{key}={piece}")[1] for piece in pieces]
    _check_grid_key(key, values, "--grid")
    return key, values


def split_values(text: str, where: str) -> list[str]:
    """Split at the commas outside brackets, braces and quotes: ``1,[2,3],"a,b"`` -> 3 values."""
    pieces, depth, quote, start, index = [], 0, "", 0, 0
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\" and quote == '"':
                index += 1  # an escaped character inside a TOML basic string
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(text[start:index].strip())
            start = index + 1
        if depth < 0:
            break
        index += 1
    if quote or depth:
        raise UserError(f"{where} has unbalanced brackets or quotes")
    pieces.append(text[start:].strip())
    return pieces


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2]."""
    try:
        seeds = [int(piece) for piece in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds {text!r} must be whole numbers separated by commas, e.g. 0,1,2") from None
    return _unique_seeds(seeds, f"--seeds {text!r}")


def _unique_seeds(seeds: list[int], where: str) -> list[int]:
    repeated = [seed for seed, count in Counter(seeds).items() if count > 1]
    if repeated:
        raise UserError(f"{where} lists seed {repeated[0]} twice")
    return seeds


def _table_seeds(config: Path, seeds: Any) -> list[int]:
    where = f"{config}: [sweep] seeds"
    if not isinstance(seeds, list) or not seeds or not all(type(seed) is int for seed in seeds):
        raise UserError(f"{where} must be a non-empty list of whole numbers, e.g. seeds = [0, 1, 2]; got {seeds!r}")
    return _unique_seeds(seeds, where)


def _table_grid(config: Path, grid: Any) -> dict[str, list[Any]]:
    """``grid = { "section.key" = [...] }``; a ``[sweep.grid]`` table with unquoted
    ``section.key = [...]`` arrives nested one level, which means the same."""
    if not isinstance(grid, dict):
        raise UserError(f'{config}: [sweep] grid must be a table, e.g. grid = {{ "partition.alpha" = [0.1, 0.5] }}')
    flat: dict[str, Any] = {}
    for key, values in grid.items():
        for flat_key, flat_values in (
            [(f"{key}.{sub}", sub_values) for sub, sub_values in values.items()]
            if isinstance(values, dict)
            else [(key, values)]
        ):
            if flat_key in flat:
                raise UserError(f"{config}: [sweep] grid lists {flat_key!r} twice; list all its values once")
            flat[flat_key] = flat_values
    for key, values in flat.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{config}: [sweep] grid {key!r} must be a non-empty list of values, got {values!r}")
        _check_grid_key(key, values, f"{config}: [sweep] grid")
    check_disjoint(flat, f"{config}: [sweep] grid")
    return flat


def check_disjoint(grid: dict[str, list[Any]], where: str) -> None:
    """No two grid keys may set the same value: the later would override the earlier in
    every run while the run's name showed both."""
    keys = list(grid)
    for index, key in enumerate(keys):
        for other in keys[index + 1 :]:
            if _overlap(key, other):
                inner, example = _overlap_example(grid, key, other, sep=", ")
                raise UserError(
                    f"{where}: {key!r} and {other!r} overlap (both vary {inner}); vary it in one key, "
                    f"e.g. {example.replace('=', ' = [', 1)}]"
                )


def _check_grid_key(key: str, values: list[Any], where: str) -> None:
    if key == "seed":
        raise UserError(f"{where}: vary the seed with --seeds (or seeds = [...] in [sweep]), not as a grid key")
    try:  # the same key checks as --set
        apply_overrides({}, [f"{key}={toml_value(values[0])}"])
    except UserError as error:
        raise UserError(f"{where}: {str(error).removeprefix('--set ')}") from None
    texts = [toml_value(value) for value in values]
    repeated = [text for text, count in Counter(texts).items() if count > 1]
    if repeated:
        raise UserError(f"{where}: {key} lists the value {repeated[0]} twice")


def toml_value(value: Any) -> str:
    """``value`` as one-line TOML, the form ``--set`` reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise UserError(f"cannot use {value!r} as a grid value (use numbers, strings, booleans, lists or tables)")
