"""Solver-side API: stream each time step of a simulation to the jaxsurro training server over ZeroMQ.

Light on purpose (numpy and pyzmq only, never JAX) so solver processes start fast::

    from jaxsurro import client
    with client.connect() as sim:                 # HELLO/WELCOME with the server
        for t, field in enumerate(simulate(sim.parameters)):
            sim.send("temperature", t, field)     # blocks while the server's buffer is full
    # leaving the block sends FINISH to every server rank and waits until all data is delivered

Settings come from the environment variables the launcher sets (ENV_* below) or explicit arguments.
The wire format is in jaxsurro.protocol and docs/protocol.md.

MPI-parallel solvers pass their mpi4py communicator; every rank sends the block it owns and where it
lies in the global field, and the client's root (rank 0 of `comm`) assembles the whole field::

    with client.connect(comm=comm) as sim:       # collective; only rank 0 speaks to the server
        for t, block in enumerate(my_blocks(sim.parameters)):   # parameters on every rank
            sim.send("temperature", t, block, start=(i0, j0), global_shape=(M, N))  # collective

- Any block decomposition works: the parts must tile the global field exactly once (checked once per
  layout; a rank owning nothing passes None or an empty block). Rank-ordered slabs along axis 0 are
  gathered (MPI Gatherv) straight into the field, other layouts with one extra copy at the root.
- The server sees one ordinary client: whole fields, one HELLO, one FINISH per server rank.
- Errors at the root (settings, unreachable or refusing server, backpressure timeout, a bad
  decomposition) are broadcast, so every rank raises the same exception class; a rank's own bad
  arguments raise on that rank. No rank waits forever: every MPI wait is non-blocking and polled
  against a deadline derived from the timeout, past which ClientRankTimeout (a TimeoutError) is raised.
  After ClientRankTimeout a collective may be left pending: end the job (comm.Abort()).
- send() and finish() are collective; leaving the `with` block through an exception is local (the root
  closes without FINISH). mpi4py is never imported here: the communicator's own methods are used.
"""

from __future__ import annotations

import hmac
import math
import operator
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import zmq

from jaxsurro import protocol

ENV_SERVER = "JAXSURRO_SERVER"
ENV_TOKEN = "JAXSURRO_TOKEN"
ENV_SIM_ID = "JAXSURRO_SIM_ID"
ENV_TIMEOUT = "JAXSURRO_TIMEOUT"
ENV_WIRE_DTYPE = "JAXSURRO_WIRE_DTYPE"
ENVIRONMENT_VARIABLES = (ENV_SERVER, ENV_TOKEN, ENV_SIM_ID, ENV_TIMEOUT, ENV_WIRE_DTYPE)

DEFAULT_TIMEOUT = 60.0  # seconds
DEFAULT_WIRE_DTYPE = "float32"
WIRE_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
# Messages queued per server rank inside this process before send() blocks (backpressure).
SEND_HIGH_WATER_MARK = 4
# On an exception inside the with-block, queued data gets at most this long to leave (best effort).
ABORT_LINGER = 1.0  # seconds

ANY_SIMULATION = protocol.ANY_SIMULATION

_HOW_TO_SET = (
    "The jaxsurro launcher sets it for every solver it starts; to run a solver by hand, export it "
    "or pass the matching argument to jaxsurro.client.connect()."
)


class ClientConfigurationError(ValueError):
    """A missing or invalid client setting (environment variable or argument)."""


class ServerUnreachable(ConnectionError):
    """The server did not answer the HELLO within the timeout."""


class SimulationRejected(ConnectionError):
    """The server refused the HELLO; `reason` is its short code (bad_token, unknown_simulation, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Settings(NamedTuple):
    """Resolved connection settings."""

    server: str  # control address of server rank 0, e.g. tcp://10.0.0.1:5555
    token: bytes  # 16 raw bytes
    sim_id: int  # or ANY_SIMULATION
    timeout: float  # seconds, > 0
    wire_dtype: np.dtype  # little-endian float32 or float64


def _missing(name: str, expected: str) -> ClientConfigurationError:
    """Error for an unset variable, saying what it should hold and who sets it."""
    return ClientConfigurationError(f"{name} is not set: expected {expected}. {_HOW_TO_SET}")


def _invalid(name: str, expected: str, got: Any) -> ClientConfigurationError:
    """Error for a bad value, saying what was expected and what came."""
    return ClientConfigurationError(f"{name}: expected {expected}, got {got!r}. {_HOW_TO_SET}")


def resolve_settings(
    server: str | None = None,
    token: bytes | str | None = None,
    sim_id: int | None = None,
    timeout: float | None = None,
    wire_dtype: Any = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from explicit arguments, else the JAXSURRO_* environment variables, else defaults."""
    env = os.environ if environ is None else environ

    address_form = "the server's control address tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555)"
    if server is None:
        if not env.get(ENV_SERVER):
            raise _missing(ENV_SERVER, address_form)
        server, server_source = env[ENV_SERVER], ENV_SERVER
    else:
        server_source = "server"
    if not isinstance(server, str) or "://" not in server:
        raise _invalid(server_source, address_form, server)

    token_form = f"the run token, {2 * protocol.TOKEN_BYTES} hexadecimal characters"
    if token is None:
        if not env.get(ENV_TOKEN):
            raise _missing(ENV_TOKEN, token_form)
        token, token_source = env[ENV_TOKEN], ENV_TOKEN
    else:
        token_source = "token"
    if isinstance(token, bytes) and len(token) == protocol.TOKEN_BYTES:
        raw_token = token
    elif isinstance(token, str):
        try:
            raw_token = protocol.token_from_hex(token)
        except ValueError:
            raise _invalid(token_source, token_form, token) from None
    else:
        raise _invalid(token_source, f"{token_form} or {protocol.TOKEN_BYTES} raw bytes", token)

    sim_form = f"the simulation id, an integer in [0, 2**64 - 1) or 'any' (= {ANY_SIMULATION})"
    if sim_id is None:
        if not env.get(ENV_SIM_ID):
            raise _missing(ENV_SIM_ID, sim_form)
        text = env[ENV_SIM_ID].strip()
        try:
            sim_id = ANY_SIMULATION if text.lower() == "any" else int(text)
        except ValueError:
            raise _invalid(ENV_SIM_ID, sim_form, text) from None
        sim_source, sim_given = ENV_SIM_ID, text
    else:
        sim_source, sim_given = "sim_id", sim_id
    if isinstance(sim_id, bool) or not isinstance(sim_id, int | np.integer) or not 0 <= sim_id <= ANY_SIMULATION:
        raise _invalid(sim_source, sim_form, sim_given)

    timeout_form = "a positive number of seconds (default 60)"
    if timeout is None:
        text = env.get(ENV_TIMEOUT, "").strip()
        timeout_source, timeout_given = ENV_TIMEOUT, text
        try:
            timeout = float(text) if text else DEFAULT_TIMEOUT
        except ValueError:
            raise _invalid(ENV_TIMEOUT, timeout_form, text) from None
    else:
        timeout_source, timeout_given = "timeout", timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
        timeout > 0 and math.isfinite(timeout)
    ):
        raise _invalid(timeout_source, timeout_form, timeout_given)

    dtype_form = "'float32' (default: halves the traffic) or 'float64'"
    if wire_dtype is None:
        wire_dtype = env.get(ENV_WIRE_DTYPE, "").strip() or DEFAULT_WIRE_DTYPE
        dtype_source = ENV_WIRE_DTYPE
    else:
        dtype_source = "wire_dtype"
    try:
        dtype = np.dtype(wire_dtype).newbyteorder("<")
    except TypeError:
        raise _invalid(dtype_source, dtype_form, wire_dtype) from None
    if dtype not in protocol.DTYPE_TO_CODE:
        raise _invalid(dtype_source, dtype_form, wire_dtype)

    return Settings(server, raw_token, int(sim_id), float(timeout), dtype)


_client_id: tuple[int, int] | None = None  # (pid, id): one random id per process


def process_client_id() -> int:
    """A random 32-bit id for this process, the same for every simulation it runs (new after fork)."""
    global _client_id
    pid = os.getpid()
    if _client_id is None or _client_id[0] != pid:
        _client_id = (pid, int.from_bytes(os.urandom(4), "little"))
    return _client_id[1]


def connect(
    server: str | None = None,
    token: bytes | str | None = None,
    sim_id: int | None = None,
    timeout: float | None = None,
    wire_dtype: Any = None,
    comm: Any = None,
) -> Simulation | ParallelSimulation:
    """Say HELLO to the server, receive the simulation's parameters and data addresses; use as `with`.

    Arguments override the environment variables ENV_*. Raises ServerUnreachable when no answer comes
    within `timeout` seconds, SimulationRejected when the server refuses. With `comm`, an mpi4py
    communicator of more than one rank, it is collective: every rank calls it, rank 0 of `comm` alone
    talks to the server, and every rank gets a ParallelSimulation with the same parameters, or raises
    the root's error (see the module docstring). None or a one-rank communicator: a plain Simulation.
    """
    if comm is not None:
        size = comm.Get_size() if hasattr(comm, "Get_size") else None
        if size is None or (
            size > 1 and not all(hasattr(comm, name) for name in ("Get_rank", "Idup", "Igatherv", "Ibcast"))
        ):
            raise TypeError(
                f"comm must be an mpi4py intracommunicator such as mpi4py.MPI.COMM_WORLD, got {comm!r}"
            )
        if size > 1:
            return _connect_parallel(comm, server, token, sim_id, timeout, wire_dtype)
    settings = resolve_settings(server, token, sim_id, timeout, wire_dtype)
    client_id = process_client_id()
    context = zmq.Context(io_threads=1)
    try:
        welcome = _handshake(context, settings, client_id)
        return Simulation(context, settings, client_id, welcome)
    except BaseException:
        context.destroy(linger=0)
        raise


def _handshake(context: zmq.Context, settings: Settings, client_id: int) -> protocol.Welcome:
    """HELLO on a DEALER to the control socket, wait for WELCOME or REJECT within the timeout."""
    timeout_ms = max(1, round(settings.timeout * 1000))
    unreachable = (
        f"no answer from the jaxsurro server at {settings.server} within {settings.timeout:g} s "
        f"(HELLO for simulation {_sim_text(settings.sim_id)} sent, no WELCOME). Check that the server "
        f"is running, that {ENV_SERVER} (or server=) is its control address, that this host can reach "
        f"it (network, firewall), or raise {ENV_TIMEOUT} (or timeout=) if it is only slow to start."
    )
    dealer = context.socket(zmq.DEALER)
    try:
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDTIMEO, timeout_ms)
        try:
            dealer.connect(settings.server)
        except zmq.ZMQError as error:
            raise ClientConfigurationError(
                f"cannot connect to server address {settings.server!r}: {error}. Expected "
                f"tcp://HOST:PORT in {ENV_SERVER} or server=."
            ) from None
        try:
            dealer.send_multipart(protocol.encode_hello(settings.token, settings.sim_id, client_id))
        except zmq.Again:
            raise ServerUnreachable(unreachable) from None
        if not dealer.poll(timeout_ms, zmq.POLLIN):
            raise ServerUnreachable(unreachable)
        reply = protocol.decode_reply(dealer.recv_multipart())
    finally:
        dealer.close(linger=0)

    if isinstance(reply, protocol.Rejection):
        raise SimulationRejected(
            reply.reason,
            f"the jaxsurro server at {settings.server} refused simulation "
            f"{_sim_text(settings.sim_id)}: {reply.message}",
        )
    if not hmac.compare_digest(reply.token, settings.token):
        raise protocol.ProtocolError(
            "bad_token",
            f"the server at {settings.server} answered with another run's token: {ENV_SERVER} and "
            f"{ENV_TOKEN} belong to different runs",
        )
    if settings.sim_id != ANY_SIMULATION and reply.sim_id != settings.sim_id:
        raise protocol.ProtocolError(
            "unknown_simulation",
            f"asked for simulation {settings.sim_id}, the server welcomed {reply.sim_id}",
        )
    if reply.sim_id == ANY_SIMULATION:
        raise protocol.ProtocolError("malformed", "WELCOME must name a concrete simulation id")
    return reply


def _sim_text(sim_id: int) -> str:
    """Human form of a simulation id."""
    return "ANY" if sim_id == ANY_SIMULATION else str(sim_id)


class Simulation:
    """One simulation's connection: `parameters`, then `send` each step; `finish` or leave the `with`.

    Not thread-safe (ZeroMQ sockets belong to one thread): use it from the thread that connected.
    """

    def __init__(self, context: zmq.Context, settings: Settings, client_id: int, welcome: protocol.Welcome):
        """Open one PUSH socket per server rank (use connect(), not this)."""
        self._context = context
        self._settings = settings
        self._token = settings.token
        self._timeout = settings.timeout
        self._wire_dtype = settings.wire_dtype
        self._wire_code = protocol.DTYPE_TO_CODE[settings.wire_dtype]
        self.client_id = client_id
        self.sim_id = welcome.sim_id
        self.parameters = welcome.parameters  # float64, shape (n_parameters,)
        self.n_steps = welcome.n_steps  # number of steps the server expects, None if unstated
        self.addresses = welcome.addresses  # data address of each server rank
        self.n_ranks = len(welcome.addresses)
        self._sim_offset = self.sim_id % self.n_ranks
        self._field_names: dict[str, bytes] = {}
        self._steps_sent: set[int] = set()
        self.messages_sent = [0] * self.n_ranks  # DATA messages accepted per rank
        timeout_ms = max(1, round(self._timeout * 1000))
        sockets = []
        try:
            for address in self.addresses:
                socket = context.socket(zmq.PUSH)
                sockets.append(socket)
                socket.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
                socket.setsockopt(zmq.SNDTIMEO, timeout_ms)
                socket.setsockopt(zmq.LINGER, timeout_ms)
                socket.connect(address)
        except zmq.ZMQError as error:
            for socket in sockets:
                socket.close(linger=0)
            raise protocol.ProtocolError(
                "malformed", f"the server sent an unusable data address {address!r}: {error}"
            ) from None
        self._sockets: list[zmq.Socket] | None = sockets

    @property
    def closed(self) -> bool:
        """True after finish() or abort()."""
        return self._sockets is None

    @property
    def steps_sent(self) -> int:
        """Number of distinct time steps sent so far (what FINISH reports)."""
        return len(self._steps_sent)

    def __enter__(self) -> Simulation:
        """Use as a context manager: finish on success, abort on an exception."""
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        """FINISH and wait for delivery on success; close without FINISH on an exception (re-raised)."""
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    def send(
        self,
        field: str,
        time_step: int,
        array: Any,
        *,
        start: Sequence[int] | None = None,
        global_shape: Sequence[int] | None = None,
    ) -> None:
        """Send `array` as step `time_step` of `field` to rank (sim_id + time_step) mod n_ranks.

        Converted to the wire dtype (float32 by default) and made C-contiguous only when needed. The
        caller may modify `array` as soon as send returns. Blocks while the server's buffer is full;
        raises TimeoutError after the timeout, never drops data. `start` and `global_shape` are the
        MPI form (ParallelSimulation.send); accepted here so one solver code runs on one process too,
        where the part must then be the whole field.
        """
        sockets = self._sockets
        if sockets is None:
            raise RuntimeError(
                f"simulation {self.sim_id} is closed (finished or aborted): send() must be called "
                "inside the `with client.connect() as sim:` block"
            )
        name = self._field_names.get(field)
        if name is None:
            name = self._register_field(field)
        if type(time_step) is not int:
            time_step = _as_time_step(time_step)
        if not 0 <= time_step <= protocol.MAX_U32:
            raise ValueError(f"time_step must be in [0, 2**32), got {time_step}")
        wire, owned = self._to_wire(field, array)
        if start is not None or global_shape is not None:
            _check_whole_field(field, wire.shape, start, global_shape)
        self._send_wire(sockets, field, name, time_step, wire, owned)

    def _send_assembled(self, field: str, time_step: int, wire: np.ndarray) -> None:
        """Send a whole field the MPI root assembled itself (already wire dtype, ours: no copy)."""
        sockets = self._sockets
        if sockets is None:
            raise RuntimeError(f"simulation {self.sim_id} is closed (finished or aborted)")
        name = self._field_names.get(field) or self._register_field(field)
        self._send_wire(sockets, field, name, time_step, wire, owned=True)

    def _send_wire(
        self, sockets: list[zmq.Socket], field: str, name: bytes, time_step: int, wire: np.ndarray, owned: bool
    ) -> None:
        """Route and send one checked wire array; count it."""
        n_ranks = self.n_ranks
        rank = (self._sim_offset + time_step % n_ranks) % n_ranks
        header = protocol.encode_header(
            protocol.DATA, self._token, self.sim_id, time_step, self.client_id, self._wire_code, wire.shape
        )
        try:
            # An array we converted is ours: hand it to ZeroMQ without copying. One that aliases the
            # caller's memory is copied once, so the caller may overwrite it right away.
            sockets[rank].send_multipart([header, name, wire], copy=not owned)
        except zmq.Again:
            raise TimeoutError(
                f"server rank {rank} ({self.addresses[rank]}) did not accept data for {self._timeout:g} s: "
                f"the server is not accepting data (its buffer is full and it stopped reading, or it is "
                f"gone). Step {time_step} of {field!r} was not sent; nothing was dropped. Raise "
                f"{ENV_TIMEOUT} (or timeout=) if the server is only slow."
            ) from None
        self._steps_sent.add(time_step)
        self.messages_sent[rank] += 1

    def _register_field(self, field: str) -> bytes:
        """Check and cache the UTF-8 form of a field name."""
        if not isinstance(field, str):
            raise TypeError(f"field must be a str name such as 'temperature', got {type(field).__name__}")
        encoded = field.encode()
        if not 0 < len(encoded) <= protocol.MAX_FIELD_NAME_BYTES:
            raise ValueError(
                f"field name must be 1..{protocol.MAX_FIELD_NAME_BYTES} UTF-8 bytes, got {field!r} "
                f"({len(encoded)} bytes)"
            )
        self._field_names[field] = encoded
        return encoded

    def _to_wire(self, field: str, array: Any) -> tuple[np.ndarray, bool]:
        """C-contiguous wire-dtype array and whether it is a fresh copy owned by us."""
        values = np.asarray(array)
        if values.dtype.kind not in "fiu":
            raise TypeError(
                f"field {field!r}: expected a real numeric array (float or int), got dtype {values.dtype}"
            )
        if values.ndim > protocol.MAX_NDIM:
            raise ValueError(
                f"field {field!r}: at most {protocol.MAX_NDIM} dimensions, got shape {values.shape}; "
                "reshape it (the server knows the expected shape)"
            )
        if any(d > protocol.MAX_U32 for d in values.shape):
            raise ValueError(f"field {field!r}: each dimension must be < 2**32, got {values.shape}")
        wire = np.asarray(values, dtype=self._wire_dtype, order="C")
        owned = wire is not array and wire.base is None
        return wire, owned

    def finish(self) -> None:
        """Send FINISH to every rank and close, waiting up to the timeout for all data to be delivered.

        Raises TimeoutError when the queued messages could not be delivered within the timeout.
        """
        sockets = self._sockets
        if sockets is None:
            raise RuntimeError(f"simulation {self.sim_id} is already closed")
        frames = protocol.encode_finish(self._token, self.sim_id, self.client_id, len(self._steps_sent))
        for rank, socket in enumerate(sockets):
            try:
                socket.send_multipart(frames)
            except zmq.Again:
                self._close(0.0)
                raise TimeoutError(
                    f"server rank {rank} ({self.addresses[rank]}) did not accept FINISH for "
                    f"{self._timeout:g} s: the server is not accepting data. Simulation {self.sim_id} "
                    "is incomplete on the server."
                ) from None
        elapsed = self._close(self._timeout)
        # ctx.term() returns as soon as every queued message is handed to TCP, or when the linger
        # expires and libzmq drops what is left: taking (almost) the whole linger means data was lost.
        if elapsed >= 0.98 * self._timeout:
            raise TimeoutError(
                f"simulation {self.sim_id}: the last messages could not be delivered to the server "
                f"({', '.join(self.addresses)}) within {self._timeout:g} s and were dropped at close; "
                "the server is not accepting data or a rank is unreachable. The simulation is "
                f"incomplete on the server. Raise {ENV_TIMEOUT} (or timeout=) if the server is only slow."
            )

    def abort(self) -> None:
        """Close without FINISH (the server sees the simulation as incomplete); best-effort delivery."""
        if self._sockets is not None:
            self._close(min(self._timeout, ABORT_LINGER))

    def _close(self, linger: float) -> float:
        """Close every socket with `linger` seconds to deliver queued messages; return the seconds taken."""
        sockets, self._sockets = self._sockets, None
        linger_ms = round(linger * 1000)
        for socket in sockets or ():
            socket.close(linger=linger_ms)
        start = time.monotonic()
        self._context.term()
        return time.monotonic() - start


def _as_time_step(time_step: Any) -> int:
    """Accept Python and NumPy integers (not bool, not float) as a time step."""
    if isinstance(time_step, bool | np.bool_):
        raise TypeError(f"time_step must be an integer, got {time_step!r}")
    try:
        return operator.index(time_step)
    except TypeError:
        raise TypeError(
            f"time_step must be a non-negative integer, got {time_step!r} ({type(time_step).__name__})"
        ) from None


def _check_whole_field(
    field: str, shape: tuple[int, ...], start: Sequence[int] | None, global_shape: Sequence[int] | None
) -> None:
    """With one process the part given with start=/global_shape= must be the whole field."""
    origin = (0,) * len(shape)
    given_start = origin if start is None else tuple(start)
    given_global = shape if global_shape is None else tuple(global_shape)
    if given_start != origin or given_global != shape:
        raise ValueError(
            f"field {field!r}: a client without an MPI communicator (or with one rank) sends whole "
            f"fields, so the part must start at {origin} and have the global shape; got a part of shape "
            f"{shape} at start={given_start} in global_shape={given_global}. Pass comm= to connect() "
            "so that every rank's part is assembled, or send the whole field."
        )


# ----------------------------------------------------------------------------- MPI-parallel clients

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
(_A_ERROR, _A_PAYLOAD, _A_REASON, _A_SIM, _A_STEPS, _A_CLIENT, _A_RANKS, _A_PARAMETERS, _A_DTYPE,
 _A_TIMEOUT) = range(_ANNOUNCE_SIZE)


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
        raise ValueError(
            f"global_shape {global_shape} has {total} elements; MPI gathers at most 2**31 - 1 per field"
        )
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
        if box[0].start != next_row or any(
            (s.start, s.stop) != (0, g) for s, g in zip(box[1:], global_shape[1:])
        ):
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
    code = next(
        (i + 1 for i, kind in enumerate(_SHARED_ERRORS) if isinstance(error, kind)), len(_SHARED_ERRORS)
    )
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


def _connect_parallel(
    comm: Any,
    server: str | None,
    token: bytes | str | None,
    sim_id: int | None,
    timeout: float | None,
    wire_dtype: Any,
) -> ParallelSimulation:
    """Collective connect: rank 0 shakes hands with the server, then tells every rank the outcome."""
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
        simulation = connect(server, token, sim_id, timeout, wire_dtype)
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
    header[_A_DTYPE] = protocol.DTYPE_TO_CODE[simulation._wire_dtype]
    header[_A_TIMEOUT:] = np.array([simulation._timeout], dtype=np.float64).view(np.uint64)
    payload = np.ascontiguousarray(simulation.parameters, dtype="<f8").tobytes()
    payload += "\n".join(simulation.addresses).encode()
    header[_A_PAYLOAD] = len(payload)
    try:
        _publish(comm, header, payload, time.monotonic() + simulation._timeout + _GRACE_SECONDS)
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
        timeout=simulation._timeout,
        wire_dtype=simulation._wire_dtype,
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
        if not isinstance(field, str) or not 0 < len(field.encode()) <= protocol.MAX_FIELD_NAME_BYTES:
            raise ValueError(
                f"field must be a str name of 1..{protocol.MAX_FIELD_NAME_BYTES} UTF-8 bytes such as "
                f"'temperature', got {field!r}"
            )
        metadata[_META_FIELD] = zlib.crc32(field.encode())
        step = time_step if type(time_step) is int else _as_time_step(time_step)
        if not 0 <= step <= protocol.MAX_U32:
            raise ValueError(f"time_step must be in [0, 2**32), got {step}")
        metadata[_META_STEP] = step
        if part is None:
            metadata[_META_STATUS] = _PART_NONE
            return _Part(metadata, empty, None)
        values = np.asarray(part)
        if values.dtype.kind not in "fiu":
            raise TypeError(
                f"field {field!r}: expected a real numeric array (float or int), got dtype {values.dtype}"
            )
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


class ParallelSimulation:
    """One simulation streamed by an MPI-parallel solver: every rank sends its part, the root the whole.

    Made by connect(comm=...) on every rank (collective). `parameters`, `sim_id`, `n_steps` are the same
    on every rank. send() and finish() are collective: every rank calls them in the same order. Only the
    root (rank 0 of the communicator) talks to the server; its errors are raised on every rank.
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
        self.timeout = timeout
        self._wire_dtype = wire_dtype
        self._plans: dict[str, tuple[bytes, AssemblyPlan]] = {}  # root: last layout per field
        self._steps_sent: set[int] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        """True after finish() or abort()."""
        return self._closed

    @property
    def steps_sent(self) -> int:
        """Number of distinct time steps sent so far (the same on every rank)."""
        return len(self._steps_sent)

    def __enter__(self) -> ParallelSimulation:
        """Use as a context manager: finish (collective) on success, abort (local) on an exception."""
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        """FINISH on success; close without FINISH on an exception (re-raised)."""
        if exc_type is None:
            self.finish()
        else:
            self.abort()

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
        local = _prepare_part(field, time_step, part, start, global_shape, self._wire_dtype)
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
            field_array = np.empty(plan.global_shape, dtype=self._wire_dtype)
            receive = field_array.reshape(-1) if plan.boxes is None else np.empty(sum(counts), self._wire_dtype)
            displacements = plan.displacements
        else:
            field_array, receive = None, np.empty(sum(counts), dtype=self._wire_dtype)
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
            self.root_simulation._send_assembled(field, int(local.metadata[_META_STEP]), field_array)
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
        layout = metadata[:, _META_STATUS:_META_STATUS + 1].tobytes() + metadata[:, _META_NDIM:].tobytes()
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
