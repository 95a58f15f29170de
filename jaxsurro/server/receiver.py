"""The server rank's receiver: a thread that takes client messages off ZeroMQ into a sink.

Each server rank binds a PULL data socket; rank 0 also binds the ROUTER control
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

Only the receiver thread counts; it publishes its counts under a lock once per batch of
messages it drained (and while it waits on a full sink), and other threads read them through
:meth:`Receiver.counters` (docs/architecture.md, "Data path").
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
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
    ):
        """``curve_secret_key``: the server's CURVE secret key (Z85): every socket then encrypts and
        authenticates with ZeroMQ CURVE, and only clients given the public key can talk to it."""
        self.table = table
        self.sink = sink
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
        self.data = self._context.socket(zmq.PULL)
        _serve_encrypted(self.data, curve_secret_key)
        self.data.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_MESSAGES)
        # Before any token is checked, a peer may announce a frame of any size: cap each frame at the
        # largest valid one, so a larger frame disconnects its sender instead of being buffered.
        self.data.setsockopt(zmq.MAXMSGSIZE, protocol.max_data_frame_bytes(self.expectation))
        self.data.setsockopt(zmq.LINGER, 0)
        bind_host, advertised_host = _hosts(host)
        port = self.data.bind_to_random_port(f"tcp://{bind_host}")
        self.data_address = f"tcp://{advertised_host}:{port}"
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
        self.addresses: tuple[str, ...] = (self.data_address,)  # every rank's, in rank order
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
        for _ in range(max_messages):
            try:
                frames = self.data.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._last_message_at = time.monotonic()
            try:
                message = protocol.validate_message(frames, self.expectation)
            except protocol.ProtocolError as exc:
                self._reject(exc.reason, exc.message)
                continue
            if self.table.retired and (message.sim_id, message.client_id) in self.table.retired:
                self._reject(
                    ABANDONED_DRAW, f"simulation {message.sim_id} has new parameters since this process ran it"
                )
                continue
            self.table.heard[message.sim_id] = self._last_message_at  # for the launcher's silence check
            if message.kind == protocol.DATA:
                self._take(message)
            else:
                self._finish(message.sim_id, message.time_step, message.client_id)

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

    def _take(self, message: protocol.Received) -> None:
        """A valid DATA message: stored at once (one field), or assembled until its step is complete."""
        sim_id, step = message.sim_id, message.time_step
        if self.stored[sim_id, step]:
            self._duplicates += 1
            return
        self._bytes_received += message.array.nbytes
        if self.assembler is None:
            self._store(sim_id, step, message.array.reshape(-1))
            return
        if self.assembler.has(sim_id, step, message.field):
            self._duplicates += 1
            return
        slot, abandoned = self.assembler.add(sim_id, step, message.field, message.array)
        if abandoned is not None:
            self._reject(
                INCOMPLETE_STEP,
                f"step {abandoned.time_step} of simulation {abandoned.sim_id} never "
                f"received field(s) {list(abandoned.missing)} while "
                f"{self.assembler.pending} other steps were being assembled",
            )
        if self.assembler.complete(slot):
            try:
                self._store(sim_id, step, self.assembler.row(slot))
            finally:
                self.assembler.release(sim_id, step)

    def _store(self, sim_id: int, step: int, sample: np.ndarray) -> None:
        try:
            while True:
                with self._commit:  # never held while waiting: a checkpoint may pause the receiver at any time
                    if self.sink.accept(sim_id, step, sample, timeout=0):
                        self.stored[sim_id, step] = True
                        now = time.monotonic()
                        self._unique_received += 1
                        self._first_data_at = self._first_data_at or now
                        self._last_data_at = now
                        return
                # The sink is full: show the counts so far, and keep answering HELLOs so that new
                # clients are not refused meanwhile.
                self._publish()
                if self._stop.is_set():
                    return
                if self.control is not None and self.control.poll(0):
                    self._serve_control()
                self.sink.wait_for_room(0.1)
        except (BufferClosed, ReceptionOver) as exc:  # a straggler after the study ended
            self._rejected[LATE] += 1
            log.warning("time step %d of simulation %d arrived after reception ended: %s", step, sim_id, exc)

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

    def wait_for_room(self, timeout: float) -> None:
        self.buffer.wait_for_room(timeout)
