"""Server ingestion (decode, validate, dedupe, buffer insert) against raw pyzmq PUSH/PULL of the same frames.

What is measured (ARCHITECTURE.md section 5): a separate sender process pushes N pre-encoded DATA
messages (``protocol.encode_data``, distinct (sim_id, time_step) pairs, the run's token) over TCP
loopback, with the client's send high-water mark, to

* the limit: a plain PULL socket with the receiver's receive high-water mark that only receives
  them, with the receiver's receive call (``recv_multipart(copy=False)``);
* a reference: the same PULL socket that also copies each payload into preallocated rows, the one
  copy that any buffer owning its memory must make (it bounds what ours can reach, shown for
  context; the target is against the limit);
* ours: a real ``jaxsurro.server.receiver.Receiver`` thread whose sink is a ``BufferSink`` over a FIFO
  buffer that holds all N samples, so the sink never blocks. Every message is decoded, validated
  (token, simulation, step, rank, field, dtype, shape, size, finite values), checked against the
  deduplication record and copied into the buffer.

Rates are (N - 1) / (time of the last message - time of the first): for ours the receiver's own
``first_data_at`` / ``last_data_at`` (first and last sample *stored*), for the others the first and
last ``recv``. The variants run one after another, ``--repeats`` times, for 16 KB (64x64 float32)
and 4 MB (1024x1024 float32) fields. Printed: median msgs/s and MB/s of each, and the ratio to the
limit (median over repeats of ours / the limit of the same repeat, so slow drifts in machine load
cancel). Target: ours / limit >= 0.9.

Also printed, because wall-clock rates on a shared 2-core machine move by tens of percent with
outside load: the CPU time per message of the receiving process (all threads, ZeroMQ's I/O thread
included) and of the sender process, and their ratio to the limit's total, (limit's receive + send
CPU) / (this variant's receive + send CPU). When the two cores are saturated, as they are here,
throughput is inversely proportional to that total, so this CPU ratio estimates the rate ratio of
an otherwise idle machine and is the steadier of the two figures.

``--proposed`` adds a prototype of a batched receive path (defined in this script, not in the
library; see ``BatchedReceiver``): per message only the frames are received and copied into
preallocated staging rows; the header, simulation, step, rank and finite checks, deduplication and
one locked ``put_many`` run per batch with NumPy. It is the measured evidence for the library change
described in its docstring (it passes tests/test_receiver.py when substituted for Receiver). A
breakdown table (per-message cost of each step of today's receive path, on hot frames in this
process) follows each size.

On a 2-core machine the sender process, the two ZeroMQ I/O threads and the receiving Python thread
share two cores, so every microsecond the receiving thread adds per message shows in the ratio, and
the figures move by 10-20 % with other load on the machine.

Usage: python scripts/bench_ingestion.py [--small-messages 20000] [--large-messages 200] [--repeats 3]
       [--proposed] [--no-breakdown]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import zmq

from jaxsurro import client, protocol
from jaxsurro.server.buffers import BufferClosed, FIFOBuffer, ReceptionOver
from jaxsurro.table import SimState, SimulationTable
from jaxsurro.server.receiver import LATE, RECEIVE_QUEUE_MESSAGES, BufferSink, Receiver

FIELD = "temperature"
N_PARAMETERS = 5
N_STEPS = 100  # time steps per simulation; N messages cover ceil(N / N_STEPS) simulations
DT = 0.01
HOST = "127.0.0.1"
TARGET_RATIO = 0.9
DISTINCT_PAYLOADS = 4  # the sender cycles through a few random fields (finite, so they validate)
DEADLINE_S = 60.0  # a run that has not delivered every message by then fails with a message
BREAKDOWN_MESSAGES = {(64, 64): 2000, (1024, 1024): 40}  # hot-cache timing of the pieces


class Rate(NamedTuple):
    """One timed run: messages over the first-to-last interval, and this process's CPU time meanwhile."""

    messages: int
    seconds: float
    cpu_seconds: float  # all threads of the receiving process (ZeroMQ's I/O thread included)
    sender_cpu_seconds: float  # all threads of the sender process, from connecting to the last message out

    @property
    def per_s(self) -> float:
        """Messages per second between the first and the last message."""
        return (self.messages - 1) / self.seconds

    @property
    def cpu_us_per_message(self) -> float:
        """Receiving-side CPU microseconds per message (less noisy than the rate under outside load)."""
        return self.cpu_seconds / self.messages * 1e6

    @property
    def sender_cpu_us_per_message(self) -> float:
        """Sending-side CPU microseconds per message."""
        return self.sender_cpu_seconds / self.messages * 1e6


# --- the sender --------------------------------------------------------------------------------


class Sender(NamedTuple):
    """A running sender process and the pipe on which it reports its CPU time."""

    process: multiprocessing.process.BaseProcess
    report: multiprocessing.connection.Connection


def send_messages(address: str, token: bytes, field_shape: tuple[int, ...], n_messages: int,
                  report: multiprocessing.connection.Connection) -> None:
    """Sender process: encode N DATA messages up front, push them as fast as the peer takes them, report CPU."""
    rng = np.random.default_rng(1)
    payloads = [rng.random(field_shape, dtype=np.float32) for _ in range(DISTINCT_PAYLOADS)]
    messages = [protocol.encode_data(token, i // N_STEPS, i % N_STEPS, 7, FIELD.encode(),
                                     payloads[i % DISTINCT_PAYLOADS]) for i in range(n_messages)]
    cpu_start = time.process_time()
    context = zmq.Context(io_threads=1)
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, client.SEND_HIGH_WATER_MARK)
    push.setsockopt(zmq.SNDTIMEO, int(DEADLINE_S * 1000))
    push.setsockopt(zmq.LINGER, int(DEADLINE_S * 1000))
    push.connect(address)
    for frames in messages:
        push.send_multipart(frames, copy=False)  # pyzmq copies frames below its 64 KB threshold anyway
    push.close()
    context.term()  # returns once everything queued was handed to TCP
    report.send(time.process_time() - cpu_start)  # all threads of this process, I/O thread included


def start_sender(address: str, token: bytes, field_shape: tuple[int, ...], n_messages: int) -> Sender:
    """The sender as a fresh (spawned) process, so it shares no interpreter or GIL with the receiver."""
    context = multiprocessing.get_context("spawn")
    report, child_end = context.Pipe(duplex=False)
    process = context.Process(target=send_messages, args=(address, token, field_shape, n_messages, child_end),
                              daemon=True)
    process.start()
    child_end.close()
    return Sender(process, report)


def check_sender(sender: Sender, deadline: float, waiting_for: str) -> None:
    """Fail fast when the sender died or the deadline passed, instead of waiting forever."""
    if sender.process.exitcode not in (None, 0):
        raise RuntimeError(f"the sender process ended with exit code {sender.process.exitcode} while "
                           f"{waiting_for}; its traceback is printed above")
    if time.monotonic() > deadline:
        raise RuntimeError(f"timed out after {DEADLINE_S:.0f} s while {waiting_for}")


def join_sender(sender: Sender) -> float:
    """Wait for the sender, fail loudly if it did not exit cleanly, and return its CPU seconds."""
    cpu_seconds = sender.report.recv() if sender.report.poll(DEADLINE_S) else None
    sender.process.join(DEADLINE_S)
    if sender.process.exitcode != 0 or cpu_seconds is None:
        sender.process.kill()
        raise RuntimeError(f"the sender process ended with exit code {sender.process.exitcode} (expected 0) "
                           f"without reporting its CPU time; its traceback is printed above")
    return cpu_seconds


# --- the limit and the reference --------------------------------------------------------------


def plain_pull() -> tuple[zmq.Socket, str]:
    """A PULL socket with the receiver's queue size, bound to a free loopback port."""
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_MESSAGES)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVTIMEO, 1000)
    return pull, f"tcp://{HOST}:{pull.bind_to_random_port(f'tcp://{HOST}')}"


def receive(pull: zmq.Socket, sender: Sender, deadline: float) -> list[zmq.Frame]:
    """One message, as the receiver takes it (copy=False); RCVTIMEO wakes it up to check on the sender."""
    while True:
        try:
            return pull.recv_multipart(copy=False)
        except zmq.Again:
            check_sender(sender, deadline, "the raw PULL socket waited for messages")


def run_raw(field_shape: tuple[int, ...], n_messages: int, copy_into_rows: bool) -> Rate:
    """Raw pyzmq PULL with the receiver's options; optionally copy each payload into preallocated rows."""
    rows = np.full((n_messages if copy_into_rows else 1, math.prod(field_shape)), 0.0, dtype=np.float32)
    pull, address = plain_pull()
    sender = start_sender(address, protocol.new_token(), field_shape, n_messages)
    deadline = time.monotonic() + DEADLINE_S
    cpu_start = time.process_time()
    try:
        frames = receive(pull, sender, deadline)
        first = time.monotonic()
        if copy_into_rows:
            rows[0] = np.frombuffer(frames[2], dtype=np.float32)
            for i in range(1, n_messages):
                rows[i] = np.frombuffer(receive(pull, sender, deadline)[2], dtype=np.float32)
        else:
            for _ in range(n_messages - 1):
                receive(pull, sender, deadline)
        last = time.monotonic()
        cpu_seconds = time.process_time() - cpu_start
    finally:
        pull.close()
    sender_cpu_seconds = join_sender(sender)
    return Rate(n_messages, last - first, cpu_seconds, sender_cpu_seconds)


# --- ours --------------------------------------------------------------------------------------


def submitted_table(n_messages: int, rng: np.random.Generator) -> SimulationTable:
    """A table whose simulations are all submitted, as the launcher leaves them, so their data are known."""
    table = SimulationTable(rng.uniform(100.0, 500.0, size=(math.ceil(n_messages / N_STEPS), N_PARAMETERS)))
    for record in table:
        record.attempts = 1
        record.state = SimState.SUBMITTED
    return table


def make_receiver(field_shape: tuple[int, ...], n_messages: int, token: bytes, rng: np.random.Generator,
                  receiver_class: type[Receiver] = Receiver) -> tuple[Receiver, FIFOBuffer]:
    """A receiver into a BufferSink over a FIFO that holds every message (the sink never blocks)."""
    table = submitted_table(n_messages, rng)
    batched = receiver_class is BatchedReceiver
    buffer = (FIFOWithPutMany if batched else FIFOBuffer)(
        capacity=n_messages, watermark=0, input_dim=N_PARAMETERS + 1, field_size=math.prod(field_shape), seed=0)
    sink = (BatchBufferSink if batched else BufferSink)(buffer, table, N_STEPS, DT)
    receiver = receiver_class(table=table, sink=sink, token=token, field=FIELD, field_shape=field_shape,
                              wire_dtype="float32", n_steps=N_STEPS, host=HOST)
    return receiver, buffer


def run_ours(field_shape: tuple[int, ...], n_messages: int, rng: np.random.Generator,
             receiver_class: type[Receiver] = Receiver) -> Rate:
    """The server's receive path: Receiver thread -> validate -> dedupe -> BufferSink -> FIFO buffer."""
    token = protocol.new_token()
    receiver, buffer = make_receiver(field_shape, n_messages, token, rng, receiver_class)
    receiver.start()
    try:
        sender = start_sender(receiver.data_address, token, field_shape, n_messages)
        deadline = time.monotonic() + DEADLINE_S
        cpu_start = time.process_time()
        while receiver.unique_received < n_messages:
            receiver.check()
            check_sender(sender, deadline, f"the receiver had stored {receiver.unique_received} of {n_messages}")
            if receiver.rejected or receiver.duplicates:
                raise RuntimeError(f"the receiver rejected or dropped messages: {receiver.stats()}; every "
                                   "message should be valid and distinct")
            time.sleep(0.005)  # a script polling a counter; the receiver thread does the work
        cpu_seconds = time.process_time() - cpu_start
        sender_cpu_seconds = join_sender(sender)
    finally:
        receiver.stop()
    stored = buffer.stats().received
    if stored != n_messages:
        raise RuntimeError(f"the buffer holds {stored} samples, expected {n_messages}")
    return Rate(n_messages, receiver.last_data_at - receiver.first_data_at, cpu_seconds, sender_cpu_seconds)


# --- the proposed batched receive path (a prototype, measured here; not in the library) ----------

_HEADER_IDS = np.dtype([("sim_id", "<u8"), ("time_step", "<u4"), ("client_id", "<u4")])  # bytes 24..39
MAX_BATCH = 64  # messages staged per batch
BATCH_WAIT_MS = 1  # with messages staged and the queue empty, wait this long for more before storing
# Above this field size the per-message Python cost is small next to the copy, and staging would add a
# second copy (recv_into staging, then staging -> buffer), so larger fields keep today's zero-copy path.
BATCHED_MAX_FIELD_BYTES = 64 * 1024


class FIFOWithPutMany(FIFOBuffer):
    """FIFO with the proposed ``put_many``: one lock, one vectorized copy for many samples."""

    def put_many(self, sample_ids: np.ndarray, inputs: np.ndarray, fields: np.ndarray,
                 timeout: float | None = None) -> int:
        """Store the leading rows that fit now (waiting up to ``timeout`` for room); return how many."""
        with self._lock:
            self._space_available.wait_for(
                lambda: self._closed or self._reception_over or self._can_accept(), timeout)
            if self._closed:
                raise BufferClosed(f"{self.kind} buffer was closed; put_many abandoned")
            if self._reception_over:
                raise ReceptionOver(f"{self.kind} buffer: put_many after end_reception()")
            count = min(self.capacity - self._count, len(sample_ids))
            slots = (self._head + self._count + np.arange(count)) % self.capacity
            self._inputs[slots] = inputs[:count]
            self._targets[slots] = fields[:count]
            self._sample_ids[slots] = sample_ids[:count]
            self._use_count[slots] = 0
            self._count += count
            self._received += count
            if count:
                self._batch_available.notify()
            return count


class BatchBufferSink(BufferSink):
    """BufferSink with the proposed ``accept_many``: inputs built for the whole batch at once."""

    def __init__(self, buffer, table: SimulationTable, n_steps: int, dt: float):
        super().__init__(buffer, table, n_steps, dt)
        # Parameters are frozen once a simulation is submitted, so they are cached on first use.
        self._parameters = np.zeros((len(table), len(table[0].parameters)), dtype=np.float32)
        self._cached = np.zeros(len(table), dtype=bool)
        self._batch_inputs = np.empty((MAX_BATCH, self._parameters.shape[1] + 1), dtype=np.float32)

    def accept_many(self, sim_ids: np.ndarray, time_steps: np.ndarray, fields: np.ndarray, timeout: float) -> int:
        """Store the leading rows that fit within ``timeout``; return how many were stored."""
        missing = sim_ids[~self._cached[sim_ids]]
        for sim_id in np.unique(missing).tolist():
            self._parameters[sim_id] = self.table[sim_id].parameters
            self._cached[sim_id] = True
        inputs = self._batch_inputs[: len(sim_ids)]
        np.take(self._parameters, sim_ids, axis=0, out=inputs[:, :-1])
        np.multiply(time_steps + 1, self.dt, out=inputs[:, -1], casting="unsafe")
        return self.buffer.put_many(sim_ids * self.n_steps + time_steps, inputs, fields, timeout=timeout)


class BatchedReceiver(Receiver):
    """Proposed receive path: stage up to a batch of DATA messages, then validate and store them together.

    Per message only three ``recv(copy=False)`` calls (framing from ``Frame.more``, cheaper than
    ``recv_multipart``'s RCVMORE queries), two length checks, a name comparison and two row copies
    (header into a [B, 64] byte array, payload into a [B, field] staging array) run in Python. The
    header checks (magic, version, kind, dtype, token, ndim, shape, reserved bytes: every byte except
    sim_id/time_step/client_id must equal a template), the simulation, step and rank checks, the
    finite check, deduplication and the buffer insert run once per batch with NumPy. When the queue
    runs dry with messages staged, it waits up to ``BATCH_WAIT_MS`` for more: the receiver is ahead
    then, and larger batches leave more CPU to the clients. Any message that fails a check, and every
    non-DATA message, goes through ``protocol.validate_message`` so rejections keep their exact
    reasons; a non-DATA message first flushes the staged batch, so a FINISH is handled after the data
    sent before it. Fields above ``BATCHED_MAX_FIELD_BYTES`` keep today's per-message path.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        ((name, spec),) = self.expectation._specs.items()
        self._spec, self._field_name = spec, name
        self._batched = spec.nbytes <= BATCHED_MAX_FIELD_BYTES
        self._headers = np.zeros((MAX_BATCH, protocol.HEADER_SIZE), dtype=np.uint8)
        self._header_rows = [memoryview(row) for row in self._headers]
        self._staging = np.zeros((MAX_BATCH, math.prod(spec.shape) if self._batched else 0), dtype=spec.dtype)
        self._staging_rows = [memoryview(row).cast("B") for row in self._staging]
        template = np.frombuffer(protocol.encode_header(protocol.DATA, self.token, 0, 0, 0, spec.dtype_code,
                                                        spec.shape), dtype=np.uint8)
        self._fixed = np.ones(protocol.HEADER_SIZE, dtype=bool)
        self._fixed[24:40] = False  # sim_id, time_step, client_id vary per message
        self._template = template[self._fixed]
        self._is_known = kwargs.get("known_simulations") or self.table.is_known
        self._known = np.zeros(len(self.table), dtype=bool)  # submitted once means known for good
        self._data_poller = zmq.Poller()
        self._data_poller.register(self.data, zmq.POLLIN)

    def _drain_data(self, max_messages: int = 256) -> None:
        if not self._batched:  # large fields: memory bandwidth dominates; zero-copy frames, one copy
            super()._drain_data(max_messages)
            return
        recv, flags, poll = self.data.recv, zmq.NOBLOCK, self._data_poller.poll
        header_rows, staging_rows = self._header_rows, self._staging_rows
        name, nbytes, header_size = self._field_name, self._spec.nbytes, protocol.HEADER_SIZE
        staged = 0
        for _ in range(max_messages):
            try:
                header = recv(flags, copy=False)
            except zmq.Again:
                if staged and poll(BATCH_WAIT_MS):
                    continue
                break
            if not header.more or len(header) != header_size:  # FINISH, or not a DATA message
                frames = self._rest_of(header)
                self._flush(staged)  # what came before a FINISH is stored before it
                staged = 0
                self._slow_path(frames)
                continue
            name_frame = recv(flags, copy=False)
            payload = recv(flags, copy=False) if name_frame.more else None
            if payload is None or payload.more or len(payload) != nbytes or name_frame.bytes != name:
                self._slow_path([header, name_frame, *self._rest_of(payload)] if payload else [header, name_frame])
                continue
            header_rows[staged][:] = header.buffer
            staging_rows[staged][:] = payload.buffer
            staged += 1
            if staged == MAX_BATCH:
                self._flush(staged)
                staged = 0
        self._flush(staged)
        self.last_message_at = time.monotonic()

    def _rest_of(self, frame: zmq.Frame) -> list[zmq.Frame]:
        """This frame and the remaining frames of its message."""
        frames = [frame]
        while frames[-1].more:
            frames.append(self.data.recv(zmq.NOBLOCK, copy=False))
        return frames

    def _slow_path(self, frames: list) -> None:
        """Full validation for an odd or non-DATA message; its exact reason is counted on rejection."""
        self.last_message_at = time.monotonic()
        try:
            message = protocol.validate_message(frames, self.expectation)
        except protocol.ProtocolError as exc:
            with self._lock:
                self.rejected[exc.reason] += 1
            return
        if message.kind == protocol.DATA:
            self._store(message)
        else:
            with self._lock:
                self.finishes += 1
            self.table.mark_finished(message.sim_id, message.time_step)

    def _accept_many(self, sim_ids: np.ndarray, time_steps: np.ndarray, fields: np.ndarray) -> int:
        """The sink's accept_many, or accept row by row for a sink without it (the validation set)."""
        if hasattr(self.sink, "accept_many"):
            return self.sink.accept_many(sim_ids, time_steps, fields, timeout=0.1)
        for row, (sim_id, time_step) in enumerate(zip(sim_ids.tolist(), time_steps.tolist())):
            if not self.sink.accept(sim_id, time_step, fields[row].reshape(self._spec.shape), timeout=0.1):
                return row
        return len(sim_ids)

    def _flush(self, count: int) -> None:
        """Validate, deduplicate and store the ``count`` staged messages."""
        if not count:
            return
        headers, staging = self._headers[:count], self._staging[:count]
        valid = (headers[:, self._fixed] == self._template).all(axis=1)
        ids = headers[:, 24:40].copy().view(_HEADER_IDS).ravel()
        in_table = ids["sim_id"] < len(self._known)
        sim_ids = np.where(in_table, ids["sim_id"], 0).astype(np.int64)
        time_steps = ids["time_step"].astype(np.int64)
        known = self._known[sim_ids] & in_table
        if not known.all():
            for sim_id in np.unique(sim_ids[in_table & ~known]).tolist():
                self._known[sim_id] = self._is_known(sim_id)
            known = self._known[sim_ids] & in_table
        valid &= known & (time_steps < self.n_steps)
        time_steps[~valid] = 0
        if self.n_ranks > 1:
            valid &= (sim_ids % self.n_ranks + time_steps % self.n_ranks) % self.n_ranks == self.rank
        valid &= np.isfinite(staging).all(axis=1)
        for row in np.flatnonzero(~valid):  # rare: the full checks give the reason
            self._slow_path([headers[row].tobytes(), self._field_name, staging[row].tobytes()])
        sample_ids = sim_ids * self.n_steps + time_steps
        keep = valid & ~self.stored[sim_ids, time_steps]
        ordered = np.sort(sample_ids[keep])
        if (ordered[1:] == ordered[:-1]).any():  # a step twice in one batch: keep its first copy
            first = np.zeros(count, dtype=bool)
            first[np.unique(np.where(keep, sample_ids, -1), return_index=True)[1]] = True
            keep &= first
        keep = np.flatnonzero(keep)
        with self._lock:
            self.duplicates += int(valid.sum()) - len(keep)
        stored = 0
        try:
            while stored < len(keep) and not self._stop.is_set():
                rows = keep[stored:]
                accepted = self._accept_many(sim_ids[rows], time_steps[rows], staging[rows])
                if accepted:
                    self._record_stored(sim_ids[rows[:accepted]], time_steps[rows[:accepted]])
                    stored += accepted
                elif self.control is not None and self.control.poll(0):  # full: keep answering HELLOs
                    self._serve_control()
        except (BufferClosed, ReceptionOver):
            with self._lock:
                self.rejected[LATE] += len(keep) - stored

    def _record_stored(self, sim_ids: np.ndarray, time_steps: np.ndarray) -> None:
        """Mark stored steps in the deduplication record and count them."""
        self.stored[sim_ids, time_steps] = True
        now = time.monotonic()
        with self._lock:
            self.unique_received += len(sim_ids)
            self.bytes_received += len(sim_ids) * self._spec.nbytes
            self.first_data_at = self.first_data_at or now
            self.last_data_at = now


# --- the breakdown -----------------------------------------------------------------------------


def microseconds_each(call: Callable[[object], object], items: Sequence[object]) -> float:
    """Mean microseconds of ``call`` over ``items``."""
    start = time.perf_counter()
    for item in items:
        call(item)
    return (time.perf_counter() - start) / len(items) * 1e6


def breakdown(field_shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, float]:
    """Microseconds per message of each step of today's receive path, on hot frames in this process."""
    n_messages = BREAKDOWN_MESSAGES[field_shape]
    token = protocol.new_token()
    table = submitted_table(n_messages, rng)
    buffer = FIFOBuffer(capacity=n_messages, watermark=0, input_dim=N_PARAMETERS + 1,
                        field_size=math.prod(field_shape), seed=0)
    sink = BufferSink(buffer, table, N_STEPS, DT)
    expectation = protocol.Expectation(  # as Receiver builds it
        token=token, n_steps=N_STEPS, fields={FIELD: (field_shape, np.dtype("float32"))}, rank=0, n_ranks=1,
        known_simulations=table.is_known)
    pool = 8  # a few distinct received messages, reused so that the timing sees hot caches
    pull, address = plain_pull()
    sender = start_sender(address, token, field_shape, pool)
    deadline = time.monotonic() + DEADLINE_S
    received = [receive(pull, sender, deadline) for _ in range(pool)]
    pull.close()
    join_sender(sender)
    frames_list = [received[i % pool] for i in range(n_messages)]
    messages = [protocol.validate_message(frames, expectation) for frames in frames_list]
    stored = np.zeros((len(table), N_STEPS), dtype=bool)
    target = np.empty(math.prod(field_shape), dtype=np.float32)
    return {
        "validate_message (all checks)": microseconds_each(
            lambda frames: protocol.validate_message(frames, expectation), frames_list),
        "  of which decode_header": microseconds_each(lambda frames: protocol.decode_header(frames[0]), frames_list),
        "  of which finite check": microseconds_each(lambda m: bool(np.isfinite(m.array).all()), messages),
        "dedupe lookup stored[sim, step]": microseconds_each(lambda m: stored[m.sim_id, m.time_step], messages),
        "BufferSink.accept (incl. put)": microseconds_each(
            lambda m: sink.accept(m.sim_id, m.time_step, m.array, timeout=0.1), messages),
        "  of which the field copy": microseconds_each(lambda m: np.copyto(target, m.array.reshape(-1)), messages),
    }


# --- the report --------------------------------------------------------------------------------


def bench_size(label: str, field_shape: tuple[int, ...], n_messages: int, args: argparse.Namespace,
               rng: np.random.Generator) -> None:
    """Run every variant ``repeats`` times in turn and print medians, MB/s and ratios to the limit."""
    variants: dict[str, Callable[[], Rate]] = {
        "raw pyzmq PULL (limit)": lambda: run_raw(field_shape, n_messages, copy_into_rows=False),
        "raw PULL + copy to rows": lambda: run_raw(field_shape, n_messages, copy_into_rows=True),
        "jaxsurro Receiver (ours)": lambda: run_ours(field_shape, n_messages, rng),
    }
    if args.proposed:
        variants["proposed batched path"] = lambda: run_ours(field_shape, n_messages, rng, BatchedReceiver)
    runs: dict[str, list[Rate]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            runs[name].append(run())
    megabytes = math.prod(field_shape) * 4 / 1e6
    limit = [rate.per_s for rate in runs["raw pyzmq PULL (limit)"]]
    print(f"\n{label}: {field_shape[0]}x{field_shape[1]} float32 ({megabytes * 1e3:,.0f} KB payload), "
          f"{n_messages} messages per run, medians of {args.repeats} runs")
    print(f"  {'':<24} {'msgs/s':>8} {'MB/s':>6} {'ratio':>6}  {'CPU us/msg: recv':>16} {'send':>6} {'ratio':>6}"
          f"   runs (msgs/s)")
    ratios = {}
    limit_cpu = statistics.median(rate.cpu_us_per_message + rate.sender_cpu_us_per_message
                                  for rate in runs["raw pyzmq PULL (limit)"])
    for name, rates in runs.items():
        ratios[name] = statistics.median(rate.per_s / lim for rate, lim in zip(rates, limit, strict=True))
        median = statistics.median(rate.per_s for rate in rates)
        receive_cpu = statistics.median(rate.cpu_us_per_message for rate in rates)
        send_cpu = statistics.median(rate.sender_cpu_us_per_message for rate in rates)
        each = " ".join(f"{rate.per_s:,.0f}" for rate in rates)
        print(f"  {name:<24} {median:>8,.0f} {median * megabytes:>6,.0f} {ratios[name]:>6.2f}  {receive_cpu:>16.1f} "
              f"{send_cpu:>6.1f} {limit_cpu / (receive_cpu + send_cpu):>6.2f}   {each}")
    ours = ratios["jaxsurro Receiver (ours)"]
    print(f"  ours / limit = {ours:.2f}: {'meets' if ours >= TARGET_RATIO else 'BELOW'} the target >= {TARGET_RATIO}")
    if not args.no_breakdown:
        print("  per-message cost of today's receive path (us, hot frames, in this process; "
              f"the limit takes {1e6 / statistics.median(limit):.1f} us per message end to end):")
        for name, microseconds in breakdown(field_shape, rng).items():
            print(f"    {name:<34} {microseconds:>8.1f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options: message counts per size, repeats, the prototype and the breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Target: ours / limit >= 0.9 for both sizes (ARCHITECTURE.md section 5).")
    parser.add_argument("--small-messages", type=int, default=20000, help="messages per run, 64x64 fields")
    parser.add_argument("--large-messages", type=int, default=200, help="messages per run, 1024x1024 fields")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every variant per size")
    parser.add_argument("--proposed", action="store_true",
                        help="also measure the batched receive path prototyped in this script")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-step cost table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.small_messages < 2 or args.large_messages < 2 or args.repeats < 1:
        parser.error("message counts must be >= 2 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Benchmark both field sizes and print one block each."""
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    print(f"server ingestion over TCP loopback, one sender process: RCVHWM {RECEIVE_QUEUE_MESSAGES}, "
          f"SNDHWM {client.SEND_HIGH_WATER_MARK}, recv_multipart(copy=False); ratio = median of per-repeat "
          "ratios to the limit")
    for label, shape, count in (("16 KB", (64, 64), args.small_messages),
                                ("4 MB", (1024, 1024), args.large_messages)):
        bench_size(label, shape, count, args, rng)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
