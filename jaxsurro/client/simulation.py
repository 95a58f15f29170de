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
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import zmq

from jaxsurro import protocol

if TYPE_CHECKING:
    from jaxsurro.client import parallel as parallel_client

ENV_SERVER = "JAXSURRO_SERVER"
ENV_TOKEN = "JAXSURRO_TOKEN"
ENV_SIM_ID = "JAXSURRO_SIM_ID"
ENV_TIMEOUT = "JAXSURRO_TIMEOUT"
ENV_WIRE_DTYPE = "JAXSURRO_WIRE_DTYPE"
ENV_ATTEMPT = "JAXSURRO_ATTEMPT"  # 1 for a simulation's first run, 2 for its first restart...
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
) -> Simulation | parallel_client.ParallelSimulation:
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
            from jaxsurro.client.parallel import _connect_parallel

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


_PARALLEL_NAMES = frozenset({'AssemblyPlan', 'ClientRankTimeout', 'MPI_MAX_ELEMENTS', 'ParallelSimulation', 'plan_assembly'})


def __getattr__(name: str) -> Any:
    """The MPI-parallel client's public names, loaded on first use (jaxsurro.client.parallel)."""
    if name in _PARALLEL_NAMES:
        from jaxsurro.client import parallel as parallel_client

        return getattr(parallel_client, name)
    raise AttributeError(f"module 'jaxsurro.client' has no attribute {name!r}")
