"""The single-process client: one simulation's HELLO/WELCOME handshake, DATA per step, FINISH at the end.

Numpy and pyzmq only, never JAX or mpi4py. Use it through :func:`jaxsurro.client.connect`;
:class:`Simulation` is also what the root of an MPI-parallel client (:mod:`jaxsurro.client.parallel`)
speaks to the server through, with :meth:`Simulation.open` and :meth:`Simulation.send_assembled`.
The messages are those of docs/protocol.md (encoded by jaxsurro.protocol); how they flow through the
system: docs/architecture.md, sections "Data path" and "Wire protocol".
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hmac
import logging
import os
import time
from collections.abc import Sequence
from socket import SOCK_DGRAM, getaddrinfo
from socket import socket as probe_socket
from typing import Any, Self

import numpy as np
import zmq

from jaxsurro import protocol
from jaxsurro.client.settings import (
    ANY_SIMULATION,
    ENV_CLIENT_ID,
    ENV_SERVER,
    ENV_SERVER_KEY,
    ENV_TIMEOUT,
    ENV_TOKEN,
    ClientConfigurationError,
    ServerUnreachable,
    Settings,
    SimulationRejected,
    check_field_name,
    check_real_array,
    check_time_step,
)

log = logging.getLogger(__name__)

# Messages queued per server rank inside this process before send() blocks (backpressure).
SEND_HIGH_WATER_MARK = 4
# On an exception inside the with-block, queued data gets at most this long to leave (best effort).
ABORT_LINGER = 1.0  # seconds

_client_id: tuple[int, int] | None = None  # (pid, id): one random id per process


def process_client_id() -> int:
    """This process's 32-bit client id, the same for every simulation it runs: the launcher's
    (ENV_CLIENT_ID, for a persistent client it started) or a random one (new after fork)."""
    global _client_id
    pid = os.getpid()
    if _client_id is None or _client_id[0] != pid:
        given = os.environ.get(ENV_CLIENT_ID, "").strip()
        if given and not (given.isdigit() and int(given) <= protocol.MAX_U32):
            raise ClientConfigurationError(f"{ENV_CLIENT_ID} must be an integer in [0, 2**32), got {given!r}")
        _client_id = (pid, int(given) if given else int.from_bytes(os.urandom(4), "little"))
    return _client_id[1]


def encrypt(socket: zmq.Socket, server_key: bytes | None, keys: tuple[bytes, bytes]) -> None:
    """Makes ``socket`` a CURVE client of the server whose public key is ``server_key``, with this
    client's key pair ``keys`` (before it connects); None leaves it in clear text."""
    if server_key is not None:
        socket.curve_serverkey = server_key
        socket.curve_publickey, socket.curve_secretkey = keys


def _handshake(context: zmq.Context, settings: Settings, client_id: int) -> protocol.Welcome:
    """HELLO on a DEALER to the control socket, wait for WELCOME or REJECT within the timeout."""
    timeout_ms = max(1, round(settings.timeout * 1000))
    unreachable = (
        f"no answer from the jaxsurro server at {settings.server} within {settings.timeout:g} s "
        f"(HELLO for simulation {_sim_text(settings.sim_id)} sent, no WELCOME). Check that the server "
        f"is running, that {ENV_SERVER} (or server=) is its control address, that this host can reach "
        f"it (network, firewall), that {ENV_SERVER_KEY} holds the server's public key if the run encrypts "
        f'(server.encryption = "curve"), or raise {ENV_TIMEOUT} (or timeout=) if it is only slow to start.'
    )
    dealer = context.socket(zmq.DEALER)
    try:
        encrypt(dealer, settings.server_key, _curve_keys(settings))
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
            declaration = None
            if settings.fields is not None:
                declaration = protocol.encode_declaration(
                    {name: (shape, settings.wire_dtype) for name, shape in settings.fields.items()}
                )
            dealer.send_multipart(protocol.encode_hello(settings.token, settings.sim_id, client_id, declaration))
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


_keys: tuple[int, tuple[bytes, bytes]] | None = None  # (pid, CURVE key pair): one per process


def _curve_keys(settings: Settings) -> tuple[bytes, bytes]:
    """This process's CURVE key pair when the run encrypts (drawn once), else empty keys."""
    global _keys
    if settings.server_key is None:
        return b"", b""
    if _keys is None or _keys[0] != os.getpid():
        _keys = (os.getpid(), zmq.curve_keypair())
    return _keys[1]


def _sim_text(sim_id: int) -> str:
    """Human form of a simulation id."""
    return "ANY" if sim_id == ANY_SIMULATION else str(sim_id)


class SimulationContext(abc.ABC):
    """What Simulation and ParallelSimulation share: the `with` protocol and the count of steps sent.

    A subclass keeps the distinct time steps it sent in `_steps_sent` and defines finish() and abort().
    """

    _steps_sent: set[int]

    @property
    def steps_sent(self) -> int:
        """Number of distinct time steps sent so far (what FINISH reports; the same on every MPI rank)."""
        return len(self._steps_sent)

    @abc.abstractmethod
    def finish(self) -> None:
        """Send FINISH and close (defined by each kind of simulation)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Close without FINISH (defined by each kind of simulation)."""

    def __enter__(self) -> Self:
        """Use as a context manager: finish on success, abort on an exception."""
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        """finish() on success (FINISH, then wait for delivery); abort() on an exception, which is re-raised."""
        if exc_type is None:
            self.finish()
        else:
            self.abort()


class Simulation(SimulationContext):
    """One simulation's connection: `parameters`, then `send` each step; `finish` or leave the `with`.

    Public attributes: `sim_id`, `parameters` (float64), `n_steps` (None if unstated), `addresses` and
    `n_ranks` (server ranks), `client_id`, `messages_sent` (DATA per rank), `timeout` (seconds) and
    `wire_dtype` (the dtype every field travels in). Not thread-safe (ZeroMQ sockets belong to one
    thread): use it from the thread that connected.
    """

    def __init__(self, context: zmq.Context, settings: Settings, client_id: int, welcome: protocol.Welcome):
        """Open one DEALER socket per server rank on `context`, which it then owns (use open() or connect())."""
        self._context = context
        self._credential = welcome.credential  # this attempt's: DATA and FINISH carry it
        self._wire_code = protocol.DTYPE_TO_CODE[settings.wire_dtype]
        self.timeout = settings.timeout  # seconds
        self.wire_dtype = settings.wire_dtype  # little-endian float32 or float64
        self.client_id = client_id
        self.sim_id = welcome.sim_id
        self.parameters = welcome.parameters  # float64, shape (n_parameters,)
        self.n_steps = welcome.n_steps  # number of steps the server expects, None if unstated
        # The endpoint used for each server rank: its Unix socket when it offers one and runs on this host.
        self.addresses = tuple(choose_endpoint(protocol.split_endpoints(entry)) for entry in welcome.addresses)
        self.n_ranks = len(welcome.addresses)
        self._field_names: dict[str, bytes] = {}
        self.fields = settings.fields  # {name: shape} declared at HELLO, or None (the server then checks each message)
        self._steps_sent: set[int] = set()
        self.messages_sent = [0] * self.n_ranks  # DATA messages accepted per rank
        timeout_ms = max(1, round(self.timeout * 1000))
        sockets = []
        keys = _curve_keys(settings)
        try:
            for address in self.addresses:
                # A DEALER to the rank's ROUTER: sends block at the high-water mark like a PUSH, and
                # the rank's RECEIVED comes back on the same connection.
                socket = context.socket(zmq.DEALER)
                sockets.append(socket)
                encrypt(socket, settings.server_key, keys)
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

    @classmethod
    def open(cls, settings: Settings) -> Simulation:
        """Say HELLO to the server of `settings`, get WELCOME, connect to every server rank.

        Raises ServerUnreachable when no answer comes within the timeout, SimulationRejected when the
        server refuses, ClientConfigurationError for an unusable address. What connect() does for a
        single process, and what the root of an MPI-parallel client does for all its ranks.
        """
        client_id = process_client_id()
        context = zmq.Context(io_threads=1)
        try:
            welcome = _handshake(context, settings, client_id)
            return cls(context, settings, client_id, welcome)
        except BaseException:
            context.destroy(linger=0)
            raise

    @property
    def closed(self) -> bool:
        """True after finish() or abort()."""
        return self._sockets is None

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
        sockets = self._open_sockets()
        name = self._field_names.get(field) or self._register_field(field)
        time_step = check_time_step(time_step)
        wire, owned = self._to_wire(field, array)
        if start is not None or global_shape is not None:
            _check_whole_field(field, wire.shape, start, global_shape)
        self._send_wire(sockets, field, name, time_step, wire, owned)

    def send_assembled(self, field: str, time_step: int, array: np.ndarray) -> None:
        """Send a whole field handed over without a copy: C-contiguous, already in `wire_dtype`.

        ZeroMQ sends `array` itself, possibly after this returns: the caller must not modify it
        afterwards (the root of an MPI-parallel client sends the field it has just assembled this
        way). Same routing, backpressure and errors as send(); ValueError for any other array.
        """
        sockets = self._open_sockets()
        name = self._field_names.get(field) or self._register_field(field)
        time_step = check_time_step(time_step)
        if not isinstance(array, np.ndarray) or array.dtype != self.wire_dtype or not array.flags.c_contiguous:
            raise ValueError(
                f"field {field!r}: send_assembled takes a C-contiguous {self.wire_dtype} NumPy array, got "
                f"{type(array).__name__} {getattr(array, 'dtype', '')}; use send() for any other array"
            )
        if self.fields is not None and array.shape != self.fields[field]:
            raise ValueError(
                f"field {field!r} was declared with shape {self.fields[field]} to connect(fields=...), got "
                f"an array of shape {array.shape}"
            )
        self._send_wire(sockets, field, name, time_step, array, owned=True)

    def _open_sockets(self) -> list[zmq.Socket]:
        """The data sockets; RuntimeError once the simulation is closed."""
        sockets = self._sockets
        if sockets is None:
            raise RuntimeError(
                f"simulation {self.sim_id} is closed (finished or aborted): send() must be called "
                "inside the `with client.connect() as sim:` block"
            )
        return sockets

    def _send_wire(
        self, sockets: list[zmq.Socket], field: str, name: bytes, time_step: int, wire: np.ndarray, owned: bool
    ) -> None:
        """Route and send one checked wire array; count it."""
        rank = protocol.rank_for(self.sim_id, time_step, self.n_ranks)
        header = protocol.encode_header(
            protocol.DATA, self._credential, self.sim_id, time_step, self.client_id, self._wire_code, wire.shape
        )
        try:
            # An array we converted is ours: hand it to ZeroMQ without copying. One that aliases the
            # caller's memory is copied once, so the caller may overwrite it right away.
            sockets[rank].send_multipart([header, name, wire], copy=not owned)
        except zmq.Again:
            raise TimeoutError(
                f"server rank {rank} ({self.addresses[rank]}) did not accept data for {self.timeout:g} s: "
                f"the server is not accepting data (its buffer is full and it stopped reading, or it is "
                f"gone). Step {time_step} of {field!r} was not sent; nothing was dropped. Raise "
                f"{ENV_TIMEOUT} (or timeout=) if the server is only slow."
            ) from None
        self._steps_sent.add(time_step)
        self.messages_sent[rank] += 1

    def _register_field(self, field: str) -> bytes:
        """Check and cache the UTF-8 form of a field name (one of the declared fields, when declared)."""
        encoded = check_field_name(field)
        if self.fields is not None and field not in self.fields:
            raise ValueError(
                f"field {field!r} was not declared to connect(fields=...); the declared fields are "
                f"{', '.join(f'{name} {list(shape)}' for name, shape in self.fields.items())}"
            )
        self._field_names[field] = encoded
        return encoded

    def _to_wire(self, field: str, array: Any) -> tuple[np.ndarray, bool]:
        """C-contiguous wire-dtype array and whether it is a fresh copy owned by us."""
        values = check_real_array(field, array)
        if values.ndim > protocol.MAX_NDIM:
            raise ValueError(
                f"field {field!r}: at most {protocol.MAX_NDIM} dimensions, got shape {values.shape}; "
                "reshape it (the server knows the expected shape)"
            )
        if any(d > protocol.MAX_U32 for d in values.shape):
            raise ValueError(f"field {field!r}: each dimension must be < 2**32, got {values.shape}")
        if self.fields is not None and field in self.fields and values.shape != self.fields[field]:
            raise ValueError(
                f"field {field!r} was declared with shape {self.fields[field]} to connect(fields=...), got "
                f"an array of shape {values.shape}"
            )
        wire = np.asarray(values, dtype=self.wire_dtype, order="C")
        owned = wire is not array and wire.base is None
        return wire, owned

    def finish(self) -> None:
        """Send FINISH to every rank, wait up to the timeout for every rank's RECEIVED, and close.

        RECEIVED from a rank means that all this simulation sent it has arrived, so nothing is in
        flight at close. Raises TimeoutError when a rank does not answer within the timeout.
        """
        sockets = self._sockets
        if sockets is None:
            raise RuntimeError(f"simulation {self.sim_id} is already closed")
        deadline = time.monotonic() + self.timeout
        frames = protocol.encode_finish(self._credential, self.sim_id, self.client_id, len(self._steps_sent))
        for rank, socket in enumerate(sockets):
            try:
                socket.send_multipart(frames)
            except zmq.Again:
                self._close(0.0)
                raise TimeoutError(
                    f"server rank {rank} ({self.addresses[rank]}) did not accept FINISH for "
                    f"{self.timeout:g} s: the server is not accepting data. Simulation {self.sim_id} "
                    "is incomplete on the server."
                ) from None
        try:
            self._await_receipts(sockets, deadline)
        finally:
            self._close(0.0)

    def _await_receipts(self, sockets: list[zmq.Socket], deadline: float) -> None:
        """Wait until every rank answered this attempt's FINISH (RECEIVED), or raise TimeoutError."""
        waiting = {socket: rank for rank, socket in enumerate(sockets)}
        poller = zmq.Poller()
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        while waiting:
            remaining_ms = max(0, round((deadline - time.monotonic()) * 1000))
            ready = dict(poller.poll(remaining_ms))
            if not ready:
                ranks = sorted(waiting.values())
                raise TimeoutError(
                    f"simulation {self.sim_id}: server rank(s) {ranks} ("
                    f"{', '.join(self.addresses[rank] for rank in ranks)}) did not confirm FINISH within "
                    f"{self.timeout:g} s, so what was sent last may not have arrived; the server is not "
                    "accepting data or a rank is unreachable. The simulation may be incomplete on the "
                    f"server. Raise {ENV_TIMEOUT} (or timeout=) if the server is only slow."
                )
            for socket in ready:
                receipt = protocol.decode_received(socket.recv_multipart())
                if receipt.sim_id != self.sim_id or not hmac.compare_digest(receipt.credential, self._credential):
                    raise protocol.ProtocolError(
                        "malformed",
                        f"server rank {waiting[socket]} answered a FINISH of simulation {receipt.sim_id}, not the "
                        f"one simulation {self.sim_id} sent on this connection",
                    )
                if receipt.refusal:
                    log.warning(
                        "server rank %d refused the FINISH of simulation %d: %s",
                        waiting[socket],
                        self.sim_id,
                        receipt.refusal,
                    )
                poller.unregister(socket)
                del waiting[socket]

    def abort(self) -> None:
        """Close without FINISH (the server sees the simulation as incomplete); best-effort delivery."""
        if self._sockets is not None:
            self._close(min(self.timeout, ABORT_LINGER))

    def _close(self, linger: float) -> float:
        """Close every socket with `linger` seconds to deliver queued messages; return the seconds taken."""
        sockets, self._sockets = self._sockets, None
        linger_ms = round(linger * 1000)
        for socket in sockets or ():
            socket.close(linger=linger_ms)
        start = time.monotonic()
        self._context.term()
        return time.monotonic() - start


def choose_endpoint(endpoints: Sequence[str]) -> str:
    """The endpoint of a server rank to send to: a Unix socket it offers (``ipc://``) when its network
    endpoint is on this host, else the network endpoint (the first)."""
    network = endpoints[0]
    local = next((endpoint for endpoint in endpoints[1:] if endpoint.startswith("ipc://")), None)
    host = network.removeprefix("tcp://").rpartition(":")[0] if network.startswith("tcp://") else None
    return local if local is not None and host is not None and _is_this_host(host) else network


@functools.cache
def _is_this_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is an address of this machine, in this network namespace:
    a socket can bind to it only then."""
    host = host.strip("[]")  # an IPv6 address in an endpoint
    try:
        addresses = getaddrinfo(host, None, type=SOCK_DGRAM)
    except (OSError, UnicodeError, ValueError):  # unknown name, bad IDNA, NUL character
        return False
    for family, kind, _, _, address in addresses:
        with contextlib.suppress(OSError), probe_socket(family, kind) as probe:
            probe.bind((address[0], 0, *address[2:]))
            return True
    return False


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
