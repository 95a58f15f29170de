"""MPI-parallel clients: every solver rank passes its block of the field, the client's root sends it whole.

:func:`jaxsurro.client.connect` loads this module only when it gets a communicator of more than
one rank. The root (rank 0 of the communicator) speaks to the server through an ordinary
:class:`jaxsurro.client.simulation.Simulation`; the server sees one client sending whole fields.
mpi4py itself is never imported: the communicator's own methods are used, on a duplicate of it.
The steps, deadlines and limits are in docs/protocol.md, section 12 (MPI-parallel clients).
"""

from __future__ import annotations

import math
import operator
import os
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxsurro import protocol
from jaxsurro.client.settings import (
    DEFAULT_TIMEOUT,
    ENV_TIMEOUT,
    ClientConfigurationError,
    ServerUnreachable,
    SimulationRejected,
    check_field_name,
    check_real_array,
    check_time_step,
)
from jaxsurro.client.simulation import Simulation, SimulationContext

# An MPI rank polls a pending request without sleeping for this long, then sleeps with doubling pauses
# up to _MAX_PAUSE: low latency when the ranks are in step, little CPU taken from the solver when one
# waits long (the root blocked by backpressure, a slow rank).
_SPIN_SECONDS = 1e-3
_MIN_PAUSE, _MAX_PAUSE = 5e-5, 2e-3
# Added to every deadline a rank derives from the timeout, for the other ranks' skew.
_GRACE_SECONDS = 5.0
# MPI counts are C ints: a field gathered with MPI holds at most this many elements.
MPI_MAX_ELEMENTS = 2**31 - 1
# Per-rank metadata gathered at every send: status, time step, field-name CRC, ndim, start, shape,
# global shape (MAX_NDIM entries each).
_META_STATUS, _META_STEP, _META_FIELD, _META_NDIM, _META_LAYOUT = 0, 1, 2, 3, 4
_META_SIZE = _META_LAYOUT + 3 * protocol.MAX_NDIM
_PART_OK, _PART_INVALID, _PART_NONE = 1, 0, 2
# Root announcements (WELCOME or an error) are a uint64 header then an optional byte payload.
_ANNOUNCE_SIZE = 10
(_A_ERROR, _A_PAYLOAD, _A_REASON, _A_SIM, _A_STEPS, _A_CLIENT, _A_RANKS, _A_PARAMETERS, _A_DTYPE, _A_TIMEOUT) = range(
    _ANNOUNCE_SIZE
)


class ClientRankTimeout(TimeoutError):
    """An MPI rank of a parallel client waited past its deadline for the other ranks: one is stuck or gone.

    The communicator may hold an unfinished collective afterwards: end the job (comm.Abort()).
    """


# Errors the root can report to every rank, by code (index + 1); subclasses come before their bases.
_SHARED_ERRORS: tuple[type[BaseException], ...] = (
    ClientConfigurationError,
    ServerUnreachable,
    SimulationRejected,
    protocol.ProtocolError,
    ClientRankTimeout,
    TimeoutError,
    ValueError,
    TypeError,
    RuntimeError,
)


class AssemblyPlan(NamedTuple):
    """How the root turns the gathered parts of one field into the whole field (built once per layout)."""

    global_shape: tuple[int, ...]
    counts: tuple[int, ...]  # elements each rank sends
    displacements: tuple[int, ...]  # where each rank's elements land in the receive buffer
    # Where each rank's part goes in the field; None when the parts are slabs along axis 0 in rank
    # order, which MPI then gathers straight into place (no copy).
    boxes: tuple[tuple[slice, ...], ...] | None


def plan_assembly(
    starts: Sequence[Sequence[int] | None],
    shapes: Sequence[Sequence[int] | None],
    global_shapes: Sequence[Sequence[int] | None],
) -> AssemblyPlan:
    """Check that the ranks' parts tile the global field exactly once and plan the gather.

    Entry r describes rank r's part; None entries (in all three) mark a rank holding no part. Raises
    ValueError saying which ranks disagree, leave a gap, overlap or fall outside the field.
    """
    holders = [r for r in range(len(starts)) if shapes[r] is not None]
    if not holders:
        raise ValueError("no rank passed a part of the field: at least one rank must hold data")
    global_shape = tuple(int(d) for d in global_shapes[holders[0]])
    for r in holders:
        if tuple(global_shapes[r]) != global_shape:
            raise ValueError(
                f"ranks disagree on the global shape: rank {holders[0]} says {global_shape}, rank {r} "
                f"says {tuple(global_shapes[r])}; every rank must pass the same global_shape"
            )
    ndim = len(global_shape)
    total = math.prod(global_shape)
    if total > MPI_MAX_ELEMENTS:
        raise ValueError(f"global_shape {global_shape} has {total} elements; MPI gathers at most 2**31 - 1 per field")
    counts, boxes = [], []
    for r in range(len(starts)):
        if shapes[r] is None:
            counts.append(0)
            boxes.append(None)
            continue
        start, shape = tuple(int(i) for i in starts[r]), tuple(int(n) for n in shapes[r])
        if len(start) != ndim or len(shape) != ndim:
            raise ValueError(
                f"rank {r}: start {start} and part shape {shape} must both have {ndim} entries "
                f"(global_shape {global_shape})"
            )
        if any(i < 0 or n < 0 or i + n > g for i, n, g in zip(start, shape, global_shape)):
            raise ValueError(
                f"rank {r}: its part of shape {shape} at start {start} falls outside the global field "
                f"{global_shape}; need 0 <= start and start + shape <= global_shape on every axis"
            )
        counts.append(math.prod(shape))
        boxes.append(tuple(slice(i, i + n) for i, n in zip(start, shape)))
    covered = np.zeros(global_shape, dtype=bool)  # once per layout: the field's size in bytes
    for r, box in enumerate(boxes):
        if box is None or counts[r] == 0:
            continue
        if covered[box].any():
            owner = next(q for q in range(r) if boxes[q] is not None and counts[q] and _intersect(boxes[q], box))
            raise ValueError(
                f"rank {r}'s part {_box_text(box)} overlaps rank {owner}'s part {_box_text(boxes[owner])}; "
                "every element of the field must belong to exactly one rank"
            )
        covered[box] = True
    if sum(counts) != total:
        gap = tuple(int(i) for i in np.argwhere(~covered)[0])
        raise ValueError(
            f"the ranks' parts hold {sum(counts)} of the {total} elements of the global field "
            f"{global_shape}; element {gap} belongs to no rank: the parts must tile the field exactly once"
        )
    # Slabs along axis 0 in rank order land contiguously at their place in the C-order field.
    row_size = math.prod(global_shape[1:])
    in_place, next_row = ndim >= 1, 0
    for r, box in enumerate(boxes):
        if box is None:
            continue
        if box[0].start != next_row or any((s.start, s.stop) != (0, g) for s, g in zip(box[1:], global_shape[1:])):
            in_place = False
            break
        next_row = box[0].stop
    if in_place:
        displacements = tuple(0 if box is None else box[0].start * row_size for box in boxes)
        return AssemblyPlan(global_shape, tuple(counts), displacements, None)
    displacements = tuple(int(d) for d in np.cumsum([0, *counts[:-1]]))
    return AssemblyPlan(global_shape, tuple(counts), displacements, tuple(boxes))


def _intersect(first: tuple[slice, ...], second: tuple[slice, ...]) -> bool:
    """True when two boxes share an element."""
    return all(max(a.start, b.start) < min(a.stop, b.stop) for a, b in zip(first, second))


def _box_text(box: tuple[slice, ...]) -> str:
    """A box as [i0:i1, j0:j1]."""
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in box) + "]"


def _wait(requests: Sequence[Any], deadline: float, what: str) -> None:
    """Complete MPI requests, polling (spin, then short sleeps) until `deadline`; else ClientRankTimeout."""
    spin_until = time.monotonic() + _SPIN_SECONDS
    pause = _MIN_PAUSE
    pending = list(requests)
    while True:
        pending = [request for request in pending if not request.Test()]
        if not pending:
            return
        now = time.monotonic()
        if now >= deadline:
            raise ClientRankTimeout(what)
        if now >= spin_until:
            time.sleep(min(pause, max(0.0, deadline - now)))
            pause = min(2 * pause, _MAX_PAUSE)


def _waiting_timeout(timeout: float | None) -> float:
    """The timeout a non-root rank uses before the root's settings arrive (argument, env, default)."""
    if timeout is not None:
        try:
            value = float(timeout)
        except (TypeError, ValueError):
            return DEFAULT_TIMEOUT
    else:
        try:
            value = float(os.environ.get(ENV_TIMEOUT, "").strip() or DEFAULT_TIMEOUT)
        except ValueError:
            return DEFAULT_TIMEOUT
    return value if value > 0 and math.isfinite(value) else DEFAULT_TIMEOUT


def _error_announcement(error: BaseException) -> tuple[np.ndarray, bytes]:
    """Header and payload telling every rank which error the root met."""
    code = next((i + 1 for i, kind in enumerate(_SHARED_ERRORS) if isinstance(error, kind)), len(_SHARED_ERRORS))
    reason = getattr(error, "reason", "") or ""
    message = error.message if isinstance(error, protocol.ProtocolError) else str(error)
    if code == len(_SHARED_ERRORS) and not isinstance(error, RuntimeError):
        message = f"{type(error).__name__}: {message}"
    reason_bytes, message_bytes = reason.encode(), message.encode()
    header = np.zeros(_ANNOUNCE_SIZE, dtype=np.uint64)
    header[_A_ERROR], header[_A_REASON] = code, len(reason_bytes)
    header[_A_PAYLOAD] = len(reason_bytes) + len(message_bytes)
    return header, reason_bytes + message_bytes


def _error_from_announcement(header: np.ndarray, payload: bytes, rank: int) -> BaseException:
    """The root's error, rebuilt on another rank with a note saying where it happened."""
    kind = _SHARED_ERRORS[int(header[_A_ERROR]) - 1]
    split = int(header[_A_REASON])
    reason, message = payload[:split].decode(), payload[split:].decode()
    text = f"{message} [reported by the client's root (rank 0 of the communicator) to rank {rank}]"
    if kind in (SimulationRejected, protocol.ProtocolError):
        return kind(reason, text)
    return kind(text)


def _publish(comm: Any, header: np.ndarray, payload: bytes, deadline: float) -> None:
    """Root side of an announcement: broadcast the header, then the payload if any."""
    what = (
        "the client's root could not deliver its announcement to the other ranks: a rank is stuck or "
        "gone (every rank must call the same client functions in the same order)"
    )
    _wait([comm.Ibcast(header, root=0)], deadline, what)
    if payload:
        _wait([comm.Ibcast(np.frombuffer(payload, dtype=np.uint8).copy(), root=0)], deadline, what)


def _receive_announcement(comm: Any, deadline: float, what: str) -> tuple[np.ndarray, bytes]:
    """Non-root side of an announcement: header, then payload bytes."""
    header = np.zeros(_ANNOUNCE_SIZE, dtype=np.uint64)
    _wait([comm.Ibcast(header, root=0)], deadline, what)
    size = int(header[_A_PAYLOAD])
    if not size:
        return header, b""
    payload = np.empty(size, dtype=np.uint8)
    _wait([comm.Ibcast(payload, root=0)], deadline, what)
    return header, payload.tobytes()


def connect_parallel(comm: Any, timeout: float | None, open_simulation: Callable[[], Simulation]) -> ParallelSimulation:
    """Collective connect: rank 0 shakes hands with the server, then tells every rank the outcome.

    What jaxsurro.client.connect(comm=comm) does for a communicator of more than one rank (call that):
    the root opens its connection with `open_simulation` (connect()'s arguments bound), and `timeout`
    is connect()'s, for the waits before the root's settings arrive. Every rank returns a
    ParallelSimulation or raises the root's error.
    """
    waiting = _waiting_timeout(timeout)
    comm, request = comm.Idup()  # the client's own collectives never match the solver's
    _wait(
        [request],
        time.monotonic() + waiting,
        f"not every rank of the communicator called jaxsurro.client.connect(comm=...) within {waiting:g} s: "
        "it is collective, every rank must call it",
    )
    rank = comm.Get_rank()
    if rank != 0:
        header, payload = _receive_announcement(
            comm,
            time.monotonic() + 3 * waiting + _GRACE_SECONDS,
            f"rank {rank} got no answer from the client's root (rank 0) within {3 * waiting + _GRACE_SECONDS:g} s "
            "of calling connect(comm=...): rank 0 is stuck or gone, or did not call connect",
        )
        if header[_A_ERROR]:
            comm.Free()
            raise _error_from_announcement(header, payload, rank)
        n_parameters = int(header[_A_PARAMETERS])
        parameters = np.frombuffer(payload[: 8 * n_parameters], dtype="<f8").astype(np.float64)
        addresses = tuple(payload[8 * n_parameters :].decode().split("\n"))
        return ParallelSimulation(
            comm,
            None,
            sim_id=int(header[_A_SIM]),
            parameters=parameters,
            n_steps=int(header[_A_STEPS]) or None,
            client_id=int(header[_A_CLIENT]),
            addresses=addresses,
            timeout=float(header[_A_TIMEOUT:].view(np.float64)[0]),
            wire_dtype=protocol.CODE_TO_DTYPE[int(header[_A_DTYPE])],
        )

    simulation: Simulation | None = None
    try:
        simulation = open_simulation()
    except BaseException as error:
        header, payload = _error_announcement(error)
        try:
            _publish(comm, header, payload, time.monotonic() + waiting + _GRACE_SECONDS)
            comm.Free()
        except ClientRankTimeout:
            pass  # the root's own error says more
        raise
    header = np.zeros(_ANNOUNCE_SIZE, dtype=np.uint64)
    header[_A_SIM], header[_A_STEPS] = simulation.sim_id, simulation.n_steps or 0
    header[_A_CLIENT], header[_A_RANKS] = simulation.client_id, simulation.n_ranks
    header[_A_PARAMETERS] = simulation.parameters.size
    header[_A_DTYPE] = protocol.DTYPE_TO_CODE[simulation.wire_dtype]
    header[_A_TIMEOUT:] = np.array([simulation.timeout], dtype=np.float64).view(np.uint64)
    payload = np.ascontiguousarray(simulation.parameters, dtype="<f8").tobytes()
    payload += "\n".join(simulation.addresses).encode()
    header[_A_PAYLOAD] = len(payload)
    try:
        _publish(comm, header, payload, time.monotonic() + simulation.timeout + _GRACE_SECONDS)
    except BaseException:
        simulation.abort()
        raise
    return ParallelSimulation(
        comm,
        simulation,
        sim_id=simulation.sim_id,
        parameters=simulation.parameters,
        n_steps=simulation.n_steps,
        client_id=simulation.client_id,
        addresses=simulation.addresses,
        timeout=simulation.timeout,
        wire_dtype=simulation.wire_dtype,
    )


class _Part(NamedTuple):
    """One rank's contribution to a send, checked locally."""

    metadata: np.ndarray  # int64 (_META_SIZE,)
    values: np.ndarray  # flat wire-dtype elements to gather (empty when invalid or absent)
    error: BaseException | None  # this rank's own mistake, raised after the collective


def _prepare_part(
    field: Any,
    time_step: Any,
    part: Any,
    start: Sequence[int] | None,
    global_shape: Sequence[int] | None,
    wire_dtype: np.dtype,
) -> _Part:
    """Check one rank's arguments to send() and pack what the root needs; never raises."""
    metadata = np.zeros(_META_SIZE, dtype=np.int64)
    empty = np.empty(0, dtype=wire_dtype)
    try:
        metadata[_META_FIELD] = zlib.crc32(check_field_name(field))
        metadata[_META_STEP] = check_time_step(time_step)
        if part is None:
            metadata[_META_STATUS] = _PART_NONE
            return _Part(metadata, empty, None)
        values = check_real_array(field, part)
        if start is None or global_shape is None:
            raise ValueError(
                f"field {field!r}: with an MPI communicator every rank passes where its part lies: "
                "send(field, t, part, start=(i0, j0, ...), global_shape=(M, N, ...)); got "
                f"start={start!r}, global_shape={global_shape!r}"
            )
        origin = tuple(operator.index(i) for i in start)
        whole = tuple(operator.index(n) for n in global_shape)
        if not len(origin) == len(whole) == values.ndim <= protocol.MAX_NDIM:
            raise ValueError(
                f"field {field!r}: part shape {values.shape}, start {origin} and global_shape {whole} "
                f"must have the same number of axes (at most {protocol.MAX_NDIM})"
            )
        if any(g < 0 or g > protocol.MAX_U32 for g in whole) or math.prod(whole) > MPI_MAX_ELEMENTS:
            raise ValueError(
                f"field {field!r}: global_shape {whole} must have dimensions in [0, 2**32) and at most "
                "2**31 - 1 elements (the limit of an MPI gather)"
            )
        if any(i < 0 or i + n > g for i, n, g in zip(origin, values.shape, whole)):
            raise ValueError(
                f"field {field!r}: a part of shape {values.shape} at start {origin} does not fit in "
                f"global_shape {whole}; need 0 <= start and start + part.shape <= global_shape"
            )
        wire = np.asarray(values, dtype=wire_dtype, order="C").reshape(-1)
        ndim = values.ndim
        metadata[_META_STATUS], metadata[_META_NDIM] = _PART_OK, ndim
        layout = _META_LAYOUT
        metadata[layout : layout + ndim] = origin
        metadata[layout + protocol.MAX_NDIM : layout + protocol.MAX_NDIM + ndim] = values.shape
        metadata[layout + 2 * protocol.MAX_NDIM : layout + 2 * protocol.MAX_NDIM + ndim] = whole
        return _Part(metadata, wire, None)
    except (TypeError, ValueError, OverflowError) as error:
        metadata[_META_STATUS] = _PART_INVALID
        return _Part(metadata, empty, error)


class ParallelSimulation(SimulationContext):
    """One simulation streamed by an MPI-parallel solver: every rank sends its part, the root the whole.

    Made by connect(comm=...) on every rank (collective). `parameters`, `sim_id`, `n_steps`, `addresses`,
    `n_ranks` (server ranks), `client_id`, `timeout` and `wire_dtype` are the same on every rank. send()
    and finish() are collective: every rank calls them in the same order. Only the root (rank 0 of the
    communicator) talks to the server, through `root_simulation`; its errors are raised on every rank.
    """

    def __init__(
        self,
        comm: Any,
        simulation: Simulation | None,
        *,
        sim_id: int,
        parameters: np.ndarray,
        n_steps: int | None,
        client_id: int,
        addresses: tuple[str, ...],
        timeout: float,
        wire_dtype: np.dtype,
    ):
        """Wrap the client's own communicator and, on the root, its server connection (use connect())."""
        self.comm = comm  # the client's duplicate of the solver's communicator
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self.root_simulation = simulation  # the server connection, on the root only
        self.sim_id = sim_id
        self.parameters = parameters  # float64, shape (n_parameters,), on every rank
        self.n_steps = n_steps
        self.client_id = client_id  # the root's: the server sees one client
        self.addresses = addresses
        self.n_ranks = len(addresses)  # server ranks
        self.timeout = timeout  # seconds
        self.wire_dtype = wire_dtype  # little-endian float32 or float64
        self._plans: dict[str, tuple[bytes, AssemblyPlan]] = {}  # root: last layout per field
        self._steps_sent: set[int] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        """True after finish() or abort()."""
        return self._closed

    def _deadline(self, n_timeouts: int) -> float:
        """Now + what the root may take for `n_timeouts` server waits, plus the others' skew."""
        return time.monotonic() + n_timeouts * self.timeout + _GRACE_SECONDS

    def send(
        self,
        field: str,
        time_step: int,
        part: Any,
        *,
        start: Sequence[int] | None = None,
        global_shape: Sequence[int] | None = None,
    ) -> None:
        """Collective: this rank's `part` of step `time_step` of `field`, at `start` in `global_shape`.

        Every rank calls it for the same (field, time_step); the parts must tile the global field
        exactly once (any block decomposition; a rank holding nothing passes part=None or an empty
        part). The root gathers them (MPI Gatherv), sends one whole-field DATA message, and every rank
        returns when that message is queued, or raises the same error. The caller may reuse `part` at
        once. Blocks while the server's buffer is full, never drops data.
        """
        if self._closed:
            raise RuntimeError(
                f"simulation {self.sim_id} is closed (finished or aborted): send() must be called "
                "inside the `with client.connect(comm=comm) as sim:` block"
            )
        local = _prepare_part(field, time_step, part, start, global_shape, self.wire_dtype)
        step_text = f"step {time_step!r} of field {field!r}"
        if not self.is_root:
            _wait(
                [self.comm.Igather(local.metadata, None, root=0), self.comm.Igatherv(local.values, None, root=0)],
                self._deadline(1),
                f"rank {self.rank}: the client's root (rank 0) did not collect {step_text} within "
                f"{self.timeout + _GRACE_SECONDS:g} s: rank 0 is stuck or gone, or did not call send()",
            )
            header, payload = _receive_announcement(
                self.comm,
                self._deadline(2),
                f"rank {self.rank}: no word from the client's root (rank 0) on {step_text} within "
                f"{2 * self.timeout + _GRACE_SECONDS:g} s: rank 0 is stuck or gone",
            )
            if local.error is not None:
                raise local.error
            if header[_A_ERROR]:
                raise _error_from_announcement(header, payload, self.rank)
            self._steps_sent.add(int(local.metadata[_META_STEP]))
            return
        error = self._send_at_root(field, local, step_text)
        header, payload = (
            (np.zeros(_ANNOUNCE_SIZE, dtype=np.uint64), b"") if error is None else _error_announcement(error)
        )
        try:
            _publish(self.comm, header, payload, self._deadline(1))
        except ClientRankTimeout:
            if error is None:
                raise
        if local.error is not None:
            raise local.error
        if error is not None:
            raise error
        self._steps_sent.add(int(local.metadata[_META_STEP]))

    def _send_at_root(self, field: str, local: _Part, step_text: str) -> BaseException | None:
        """Gather every rank's part, assemble, send; return the error to share (None if it went out)."""
        metadata = np.empty((self.size, _META_SIZE), dtype=np.int64)
        _wait(
            [self.comm.Igather(local.metadata, metadata, root=0)],
            time.monotonic() + self.timeout,
            f"not every rank of the communicator called send() for {step_text} within {self.timeout:g} s "
            "(the client's timeout): a rank is stuck, gone or behind; send() is collective",
        )
        status = metadata[:, _META_STATUS]
        # What each rank sends: prod(part shape) for a valid part (entries past ndim are 0), else 0.
        shapes = metadata[:, _META_LAYOUT + protocol.MAX_NDIM : _META_LAYOUT + 2 * protocol.MAX_NDIM]
        used_axes = np.arange(protocol.MAX_NDIM) < metadata[:, _META_NDIM, None]
        counts = (np.where(used_axes, shapes, 1).prod(axis=1) * (status == _PART_OK)).tolist()
        problem: BaseException | None = None
        plan: AssemblyPlan | None = None
        try:
            plan = self._check_and_plan(field, metadata, status)
        except ValueError as error:
            problem = error
        if plan is not None:
            field_array = np.empty(plan.global_shape, dtype=self.wire_dtype)
            receive = field_array.reshape(-1) if plan.boxes is None else np.empty(sum(counts), self.wire_dtype)
            displacements = plan.displacements
        else:
            field_array, receive = None, np.empty(sum(counts), dtype=self.wire_dtype)
            displacements = tuple(int(d) for d in np.cumsum([0, *counts[:-1]]))
        _wait(
            [self.comm.Igatherv(local.values, [receive, (counts, displacements)], root=0)],
            time.monotonic() + self.timeout,
            f"the client's root did not receive every rank's part of {step_text} within {self.timeout:g} s: "
            "a rank is stuck or gone",
        )
        if plan is None or field_array is None:
            return problem
        if plan.boxes is not None:
            for r, box in enumerate(plan.boxes):
                if box is not None and plan.counts[r]:
                    offset = plan.displacements[r]
                    field_array[box] = receive[offset : offset + plan.counts[r]].reshape(
                        [s.stop - s.start for s in box]
                    )
        try:
            assert self.root_simulation is not None
            self.root_simulation.send_assembled(field, int(local.metadata[_META_STEP]), field_array)
        except Exception as error:  # shared with every rank, raised there too
            return error
        return None

    def _check_and_plan(self, field: Any, metadata: np.ndarray, status: np.ndarray) -> AssemblyPlan:
        """Every rank agrees on the field and step and the parts tile it: the (cached) plan, else ValueError."""
        invalid = [r for r in range(self.size) if status[r] == _PART_INVALID]
        if invalid:
            raise ValueError(
                f"rank(s) {invalid} passed invalid arguments to send() (each raises its own error saying "
                "which); nothing was sent"
            )
        steps, names = metadata[:, _META_STEP], metadata[:, _META_FIELD]
        if (steps != steps[0]).any() or (names != names[0]).any():
            raise ValueError(
                f"the ranks called send() for different time steps or fields: time steps by rank "
                f"{steps.tolist()}, field-name CRC32 by rank {names.tolist()} (root: {field!r}); every rank "
                "must send the same (field, time step) in the same order"
            )
        layout = metadata[:, _META_STATUS : _META_STATUS + 1].tobytes() + metadata[:, _META_NDIM:].tobytes()
        cached = self._plans.get(field)
        if cached is not None and cached[0] == layout:
            return cached[1]
        m = protocol.MAX_NDIM
        starts, shapes, wholes = [], [], []
        for row in metadata:
            ndim, base = int(row[_META_NDIM]), _META_LAYOUT
            held = row[_META_STATUS] != _PART_NONE
            starts.append(row[base : base + ndim].tolist() if held else None)
            shapes.append(row[base + m : base + m + ndim].tolist() if held else None)
            wholes.append(row[base + 2 * m : base + 2 * m + ndim].tolist() if held else None)
        try:
            plan = plan_assembly(starts, shapes, wholes)
        except ValueError as error:
            raise ValueError(f"field {field!r}: {error}") from None
        self._plans[field] = (layout, plan)
        return plan

    def finish(self) -> None:
        """Collective: the root sends FINISH to every server rank and waits for delivery; errors reach all."""
        if self._closed:
            raise RuntimeError(f"simulation {self.sim_id} is already closed")
        self._closed = True
        if not self.is_root:
            header, payload = _receive_announcement(
                self.comm,
                self._deadline(self.n_ranks + 2),
                f"rank {self.rank}: no word from the client's root (rank 0) on FINISH of simulation "
                f"{self.sim_id} within {(self.n_ranks + 2) * self.timeout + _GRACE_SECONDS:g} s: rank 0 is "
                "stuck or gone",
            )
            if header[_A_ERROR]:
                raise _error_from_announcement(header, payload, self.rank)
            self.comm.Free()
            return
        error: BaseException | None = None
        try:
            assert self.root_simulation is not None
            self.root_simulation.finish()
        except Exception as caught:
            error = caught
        header, payload = (
            (np.zeros(_ANNOUNCE_SIZE, dtype=np.uint64), b"") if error is None else _error_announcement(error)
        )
        _publish(self.comm, header, payload, self._deadline(1))
        if error is not None:
            raise error
        self.comm.Free()

    def abort(self) -> None:
        """Local: close without FINISH (the server sees the simulation as incomplete)."""
        self._closed = True
        if self.root_simulation is not None:
            self.root_simulation.abort()
