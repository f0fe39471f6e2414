"""Experiment files: TOML, validated with pydantic, overridable with ``--set``.

An experiment is a handful of tables. Each table that names a component (``[dataset]``,
``[partition]``, ``[model]``, ``[strategy]``, ``[engine]``) passes its other keys to that
component, so the keys allowed there are exactly the component's parameters::

    name = "quickstart"
    seed = 0
    rounds = 20

    [dataset]
    name = "mnist5k"
    [partition]
    name = "dirichlet"
    num_clients = 10
    alpha = 0.5
    [model]
    name = "lenet"
    [client]
    local_epochs = 1
    batch_size = 32
    lr = 0.05
    [strategy]
    name = "fedavg"
    [engine]
    name = "inprocess"

Every mistake becomes a :class:`~fedsim.errors.UserError` naming the key and the fix.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsim.errors import UserError
from fedsim.registry import did_you_mean, first_error_line


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentTable(BaseModel):
    """A table that names a registered component; other keys are its parameters."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DatasetTable(ComponentTable):
    name: str = "mnist5k"


class PartitionTable(ComponentTable):
    name: str = "iid"


class ModelTable(ComponentTable):
    name: str = "lenet"


class StrategyTable(ComponentTable):
    name: str = "fedavg"

    @model_validator(mode="after")
    def _fractions_in_range(self) -> StrategyTable:
        # Flower types these as plain floats; a fraction outside [0, 1] fails mid-run.
        for key in ("fraction_train", "fraction_evaluate"):
            value = self.params.get(key)
            if isinstance(value, (int, float)) and not 0 <= value <= 1:
                raise ValueError(f"{key} = {value!r} is invalid: a fraction of clients must be in [0, 1]")
        return self


class EngineTable(ComponentTable):
    name: Literal["inprocess", "ray", "flower"] = "inprocess"


class ClientTable(_Table):
    """Local training settings, sent to every client in its round's config."""

    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    local_test_fraction: float = Field(0.2, ge=0, lt=1)


class Experiment(_Table):
    """A whole experiment, as read from a TOML file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    rounds: int = Field(ge=1)
    # rounds between evaluations, and always after the last; 0 = never (benchmarks, pure training)
    evaluate_every: int = Field(1, ge=0)
    description: str = ""
    dataset: DatasetTable = DatasetTable()
    partition: PartitionTable = PartitionTable()
    model: ModelTable = ModelTable()
    client: ClientTable = ClientTable()
    strategy: StrategyTable = StrategyTable()
    engine: EngineTable = EngineTable()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, component parameters inline and unset values left out, as in TOML."""
        return _drop_none(self.model_dump(mode="json"))

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def fingerprint(self) -> str:
        """A short hash of the resolved experiment; equal experiments share it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


TABLES = {name: field.annotation for name, field in Experiment.model_fields.items()}
TABLE_NAMES = [name for name, kind in TABLES.items() if isinstance(kind, type) and issubclass(kind, BaseModel)]


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` and read the value as a TOML value (else a string)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r} must look like section.key=value, e.g. partition.alpha=0.1")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to raw experiment data (before validation)."""
    for text in overrides:
        path, value = parse_override(text)
        if len(path) > 2:
            raise UserError(f"--set {text!r}: keys are at most two levels deep (section.key)")
        if len(path) == 2:
            section = path[0]
            if section not in TABLE_NAMES:
                raise UserError(f"--set {text!r}: unknown table [{section}]{did_you_mean(section, TABLE_NAMES)}")
            table = data.setdefault(section, {})
            if not isinstance(table, dict):
                raise UserError(f"--set {text!r}: [{section}] is not a table")
            table[path[1]] = value
        else:
            data[path[0]] = value
    return data


def validate(
    data: dict[str, Any], source: str = "experiment", inherited: dict[str, set[str]] | None = None
) -> Experiment:
    """Validate raw data into an Experiment: unknown keys get a suggestion, bad values
    name the key, the value and what is allowed. Component parameters are checked
    against the component itself by :func:`fedsim.components.resolve`."""
    for key, value in data.items():
        if key not in TABLES:
            hint = did_you_mean(key, TABLES) or f" (valid keys and tables: {', '.join(TABLES)})"
            raise UserError(f"{source}: unknown key {key!r}{hint}")
        if key in TABLE_NAMES and not isinstance(value, dict):
            raise UserError(f"{source}: {key!r} must be a table [{key}], got {value!r}")
    for key in data.get("client", {}):  # pydantic would refuse it too, but without a suggestion
        if key not in ClientTable.model_fields:
            raise UserError(f"{source}: [client] unknown key {key!r}{did_you_mean(key, ClientTable.model_fields)}")
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as error:
        loc, value, message = first_error_line(error)
        where = f"[{loc[0]}] {loc[1]}" if len(loc) > 1 else ".".join(map(str, loc))
        if error.errors()[0]["type"] == "missing":
            raise UserError(f"{source}: missing required key {where!r}") from None
        if len(loc) == 1 and isinstance(value, dict):  # a check across a whole table
            raise UserError(f"{source}: [{loc[0]}] {message}") from None
        raise UserError(f"{source}: {where} = {value!r} is invalid: {message}") from None
    from fedsim.components import resolve

    return resolve(experiment, source, inherited)


SWEEP_TABLE = "sweep"  # read only by `fedsim sweep`; set aside for everything else


def read_experiment_file(path: str | Path) -> dict[str, Any]:
    """The raw TOML data of an experiment file, before overrides and validation."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"experiment file {str(path)!r} not found") from None
    except OSError as error:
        raise UserError(f"cannot read experiment file {str(path)!r}: {error.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML: {error}") from None


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, override and validate an experiment file (its ``[sweep]`` table is ignored).

    An override that switches a component (``--set partition.name=shards``) keeps the
    file's other keys of that table only where the new component accepts them, so one
    file serves every scheme, strategy or model a sweep compares.
    """
    data = read_experiment_file(path)
    data.pop(SWEEP_TABLE, None)
    file_tables = {key: dict(value) for key, value in data.items() if isinstance(value, dict)}
    data = apply_overrides(data, overrides or [])
    return validate(data, str(path), inherited=_inherited_keys(file_tables, data, overrides or []))


def _inherited_keys(file_tables: dict[str, dict], data: dict[str, Any], overrides: list[str]) -> dict[str, set[str]]:
    """Per component table whose ``name`` an override changed: the keys it kept from the file."""
    overridden: dict[str, set[str]] = {}
    for text in overrides:
        path, _ = parse_override(text)
        if len(path) == 2:
            overridden.setdefault(path[0], set()).add(path[1])
    inherited = {}
    for table, keys in overridden.items():
        before = file_tables.get(table, {})
        if "name" in keys and before.get("name") != data.get(table, {}).get("name"):
            inherited[table] = set(before) - {"name"} - keys
    return inherited


def load_sweep_table(path: str | Path) -> dict[str, Any]:
    """The experiment file's ``[sweep]`` table (see :mod:`fedsim.sweep`), empty if it has none."""
    table = read_experiment_file(path).get(SWEEP_TABLE, {})
    if not isinstance(table, dict):
        raise UserError(f"{path}: {SWEEP_TABLE!r} must be a table [{SWEEP_TABLE}], got {table!r}")
    return table
