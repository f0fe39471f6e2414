"""Checkpoints: the server's state after a round, as arrays and JSON, never a pickle.

A checkpoint is one ``.npz`` file, written atomically, read with ``allow_pickle=False``:

- ``arrays/<key>``: the global model (the strategy's ArrayRecord), key by key;
- ``strategy/<name>``: the arrays of the strategy's own state (its ``state_dict()``);
- ``__meta__``: UTF-8 JSON: the format, the fedsim version, the experiment's fingerprint,
  the round, the length of ``metrics.csv`` at that round and its SHA-256, the wall and round
  times so far, and the strategy's non-array state.

Each client's persistent state is saved by round in ``client_state/`` (:mod:`fedsim.state`),
so a checkpoint of round r is completed by each client's newest state from a round <= r.
Randomness is derived from (seed, round, client) everywhere (:mod:`fedsim.seeding`), so
there is no generator state to save: a resumed run draws exactly what it would have drawn.

A strategy keeps state across rounds through an explicit pair, as PyTorch modules do:
``state_dict() -> dict`` (values: NumPy arrays, tensors, ArrayRecords, or plain JSON data)
and ``load_state_dict(state)``. A strategy without them is stateless.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

import fedsim
from fedsim import atomic
from fedsim.errors import UserError
from fedsim.protocols import Stateful

FORMAT = 1
META = "__meta__"


@dataclass
class Checkpoint:
    """The server's state after ``round``: enough to continue as if never stopped."""

    round: int
    arrays: ArrayRecord
    strategy_state: dict[str, Any] | None
    metrics_bytes: int
    metrics_sha256: str
    elapsed_s: float
    rounds_time_s: float = 0.0
    fingerprint: str = ""
    version: str = field(default_factory=lambda: fedsim.__version__)


def strategy_state(strategy: Any) -> dict[str, Any] | None:
    """The strategy's ``state_dict()``, or None for a stateless strategy
    (:class:`fedsim.protocols.Stateful`: one with ``state_dict`` and ``load_state_dict``)."""
    return dict(strategy.state_dict()) if isinstance(strategy, Stateful) else None


def restore_strategy(strategy: Any, state: dict[str, Any] | None, source: str) -> None:
    """Give a freshly built strategy its saved state."""
    if state is None:
        return
    if not isinstance(strategy, Stateful):
        raise UserError(
            f"{source} holds state for strategy {type(strategy).__name__}, which has no load_state_dict(); "
            "resume it with the strategy that wrote it, or --overwrite to start over"
        )
    strategy.load_state_dict(state)


def save(path: str | Path, checkpoint: Checkpoint) -> None:
    arrays: dict[str, np.ndarray] = {f"arrays/{key}": array.numpy() for key, array in checkpoint.arrays.items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "fedsim": checkpoint.version,
        "fingerprint": checkpoint.fingerprint,
        "round": checkpoint.round,
        "metrics_bytes": checkpoint.metrics_bytes,
        "metrics_sha256": checkpoint.metrics_sha256,
        "elapsed_s": checkpoint.elapsed_s,
        "rounds_time_s": checkpoint.rounds_time_s,
        "array_keys": list(checkpoint.arrays.keys()),
    }
    if checkpoint.strategy_state is not None:
        meta["strategy"] = _encode_state(checkpoint.strategy_state, arrays)
    arrays[META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic.write_npz(path, arrays)


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint; anything but one fedsim wrote is a one-line UserError."""
    path = Path(path)
    damaged = f"{path} is not a readable fedsim checkpoint"
    fix = "--overwrite starts the run over"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(arrays.pop(META).tobytes().decode())
        version, fmt = meta["fedsim"], meta["format"]
    except ValueError as error:
        if "pickle" in str(error):
            raise UserError(f"{damaged}: it holds pickled data, which fedsim never loads; {fix}") from None
        raise UserError(f"{damaged} ({_first_line(error)}); {fix}") from None
    except (OSError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, TypeError) as error:
        raise UserError(f"{damaged} ({type(error).__name__}: {_first_line(error)}); {fix}") from None
    if fmt != FORMAT or version != fedsim.__version__:
        raise UserError(
            f"{path} was written by fedsim {version} (format {fmt}); this is fedsim {fedsim.__version__} "
            f"(format {FORMAT}): resume it with that version, or {fix}"
        )
    try:
        record = ArrayRecord({key: Array(arrays.pop(f"arrays/{key}")) for key in meta["array_keys"]})
        state = _decode_state(meta["strategy"], arrays) if "strategy" in meta else None
        return Checkpoint(
            round=int(meta["round"]),
            arrays=record,
            strategy_state=state,
            metrics_bytes=int(meta["metrics_bytes"]),
            metrics_sha256=str(meta["metrics_sha256"]),
            elapsed_s=float(meta["elapsed_s"]),
            rounds_time_s=float(meta["rounds_time_s"]),
            fingerprint=str(meta["fingerprint"]),
            version=version,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{damaged} ({type(error).__name__}: {_first_line(error)}); {fix}") from None


# -- a strategy's state: arrays into the archive, the rest into JSON ----------------------
def _encode_state(state: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    encoded: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, ArrayRecord):
            keys = list(value.keys())
            for index, key in enumerate(keys):
                arrays[f"strategy/{name}/{index}"] = value[key].numpy()
            encoded[name] = {"kind": "arrayrecord", "keys": keys}
        elif isinstance(value, np.ndarray) or _is_tensor(value):
            arrays[f"strategy/{name}"] = np.asarray(value.detach().cpu() if _is_tensor(value) else value)
            encoded[name] = {"kind": "tensor" if _is_tensor(value) else "array"}
        else:
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"strategy state {name!r} is a {type(value).__name__}: state_dict() values must be NumPy "
                    "arrays, tensors, ArrayRecords or JSON data (numbers, strings, lists, dicts)"
                ) from None
            encoded[name] = {"kind": "json", "value": value}
    return encoded


def _decode_state(encoded: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name, entry in encoded.items():
        kind = entry["kind"]
        if kind == "arrayrecord":
            state[name] = ArrayRecord(
                {key: Array(arrays[f"strategy/{name}/{index}"]) for index, key in enumerate(entry["keys"])}
            )
        elif kind == "array":
            state[name] = arrays[f"strategy/{name}"]
        elif kind == "tensor":
            import torch

            state[name] = torch.from_numpy(arrays[f"strategy/{name}"])
        elif kind == "json":
            state[name] = entry["value"]
        else:
            raise ValueError(f"unknown kind of strategy state {kind!r}")
    return state


def _is_tensor(value: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
