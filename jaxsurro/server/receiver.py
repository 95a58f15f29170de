"""The server rank's receiver: a thread that takes client messages off ZeroMQ into a sink.

Each server rank binds a ROUTER data socket; rank 0 also binds the ROUTER control
socket that answers HELLOs (docs/protocol.md). Every message is validated; a bad
one is counted by reason and dropped, and the receiver keeps running. A time step
that arrives twice (a restarted client) is stored once. The sink (a training
buffer or the validation set) may block when full: the receiver then stops
reading, ZeroMQ's bounded queues fill and the clients block, so nothing is dropped.

A time step with several fields is assembled field by field (:mod:`jaxsurro.server.assembly`)
and stored once complete. The first rejection of each reason is logged as a warning naming the
simulation, step and field. A message that contradicts the experiment's declared fields
(``unknown_field``, ``bad_shape``, ``bad_dtype``, ``bad_size``, ``field_mismatch``) from a client
holding the run's token is a configuration error, not noise: :meth:`Receiver.check` raises
:class:`ExperimentMismatch` with its text, and the run stops.

Messages are taken in batches: every wakeup drains what ZeroMQ holds (up to
``BATCH_MESSAGES`` messages or ``BATCH_BYTES`` of payload at a time), checks the batch's headers
together (:func:`jaxsurro.protocol.validate_batch`, the same verdicts as one message at a time),
drops duplicates against the deduplication record and within the batch, and copies each new
payload once, straight from its frame into the sink (``accept_many``, one lock for the batch). A
FINISH is processed after the steps that arrived before it are stored, then answered with RECEIVED
on the same connection: the client closes only once every rank's answer came, so nothing it sent is
in flight when it closes.

Clients on this host send over a Unix socket (``ipc://``, bound next to the TCP port), which costs
the machine less per byte than TCP loopback. Delivery never rests on a sender's linger, whatever the
transport: libzmq 4.3 has been reported to ignore it over ipc when the receive queue is full (libzmq
issue #4660), the normal state under backpressure; a client waits for RECEIVED instead.

Only the receiver thread counts; it publishes its counts under a lock once per batch of
messages it drained (and while it waits on a full sink), and other threads read them through
:meth:`Receiver.counters` (docs/architecture.md, "Data path").
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import zmq

from jaxsurro import protocol
from jaxsurro.config import Config
from jaxsurro.server.assembly import StepAssembler, field_sizes
from jaxsurro.server.buffers import BufferClosed, ReceptionOver
from jaxsurro.table import SimState, SimulationTable

log = logging.getLogger("jaxsurro.server.receiver")

# Messages queued per socket before ZeroMQ pushes back on the clients; small, since a 4 MB
# field times a large queue would hold gigabytes that the buffer's capacity is meant to bound.
RECEIVE_QUEUE_MESSAGES = 16
# A batch of data messages taken at one wakeup: at most this many messages ...
BATCH_MESSAGES = 64
# ... and it stops growing once its payloads reach this many bytes (it holds their frames until stored).
BATCH_BYTES = 4 << 20
# Counted with the protocol's rejection reasons: a valid time step that came after reception ended.
LATE = "after_end_of_reception"
# ... an incomplete multi-field step dropped because every assembly slot was taken.
INCOMPLETE_STEP = "incomplete_step"
# ... a message from a process of a simulation's abandoned draw (the simulation has new parameters).
ABANDONED_DRAW = "abandoned_draw"
# Reasons that mean the client and the experiment disagree on the fields: fatal to the run.
MISMATCH_REASONS = frozenset({"unknown_field", "bad_shape", "bad_dtype", "bad_size", "field_mismatch"})
# Incomplete steps held per assembly slot pool by default: a client sends a step's fields together,
# so a few per running simulation suffice.
DEFAULT_ASSEMBLY_SLOTS = 64


class ExperimentMismatch(RuntimeError):
    """A client's fields differ from the experiment's declaration: the run cannot train on it."""


class Sink(Protocol):
    """Where validated time steps go."""

    def accept(self, sim_id: int, time_step: int, sample: np.ndarray, timeout: float) -> bool:
        """Stores one time step (its flat row of every field); False if it could not within ``timeout``."""

    def wait_for_room(self, timeout: float) -> None:
        """Returns once a time step could be stored, or after ``timeout`` seconds."""


class BatchSink(Sink, Protocol):
    """A sink that also stores several time steps at once (the receiver uses it when the sink has it)."""

    def accept_many(
        self, sim_ids: np.ndarray, time_steps: np.ndarray, samples: Sequence[np.ndarray], timeout: float
    ) -> int:
        """Stores time steps in order as accept would; how many were (a prefix: the rest found no room in time).

        Raises what accept raises only when the first cannot be stored."""


def _accept_each(
    sink: Sink, sim_ids: Sequence[int], time_steps: Sequence[int], samples: Sequence[np.ndarray], timeout: float
) -> int:
    """accept_many for a sink that has only accept: one time step after the other."""
    for i, (sim_id, time_step, sample) in enumerate(zip(sim_ids, time_steps, samples, strict=True)):
        try:
            if not sink.accept(int(sim_id), int(time_step), sample, timeout):
                return i
        except (BufferClosed, ReceptionOver):
            if i:
                return i
            raise
    return len(samples)


class ReceiverCounters(NamedTuple):
    """A consistent snapshot of a receiver's counters, as its thread last published them."""

    unique_received: int  # time steps stored in the sink (each (simulation, step) once)
    duplicates: int  # valid time steps that had already been stored, dropped
    bytes_received: int  # payload bytes of the stored time steps
    finishes: int  # FINISH messages
    rejected: dict[str, int]  # messages dropped, by reason (a copy the caller owns)
    incomplete: dict[int, tuple[int, int]]  # sim_id -> (steps its FINISH reported, steps expected), when fewer
    first_data_at: float | None  # time.monotonic() when the first time step was stored
    last_data_at: float | None  # ... when the last one was
    last_message_at: float  # ... when the last message of any kind (HELLO included) was read


class Receiver:
    """One server rank's receiving side: sockets, validation, deduplication, the sink."""

    def __init__(
        self,
        *,
        table: SimulationTable,
        sink: Sink,
        token: bytes,
        secret: bytes,
        fields: Mapping[str, Sequence[int]],
        wire_dtype: str,
        n_steps: int,
        host: str,
        rank: int = 0,
        n_ranks: int = 1,
        context: zmq.Context | None = None,
        known_simulations: Callable[[int], bool] | None = None,
        assembly_slots: int = DEFAULT_ASSEMBLY_SLOTS,
        bounds: Mapping[str, tuple[float, float]] | None = None,
        curve_secret_key: bytes | None = None,
        local_transport: str = "ipc",
    ):
        """``curve_secret_key``: the server's CURVE secret key (Z85): every socket then encrypts and
        authenticates with ZeroMQ CURVE, and only clients given the public key can talk to it.
        ``local_transport``: "ipc" also binds the data socket to a Unix socket that clients on this
        host use instead of TCP (Linux); "tcp": every client uses TCP."""
        self.table = table
        self.sink = sink
        accept_many = getattr(sink, "accept_many", None)
        self._accept_many = accept_many if accept_many is not None else (lambda *batch: _accept_each(sink, *batch))
        self.token = token
        self.n_steps = n_steps
        self.rank, self.n_ranks = rank, n_ranks
        # Per-attempt credentials (DATA, FINISH): every rank of the server holds the same secret.
        self.credentials = protocol.AttemptCredentials(secret)
        self.expectation = protocol.Expectation(
            token=token,
            credentials=self.credentials,
            n_steps=n_steps,
            fields={name: (tuple(shape), np.dtype(wire_dtype)) for name, shape in fields.items()},
            rank=rank,
            n_ranks=n_ranks,
            known_simulations=known_simulations or table.is_known,
            bounds=dict(bounds or {}),
        )
        # A step of one field is stored as it arrives; several fields are assembled first.
        self.assembler = StepAssembler(field_sizes(fields), assembly_slots) if len(fields) > 1 else None
        self._context = context or zmq.Context.instance()
        # A ROUTER, so that each FINISH is answered (RECEIVED) on the connection that carried the data.
        self.data = self._context.socket(zmq.ROUTER)
        _serve_encrypted(self.data, curve_secret_key)
        self.data.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_MESSAGES)
        # Before any token is checked, a peer may announce a frame of any size: cap each frame at the
        # largest valid one, so a larger frame disconnects its sender instead of being buffered.
        self.data.setsockopt(zmq.MAXMSGSIZE, protocol.max_data_frame_bytes(self.expectation))
        self.data.setsockopt(zmq.LINGER, 0)
        bind_host, advertised_host = _hosts(host)
        port = self.data.bind_to_random_port(f"tcp://{bind_host}")
        self.data_address = f"tcp://{advertised_host}:{port}"  # the network endpoint
        # Every endpoint of the data socket, the network one first: what WELCOME gives clients.
        self.data_endpoints: tuple[str, ...] = (self.data_address, *_bind_local(self.data, port, local_transport))
        self.control = None
        self.control_address = ""
        if rank == 0:
            self.control = self._context.socket(zmq.ROUTER)
            _serve_encrypted(self.control, curve_secret_key)
            self.control.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_MESSAGES)
            self.control.setsockopt(zmq.MAXMSGSIZE, protocol.max_control_frame_bytes())
            self.control.setsockopt(zmq.LINGER, 0)
            port = self.control.bind_to_random_port(f"tcp://{bind_host}")
            self.control_address = f"tcp://{advertised_host}:{port}"
        # Every rank's data endpoints (protocol.join_endpoints), in rank order, as WELCOME gives them.
        self.addresses: tuple[str, ...] = (protocol.join_endpoints(self.data_endpoints),)
        # Which (simulation, step) pairs were stored: the deduplication record, O(S x T) bits.
        self.stored = np.zeros((len(table), n_steps), dtype=bool)
        # The running counts: written by the receiver thread alone, published by _publish().
        self._unique_received = 0
        self._duplicates = 0
        self._bytes_received = 0
        self._finishes = 0
        self._rejected: collections.Counter[str] = collections.Counter()
        self._incomplete: dict[int, tuple[int, int]] = {}
        self.mismatch: str | None = None  # the first disagreement with the experiment's fields
        self._first_data_at: float | None = None
        self._last_data_at: float | None = None
        self._last_message_at = time.monotonic()
        self._lock = threading.Lock()  # guards _published
        # Held while a time step is committed (stored in the sink and marked in `stored`), so that a
        # checkpoint copies the sink and the deduplication record at one instant (paused()).
        self._commit = threading.Lock()
        self._published = self._snapshot()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"receiver-{rank}", daemon=True)

    @classmethod
    def from_config(
        cls, config: Config, table: SimulationTable, sink: Sink, token: bytes, secret: bytes, **placement: Any
    ) -> Receiver:
        """A receiver for the experiment's solver (fields, dtype, steps) on ``server.host``.

        ``placement``: the constructor's ``rank``, ``n_ranks``, ``context`` and ``known_simulations``.
        """
        solver = config.solver
        return cls(
            table=table,
            sink=sink,
            token=token,
            secret=secret,
            fields=solver.field_shapes,
            wire_dtype=solver.wire_dtype,
            n_steps=solver.n_steps,
            host=config.server.host,
            assembly_slots=max(DEFAULT_ASSEMBLY_SLOTS, 4 * config.launcher.max_concurrent),
            bounds={field.name: field.bounds for field in solver.fields if field.bounds is not None},
            local_transport=config.server.local_transport,
            **placement,
        )

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("receiver %d did not stop within %.0f s", self.rank, timeout)
                return
        self.data.close()
        if self.control is not None:
            self.control.close()

    def check(self) -> None:
        """Re-raises, in the caller's thread, an error that stopped the receiver thread or a field mismatch."""
        if self.mismatch is not None:
            raise ExperimentMismatch(self.mismatch)
        if self.error is not None:
            raise RuntimeError(f"the receiver of rank {self.rank} stopped: {self.error}") from self.error

    def counters(self) -> ReceiverCounters:
        """The counts as of the thread's last batch of messages (at most one batch behind), from any thread."""
        with self._lock:
            published = self._published
        return published._replace(rejected=dict(published.rejected), incomplete=dict(published.incomplete))

    def _snapshot(self) -> ReceiverCounters:
        return ReceiverCounters(
            self._unique_received,
            self._duplicates,
            self._bytes_received,
            self._finishes,
            dict(self._rejected),
            dict(self._incomplete),
            self._first_data_at,
            self._last_data_at,
            self._last_message_at,
        )

    def _publish(self) -> None:
        """Makes the thread's running counts visible to counters(): one lock per batch, not per message."""
        snapshot = self._snapshot()
        with self._lock:
            self._published = snapshot

    # -- the loop ----------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.data, zmq.POLLIN)
        if self.control is not None:
            poller.register(self.control, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if self.table.redraws_requested:  # new parameters apply between two messages (jaxsurro.table)
                    for sim_id in self.table.apply_redraws(self.stored):
                        if self.assembler is not None:
                            self.assembler.drop_simulation(sim_id)
                events = dict(poller.poll(100))
                if self.control is not None and self.control in events:
                    self._serve_control()
                if self.data in events:
                    self._drain_data()
                if events:
                    self._publish()
        except BaseException as exc:  # surfaced by check() in the main thread
            log.exception("receiver %d failed", self.rank)
            self.error = exc
        finally:
            self._publish()

    def _drain_data(self, max_messages: int = 256) -> None:
        """Takes batches off the data socket until it is empty or ``max_messages`` were taken."""
        taken = 0
        while taken < max_messages:
            senders, batch, emptied = self._receive_batch()
            if batch:
                taken += len(batch)
                self._last_message_at = time.monotonic()
                self._take_batch(batch, senders)
                self._last_message_at = time.monotonic()  # each message of the batch is read by now
            if emptied:
                return

    def _receive_batch(self) -> tuple[list[zmq.Frame], list[list[zmq.Frame]], bool]:
        """Up to BATCH_MESSAGES messages (BATCH_BYTES of payload) without waiting: each one's sender (the
        ROUTER's routing id) and frames, and whether the socket is now empty.

        Frames are taken without copying; ``frame.more`` saves recv_multipart's socket option call per frame
        (the parts of a message arrive together, so the NOBLOCK receives after the first always succeed)."""
        recv = self.data.recv
        senders: list[zmq.Frame] = []
        batch: list[list[zmq.Frame]] = []
        size = 0
        while len(batch) < BATCH_MESSAGES and size < BATCH_BYTES:
            try:
                sender = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return senders, batch, True
            frame = recv(zmq.NOBLOCK, copy=False)  # a ROUTER always delivers at least one frame after the id
            frames = [frame]
            while frame.more:
                frame = recv(zmq.NOBLOCK, copy=False)
                frames.append(frame)
            size += len(frame)
            senders.append(sender)
            batch.append(frames)
        return senders, batch, False

    def _take_batch(self, batch: list[list[zmq.Frame]], senders: Sequence[Any]) -> None:
        """Validates a batch, counts its rejections, then takes its DATA and FINISH messages in order;
        every FINISH, taken or refused, is answered with RECEIVED once the messages before it are."""
        checked = protocol.validate_batch(batch, self.expectation)
        for i, error in checked.errors.items():
            self._reject(error.reason, error.message)
            self._answer_finish(senders[i], batch[i][0], f"{error.reason}: {error.message}")
        kinds = checked.kind.tolist()
        if self.table.retired:
            for i, kind in enumerate(kinds):
                if kind and (int(checked.sim_id[i]), int(checked.client_id[i])) in self.table.retired:
                    text = f"simulation {checked.sim_id[i]} has new parameters since this process ran it"
                    self._reject(ABANDONED_DRAW, text)
                    if kind == protocol.FINISH:
                        self._answer_finish(senders[i], batch[i][0], f"{ABANDONED_DRAW}: {text}")
                    kinds[i] = 0
        accepted = [i for i, kind in enumerate(kinds) if kind]
        if not accepted:
            return
        self.table.heard[checked.sim_id[accepted]] = self._last_message_at  # for the launcher's silence check
        finishes = [i for i in accepted if kinds[i] == protocol.FINISH]
        if self.assembler is not None:  # several fields: assembled message by message
            for i in accepted:
                sim_id, step = int(checked.sim_id[i]), int(checked.time_step[i])
                if kinds[i] == protocol.DATA:
                    self._take(sim_id, step, checked.field[i], checked.array[i])
                else:
                    self._finish(sim_id, step, int(checked.client_id[i]))
                    self._answer_finish(senders[i], batch[i][0])
            return
        if not finishes:
            self._take_steps(checked, accepted)
            return
        # A FINISH is taken once the steps that arrived before it are stored, so that it sees them.
        start = 0
        for end in finishes:
            self._take_steps(checked, [i for i in accepted[start:] if i < end])
            start = accepted.index(end) + 1
            self._finish(int(checked.sim_id[end]), int(checked.time_step[end]), int(checked.client_id[end]))
            self._answer_finish(senders[end], batch[end][0])
        self._take_steps(checked, accepted[start:])

    def _answer_finish(self, sender: zmq.Frame, header_frame: zmq.Frame, refusal: str = "") -> None:
        """RECEIVED to the sender of a FINISH (anything else is not answered): the client then knows that
        everything it sent before has arrived. Never waits: a peer that does not read loses its answers."""
        try:
            header = protocol.decode_header(header_frame)
        except protocol.ProtocolError:
            return
        if header.kind != protocol.FINISH:
            return
        frames = protocol.encode_received(header.token, header.sim_id, header.client_id, header.time_step, refusal)
        with contextlib.suppress(zmq.Again):
            self.data.send_multipart([sender, *frames], zmq.NOBLOCK)

    def _take_steps(self, checked: protocol.CheckedBatch, positions: list[int]) -> None:
        """Valid DATA messages of a batch (one field, in order): each new step stored once, duplicates counted."""
        if not positions:
            return
        sims = checked.sim_id[positions].astype(np.intp)
        steps = checked.time_step[positions].astype(np.intp)
        new = ~self.stored[sims, steps]
        keys = (sims * self.n_steps + steps).tolist()
        arrays = checked.array
        if new.all() and len(set(keys)) == len(keys):  # the usual batch: every step new, each once
            self._store(sims, steps, [arrays[i] for i in positions], count_bytes=True)
            return
        first = np.zeros(len(keys), dtype=bool)  # the same step twice in a batch: the first is kept
        first[list({key: i for i, key in reversed(list(enumerate(keys)))}.values())] = True
        self._duplicates += len(keys) - int(new.sum())  # stored before this batch
        take = np.flatnonzero(new & first)
        late = self._store(sims[take], steps[take], [arrays[positions[i]] for i in take.tolist()], count_bytes=True)
        again = np.flatnonzero(new & ~first)
        if len(again):  # a duplicate of a step stored just now, or late like the step it repeats
            stored = self.stored[sims[again], steps[again]]
            self._duplicates += int(stored.sum())
            if late:
                self._bytes_received += sum(arrays[positions[i]].nbytes for i in again[~stored].tolist())
                self._rejected[LATE] += int((~stored).sum())

    def _reject(self, reason: str, message: str) -> None:
        """Counts a rejected message; the first of each reason is a warning, a field mismatch is fatal."""
        self._rejected[reason] += 1
        if reason in MISMATCH_REASONS and self.mismatch is None:
            self.mismatch = (
                f"a client's fields differ from the experiment's [[solver.fields]]: {message}. "
                "Fix the solver or the experiment file; the run stops."
            )
            log.error("%s", self.mismatch)
        elif self._rejected[reason] == 1:
            log.warning(
                "rejected a message (%s): %s; further %s rejections are counted in metrics.jsonl",
                reason,
                message,
                reason,
            )
        else:
            log.debug("rejected a message (%s): %s", reason, message)

    def _finish(self, sim_id: int, steps: int, client_id: int) -> None:
        self._finishes += 1
        if steps < self.n_steps:
            self._incomplete[sim_id] = (steps, self.n_steps)
            log.warning(
                "simulation %d finished after %d time steps; the experiment expects %d (solver.n_steps)",
                sim_id,
                steps,
                self.n_steps,
            )
        else:
            self._incomplete.pop(sim_id, None)  # a later attempt sent every step
        share = self.stored[sim_id, (self.rank - sim_id) % self.n_ranks :: self.n_ranks]  # the steps routed here
        missing = share.size - int(share.sum())
        self.table.mark_finished(
            sim_id, steps, expected=self.n_steps, missing=missing, client_id=client_id, other_ranks=self.n_ranks > 1
        )

    def _take(self, sim_id: int, step: int, field: str, array: np.ndarray) -> None:
        """A valid DATA message of several fields: assembled until its step is complete, then stored."""
        if self.stored[sim_id, step]:
            self._duplicates += 1
            return
        self._bytes_received += array.nbytes
        if self.assembler.has(sim_id, step, field):
            self._duplicates += 1
            return
        slot, abandoned = self.assembler.add(sim_id, step, field, array)
        if abandoned is not None:
            self._reject(
                INCOMPLETE_STEP,
                f"step {abandoned.time_step} of simulation {abandoned.sim_id} never "
                f"received field(s) {list(abandoned.missing)} while "
                f"{self.assembler.pending} other steps were being assembled",
            )
        if self.assembler.complete(slot):
            try:
                self._store([sim_id], [step], [self.assembler.row(slot)])
            finally:
                self.assembler.release(sim_id, step)

    def _store(
        self, sim_ids: Sequence[int], steps: Sequence[int], samples: Sequence[np.ndarray], count_bytes: bool = False
    ) -> bool:
        """Commits time steps to the sink in order, waiting while it is full; whether reception had ended.

        Nothing is dropped while the sink is full: the receiver stops reading (the clients block) and
        keeps answering HELLOs. Steps that arrive after reception ended are counted (LATE), not stored.
        ``count_bytes``: the samples are the received payloads, counted in bytes_received as they are
        committed (an assembled step's fields were counted as they arrived).
        """
        done, count = 0, len(samples)
        if not count:
            return False
        try:
            while True:
                with self._commit:  # never held while waiting: a checkpoint may pause the receiver at any time
                    stored = self._accept_many(sim_ids[done:], steps[done:], samples[done:], 0)
                    if stored:
                        self.stored[sim_ids[done : done + stored], steps[done : done + stored]] = True
                        if count_bytes:
                            self._bytes_received += sum(sample.nbytes for sample in samples[done : done + stored])
                        now = time.monotonic()
                        self._unique_received += stored
                        self._first_data_at = self._first_data_at or now
                        self._last_data_at = now
                        done += stored
                if done == count:
                    return False
                # The sink is full: show the counts so far, and keep answering HELLOs so that new
                # clients are not refused meanwhile.
                self._publish()
                if self._stop.is_set():
                    return False
                if self.control is not None and self.control.poll(0):
                    self._serve_control()
                self.sink.wait_for_room(0.1)
        except (BufferClosed, ReceptionOver) as exc:  # stragglers after the study ended
            self._rejected[LATE] += count - done
            if count_bytes:
                self._bytes_received += sum(sample.nbytes for sample in samples[done:])
            log.warning(
                "%d time step(s) arrived after reception ended (the first: step %d of simulation %d): %s",
                count - done,
                steps[done],
                sim_ids[done],
                exc,
            )
            return True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No time step is committed while the block runs (messages wait in ZeroMQ's queues meanwhile)."""
        with self._commit:
            yield

    def state(self) -> tuple[np.ndarray, dict]:
        """A copy of the deduplication record and the counters, for a checkpoint (call inside paused())."""
        return self.stored.copy(), {
            "unique_received": self._unique_received,
            "duplicates": self._duplicates,
            "bytes_received": self._bytes_received,
            "finishes": self._finishes,
            "rejected": dict(self._rejected),
            "incomplete": {str(k): list(v) for k, v in self._incomplete.items()},
        }

    def restore(self, stored: np.ndarray, counters: dict) -> None:
        """Continues from :meth:`state`: the steps stored before are duplicates now, the counts go on."""
        if stored.shape != self.stored.shape:
            raise ValueError(f"a deduplication record of shape {stored.shape} cannot restore {self.stored.shape}")
        with self._commit:
            self.stored[...] = stored
            self._unique_received = int(counters["unique_received"])
            self._duplicates = int(counters["duplicates"])
            self._bytes_received = int(counters["bytes_received"])
            self._finishes = int(counters["finishes"])
            self._rejected.update(counters["rejected"])
            self._incomplete.update({int(k): tuple(v) for k, v in counters["incomplete"].items()})
        self._publish()

    def _serve_control(self) -> None:
        while True:
            try:
                routing_id, *frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # an empty multipart message from the ROUTER
                continue
            self._last_message_at = time.monotonic()
            self.control.send_multipart([routing_id, *self._answer_hello(frames)])

    def _answer_hello(self, frames: list[bytes]) -> list[bytes]:
        try:
            header = protocol.validate_hello(frames, self.expectation)
        except protocol.ProtocolError as exc:
            self._reject(exc.reason, exc.message)
            sim_id = _sim_id_or_zero(frames)
            return protocol.encode_reject(sim_id, 0, exc.reason, exc.message)
        sim_id = header.sim_id
        if sim_id == protocol.ANY_SIMULATION:  # a persistent client asks for its next simulation
            sim_id = self.table.hand_out(header.client_id)
            if sim_id is None:
                why = (
                    "every simulation has been handed out"
                    if self.table.persistent
                    else "this run starts a job per simulation (launcher.persistent_clients = 0)"
                )
                return protocol.encode_reject(header.sim_id, header.client_id, protocol.NO_SIMULATION_LEFT, why)
        with self.table.lock:
            record = self.table[sim_id]
            if record.state != SimState.SUBMITTED:
                return protocol.encode_reject(
                    sim_id,
                    header.client_id,
                    "unknown_simulation",
                    f"simulation {sim_id} is {record.state.value}, not submitted: nothing to run",
                )
            if record.attempt_clients:  # one HELLO per attempt: its credential goes to one process only
                reason, text = (
                    "stale_attempt",
                    f"attempt {record.attempts} of simulation {sim_id} already has its client; "
                    "a second HELLO for it is refused (a leftover process of an earlier attempt, or another sender)",
                )
                self._reject(reason, text)
                return protocol.encode_reject(sim_id, header.client_id, reason, text)
            parameters = self.table.welcome(sim_id, header.client_id)
            credential = self.credentials.issue(sim_id, record.attempts)
        return protocol.encode_welcome(
            self.token, sim_id, header.client_id, self.addresses, parameters, credential, self.n_steps
        )


def _bind_local(data: zmq.Socket, port: int, transport: str) -> tuple[str, ...]:
    """Binds ``data`` to a Linux abstract Unix socket named after its TCP port when ``transport`` is
    "ipc"; the endpoints bound (none for "tcp", on other systems, or when the name is taken).

    The TCP port is unique in this network namespace while bound, and so is the abstract name: a
    client that reaches the TCP host locally reaches this name too."""
    if transport != "ipc" or not sys.platform.startswith("linux"):
        return ()
    endpoint = f"ipc://@jaxsurro-data-{port}"
    try:
        data.bind(endpoint)
    except zmq.ZMQError as error:
        log.warning("clients on this host use TCP: could not bind %s (%s)", endpoint, error)
        return ()
    return (endpoint,)


def _serve_encrypted(socket: zmq.Socket, secret_key: bytes | None) -> None:
    """Makes ``socket`` a CURVE server with ``secret_key`` (before it binds); None leaves it in clear text."""
    if secret_key is not None:
        socket.curve_server = True
        socket.curve_secretkey = secret_key


def _hosts(host: str) -> tuple[str, str]:
    """(address to bind, address to give clients): ``auto`` binds every interface, advertises the host name."""
    if host == "auto":
        return "*", socket.getfqdn()
    return host, host


def _sim_id_or_zero(frames: list[bytes]) -> int:
    try:
        return protocol.decode_header(frames[0]).sim_id
    except (protocol.ProtocolError, IndexError):
        return 0


class ValidationSink:
    """Collects whole trajectories into a dense array ``[n_simulations, n_steps, sample_size]``."""

    def __init__(self, n_simulations: int, n_steps: int, sample_size: int):
        self.samples = np.zeros((n_simulations, n_steps, sample_size), dtype=np.float32)

    def accept(self, sim_id: int, time_step: int, sample: np.ndarray, timeout: float) -> bool:
        self.samples[sim_id, time_step] = sample
        return True

    def accept_many(
        self, sim_ids: np.ndarray, time_steps: np.ndarray, samples: Sequence[np.ndarray], timeout: float
    ) -> int:
        for sim_id, time_step, sample in zip(sim_ids, time_steps, samples, strict=True):
            self.samples[sim_id, time_step] = sample
        return len(samples)

    def wait_for_room(self, timeout: float) -> None:
        return  # always room


class BufferSink:
    """Turns a time step into a training sample (parameters, time) -> field and puts it in a buffer."""

    def __init__(self, buffer, table: SimulationTable, n_steps: int, dt: float):
        self.buffer = buffer
        self.table = table
        self.n_steps = n_steps
        self.dt = dt
        n_parameters = len(table[0].parameters)
        self._inputs = np.empty(n_parameters + 1, dtype=np.float32)  # reused: put() copies it

    def accept(self, sim_id: int, time_step: int, sample: np.ndarray, timeout: float) -> bool:
        self._inputs[:-1] = self.table[sim_id].parameters  # frozen once submitted
        self._inputs[-1] = (time_step + 1) * self.dt
        try:
            self.buffer.put(sim_id * self.n_steps + time_step, self._inputs, sample, timeout=timeout)
        except TimeoutError:
            return False
        return True

    def accept_many(
        self, sim_ids: np.ndarray, time_steps: np.ndarray, samples: Sequence[np.ndarray], timeout: float
    ) -> int:
        """accept for several time steps: their input rows built together, one put_many (one copy of each field)."""
        sim_ids = np.asarray(sim_ids, dtype=np.int64)
        time_steps = np.asarray(time_steps, dtype=np.int64)
        inputs = np.empty((len(sim_ids), len(self._inputs)), dtype=np.float32)
        records = self.table
        inputs[:, :-1] = [records[sim_id].parameters for sim_id in sim_ids.tolist()]
        inputs[:, -1] = (time_steps + 1) * self.dt
        return self.buffer.put_many(sim_ids * self.n_steps + time_steps, inputs, samples, timeout=timeout)

    def wait_for_room(self, timeout: float) -> None:
        self.buffer.wait_for_room(timeout)
