"""Per-client persistent state, kept on disk and keyed by client id and round.

Each save is one ``.npz`` per (client, round) (arrays only, read with
``allow_pickle=False``), written atomically. Training in round r reads the newest state
from before r; evaluation in round r reads the state that round's training left. Old
rounds stay readable until a checkpoint makes them unnecessary (:meth:`prune`), so a run
resumed from the checkpoint of round r gives every client exactly the state it had then
(:meth:`discard_after` removes what the interrupted rounds wrote). Every engine honours it;
on a Ray cluster the run directory must be shared storage.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedsim.atomic import write_npz
from fedsim.errors import UserError

_FILE = re.compile(r"^r(\d+)\.npz$")


class ClientStateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _rounds(self, client: int | str) -> list[tuple[int, Path]]:
        folder = self.root / str(client)
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE.match(p.name))]
        return sorted(found)

    def _clients(self) -> list[str]:
        return [folder.name for folder in self.root.iterdir() if folder.is_dir()] if self.root.is_dir() else []

    def load(self, client: int, up_to_round: int) -> dict[str, np.ndarray]:
        """The newest state saved in a round <= ``up_to_round`` (empty if none)."""
        return self.newest(client, up_to_round)[1]

    def newest(self, client: int, up_to_round: int) -> tuple[int, dict[str, np.ndarray]]:
        """The round and the newest state saved in a round <= ``up_to_round`` ((0, {}) if none)."""
        candidates = [(rnd, path) for rnd, path in self._rounds(client) if rnd <= up_to_round]
        if not candidates:
            return 0, {}
        saved, path = candidates[-1]
        try:
            with np.load(path, allow_pickle=False) as data:
                return saved, {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError) as error:
            raise UserError(
                f"{path} is not a readable client state ({type(error).__name__}: {error}); "
                "--overwrite starts the run over"
            ) from None

    def save(self, client: int, server_round: int, state: dict[str, np.ndarray]) -> None:
        if state:
            write_npz(self.root / str(client) / f"r{server_round:06d}.npz", state)

    def prune(self, checkpoint_round: int) -> None:
        """Keep, per client, the newest state from a round <= ``checkpoint_round`` (what a
        resume from that checkpoint reads) and everything newer; delete the rest."""
        for client in self._clients():
            rounds = self._rounds(client)
            kept = [rnd for rnd, _ in rounds if rnd <= checkpoint_round]
            for rnd, path in rounds:
                if kept and rnd < kept[-1]:
                    path.unlink(missing_ok=True)

    def discard_after(self, server_round: int) -> None:
        """Delete states saved in rounds after ``server_round``: a run resumed from that
        round's checkpoint computes them again."""
        for client in self._clients():
            for rnd, path in self._rounds(client):
                if rnd > server_round:
                    path.unlink(missing_ok=True)
