"""Assembly of time steps from their fields: a step is stored once every declared field has arrived.

Clients send one message per (simulation, step, field). A step with several fields is
collected here, field by field, into one flat float32 row in the experiment's order (the
training sample); the row is handed on once complete. Rows come from a fixed pool, so
memory stays bounded whatever the clients do: when every slot holds an incomplete step,
the step that has waited longest is abandoned and reported. Float64 fields are converted
to float32 by the copy into the row, the one conversion on the server.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


class Abandoned(NamedTuple):
    """An incomplete step dropped to make room: which one, and which fields it was missing."""

    sim_id: int
    time_step: int
    missing: tuple[str, ...]


class StepAssembler:
    """Collects the fields of up to ``slots`` incomplete steps; hands over each step when complete."""

    def __init__(self, field_sizes: Mapping[str, int], slots: int):
        if slots < 1:
            raise ValueError(f"a step assembler needs at least one slot, got {slots}")
        self.names = tuple(field_sizes)
        sizes = np.asarray(list(field_sizes.values()), dtype=np.int64)
        self._start = dict(zip(self.names, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist(), strict=True))
        self._stop = dict(zip(self.names, np.cumsum(sizes).tolist(), strict=True))
        self._index = {name: i for i, name in enumerate(self.names)}
        self._rows = np.empty((slots, int(sizes.sum())), dtype=np.float32)
        self._have = np.zeros((slots, len(self.names)), dtype=bool)
        self._free = list(range(slots - 1, -1, -1))
        self._slot_of: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()  # oldest first

    @property
    def pending(self) -> int:
        """Incomplete steps held now."""
        return len(self._slot_of)

    def has(self, sim_id: int, time_step: int, field: str) -> bool:
        """Whether this field of this step is already held (a duplicate if it comes again)."""
        slot = self._slot_of.get((sim_id, time_step))
        return slot is not None and bool(self._have[slot, self._index[field]])

    def add(self, sim_id: int, time_step: int, field: str, values: np.ndarray) -> tuple[int, Abandoned | None]:
        """Copies one field in; returns (its slot, the step abandoned to make room or None).

        The step is complete when :meth:`complete` says so; :meth:`row` is then its sample
        and :meth:`release` frees the slot.
        """
        key = (sim_id, time_step)
        abandoned = None
        slot = self._slot_of.get(key)
        if slot is None:
            if not self._free:
                abandoned = self._abandon_oldest()
            slot = self._free.pop()
            self._have[slot] = False
            self._slot_of[key] = slot
        self._rows[slot, self._start[field] : self._stop[field]] = values.reshape(-1)
        self._have[slot, self._index[field]] = True
        return slot, abandoned

    def complete(self, slot: int) -> bool:
        return bool(self._have[slot].all())

    def row(self, slot: int) -> np.ndarray:
        """The flat float32 sample held in ``slot`` (a view: valid until the slot is released)."""
        return self._rows[slot]

    def release(self, sim_id: int, time_step: int) -> None:
        self._free.append(self._slot_of.pop((sim_id, time_step)))

    def drop_simulation(self, sim_id: int) -> int:
        """Forgets every incomplete step of a simulation (e.g. an abandoned attempt); returns how many."""
        keys = [key for key in self._slot_of if key[0] == sim_id]
        for key in keys:
            self._free.append(self._slot_of.pop(key))
        return len(keys)

    def _abandon_oldest(self) -> Abandoned:
        (sim_id, time_step), slot = self._slot_of.popitem(last=False)
        self._free.append(slot)
        missing = tuple(name for name, have in zip(self.names, self._have[slot], strict=True) if not have)
        return Abandoned(sim_id, time_step, missing)


def field_sizes(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Elements of each field in the flat sample, in the experiment's order."""
    return {name: int(np.prod(shape, dtype=np.int64)) for name, shape in shapes.items()}
