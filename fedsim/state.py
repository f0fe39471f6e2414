"""Per-client persistent state, kept on disk and keyed by client id.

Each save is one ``.npz`` per (client, round), written atomically, and the two newest
are kept. Training in round r reads the newest state from before r; evaluation in round
r reads the state that round's training left. Because old rounds stay readable, a run
resumed from the checkpoint of round r gives clients exactly the state they had then.
Every engine honours it; on a Ray cluster the run directory must be shared storage.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedsim.atomic import write_npz

_FILE = re.compile(r"^r(\d+)\.npz$")
KEEP = 2


class ClientStateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _rounds(self, client: int) -> list[tuple[int, Path]]:
        folder = self.root / str(client)
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE.match(p.name))]
        return sorted(found)

    def load(self, client: int, up_to_round: int) -> dict[str, np.ndarray]:
        """The newest state saved in a round <= ``up_to_round`` (empty if none)."""
        candidates = [path for rnd, path in self._rounds(client) if rnd <= up_to_round]
        if not candidates:
            return {}
        with np.load(candidates[-1], allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def save(self, client: int, server_round: int, state: dict[str, np.ndarray]) -> None:
        if not state:
            return
        write_npz(self.root / str(client) / f"r{server_round:06d}.npz", state)
        for _, old in self._rounds(client)[:-KEEP]:
            old.unlink(missing_ok=True)
