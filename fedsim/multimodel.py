"""Several models in one message, for clustered methods (FedDAA, IFCA).

A one-model strategy sends one ArrayRecord. A strategy with K global models keeps them
as one ArrayRecord whose keys carry the model's name (``model.0/conv1.weight``, ...), so
that Flower's ``configure_train(server_round, arrays, ...)`` signature, checkpoints and
resume stay as they are, and sends them to a client as K ArrayRecords keyed by name
(``model.0``, ``model.1``, ...). The ClientApp hands a trainer the one record, or the
dict of named records; a trainer that takes several says so with
``ClientTrainer.takes_several_models = True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flwr.app import ArrayRecord

PREFIX = "model."
SEPARATOR = "/"


def model_name(index: int) -> str:
    return f"{PREFIX}{index}"


def is_packed(arrays: ArrayRecord) -> bool:
    """Whether ``arrays`` holds several named models (see :func:`pack`)."""
    return bool(arrays) and all(key.startswith(PREFIX) and SEPARATOR in key for key in arrays)


def pack(models: Sequence[ArrayRecord] | Mapping[str, ArrayRecord]) -> ArrayRecord:
    """One ArrayRecord holding every model, each key prefixed with its model's name."""
    named = models.items() if isinstance(models, Mapping) else ((model_name(i), m) for i, m in enumerate(models))
    return ArrayRecord({f"{name}{SEPARATOR}{key}": array for name, record in named for key, array in record.items()})


def unpack(arrays: ArrayRecord) -> dict[str, ArrayRecord]:
    """The named models of a packed ArrayRecord, ordered by model number."""
    models: dict[str, dict] = {}
    for key, array in arrays.items():
        name, _, inner = key.partition(SEPARATOR)
        models.setdefault(name, {})[inner] = array
    return {name: ArrayRecord(models[name]) for name in sorted(models, key=_number)}


def ordered(records: Mapping[str, ArrayRecord]) -> list[ArrayRecord]:
    """A message's named model records as a list, model 0 first."""
    return [records[name] for name in sorted(records, key=_number)]


def _number(name: str) -> int:
    suffix = name[len(PREFIX) :]
    if not name.startswith(PREFIX) or not suffix.isdigit():
        raise ValueError(f"{name!r} is not a model name ({PREFIX}0, {PREFIX}1, ...)")
    return int(suffix)
