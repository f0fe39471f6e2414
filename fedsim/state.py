"""Per-client persistent state, kept on disk and keyed by client id and round.

Each save is one ``.npz`` per (client, round) (arrays only, read with
``allow_pickle=False``), written atomically. Training in round r reads the newest state
from before r; evaluation in round r reads the state that round's training left. Old
rounds stay readable until a checkpoint makes them unnecessary (:meth:`prune`), so a run
resumed from the checkpoint of round r gives every client exactly the state it had then
(:meth:`discard_after` removes what the interrupted rounds wrote). Every engine honours it;
on a Ray cluster the run directory must be shared storage.

A state that goes back stops the run (:class:`WrittenRounds`): each process records the
last round in which it wrote each client's state, and a client that later reads its state
as of that round or after, and finds an older one, raises a one-line UserError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from fedsim.atomic import write_npz
from fedsim.errors import UserError

_FILE = re.compile(r"^r(\d+)\.npz$")


class WrittenRounds:
    """The round in which each client's state was last written, as this process saw it.

    A client that wrote its state in round t and later reads its state as of a round
    u >= t must find state from round t or later. Finding older state, or none, means the
    state went back (an update lost or overwritten by an older copy): training on it would
    silently compute something else, so :meth:`check` raises a one-line UserError naming
    the client and the rounds. A client this process never saw writing is not checked, nor
    is a read as of a round before its last write (the round is being run again, as after a
    resume from a checkpoint). Keys are the caller's: a client id, or (run, node, record).
    """

    def __init__(self) -> None:
        self._last: dict[Hashable, int] = {}

    def wrote(self, key: Hashable, server_round: int) -> None:
        self._last[key] = server_round

    def forget_after(self, server_round: int) -> None:
        """Forget writes from rounds after ``server_round``: the run goes back to it."""
        self._last = {key: written for key, written in self._last.items() if written <= server_round}

    def check(self, key: Hashable, client: object, found_round: int | None, as_of_round: int) -> None:
        """Raise if ``client`` (its name in the message), reading its state as of
        ``as_of_round``, finds state from ``found_round`` (None: no state) older than its
        last write."""
        last = self._last.get(key)
        if last is None or last > as_of_round or (found_round is not None and found_round >= last):
            return
        found = "none" if found_round is None else f"from round {found_round}"
        raise UserError(
            f"client {client}'s state went back: it wrote its state in round {last}, but as of round "
            f"{as_of_round} its state is {found}; an update was lost, so the run stops"
        )


_WRITTEN_BY_ROOT: dict[str, WrittenRounds] = {}  # this process's writes, by store folder


class ClientStateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        # every store on one folder in this process shares the record, so a resume's
        # discard_after rewinds what the clients' own store recorded
        self._written = _WRITTEN_BY_ROOT.setdefault(os.path.realpath(self.root), WrittenRounds())

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
        """The round and the newest state saved in a round <= ``up_to_round`` ((0, {}) if none).

        Raises a UserError if this process saved the client's state in a round <=
        ``up_to_round`` that is not there any more (:class:`WrittenRounds`)."""
        candidates = [(rnd, path) for rnd, path in self._rounds(client) if rnd <= up_to_round]
        self._written.check(str(client), client, candidates[-1][0] if candidates else None, up_to_round)
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
            self._written.wrote(str(client), server_round)

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
        round's checkpoint computes them again (0: a new run; every state goes)."""
        self._written.forget_after(server_round)
        for client in self._clients():
            for rnd, path in self._rounds(client):
                if rnd > server_round:
                    path.unlink(missing_ok=True)
