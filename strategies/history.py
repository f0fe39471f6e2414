"""A client's bounded history of earlier time slots' data, kept in its persistent state.

Under a drift stream a client holds new data each slot (:class:`fedsim.data.ClientData`,
``slot``). Methods that learn from the past (FedDAA for virtual and label drift, the
keep-history FedAvg baseline) keep references to earlier slots' training samples: the
slot and the sample's position in that slot's training split, which the stream gives
back exactly (``ClientData.at_slot``). References, not images, so that the state stays
small and holds plain integers (fedsim never pickles). At most ``bound`` samples are
kept, the newest first.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedsim.data import ClientData
from fedsim.trainer import ClientState

SLOTS = "history/slot"
POSITIONS = "history/position"
UPDATED = "history/updated"  # the slot the buffer was last brought up to


def history_size(state: ClientState) -> int:
    return len(state.get(SLOTS, ()))


def update(state: ClientState, data: ClientData, *, keep: bool, bound: int) -> ClientState:
    """The state with its buffer brought up to ``data.slot``: on the client's first
    training in a new slot, the previous slot's samples join the buffer (``keep``), or the
    buffer is emptied (real drift: the old data now has the wrong labels). ``bound``
    samples at most (0: as many as the current slot holds)."""
    updated = int(state.get(UPDATED, np.array(-1)))
    if data.slot <= updated:
        return state
    slots = np.asarray(state.get(SLOTS, np.zeros(0, np.int64)), dtype=np.int64)
    positions = np.asarray(state.get(POSITIONS, np.zeros(0, np.int64)), dtype=np.int64)
    if not keep:
        slots, positions = slots[:0], positions[:0]
    elif data.slot >= 1 and (data.slot - 1) not in set(slots.tolist()):
        previous = data.at_slot(data.slot - 1)
        slots = np.concatenate([slots, np.full(previous.num_train, data.slot - 1, np.int64)])
        positions = np.concatenate([positions, np.arange(previous.num_train, dtype=np.int64)])
    limit = bound if bound > 0 else data.num_train
    if len(slots) > limit:  # the newest: the buffer is in slot order, so its tail
        slots, positions = slots[-limit:], positions[-limit:]
    return {**state, SLOTS: slots, POSITIONS: positions, UPDATED: np.array(data.slot, np.int64)}


def merged(state: ClientState, data: ClientData) -> ClientData:
    """The client's current data with its buffered samples added to the training split."""
    slots = np.asarray(state.get(SLOTS, np.zeros(0, np.int64)))
    if not len(slots):
        return data
    positions = np.asarray(state[POSITIONS])
    xs, ys = [data.x_train], [data.y_train]
    for slot in np.unique(slots):
        earlier = data.at_slot(int(slot))
        chosen = positions[slots == slot]
        xs.append(earlier.x_train[chosen])
        ys.append(earlier.y_train[chosen])
    return replace(data, x_train=np.concatenate(xs), y_train=np.concatenate(ys))
