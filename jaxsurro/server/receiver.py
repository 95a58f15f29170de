"""The server rank's receiver: a thread that takes client messages off ZeroMQ into a sink.

Each server rank binds a PULL data socket; rank 0 also binds the ROUTER control
socket that answers HELLOs (docs/protocol.md). Every message is validated; a bad
one is counted by reason and dropped, and the receiver keeps running. A time step
that arrives twice (a restarted client) is stored once. The sink (a training
buffer or the validation set) may block when full: the receiver then stops
reading, ZeroMQ's bounded queues fill and the clients block, so nothing is dropped.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import zmq

from jaxsurro import protocol
from jaxsurro.server.buffers import BufferClosed, ReceptionOver
from jaxsurro.table import SimState, SimulationTable

log = logging.getLogger("jaxsurro.server.receiver")

# Messages queued per socket before ZeroMQ pushes back on the clients; small, since a 4 MB
# field times a large queue would hold gigabytes that the buffer's capacity is meant to bound.
RECEIVE_QUEUE_MESSAGES = 16
# Counted with the protocol's rejection reasons: a valid time step that came after reception ended.
LATE = "after_end_of_reception"


class Sink(Protocol):
    """Where validated time steps go."""

    def accept(self, sim_id: int, time_step: int, field: np.ndarray, timeout: float) -> bool:
        """Stores one time step; returns False if it could not within ``timeout`` (the caller retries)."""


class Receiver:
    """One server rank's receiving side: sockets, validation, deduplication, the sink."""

    def __init__(self, *, table: SimulationTable, sink: Sink, token: bytes, field: str,
                 field_shape: Sequence[int], wire_dtype: str, n_steps: int, host: str,
                 rank: int = 0, n_ranks: int = 1, context: zmq.Context | None = None,
                 known_simulations: Callable[[int], bool] | None = None):
        self.table = table
        self.sink = sink
        self.token = token
        self.n_steps = n_steps
        self.rank, self.n_ranks = rank, n_ranks
        self.expectation = protocol.Expectation(
            token=token, n_steps=n_steps, fields={field: (tuple(field_shape), np.dtype(wire_dtype))},
            rank=rank, n_ranks=n_ranks, known_simulations=known_simulations or table.is_known)
        self._context = context or zmq.Context.instance()
        self.data = self._context.socket(zmq.PULL)
        self.data.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_MESSAGES)
        self.data.setsockopt(zmq.LINGER, 0)
        bind_host, advertised_host = _hosts(host)
        port = self.data.bind_to_random_port(f"tcp://{bind_host}")
        self.data_address = f"tcp://{advertised_host}:{port}"
        self.control = None
        self.control_address = ""
        if rank == 0:
            self.control = self._context.socket(zmq.ROUTER)
            self.control.setsockopt(zmq.LINGER, 0)
            port = self.control.bind_to_random_port(f"tcp://{bind_host}")
            self.control_address = f"tcp://{advertised_host}:{port}"
        self.addresses: tuple[str, ...] = (self.data_address,)  # every rank's, in rank order
        # Which (simulation, step) pairs were stored: the deduplication record, O(S x T) bits.
        self.stored = np.zeros((len(table), n_steps), dtype=bool)
        self.unique_received = 0
        self.duplicates = 0
        self.bytes_received = 0
        self.finishes = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.last_message_at = time.monotonic()
        self.first_data_at: float | None = None
        self.last_data_at: float | None = None
        self._lock = threading.Lock()  # guards the counters for stats()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"receiver-{rank}", daemon=True)

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
        """Re-raises, in the caller's thread, an error that stopped the receiver thread."""
        if self.error is not None:
            raise RuntimeError(f"the receiver of rank {self.rank} stopped: {self.error}") from self.error

    def stats(self) -> dict:
        with self._lock:
            return {"unique_received": self.unique_received, "duplicates": self.duplicates,
                    "bytes_received": self.bytes_received, "finishes": self.finishes,
                    "rejected": dict(self.rejected)}

    # -- the loop ----------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.data, zmq.POLLIN)
        if self.control is not None:
            poller.register(self.control, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if self.control is not None and self.control in events:
                    self._serve_control()
                if self.data in events:
                    self._drain_data()
        except BaseException as exc:  # surfaced by check() in the main thread
            log.exception("receiver %d failed", self.rank)
            self.error = exc

    def _drain_data(self, max_messages: int = 256) -> None:
        for _ in range(max_messages):
            try:
                frames = self.data.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.last_message_at = time.monotonic()
            try:
                message = protocol.validate_message(frames, self.expectation)
            except protocol.ProtocolError as exc:
                with self._lock:
                    self.rejected[exc.reason] += 1
                log.debug("rejected a message: %s", exc)
                continue
            if message.kind == protocol.DATA:
                self._store(message)
            else:
                with self._lock:
                    self.finishes += 1
                self.table.mark_finished(message.sim_id, message.time_step)

    def _store(self, message: protocol.Received) -> None:
        sim_id, step = message.sim_id, message.time_step
        if self.stored[sim_id, step]:
            with self._lock:
                self.duplicates += 1
            return
        try:
            while not self.sink.accept(sim_id, step, message.array, timeout=0.1):
                # The sink is full: keep answering HELLOs so new clients are not refused meanwhile.
                if self._stop.is_set():
                    return
                if self.control is not None and self.control.poll(0):
                    self._serve_control()
        except (BufferClosed, ReceptionOver) as exc:  # a straggler after the study ended
            with self._lock:
                self.rejected[LATE] += 1
            log.warning("time step %d of simulation %d arrived after reception ended: %s", step, sim_id, exc)
            return
        self.stored[sim_id, step] = True
        now = time.monotonic()
        with self._lock:
            self.unique_received += 1
            self.bytes_received += message.array.nbytes
            self.first_data_at = self.first_data_at or now
            self.last_data_at = now

    def _serve_control(self) -> None:
        while True:
            try:
                routing_id, *frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # an empty multipart message from the ROUTER
                continue
            self.last_message_at = time.monotonic()
            self.control.send_multipart([routing_id, *self._answer_hello(frames)])

    def _answer_hello(self, frames: list[bytes]) -> list[bytes]:
        try:
            header = protocol.validate_hello(frames, self.expectation)
        except protocol.ProtocolError as exc:
            with self._lock:
                self.rejected[exc.reason] += 1
            sim_id = _sim_id_or_zero(frames)
            return protocol.encode_reject(sim_id, 0, exc.reason, exc.message)
        if header.sim_id == protocol.ANY_SIMULATION:
            return protocol.encode_reject(header.sim_id, header.client_id, protocol.NO_SIMULATION_LEFT,
                                          "this server assigns simulations to jobs; persistent clients "
                                          "are not enabled in this run")
        with self.table.lock:
            record = self.table[header.sim_id]
            if record.state != SimState.SUBMITTED:
                return protocol.encode_reject(header.sim_id, header.client_id, "unknown_simulation",
                                              f"simulation {header.sim_id} is {record.state.value}, "
                                              f"not submitted: nothing to run")
            parameters = record.parameters.copy()
        return protocol.encode_welcome(self.token, header.sim_id, header.client_id, self.addresses,
                                       parameters, self.n_steps)


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
    """Collects whole trajectories into a dense array ``[n_simulations, n_steps, *field_shape]``."""

    def __init__(self, n_simulations: int, n_steps: int, field_shape: Sequence[int]):
        self.fields = np.zeros((n_simulations, n_steps, *field_shape), dtype=np.float32)

    def accept(self, sim_id: int, time_step: int, field: np.ndarray, timeout: float) -> bool:
        self.fields[sim_id, time_step] = field
        return True


class BufferSink:
    """Turns a time step into a training sample (parameters, time) -> field and puts it in a buffer."""

    def __init__(self, buffer, table: SimulationTable, n_steps: int, dt: float):
        self.buffer = buffer
        self.table = table
        self.n_steps = n_steps
        self.dt = dt
        n_parameters = len(table[0].parameters)
        self._inputs = np.empty(n_parameters + 1, dtype=np.float32)  # reused: put() copies it

    def accept(self, sim_id: int, time_step: int, field: np.ndarray, timeout: float) -> bool:
        self._inputs[:-1] = self.table[sim_id].parameters  # frozen once submitted
        self._inputs[-1] = (time_step + 1) * self.dt
        try:
            self.buffer.put(sim_id * self.n_steps + time_step, self._inputs, field.reshape(-1), timeout=timeout)
        except TimeoutError:
            return False
        return True
