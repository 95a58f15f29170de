"""Host training buffers (FIFO, FIRO, Reservoir) between the receiver thread and the trainer.

Every buffer preallocates its storage once (``capacity x input_dim`` and ``capacity x field_size``
float32 rows, int64 sample ids, int32 use counts) and keeps its bookkeeping (free slots, stored
slots, seen slots) in preallocated index arrays with O(1) swap-remove, so the hot path creates no
per-sample Python objects. One lock and two condition variables make a buffer safe between one
producer (``put``, or ``put_many`` for a batch of samples under one lock, the receiver) and one consumer
(``get_batch``, the trainer). The rules come from
the SC23 Melissa paper (seed 002, Section 3.2.3 and its Algorithm 1):

**FIFOBuffer** (First In, First Out) is pure streaming with slack: batches come out in arrival
order, every sample is used exactly once because reading evicts it, and the producer blocks when
the buffer is full. A batch is available as soon as ``batch_size`` samples are stored (any number
once reception is over). The paper's FIFO has no threshold, so ``watermark`` is validated but
ignored; it only amortises short gaps between production and consumption and does not mix data.

**FIROBuffer** (First In, Random Out) also evicts on reading and blocks the producer when full,
but draws ``batch_size`` distinct samples from random positions so that batches mix several
simulations and time steps, and releases a batch only while the population exceeds the watermark
(the threshold drops to zero once reception is over so the last samples are consumed). The
threshold is what keeps the first received time steps from dominating the first batches; because
reading evicts, the population hovers around the watermark when the trainer is faster than the
clients.

**ReservoirBuffer** keeps both unseen and already-seen samples so that the trainer never idles once
the watermark is reached, while new data always take priority over repeated data. A new sample
takes a free slot, else overwrites a uniformly random *seen* sample; if every stored sample is
unseen the producer blocks, so no produced sample is ever discarded unseen. A batch draws
``batch_size`` samples uniformly with replacement among all stored samples once the population
reaches the watermark, and the drawn unseen samples become seen. When reception is over the
threshold is lifted and draws evict (``min(batch_size, population)`` distinct samples, removed), so
the buffer empties, every sample has been drawn at least once, and training ends.

The size rules (capacity, watermark, batch size per kind) are stated once, in
:func:`jaxsurro.config.buffer_capacity_problems`; the configuration reports them at load and the
buffers raise them here (docs/architecture.md, "Buffers").
"""

from __future__ import annotations

import abc
import copy
import threading
from collections.abc import Sequence
from typing import ClassVar, Literal, NamedTuple

import numpy as np

from jaxsurro.config import Config, buffer_capacity_problems

__all__ = [
    "Buffer",
    "BufferClosed",
    "BufferStats",
    "FIFOBuffer",
    "FIROBuffer",
    "ReservoirBuffer",
    "SampleBatch",
    "buffer_from_config",
    "make_buffer",
]


class SampleBatch(NamedTuple):
    """Rows drawn from a buffer, gathered into fresh arrays that the caller owns."""

    inputs: np.ndarray  # [n, input_dim] float32
    targets: np.ndarray  # [n, field_size] float32
    sample_ids: np.ndarray  # [n] int64, sim_id * n_steps + time_step (assigned by the caller)


class BufferStats(NamedTuple):
    """A consistent snapshot of a buffer's counters, taken under its lock."""

    population: int  # samples stored now
    capacity: int
    received: int  # samples ever stored by put
    unseen: int  # stored samples never drawn in a batch
    evicted: int  # samples removed (overwritten, or read by an evicting draw)
    drawn: int  # rows returned in batches, duplicates included
    reception_over: bool


class BufferSnapshot(NamedTuple):
    """Everything a buffer holds, copied at one instant: what a checkpoint saves and a resumed run restores."""

    kind: str
    inputs: np.ndarray  # [n, input_dim] float32: the stored samples, in the buffer's order (FIFO: oldest first)
    targets: np.ndarray  # [n, field_size] float32
    sample_ids: np.ndarray  # [n] int64
    use_counts: np.ndarray  # [n] int32: how often each was drawn (a Reservoir's seen samples have > 0)
    evicted_uses: np.ndarray  # [k] int64: the histogram of evicted samples' use counts
    counters: np.ndarray  # [3] int64: samples received, evicted, drawn
    rng_state: dict  # the draws' generator state (numpy bit generator)


class ReceptionOver(RuntimeError):
    """A put after end_reception(): the sample arrived after the study declared reception over."""


class BufferClosed(RuntimeError):
    """Raised in a waiting or later put/get_batch once close() has aborted the buffer."""


class _SlotSet:
    """A set of slot indices in two preallocated arrays: O(1) add, remove and pick by position."""

    __slots__ = ("members", "position", "size")

    def __init__(self, capacity: int) -> None:
        self.members = np.zeros(capacity, dtype=np.int64)  # members[:size] are the slots in the set
        self.position = np.full(capacity, -1, dtype=np.int64)  # index in members, -1 if absent
        self.size = 0

    def add(self, slot: int) -> None:
        """Insert one slot that is not in the set."""
        self.members[self.size] = slot
        self.position[slot] = self.size
        self.size += 1

    def add_many(self, slots: np.ndarray) -> None:
        """Insert distinct slots that are not in the set."""
        end = self.size + len(slots)
        self.members[self.size : end] = slots
        self.position[slots] = np.arange(self.size, end)
        self.size = end

    def remove(self, slot: int) -> None:
        """Remove one member by moving the last member into its place."""
        hole = self.position[slot]
        self.size -= 1
        last = self.members[self.size]
        self.members[hole] = last
        self.position[last] = hole
        self.position[slot] = -1

    def remove_many(self, slots: np.ndarray) -> None:
        """Remove distinct members: survivors from the tail fill the holes left below the new size."""
        removed_positions = self.position[slots]
        new_size = self.size - len(slots)
        holes = removed_positions[removed_positions < new_size]
        tail_survives = np.ones(self.size - new_size, dtype=bool)
        tail_survives[removed_positions[removed_positions >= new_size] - new_size] = False
        movers = self.members[new_size + np.flatnonzero(tail_survives)]
        self.members[holes] = movers
        self.position[movers] = holes
        self.position[slots] = -1
        self.size = new_size

    def pop_last(self) -> int:
        """Remove and return the last member."""
        self.size -= 1
        slot = int(self.members[self.size])
        self.position[slot] = -1
        return slot

    def pop_many(self, count: int) -> np.ndarray:
        """Remove and return the last ``count`` members, last first (``count`` calls of pop_last)."""
        self.size -= count
        slots = self.members[self.size : self.size + count][::-1].copy()
        self.position[slots] = -1
        return slots

    def contains(self, slots: np.ndarray) -> np.ndarray:
        """Boolean mask: which of the given slots are members."""
        return self.position[slots] >= 0


_SIZE_NAMES = ("capacity", "watermark", "batch_size")  # how the size rules name the arguments here


def _check_capacity(kind: str, capacity: int, watermark: int, batch_size: int | None = None) -> None:
    """Raise the size rules' problems (jaxsurro.config.buffer_capacity_problems) as one ValueError."""
    problems = buffer_capacity_problems(kind, capacity, watermark, batch_size, names=_SIZE_NAMES)
    if problems:
        raise ValueError(f"{kind} buffer: " + "; ".join(problems))


def _validate_sizes(kind: str, capacity: int, watermark: int, input_dim: int, field_size: int) -> None:
    """Reject buffer sizes that cannot work, saying what was given and what is needed."""
    for name, value in (
        ("capacity", capacity),
        ("watermark", watermark),
        ("input_dim", input_dim),
        ("field_size", field_size),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{kind} buffer: {name} must be an int, got {value!r} ({type(value).__name__})")
    _check_capacity(kind, int(capacity), int(watermark))
    if input_dim < 1 or field_size < 1:
        raise ValueError(
            f"{kind} buffer: input_dim and field_size must be >= 1, got input_dim={input_dim}, field_size={field_size}"
        )


class Buffer(abc.ABC):
    """Shared storage, locking, waiting, counters and repetition histogram of the host buffers."""

    kind: ClassVar[str] = "buffer"

    def __init__(self, capacity: int, watermark: int, input_dim: int, field_size: int, seed: int) -> None:
        _validate_sizes(self.kind, capacity, watermark, input_dim, field_size)
        self.capacity = int(capacity)
        self.watermark = int(watermark)
        self.input_dim = int(input_dim)
        self.field_size = int(field_size)
        # np.full writes every page now, so the first fill does not page-fault on the receiver's hot path.
        self._inputs = np.full((self.capacity, self.input_dim), 0.0, dtype=np.float32)
        self._targets = np.full((self.capacity, self.field_size), 0.0, dtype=np.float32)
        self._sample_ids = np.full(self.capacity, -1, dtype=np.int64)
        self._use_count = np.zeros(self.capacity, dtype=np.int32)
        # Histogram of use counts of evicted samples: _evicted_uses[k] = evicted samples used k times.
        self._evicted_uses = np.zeros(8, dtype=np.int64)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._space_available = threading.Condition(self._lock)  # the producer waits on it
        self._batch_available = threading.Condition(self._lock)  # the consumer waits on it
        self._received = 0
        self._evicted = 0
        self._drawn = 0
        self._reception_over = False
        self._closed = False
        self._valid_batch_size = 0  # the last batch size the size rules accepted (checked once per size)

    # --- public API -------------------------------------------------------------------------

    def put(self, sample_id: int, inputs: np.ndarray, field: np.ndarray, timeout: float | None = None) -> None:
        """Copy one sample into a slot, blocking per the buffer's rule for at most ``timeout`` seconds.

        ``timeout=None`` waits until there is room, end_reception() or close(); ``timeout=0`` never waits.
        """
        inputs_row = self._as_row(inputs, self.input_dim, "inputs")
        field_row = self._as_row(field, self.field_size, "field")
        with self._lock:
            accepted = self._space_available.wait_for(
                lambda: self._closed or self._reception_over or self._can_accept(), timeout
            )
            if self._closed or self._reception_over:
                self._raise_refused(sample_id)
            if not accepted:
                raise TimeoutError(self._put_timeout_message(sample_id, timeout))
            slot = self._claim_slot()
            self._inputs[slot] = inputs_row
            self._targets[slot] = field_row
            self._sample_ids[slot] = sample_id
            self._use_count[slot] = 0
            self._publish_slot(slot)
            self._received += 1
            self._batch_available.notify()

    def put_many(
        self, sample_ids: np.ndarray, inputs: np.ndarray, fields: Sequence[np.ndarray], timeout: float | None = None
    ) -> int:
        """Copy samples in order, each once, under one acquisition of the lock; how many were stored.

        The same as ``put`` for each in turn (its rule picks each slot, waiting for room for at most
        ``timeout`` seconds each), except that the lock is taken once and a timeout is not an error:
        the samples from the first that found no room on are left to the caller, who may retry them.
        ``inputs`` is ``[n, input_dim]``; ``fields[i]`` any array of ``field_size`` values (e.g. a view
        of a received frame, copied here; float64 is converted). BufferClosed or ReceptionOver as
        ``put`` when the first sample cannot be stored; once some were, the count (the next call raises).
        """
        count = len(sample_ids)
        inputs = np.asarray(inputs)
        if inputs.shape != (count, self.input_dim) or len(fields) != count:
            raise ValueError(
                f"{self.kind} buffer: put_many of {count} samples needs inputs of shape ({count}, {self.input_dim}) "
                f"and {count} fields, got inputs {inputs.shape} and {len(fields)} fields"
            )
        rows = [self._as_row(field, self.field_size, "field") for field in fields]
        slots = np.empty(count, dtype=np.int64)
        stored = completed = 0
        targets = self._targets
        with self._lock:
            try:
                while stored < count:
                    if self._closed or self._reception_over or not self._can_accept():
                        # The consumer may draw the samples stored so far while this waits.
                        self._complete(slots[completed:stored], inputs[completed:stored], sample_ids[completed:stored])
                        completed = stored
                        room = self._space_available.wait_for(
                            lambda: self._closed or self._reception_over or self._can_accept(), timeout
                        )
                        if self._closed or self._reception_over:
                            if stored:
                                break
                            self._raise_refused(int(sample_ids[0]))
                        if not room:
                            break
                    free = min(self._free_slots(), count - stored)
                    if free:  # slots that evict nothing: claimed and published together, as put would one by one
                        claimed = self._claim_free(free)
                        for slot, row in zip(claimed.tolist(), rows[stored : stored + free], strict=True):
                            targets[slot] = row  # the one copy of the field
                        self._publish_slots(claimed)
                    else:  # a slot whose sample is evicted (Reservoir): one at a time, as put
                        claimed = np.array([self._claim_slot()])
                        targets[claimed[0]] = rows[stored]
                        self._publish_slot(int(claimed[0]))
                    slots[stored : stored + len(claimed)] = claimed
                    stored += len(claimed)
            finally:  # every published slot is complete before the lock is released
                self._complete(slots[completed:stored], inputs[completed:stored], sample_ids[completed:stored])
        return stored

    def get_batch(self, batch_size: int, timeout: float | None = None) -> SampleBatch | None:
        """Draw a batch per the buffer's rule; None once reception is over and the buffer is drained."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"{self.kind} buffer: batch_size must be an int >= 1, got {batch_size!r}")
        if batch_size != self._valid_batch_size:
            _check_capacity(self.kind, self.capacity, self.watermark, int(batch_size))
            self._valid_batch_size = int(batch_size)
        with self._lock:
            ready = self._batch_available.wait_for(lambda: self._closed or self._batch_ready(batch_size), timeout)
            if self._closed:
                raise BufferClosed(f"{self.kind} buffer was closed; get_batch abandoned")
            if not ready:
                raise TimeoutError(self._get_timeout_message(batch_size, timeout))
            if self.population == 0:  # reception over and drained: training ends
                return None
            slots = self._choose_slots(batch_size)
            batch = SampleBatch(
                inputs=self._inputs.take(slots, axis=0),
                targets=self._targets.take(slots, axis=0),
                sample_ids=self._sample_ids.take(slots),
            )
            self._after_draw(slots)
            self._drawn += len(slots)
            self._space_available.notify()
            return batch

    def end_reception(self) -> None:
        """Declare that no more samples will come: thresholds drop and waiters wake up."""
        with self._lock:
            self._reception_over = True
            self._space_available.notify_all()
            self._batch_available.notify_all()

    def close(self) -> None:
        """Abort: every waiter wakes up and raises BufferClosed, as do later put/get_batch calls."""
        with self._lock:
            self._closed = True
            self._space_available.notify_all()
            self._batch_available.notify_all()

    def stats(self) -> BufferStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return BufferStats(
                population=self.population,
                capacity=self.capacity,
                received=self._received,
                unseen=self._unseen(),
                evicted=self._evicted,
                drawn=self._drawn,
                reception_over=self._reception_over,
            )

    def wait_for_room(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds until a put could store a sample now; whether it could."""
        with self._lock:
            return self._space_available.wait_for(
                lambda: self._closed or self._reception_over or self._can_accept(), timeout
            )

    def snapshot(self) -> BufferSnapshot:
        """A copy of the stored samples, their use counts, the counters and the draws' state, under the lock."""
        with self._lock:
            slots = self._stored_slots()
            return BufferSnapshot(
                kind=self.kind,
                inputs=self._inputs[slots],
                targets=self._targets[slots],
                sample_ids=self._sample_ids[slots],
                use_counts=self._use_count[slots],
                evicted_uses=self._evicted_uses.copy(),
                counters=np.array([self._received, self._evicted, self._drawn], dtype=np.int64),
                rng_state=copy.deepcopy(self._rng.bit_generator.state),
            )

    def restore(self, snapshot: BufferSnapshot) -> None:
        """Refills an empty buffer of the same kind and sizes from :meth:`snapshot`: same samples, uses and draws."""
        if (
            snapshot.kind != self.kind
            or snapshot.inputs.shape[1:] != (self.input_dim,)
            or (snapshot.targets.shape[1:] != (self.field_size,))
        ):
            raise ValueError(
                f"a {snapshot.kind} snapshot of samples {snapshot.inputs.shape[1:]} -> {snapshot.targets.shape[1:]} "
                f"cannot refill a {self.kind} buffer of {self.input_dim} -> {self.field_size} values"
            )
        if len(snapshot.sample_ids) > self.capacity:
            raise ValueError(f"the snapshot holds {len(snapshot.sample_ids)} samples; the capacity is {self.capacity}")
        with self._lock:
            if self.population:
                raise ValueError(f"restore needs an empty {self.kind} buffer; this one holds {self.population}")
            slots = np.empty(len(snapshot.sample_ids), dtype=np.int64)
            for row in range(len(slots)):
                slot = slots[row] = self._claim_slot()
                self._inputs[slot] = snapshot.inputs[row]
                self._targets[slot] = snapshot.targets[row]
                self._sample_ids[slot] = snapshot.sample_ids[row]
                self._publish_slot(slot)
            self._restore_uses(slots, np.asarray(snapshot.use_counts, dtype=np.int32))
            self._evicted_uses = np.array(snapshot.evicted_uses, dtype=np.int64)
            self._received, self._evicted, self._drawn = (int(v) for v in snapshot.counters)
            self._rng.bit_generator.state = copy.deepcopy(snapshot.rng_state)
            self._batch_available.notify_all()

    def _restore_uses(self, slots: np.ndarray, uses: np.ndarray) -> None:
        """Sets restored samples' use counts (a Reservoir also marks the used ones seen)."""
        self._use_count[slots] = uses

    def repetition_histogram(self) -> np.ndarray:
        """counts[k] = unique samples used exactly k times, over every sample ever stored."""
        with self._lock:
            stored_uses = self._use_count[self._stored_slots()]
            length = max(len(self._evicted_uses), int(stored_uses.max(initial=0)) + 1)
            counts = np.bincount(stored_uses, minlength=length).astype(np.int64)
            counts[: len(self._evicted_uses)] += self._evicted_uses
        used_lengths = np.flatnonzero(counts)
        return counts[: (used_lengths[-1] + 1 if len(used_lengths) else 1)]

    @property
    @abc.abstractmethod
    def population(self) -> int:
        """Samples stored now."""

    # --- shared helpers -----------------------------------------------------------------------

    def _as_row(self, array: np.ndarray, size: int, name: str) -> np.ndarray:
        """Flatten one sample's array, checking it has the configured number of values."""
        array = np.asarray(array)
        if array.size != size:
            raise ValueError(
                f"{self.kind} buffer: {name} must have {size} values (buffer configured with "
                f"{'input_dim' if name == 'inputs' else 'field_size'}={size}), got shape {array.shape}"
            )
        return array if array.ndim == 1 else array.reshape(size)

    def _complete(self, slots: np.ndarray, inputs: np.ndarray, sample_ids: np.ndarray) -> None:
        """put_many: the inputs and ids of slots whose fields were written, then the consumer is told."""
        if len(slots):
            self._inputs[slots] = inputs
            self._sample_ids[slots] = sample_ids
            self._use_count[slots] = 0
            self._received += len(slots)
            self._batch_available.notify()

    def _raise_refused(self, sample_id: int) -> None:
        """BufferClosed after close(), ReceptionOver after end_reception(): why a put is refused."""
        if self._closed:
            raise BufferClosed(f"{self.kind} buffer was closed; put of sample {sample_id} abandoned")
        raise ReceptionOver(
            f"{self.kind} buffer: put of sample {sample_id} after end_reception(); "
            f"end reception only once every sample has been put"
        )

    def _record_evictions(self, slots: np.ndarray) -> None:
        """Add the use counts of samples about to leave the buffer to the evicted histogram."""
        uses = self._use_count[slots]
        needed = int(uses.max(initial=0)) + 1
        if needed > len(self._evicted_uses):
            self._evicted_uses = np.concatenate(
                [
                    self._evicted_uses,
                    np.zeros(max(needed, 2 * len(self._evicted_uses)) - len(self._evicted_uses), dtype=np.int64),
                ]
            )
        self._evicted_uses += np.bincount(uses, minlength=len(self._evicted_uses))
        self._evicted += len(slots)

    def _record_eviction(self, slot: int) -> None:
        """Scalar form of _record_evictions for the one sample a put overwrites."""
        uses = int(self._use_count[slot])
        if uses >= len(self._evicted_uses):
            self._record_evictions(np.array([slot]))
            return
        self._evicted_uses[uses] += 1
        self._evicted += 1

    def _state_line(self) -> str:
        """Population, capacity, unseen count, watermark and reception state, for error messages."""
        return (
            f"population {self.population}/{self.capacity} (capacity), {self._unseen()} unseen, "
            f"watermark {self.watermark}, reception {'over' if self._reception_over else 'ongoing'}"
        )

    def _put_timeout_message(self, sample_id: int, timeout: float | None) -> str:
        """Why put could not store a sample in time."""
        return (
            f"{self.kind} buffer: put of sample {sample_id} timed out after {timeout}s: {self._state_line()}; "
            f"{self._put_blocked_reason()}"
        )

    def _get_timeout_message(self, batch_size: int, timeout: float | None) -> str:
        """Why get_batch could not draw a batch in time."""
        return (
            f"{self.kind} buffer: get_batch({batch_size}) timed out after {timeout}s: {self._state_line()}; "
            f"{self._get_blocked_reason(batch_size)}"
        )

    # --- per-rule hooks (called with the lock held) --------------------------------------------

    @abc.abstractmethod
    def _can_accept(self) -> bool:
        """Whether put may store a sample now."""

    @abc.abstractmethod
    def _claim_slot(self) -> int:
        """Take the slot the next sample goes to, evicting its previous sample if any."""

    @abc.abstractmethod
    def _publish_slot(self, slot: int) -> None:
        """Make a freshly written slot visible to get_batch."""

    @abc.abstractmethod
    def _free_slots(self) -> int:
        """How many samples could be stored now without evicting any."""

    @abc.abstractmethod
    def _claim_free(self, count: int) -> np.ndarray:
        """Take ``count`` <= _free_slots() slots, the ones ``count`` calls of _claim_slot would take in turn."""

    @abc.abstractmethod
    def _publish_slots(self, slots: np.ndarray) -> None:
        """_publish_slot of each slot, in order."""

    @abc.abstractmethod
    def _batch_ready(self, batch_size: int) -> bool:
        """Whether get_batch may return now (a batch, or None when over and drained)."""

    @abc.abstractmethod
    def _choose_slots(self, batch_size: int) -> np.ndarray:
        """Slots of the next batch's rows, in batch order."""

    @abc.abstractmethod
    def _after_draw(self, slots: np.ndarray) -> None:
        """Update use counts, seen flags and evictions for the rows just gathered."""

    @abc.abstractmethod
    def _stored_slots(self) -> np.ndarray:
        """Slots that hold a sample now."""

    @abc.abstractmethod
    def _unseen(self) -> int:
        """Stored samples never drawn."""

    def _put_blocked_reason(self) -> str:
        """Why put waits, for its timeout message."""
        return "the buffer is full and the consumer is not drawing batches (is the trainer running?)"

    @abc.abstractmethod
    def _get_blocked_reason(self, batch_size: int) -> str:
        """Why get_batch waits, for its timeout message."""


class FIFOBuffer(Buffer):
    """First In, First Out: a ring of slots; batches in arrival order; reading evicts."""

    kind = "fifo"

    def __init__(self, capacity: int, watermark: int, input_dim: int, field_size: int, seed: int) -> None:
        super().__init__(capacity, watermark, input_dim, field_size, seed)
        self._head = 0  # slot of the oldest stored sample
        self._count = 0  # stored samples, in slots head, head+1, ... (mod capacity)

    @property
    def population(self) -> int:
        return self._count

    def _can_accept(self) -> bool:
        return self._count < self.capacity

    def _claim_slot(self) -> int:
        return (self._head + self._count) % self.capacity

    def _publish_slot(self, slot: int) -> None:
        self._count += 1

    def _free_slots(self) -> int:
        return self.capacity - self._count

    def _claim_free(self, count: int) -> np.ndarray:
        return (self._head + self._count + np.arange(count)) % self.capacity

    def _publish_slots(self, slots: np.ndarray) -> None:
        self._count += len(slots)

    def _batch_ready(self, batch_size: int) -> bool:
        return self._count >= batch_size or self._reception_over

    def _choose_slots(self, batch_size: int) -> np.ndarray:
        taken = min(batch_size, self._count)
        return (self._head + np.arange(taken)) % self.capacity

    def _after_draw(self, slots: np.ndarray) -> None:
        self._use_count[slots] += 1
        self._record_evictions(slots)
        self._sample_ids[slots] = -1
        self._head = (self._head + len(slots)) % self.capacity
        self._count -= len(slots)

    def _stored_slots(self) -> np.ndarray:
        return (self._head + np.arange(self._count)) % self.capacity

    def _unseen(self) -> int:
        return self._count

    def _get_blocked_reason(self, batch_size: int) -> str:
        return f"a batch needs {batch_size} stored samples and the producer has not delivered them"


class _SlotSetBuffer(Buffer):
    """A buffer whose samples sit in any slots, kept as index sets of free and stored slots (FIRO, Reservoir)."""

    def __init__(self, capacity: int, watermark: int, input_dim: int, field_size: int, seed: int) -> None:
        super().__init__(capacity, watermark, input_dim, field_size, seed)
        self._free = _SlotSet(self.capacity)
        self._free.add_many(np.arange(self.capacity - 1, -1, -1))  # pop_last hands out slot 0 first
        self._stored = _SlotSet(self.capacity)

    @property
    def population(self) -> int:
        return self._stored.size

    def _publish_slot(self, slot: int) -> None:
        self._stored.add(slot)

    def _free_slots(self) -> int:
        return self._free.size

    def _claim_free(self, count: int) -> np.ndarray:
        return self._free.pop_many(count)

    def _publish_slots(self, slots: np.ndarray) -> None:
        self._stored.add_many(slots)

    def _stored_slots(self) -> np.ndarray:
        return self._stored.members[: self._stored.size]


class FIROBuffer(_SlotSetBuffer):
    """First In, Random Out: distinct random samples per batch above the watermark; reading evicts."""

    kind = "firo"

    def _can_accept(self) -> bool:
        return self._free.size > 0

    def _claim_slot(self) -> int:
        return self._free.pop_last()

    def _batch_ready(self, batch_size: int) -> bool:
        if self._reception_over:
            return True
        return self._stored.size > self.watermark and self._stored.size >= batch_size

    def _choose_slots(self, batch_size: int) -> np.ndarray:
        taken = min(batch_size, self._stored.size)
        positions = self._rng.choice(self._stored.size, size=taken, replace=False)
        return self._stored.members[positions]

    def _after_draw(self, slots: np.ndarray) -> None:
        self._use_count[slots] += 1
        self._record_evictions(slots)
        self._sample_ids[slots] = -1
        self._stored.remove_many(slots)
        self._free.add_many(slots)

    def _unseen(self) -> int:
        return self._stored.size

    def _get_blocked_reason(self, batch_size: int) -> str:
        return (
            f"before reception ends a batch needs a population above the watermark {self.watermark} and at "
            f"least batch_size={batch_size}, and the producer has not delivered enough samples"
        )


class ReservoirBuffer(_SlotSetBuffer):
    """Reservoir: overwrite a random seen sample when full; draw with replacement above the watermark."""

    kind = "reservoir"

    def __init__(self, capacity: int, watermark: int, input_dim: int, field_size: int, seed: int) -> None:
        super().__init__(capacity, watermark, input_dim, field_size, seed)
        self._seen = _SlotSet(self.capacity)  # stored slots already drawn in a batch

    def _can_accept(self) -> bool:
        return self._free.size > 0 or self._seen.size > 0

    def _claim_slot(self) -> int:
        if self._free.size > 0:
            return self._free.pop_last()
        slot = int(self._seen.members[self._rng.integers(self._seen.size)])
        self._record_eviction(slot)
        self._seen.remove(slot)
        self._stored.remove(slot)
        return slot

    def _batch_ready(self, batch_size: int) -> bool:
        if self._reception_over:
            return True
        return self._stored.size >= max(self.watermark, 1)

    def _choose_slots(self, batch_size: int) -> np.ndarray:
        if self._reception_over:  # threshold lifted; draws evict so the buffer empties
            taken = min(batch_size, self._stored.size)
            positions = self._rng.choice(self._stored.size, size=taken, replace=False)
        else:
            positions = self._rng.integers(self._stored.size, size=batch_size)
        return self._stored.members[positions]

    def _after_draw(self, slots: np.ndarray) -> None:
        if self._reception_over:  # slots are distinct
            self._use_count[slots] += 1
            self._record_evictions(slots)
            was_seen = self._seen.contains(slots)
            self._seen.remove_many(slots[was_seen])
            self._stored.remove_many(slots)
            self._free.add_many(slots)
            self._sample_ids[slots] = -1
            return
        newly_seen = slots[self._use_count[slots] == 0]  # a stored sample is seen iff it was used
        np.add.at(self._use_count, slots, 1)
        if len(newly_seen):
            self._seen.add_many(np.unique(newly_seen))

    def _unseen(self) -> int:
        return self._stored.size - self._seen.size

    def _restore_uses(self, slots: np.ndarray, uses: np.ndarray) -> None:
        super()._restore_uses(slots, uses)
        self._seen.add_many(slots[uses > 0])

    def _put_blocked_reason(self) -> str:
        return (
            "every stored sample is unseen, so none may be evicted until the trainer draws a batch "
            "(is the trainer running?)"
        )

    def _get_blocked_reason(self, batch_size: int) -> str:
        return (
            f"before reception ends a batch needs a population of at least the watermark "
            f"{max(self.watermark, 1)}, and the producer has not delivered enough samples"
        )


_BUFFER_KINDS: dict[str, type[Buffer]] = {"fifo": FIFOBuffer, "firo": FIROBuffer, "reservoir": ReservoirBuffer}


def make_buffer(
    kind: Literal["fifo", "firo", "reservoir"],
    *,
    capacity: int,
    watermark: int,
    input_dim: int,
    field_size: int,
    seed: int,
) -> Buffer:
    """Build a host buffer by name, as configuration files spell it."""
    try:
        cls = _BUFFER_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown buffer kind {kind!r}; expected one of {sorted(_BUFFER_KINDS)}") from None
    return cls(capacity=capacity, watermark=watermark, input_dim=input_dim, field_size=field_size, seed=seed)


def buffer_from_config(config: Config, seed: int) -> Buffer:
    """An empty buffer as ``config`` sets it up: ``[buffer]`` kind, capacity and watermark, rows of the
    solver's parameters and time (inputs) and of its sample (fields); ``seed`` seeds its draws."""
    solver = config.solver
    return make_buffer(
        config.buffer.kind,
        capacity=config.buffer.capacity,
        watermark=config.buffer.watermark,
        input_dim=len(solver.parameters) + 1,
        field_size=solver.sample_size,
        seed=seed,
    )
