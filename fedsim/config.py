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
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedsim.errors import UserError
from fedsim.registry import did_you_mean, first_error_line


class _Table(BaseModel):
    # strict: a TOML value keeps its type (`rounds = true` or `lr = "0.1"` is a mistake, not 1 or 0.1);
    # no NaN or infinity in any float (`lr = inf` would train to NaN without a word)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ComponentTable(BaseModel):
    """A table that names a registered component; other keys are its parameters."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DatasetTable(ComponentTable):
    name: str = "mnist5k"


class FeaturesTable(ComponentTable):
    """A frozen feature extractor the inputs pass through (:mod:`fedsim.data.features`)."""

    name: str = "none"


class PartitionTable(ComponentTable):
    name: str = "iid"


class ModelTable(ComponentTable):
    """Left without a ``name``, the model is the dataset's default (``fedsim list`` names it),
    which :func:`fedsim.build.resolve` writes in."""

    name: str | None = None


class StrategyTable(ComponentTable):
    name: str = "fedavg"

    @model_validator(mode="after")
    def _fractions_in_range(self) -> StrategyTable:
        # Flower types these as plain floats; a fraction outside [0, 1] fails mid-run, and
        # fraction_train = 0 "succeeds" without training anyone (Flower skips the training).
        for key in ("fraction_train", "fraction_evaluate"):
            value = self.params.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # a wrong type is reported against the strategy's own signature
            if not math.isfinite(value) or not 0 <= value <= 1:
                raise ValueError(f"{key} = {value!r} is invalid: a fraction of clients must be a number in [0, 1]")
        if self.params.get("fraction_train", 1) == 0 and not isinstance(self.params.get("fraction_train"), bool):
            raise ValueError(
                "fraction_train = 0 trains no client in any round; set fraction_train > 0 "
                "(fraction_evaluate = 0 is the way to skip the clients' evaluation)"
            )
        return self


class ObserverTable(ComponentTable):
    """A user's round observer (:mod:`fedsim.observers`), an ``[[observer]]`` table: ``name``
    is ``"package.module:Class"`` or an entry point of the group ``fedsim.observers``; the
    other keys are its constructor's keyword arguments."""


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


class FaultsTable(_Table):
    """Injected client faults (:mod:`fedsim.faults`): per round, the probability that a
    sampled client drops out before replying, raises an exception, hangs past
    ``[engine] client_timeout_s``, returns NaN or infinite weights, or returns an update
    scaled by ``scale_factor``; ``clients`` limits them to some clients. A round goes on
    with the useful replies; with fewer than ``min_replies`` the run stops."""

    drop: float = Field(0.0, ge=0, le=1)
    error: float = Field(0.0, ge=0, le=1)
    hang: float = Field(0.0, ge=0, le=1)
    nan: float = Field(0.0, ge=0, le=1)
    inf: float = Field(0.0, ge=0, le=1)
    scale: float = Field(0.0, ge=0, le=1)
    scale_factor: float = Field(1e6, gt=0)
    clients: list[int] | None = None
    min_replies: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _probabilities_sum_to_at_most_one(self) -> FaultsTable:
        total = self.drop + self.error + self.hang + self.nan + self.inf + self.scale
        if total > 1 + 1e-9:
            raise ValueError(f"the fault probabilities add up to {total:g}; they must add up to at most 1")
        return self

    def probabilities(self) -> dict[str, float]:
        return {kind: getattr(self, kind) for kind in ("drop", "error", "hang", "nan", "inf", "scale")}


class GuardsTable(_Table):
    """Server-side guards on client updates: a non-finite update is never aggregated;
    ``max_update_norm`` also rejects an update farther than this (L2) from the global model."""

    max_update_norm: float | None = Field(None, gt=0)


TRACKING_BACKENDS = ("tensorboard", "mlflow")


class TrackingTable(_Table):
    """Experiment tracking (:mod:`fedsim.observers.tracking`): the ``backends`` a run also
    logs to, the MLflow tracking server or store (``mlflow_uri``; default: a SQLite store in
    the run directory) and MLflow experiment (``mlflow_experiment``; default: the
    experiment's name)."""

    backends: list[str] = []
    mlflow_uri: str | None = Field(None, min_length=1)
    mlflow_experiment: str | None = Field(None, min_length=1)

    @field_validator("backends", mode="before")
    @classmethod
    def _one_name_is_a_list_of_one(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # --set tracking.backends=mlflow

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, backends: list[str]) -> list[str]:
        for name in backends:
            if name not in TRACKING_BACKENDS:
                raise ValueError(
                    f"unknown backend {name!r}{did_you_mean(name, TRACKING_BACKENDS)} "
                    f"(choose from: {', '.join(TRACKING_BACKENDS)})"
                )
        if len(set(backends)) < len(backends):
            raise ValueError("a backend is named twice")
        return backends


class TriggerTable(_Table):
    """An attacker's trigger (:class:`fedsim.attacks.triggers.Trigger`): a ``patch`` of
    ``size`` x ``size`` pixels set to ``value`` at a corner or ``[row, col]``; a full-image
    ``blend`` with a pattern drawn from ``seed`` at ``alpha``; or Mirage's ``learnable``
    blend, starting at ``init``."""

    kind: Literal["patch", "blend", "learnable"] = "patch"
    size: int = Field(3, ge=1)
    location: Literal["top-left", "top-right", "bottom-left", "bottom-right"] | list[int] = "bottom-right"
    value: float = 1.0
    alpha: float | None = Field(None, ge=0, le=1)
    seed: int = Field(0, ge=0)
    init: float = 0.5

    @model_validator(mode="after")
    def _location_is_a_corner_or_a_pixel(self) -> TriggerTable:
        if isinstance(self.location, list) and (len(self.location) != 2 or min(self.location) < 0):
            raise ValueError(f"location {self.location!r} must be a corner or [row, col] with row, col >= 0")
        return self


RESERVED_ATTACKER_NAMES = ("all", "benign")  # metrics.csv ids of the attack's totals


class AttackTable(_Table):
    """One attacker (:mod:`fedsim.attacks`), an ``[[attack]]`` table: the ``method`` and its
    ``options``, the ``clients`` it controls (ids, or a ``count`` drawn with the seed from
    the clients no table names), its ``target`` label, its ``trigger``, the share of each
    batch it poisons (``poison_fraction``; the method's default when left out), the rounds
    ``window = [first, last]`` it attacks in (every round when left out), and its ``name``
    in metrics (default: its position, 0, 1, ...). Attackers do not collude: each has its
    own target and trigger. Tables with the same ``group`` collude (DBA: the group's clients
    share one patch, each stamping its own part of it)."""

    method: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    clients: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    count: int | None = Field(None, ge=1)
    target: int = Field(ge=0)
    trigger: TriggerTable | None = None
    poison_fraction: float | None = Field(None, ge=0, le=1)
    window: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=2, max_length=2)
    group: str | None = None
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _clients_or_count(self) -> AttackTable:
        if (self.clients is None) == (self.count is None):
            raise ValueError("give either clients = [ids] or count = N (clients drawn with the seed), not both")
        if self.clients is not None and len(set(self.clients)) != len(self.clients):
            raise ValueError(f"clients {self.clients} names a client twice")
        if self.window is not None and self.window[0] > self.window[1]:
            raise ValueError(f"window {self.window} must be [first, last] with first <= last")
        if self.name in RESERVED_ATTACKER_NAMES:
            raise ValueError(f"name {self.name!r} is reserved; choose another")
        return self


class Experiment(_Table):
    """A whole experiment, as read from a TOML file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # >= 0: NumPy's generators, which draw the partition, take no negative seed
    seed: int = Field(0, ge=0)
    rounds: int = Field(ge=1)
    # rounds between evaluations, and always after the last; 0 = never (benchmarks, pure training)
    evaluate_every: int = Field(1, ge=0)
    checkpoint_every: int = Field(1, ge=1)  # rounds between checkpoints, and always after the last
    description: str = ""
    dataset: DatasetTable = DatasetTable()
    features: FeaturesTable = FeaturesTable()
    partition: PartitionTable = PartitionTable()
    model: ModelTable = ModelTable()
    client: ClientTable = ClientTable()
    strategy: StrategyTable = StrategyTable()
    engine: EngineTable = EngineTable()
    faults: FaultsTable = FaultsTable()
    guards: GuardsTable = GuardsTable()
    attack: list[AttackTable] = []  # [[attack]] tables: the attackers (fedsim.attacks)
    observer: list[ObserverTable] = []  # [[observer]] tables: the user's round observers (fedsim.observers)
    tracking: TrackingTable = TrackingTable()

    @model_validator(mode="after")
    def _hangs_need_a_timeout(self) -> Experiment:
        if self.faults.hang > 0 and self.engine.params.get("client_timeout_s") is None:
            raise ValueError(
                "[faults] hang > 0 needs [engine] client_timeout_s, the time after which a client counts as hung"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, component parameters inline and unset values left out, as in TOML.

        Raw inputs (no ``[features]``) leave the table out, so experiments written before
        it existed keep their fingerprints and their runs stay resumable."""
        data = _drop_none(self.model_dump(mode="json"))
        if data.get("features") == {"name": "none"}:
            del data["features"]
        for tables in ("attack", "observer"):  # as features: experiments without them keep their fingerprints
            if not data.get(tables):
                data.pop(tables, None)
        if data.get("tracking") == {"backends": []}:  # likewise
            del data["tracking"]
        return data

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def fingerprint(self) -> str:
        """A short hash of the resolved experiment; equal experiments share it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


TABLES = {name: field.annotation for name, field in Experiment.model_fields.items()}
TABLE_NAMES = [name for name, kind in TABLES.items() if isinstance(kind, type) and issubclass(kind, BaseModel)]
# tables with a fixed set of keys (the others name a component and take its parameters)
FIXED_TABLES = [name for name in TABLE_NAMES if issubclass(TABLES[name], _Table)]


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def toml_value(value: Any) -> str:
    """A value as an error message shows it: as Python repr, but booleans as TOML spells them."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` and read the value as a TOML value (else a string)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(part.strip() for part in key.split(".")):
        raise UserError(f"--set {text!r} must look like section.key=value, e.g. partition.alpha=0.1")
    try:
        document = tomllib.loads(f"v = {raw.strip()}")
    except tomllib.TOMLDecodeError:
        document = {}
    except RecursionError:  # tomllib reads nested arrays recursively
        raise UserError(f"--set {text!r}: the value is nested too deeply") from None
    # not one TOML value ("a b", or "1\nlr = 2", which TOML reads as two keys): the text itself
    value = document["v"] if list(document) == ["v"] else raw.strip()
    return [part.strip() for part in key.split(".")], value


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


def parse_experiment(data: dict[str, Any], source: str = "experiment") -> Experiment:
    """Raw data as an Experiment, by its schema: unknown keys get a suggestion, bad values
    name the key, the value and what is allowed. Component parameters are checked against
    the component itself by :func:`fedsim.build.validate_experiment`, which calls this."""
    for key, value in data.items():
        if key not in TABLES:
            hint = did_you_mean(key, TABLES) or f" (valid keys and tables: {', '.join(TABLES)})"
            raise UserError(f"{source}: unknown key {key!r}{hint}")
        if key in TABLE_NAMES and not isinstance(value, dict):
            raise UserError(f"{source}: {key!r} must be a table [{key}], got {value!r}")
    for table in FIXED_TABLES:  # pydantic would refuse an unknown key too, but without a suggestion
        fields = TABLES[table].model_fields
        for key in data.get(table, {}):
            if key not in fields:
                hint = did_you_mean(key, fields) or f" (valid keys: {', '.join(fields)})"
                raise UserError(f"{source}: [{table}] unknown key {key!r}{hint}")
    _check_attack_tables(data.get(ATTACK_TABLES, []), source)
    _check_observer_tables(data.get(OBSERVER_TABLES, []), source)
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as error:
        loc, value, message = first_error_line(error)
        if loc and loc[0] in ARRAY_TABLES and len(loc) > 1:  # [[attack]] number n (1-based, as in the file)
            where = ".".join(map(str, loc[2:]))
            table = f"[[{loc[0]}]] #{int(loc[1]) + 1}"
            if error.errors()[0]["type"] == "missing":
                raise UserError(f"{source}: {table} is missing the required key {where!r}") from None
            if not where:
                raise UserError(f"{source}: {table}: {message}") from None
            raise UserError(f"{source}: {table} {where} = {toml_value(value)} is invalid: {message}") from None
        where = f"[{loc[0]}] {loc[1]}" if len(loc) > 1 else ".".join(map(str, loc))
        if error.errors()[0]["type"] == "missing":
            raise UserError(f"{source}: missing required key {where!r}") from None
        if len(loc) == 1 and loc[0] in TABLE_NAMES and isinstance(value, dict):  # a check across a whole table
            raise UserError(f"{source}: [{loc[0]}] {message}") from None
        if not loc:  # a check across tables
            raise UserError(f"{source}: {message}") from None
        raise UserError(f"{source}: {where} = {toml_value(value)} is invalid: {message}") from None
    return experiment


ATTACK_TABLES = "attack"
OBSERVER_TABLES = "observer"
ARRAY_TABLES = (ATTACK_TABLES, OBSERVER_TABLES)  # written [[name]], one table per entry


def _check_observer_tables(tables: Any, source: str) -> None:
    """``[[observer]]`` is an array of tables, each with a ``name``."""
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise UserError(f"{source}: 'observer' must be written as [[observer]] tables, one per observer")


def _check_attack_tables(tables: Any, source: str) -> None:
    """``[[attack]]`` is an array of tables; unknown keys in one get a suggestion."""
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise UserError(f"{source}: 'attack' must be written as [[attack]] tables, one per attacker")
    fields = AttackTable.model_fields
    for number, table in enumerate(tables, start=1):
        for key in table:
            if key not in fields:
                hint = did_you_mean(key, fields) or f" (valid keys: {', '.join(fields)})"
                raise UserError(f"{source}: [[attack]] #{number} unknown key {key!r}{hint}")
        trigger = table.get("trigger", {})
        for key in trigger if isinstance(trigger, dict) else ():
            if key not in TriggerTable.model_fields:
                hint = (
                    did_you_mean(key, TriggerTable.model_fields)
                    or f" (valid keys: {', '.join(TriggerTable.model_fields)})"
                )
                raise UserError(f"{source}: [[attack]] #{number} trigger: unknown key {key!r}{hint}")


SWEEP_TABLE = "sweep"  # read only by `fedsim sweep`; set aside for everything else


def read_experiment_file(path: str | Path) -> dict[str, Any]:
    """The raw TOML data of an experiment file, before overrides and validation."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"experiment file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise UserError(f"experiment file {str(path)!r} is a folder; give the path of a .toml file") from None
    except OSError as error:
        raise UserError(f"cannot read experiment file {str(path)!r}: {error.strerror or error}") from None
    text = decode_toml_bytes(raw, str(path))
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML: {error}") from None
    except RecursionError:  # tomllib reads nested arrays and inline tables recursively
        raise UserError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None


def decode_toml_bytes(raw: bytes, source: str) -> str:
    """A TOML file's text: UTF-8, as TOML requires (a UTF-8 byte-order mark, as some
    Windows editors write, is dropped); anything else is a one-line error."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{source}: the file is UTF-16 text; save it as UTF-8, which TOML requires")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{source}: not a UTF-8 text file (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "an experiment file is TOML, saved as UTF-8"
        ) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise UserError(f"{source}: a NUL byte on line {line}: a binary file, not a TOML experiment file")
    return text


def load_sweep_table(path: str | Path) -> dict[str, Any]:
    """The experiment file's ``[sweep]`` table (see :mod:`fedsim.sweep`), empty if it has none."""
    table = read_experiment_file(path).get(SWEEP_TABLE, {})
    if not isinstance(table, dict):
        raise UserError(f"{path}: {SWEEP_TABLE!r} must be a table [{SWEEP_TABLE}], got {table!r}")
    return table
