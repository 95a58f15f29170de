"""Wire protocol between solver clients and the training server: header codec, routing and validation.

Every message is a ZeroMQ multipart message whose first frame is a fixed 64-byte little-endian header
(layout in `HEADER_FORMAT` and docs/protocol.md). This module is pure (no sockets, no JAX): the client
encodes with it, the server's receiver decodes and validates with it. A bad message raises
`ProtocolError` with a stable short `reason` (one of `REJECTION_REASONS`) so the server can count it
and keep running.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import math
import secrets
import struct
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

MAGIC = b"JXSR"
# Version 2: DATA and FINISH carry the attempt's credential (from WELCOME) where version 1 carried the run token.
# Version 3: data sockets are DEALER (client) to ROUTER (server rank), each FINISH is answered with RECEIVED,
# and a WELCOME's address of a rank may list a host-local endpoint after the network one.
VERSION = 3

# Message kinds (header byte 6).
HELLO = 1
WELCOME = 2
DATA = 3
FINISH = 4
REJECT = 5
RECEIVED = 6  # a server rank's answer to FINISH on the data socket: everything sent before it has arrived
KIND_NAMES = {
    HELLO: "HELLO",
    WELCOME: "WELCOME",
    DATA: "DATA",
    FINISH: "FINISH",
    REJECT: "REJECT",
    RECEIVED: "RECEIVED",
}

# Payload dtype codes (header byte 7); payloads are always little-endian.
DTYPE_NONE = 0
DTYPE_FLOAT32 = 1
DTYPE_FLOAT64 = 2
CODE_TO_DTYPE: dict[int, np.dtype] = {DTYPE_FLOAT32: np.dtype("<f4"), DTYPE_FLOAT64: np.dtype("<f8")}
DTYPE_TO_CODE: dict[np.dtype, int] = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}

TOKEN_BYTES = 16
CREDENTIAL_BYTES = TOKEN_BYTES  # an attempt's credential travels in the header's token field
SECRET_BYTES = 32  # the server's credential key; it never leaves the server's ranks
MAX_NDIM = 4
MAX_FIELD_NAME_BYTES = 64
MAX_U32 = 2**32 - 1
MAX_U64 = 2**64 - 1
# sim_id meaning "give me any simulation": reserved for persistent clients asking for their next one.
ANY_SIMULATION = MAX_U64

# magic, version, kind, dtype, token, sim_id, time_step, client_id, ndim, reserved[3], shape[4], reserved u32.
# Offsets: 0, 4, 6, 7, 8, 24, 32, 36, 40, 41, 44..59, 60. Naturally aligned, so a C struct of these
# fields in this order has no padding and is exactly 64 bytes.
HEADER_FORMAT = "<4sHBB16sQIIB3s4II"
HEADER = struct.Struct(HEADER_FORMAT)
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 64, HEADER_SIZE

_ZERO_TOKEN = bytes(TOKEN_BYTES)
_ZERO_RESERVED = bytes(3)

REJECTION_REASONS: tuple[str, ...] = (
    "malformed",
    "bad_magic",
    "bad_version",
    "bad_token",
    "bad_credential",
    "stale_attempt",
    "unknown_simulation",
    "time_step_out_of_range",
    "wrong_rank",
    "unknown_field",
    "bad_dtype",
    "bad_shape",
    "bad_size",
    "non_finite",
    "field_mismatch",
    "out_of_bounds",
)
# REJECT reason code for a HELLO asking for ANY_SIMULATION when none is left to hand out.
NO_SIMULATION_LEFT = "no_simulation_left"


class ProtocolError(Exception):
    """A message that breaks the protocol; `reason` is a stable short code for counting rejections."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"[{reason}] {message}")
        self.reason = reason
        self.message = message


class Header(NamedTuple):
    """Decoded 64-byte header; `shape` has `ndim` entries, `dtype_code` is 0 (none), 1 (f32) or 2 (f64)."""

    kind: int
    dtype_code: int
    token: bytes  # 16 raw bytes
    sim_id: int  # u64; ANY_SIMULATION only in HELLO
    time_step: int  # u32; DATA: step index, FINISH: number of steps sent, WELCOME: steps expected (0 = unstated)
    client_id: int  # u32, chosen by the client process
    shape: tuple[int, ...]
    version: int = VERSION

    @property
    def ndim(self) -> int:
        """Number of dimensions of the payload."""
        return len(self.shape)


_new_header = functools.partial(tuple.__new__, Header)  # skips NamedTuple's Python-level __new__
_ZERO_DIMS = (0, 0, 0, 0)


class Welcome(NamedTuple):
    """A decoded WELCOME: the simulation to run, where to send data, its parameters and the attempt's credential."""

    sim_id: int
    client_id: int
    token: bytes  # the run token (the client checks that the server holds it)
    n_steps: int | None  # None when the server did not state it
    addresses: tuple[str, ...]  # data endpoints of each server rank, in rank order (split_endpoints)
    parameters: np.ndarray  # float64, shape (n_parameters,)
    credential: bytes  # what this attempt's DATA and FINISH carry in the header's token field


class Rejection(NamedTuple):
    """A decoded REJECT: why the server refused a HELLO."""

    sim_id: int
    client_id: int
    reason: str  # short code, e.g. "bad_token", "unknown_simulation", "no_simulation_left"
    message: str  # full human-readable text as sent


class Receipt(NamedTuple):
    """A decoded RECEIVED: a server rank took (or refused) a FINISH, so all that was sent before it arrived."""

    sim_id: int
    credential: bytes  # the FINISH's, echoed: the client matches the receipt to its attempt
    n_steps: int  # the FINISH's count of steps sent
    refusal: str  # "" when the FINISH was taken, else "reason: message" as the server counted it


class Received(NamedTuple):
    """A validated message from a data socket: DATA (field and array set) or FINISH (time_step = steps sent)."""

    kind: int
    sim_id: int
    time_step: int
    client_id: int
    field: str | None
    array: np.ndarray | None  # zero-copy view of the payload frame


def new_token() -> bytes:
    """A fresh random 16-byte run credential (give clients `token.hex()`)."""
    return secrets.token_bytes(TOKEN_BYTES)


def token_from_hex(text: str) -> bytes:
    """Parse the 32-hex-character form of a run token; ValueError with the expected form otherwise."""
    text = text.strip()
    try:
        token = bytes.fromhex(text)
    except ValueError:
        token = b""
    if len(token) != TOKEN_BYTES or len(text) != 2 * TOKEN_BYTES:
        raise ValueError(
            f"a run token is {2 * TOKEN_BYTES} hexadecimal characters (e.g. {new_token().hex()}), "
            f"got {text!r} ({len(text)} characters)"
        )
    return token


def new_secret() -> bytes:
    """A fresh random key for :class:`AttemptCredentials` (one per server start, shared by its ranks only)."""
    return secrets.token_bytes(SECRET_BYTES)


_CREDENTIAL_TAG = b"jaxsurro attempt credential"
# Simulation ids below this have their current credential in AttemptCredentials' dense array (16 bytes
# each, grown on demand up to 64 MiB); a larger id is checked one message at a time.
DENSE_SIMULATIONS = 2**22
_SIM_ATTEMPT = struct.Struct("<QI")


def attempt_of(credential: bytes) -> int:
    """The attempt number a credential claims (its first 4 bytes, little-endian u32; 0 is never issued)."""
    return int.from_bytes(credential[:4], "little")


class AttemptCredentials:
    """Credentials bound to (simulation, attempt): what DATA and FINISH must carry instead of the run token.

    A credential is the attempt number (u32, little-endian) followed by the first 12 bytes of
    HMAC-SHA256(secret, tag || sim_id u64 || attempt u32). The secret never leaves the server, so a
    holder of the run token cannot make one: it gets one only in the WELCOME to an accepted HELLO, and
    the server welcomes one HELLO per attempt. Any server rank checks a credential with the secret
    alone. A simulation's current attempt is the latest issued here (rank 0, at WELCOME) or seen valid
    here (the other ranks, from its first message); a valid credential of an earlier attempt is stale.
    The hot path is one dictionary lookup and a 16-byte comparison. Not thread-safe: the receiver
    thread owns it.
    """

    def __init__(self, secret: bytes):
        if len(secret) < TOKEN_BYTES:
            raise ValueError(f"a credential secret has at least {TOKEN_BYTES} bytes, got {len(secret)}")
        self._secret = bytes(secret)
        self._current: dict[int, bytes] = {}  # sim_id -> its current attempt's credential
        # The same, as rows of two little-endian u64 words indexed by sim_id (zeros: none yet; the last
        # row always zeros), for the batched check (`current_rows`); simulations from
        # DENSE_SIMULATIONS on are in the dictionary only.
        self._dense = np.zeros((1, 2), dtype="<u8")

    def make(self, sim_id: int, attempt: int) -> bytes:
        """The credential of attempt ``attempt`` (>= 1) of simulation ``sim_id``."""
        if not 1 <= attempt <= MAX_U32:
            raise ValueError(f"an attempt number is in [1, 2**32), got {attempt}")
        packed = _SIM_ATTEMPT.pack(sim_id, attempt)
        digest = hmac.new(self._secret, _CREDENTIAL_TAG + packed, "sha256").digest()
        return packed[8:] + digest[: CREDENTIAL_BYTES - 4]

    def issue(self, sim_id: int, attempt: int) -> bytes:
        """Rank 0, on WELCOME: the attempt's credential, which from now on is the simulation's current one."""
        credential = self.make(sim_id, attempt)
        current = self._current.get(sim_id)
        if current is None or attempt_of(current) <= attempt:
            self._set_current(sim_id, credential)
        return credential

    def check(self, sim_id: int, credential: bytes) -> None:
        """ProtocolError ``bad_credential`` (not made with this server's secret for this simulation) or
        ``stale_attempt`` (an earlier attempt's); a valid newer attempt becomes the current one."""
        current = self._current.get(sim_id)
        if current is not None and hmac.compare_digest(credential, current):
            return
        attempt = attempt_of(credential)
        if attempt == 0 or not hmac.compare_digest(credential, self.make(sim_id, attempt)):
            raise ProtocolError(
                "bad_credential",
                f"simulation {sim_id}: the message does not carry a credential this server issued for it "
                "(DATA and FINISH carry the credential of the WELCOME, not the run token)",
            )
        if current is not None and attempt < attempt_of(current):
            raise ProtocolError(
                "stale_attempt",
                f"simulation {sim_id}: a message of attempt {attempt}, which was given up for attempt "
                f"{attempt_of(current)} (a leftover process of an earlier attempt)",
            )
        self._set_current(sim_id, credential)

    def current_rows(self, sim_ids: np.ndarray) -> np.ndarray:
        """Each simulation's current credential as two little-endian u64 words, zeros where it has none here.

        The vector form of check's first case: a message whose token equals its row (a row is never
        zero: no attempt is 0) passes check() without changing anything; any other needs check(). A
        comparison with the rows reads every word, whatever the bytes, like compare_digest.
        ``sim_ids``: [n] u64; returns [n, 2] u64 (a simulation from DENSE_SIMULATIONS on gets zeros).
        """
        dense = self._dense
        return dense[np.minimum(sim_ids, len(dense) - 1).astype(np.intp)]  # beyond: the last row, all zeros

    def current_attempts(self) -> dict[int, int]:
        """sim_id -> current attempt, as known here."""
        return {sim_id: attempt_of(credential) for sim_id, credential in self._current.items()}

    def _set_current(self, sim_id: int, credential: bytes) -> None:
        """Makes ``credential`` the simulation's current one, in the dictionary and its dense copy."""
        self._current[sim_id] = credential
        if sim_id < DENSE_SIMULATIONS:
            if sim_id >= len(self._dense) - 1:
                rows = min(DENSE_SIMULATIONS, max(2 * len(self._dense), sim_id + 1, 64)) + 1
                grown = np.zeros((rows, 2), dtype="<u8")
                grown[: len(self._dense)] = self._dense
                self._dense = grown
            self._dense[sim_id] = np.frombuffer(credential, dtype="<u8")


def rank_for(sim_id: int, time_step: int, n_ranks: int) -> int:
    """Server rank receiving step `time_step` of simulation `sim_id`: (sim_id + time_step) mod n_ranks.

    The one routing rule (docs/protocol.md, section 5): the client sends by it, validate_data checks
    arrivals by it. It runs once per message on both sides: keep it a comparison and three modulos.
    """
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    # Reducing each term first keeps the C form (sim_id % R + t % R) % R free of u64 overflow.
    return (sim_id % n_ranks + time_step % n_ranks) % n_ranks


def encode_header(
    kind: int,
    token: bytes,
    sim_id: int,
    time_step: int = 0,
    client_id: int = 0,
    dtype_code: int = DTYPE_NONE,
    shape: Sequence[int] = (),
) -> bytes:
    """Pack one 64-byte header; ValueError when a field does not fit its wire type."""
    ndim = len(shape)
    if ndim > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions fit in a header, got shape {tuple(shape)}")
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"token must be {TOKEN_BYTES} raw bytes, got {len(token)}")
    dims = (*shape, 0, 0, 0, 0)
    try:
        return HEADER.pack(
            MAGIC,
            VERSION,
            kind,
            dtype_code,
            token,
            sim_id,
            time_step,
            client_id,
            ndim,
            _ZERO_RESERVED,
            dims[0],
            dims[1],
            dims[2],
            dims[3],
            0,
        )
    except struct.error as error:
        raise ValueError(
            f"header field out of range (sim_id u64, time_step/client_id/dims u32, kind/dtype u8): "
            f"kind={kind} dtype_code={dtype_code} sim_id={sim_id} time_step={time_step} "
            f"client_id={client_id} shape={tuple(shape)}: {error}"
        ) from None


def _buffer(frame: Any) -> memoryview:
    """Byte view of a frame (bytes, bytearray, memoryview, zmq.Frame or any buffer) without copying."""
    view = memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def decode_header(frame: Any) -> Header:
    """Unpack and structurally check a header frame; ProtocolError malformed/bad_magic/bad_version."""
    buffer = _buffer(frame)
    if buffer.nbytes != HEADER_SIZE:
        raise ProtocolError("malformed", f"header frame must be {HEADER_SIZE} bytes, got {buffer.nbytes}")
    (
        magic,
        version,
        kind,
        dtype_code,
        token,
        sim_id,
        time_step,
        client_id,
        ndim,
        reserved,
        d0,
        d1,
        d2,
        d3,
        reserved_tail,
    ) = HEADER.unpack(buffer)
    if magic != MAGIC:
        raise ProtocolError("bad_magic", f"header must start with {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise ProtocolError(
            "bad_version",
            f"protocol version {VERSION} expected, got {version}; "
            "update the client or the server so both speak the same version",
        )
    if kind not in KIND_NAMES:
        raise ProtocolError("malformed", f"unknown message kind {kind}; known: {KIND_NAMES}")
    if ndim > MAX_NDIM:
        raise ProtocolError("malformed", f"ndim must be <= {MAX_NDIM}, got {ndim}")
    if reserved != _ZERO_RESERVED or reserved_tail:
        raise ProtocolError("malformed", "reserved header bytes 41-43 and 60-63 must be zero")
    dims = (d0, d1, d2, d3)
    if dims[ndim:] != _ZERO_DIMS[ndim:]:
        raise ProtocolError("malformed", f"shape entries beyond ndim={ndim} must be zero, got {dims}")
    return _new_header((kind, dtype_code, token, sim_id, time_step, client_id, dims[:ndim], version))


class _BatchSpecs(NamedTuple):
    """The fields as validate_batch compares them: a DATA header's fixed words and the payload size, per field."""

    specs: tuple[_FieldSpec, ...]
    index: dict[bytes, int]  # encoded field name -> position in specs
    templates: np.ndarray  # [n_fields + 1, 8] u64: a DATA header of each field, variable words zero; then zeros
    nbytes: tuple[int, ...]  # payload bytes of each field


# A header as eight little-endian u64 words: 0 magic, version, kind, dtype; 1-2 token; 3 sim_id;
# 4 time_step (low half), client_id (high half); 5 ndim, reserved bytes, shape[0]; 6 shape[1..2];
# 7 shape[3], reserved u32. Words 0, 5, 6 and 7 are the same in every valid DATA message of a field;
# validate_batch compares a message's words, sim_id and time_step/client_id masked out, with its
# field's template whose token words hold the simulation's current credential.
_VARIABLE_WORDS = np.array([~0, ~0, ~0, 0, 0, ~0, ~0, ~0], dtype=np.int64).astype("<u8")
_NO_HEADER = bytes(HEADER_SIZE)  # stands for a missing or mis-sized header frame: its magic never matches


def _batch_specs(specs: Mapping[bytes, _FieldSpec]) -> _BatchSpecs:
    """Precomputes what validate_batch compares a batch's headers against."""
    ordered = tuple(specs.values())
    headers = b"".join(
        encode_header(DATA, _ZERO_TOKEN, 0, dtype_code=spec.dtype_code, shape=spec.shape) for spec in ordered
    )
    templates = np.zeros((len(ordered) + 1, 8), dtype="<u8")  # the last row: field -1 (not fast in any case)
    templates[:-1] = np.frombuffer(headers, dtype="<u8").reshape(len(ordered), 8)
    return _BatchSpecs(
        ordered, {name: i for i, name in enumerate(specs)}, templates, tuple(spec.nbytes for spec in ordered)
    )


class _FieldSpec(NamedTuple):
    """Precomputed per-field expectation used on the hot path."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    dtype_code: int
    nbytes: int
    bounds: tuple[float, float] | None  # the field's valid physical range, when declared


@dataclasses.dataclass(frozen=True)
class Expectation:
    """What one server rank accepts: run token (HELLO), attempt credentials (DATA, FINISH), steps per
    simulation, fields, its rank, known simulations."""

    token: bytes
    n_steps: int
    fields: Mapping[str, tuple[tuple[int, ...], Any]]  # name -> (shape, wire dtype float32|float64)
    rank: int
    n_ranks: int
    known_simulations: Callable[[int], bool] | Collection[int]  # predicate or container of sim ids
    credentials: AttemptCredentials  # this rank's view of every simulation's current attempt
    bounds: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # name -> valid [low, high]
    _specs: dict[bytes, _FieldSpec] = dataclasses.field(init=False, repr=False, compare=False)
    _is_known: Callable[[int], bool] = dataclasses.field(init=False, repr=False, compare=False)
    _batch: _BatchSpecs = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check the settings once and precompute the per-field lookup used for every message."""
        if len(self.token) != TOKEN_BYTES:
            raise ValueError(f"token must be {TOKEN_BYTES} raw bytes, got {len(self.token)}")
        if not 1 <= self.n_steps <= MAX_U32 + 1:
            raise ValueError(f"n_steps must be in [1, 2**32], got {self.n_steps}")
        if not 0 <= self.rank < self.n_ranks:
            raise ValueError(f"rank must be in [0, n_ranks={self.n_ranks}), got {self.rank}")
        specs = {}
        for name, (shape, dtype) in self.fields.items():
            encoded = name.encode()
            if not 0 < len(encoded) <= MAX_FIELD_NAME_BYTES:
                raise ValueError(f"field name must be 1..{MAX_FIELD_NAME_BYTES} UTF-8 bytes, got {name!r}")
            dtype = np.dtype(dtype).newbyteorder("<")
            if dtype not in DTYPE_TO_CODE:
                raise ValueError(f"field {name!r}: wire dtype must be float32 or float64, got {dtype}")
            shape = tuple(int(d) for d in shape)
            if len(shape) > MAX_NDIM or any(not 0 <= d <= MAX_U32 for d in shape):
                raise ValueError(f"field {name!r}: shape must have <= {MAX_NDIM} u32 dims, got {shape}")
            specs[encoded] = _FieldSpec(
                name, shape, dtype, DTYPE_TO_CODE[dtype], math.prod(shape) * dtype.itemsize, self.bounds.get(name)
            )
        if not specs:
            raise ValueError("an Expectation needs at least one field")
        known = self.known_simulations
        is_known = known if callable(known) else known.__contains__
        object.__setattr__(self, "_specs", specs)
        object.__setattr__(self, "_is_known", is_known)
        object.__setattr__(self, "_batch", _batch_specs(specs))


def _check_sender(header: Header, expectation: Expectation, allow_any: bool = False) -> None:
    """A HELLO's token first (so nothing is revealed to a stranger), then the simulation id."""
    if not hmac.compare_digest(header.token, expectation.token):
        raise ProtocolError("bad_token", "token does not match this run's token (JAXSURRO_TOKEN)")
    if allow_any and header.sim_id == ANY_SIMULATION:
        return
    if not expectation._is_known(header.sim_id):
        raise ProtocolError("unknown_simulation", f"simulation {header.sim_id} is not in this run")


def _check_attempt(header: Header, expectation: Expectation) -> None:
    """DATA and FINISH: the simulation id, then the credential of its current attempt."""
    if not expectation._is_known(header.sim_id):
        raise ProtocolError("unknown_simulation", f"simulation {header.sim_id} is not in this run")
    expectation.credentials.check(header.sim_id, header.token)


def _all_finite(view: np.ndarray) -> bool:
    """True when the payload holds no NaN or inf (one vectorized pass, ~20 GB/s on one core)."""
    # Measured: as fast as a float64 sum for float32 payloads and simpler; the temporary bool array is
    # 1/4 of a float32 payload. 16 KB takes ~1.5 us, 4 MB ~0.2 ms (TCP moves 4 MB in ~2 ms).
    return bool(np.isfinite(view).all())


def validate_data(header: Header, name_frame: Any, payload_frame: Any, expectation: Expectation) -> np.ndarray:
    """Check one DATA message against `expectation`; return a zero-copy view of its payload.

    Raises ProtocolError whose reason is one of REJECTION_REASONS. Cost: a few microseconds plus one
    vectorized pass over the payload for the finite check (~20 GB/s).
    """
    return _validate_data(header, name_frame, payload_frame, expectation)[1]


def _validate_data(
    header: Header, name_frame: Any, payload_frame: Any, expectation: Expectation
) -> tuple[_FieldSpec, np.ndarray]:
    """validate_data, also returning the matched field so callers need not look it up again."""
    if header.kind != DATA:
        raise ProtocolError("malformed", f"DATA expected, got {KIND_NAMES.get(header.kind, header.kind)}")
    _check_attempt(header, expectation)
    time_step = header.time_step
    if time_step >= expectation.n_steps:
        raise ProtocolError(
            "time_step_out_of_range",
            f"time step {time_step} of simulation {header.sim_id} is outside [0, {expectation.n_steps})",
        )
    n_ranks = expectation.n_ranks
    rank = rank_for(header.sim_id, time_step, n_ranks)
    if rank != expectation.rank:
        raise ProtocolError(
            "wrong_rank",
            f"step {time_step} of simulation {header.sim_id} belongs to rank {rank} of {n_ranks}, "
            f"arrived at rank {expectation.rank}",
        )
    name = _buffer(name_frame)
    if name.nbytes > MAX_FIELD_NAME_BYTES:
        raise ProtocolError("malformed", f"field name frame is at most {MAX_FIELD_NAME_BYTES} bytes, got {name.nbytes}")
    spec = expectation._specs.get(bytes(name))
    if spec is None:
        raise ProtocolError(
            "unknown_field",
            f"field {bytes(name)!r} is not expected; expected one of "
            f"{sorted(s.name for s in expectation._specs.values())}",
        )
    if header.dtype_code != spec.dtype_code:
        got = CODE_TO_DTYPE.get(header.dtype_code, f"unknown code {header.dtype_code}")
        raise ProtocolError(
            "bad_dtype",
            f"field {spec.name!r} travels as {spec.dtype} (code {spec.dtype_code}), got {got}; "
            "set JAXSURRO_WIRE_DTYPE on the client to match the server",
        )
    if header.shape != spec.shape:
        raise ProtocolError("bad_shape", f"field {spec.name!r} must have shape {spec.shape}, got {header.shape}")
    payload = _buffer(payload_frame)
    if payload.nbytes != spec.nbytes:
        raise ProtocolError(
            "bad_size",
            f"field {spec.name!r} {spec.shape} {spec.dtype} is {spec.nbytes} bytes, payload has {payload.nbytes}",
        )
    view = np.frombuffer(payload, dtype=spec.dtype).reshape(spec.shape)
    if not _all_finite(view):
        raise ProtocolError(
            "non_finite",
            f"field {spec.name!r} of simulation {header.sim_id} step {time_step} contains NaN or inf",
        )
    if spec.bounds is not None and view.size:
        low, high = float(view.min()), float(view.max())
        if low < spec.bounds[0] or high > spec.bounds[1]:
            raise ProtocolError(
                "out_of_bounds",
                f"field {spec.name!r} of simulation {header.sim_id} step {time_step} spans [{low:.6g}, {high:.6g}], "
                f"outside its declared bounds {list(spec.bounds)} ([[solver.fields]] bounds)",
            )
    return spec, view


def validate_finish(header: Header, expectation: Expectation) -> int:
    """Check a FINISH message; return the number of time steps the client says it sent."""
    if header.kind != FINISH:
        raise ProtocolError("malformed", f"FINISH expected, got {KIND_NAMES.get(header.kind, header.kind)}")
    _check_attempt(header, expectation)
    if header.time_step > expectation.n_steps:
        raise ProtocolError(
            "time_step_out_of_range",
            f"FINISH of simulation {header.sim_id} claims {header.time_step} steps, "
            f"at most {expectation.n_steps} exist",
        )
    return header.time_step


def validate_message(frames: Sequence[Any], expectation: Expectation) -> Received:
    """Decode and validate one message from a data socket (without the ROUTER's routing id): DATA
    (3 frames) or FINISH (1 frame)."""
    if not frames:
        raise ProtocolError("malformed", "empty message")
    header = decode_header(frames[0])
    if header.kind == DATA:
        if len(frames) != 3:
            raise ProtocolError("malformed", f"DATA has 3 frames (header, field name, payload), got {len(frames)}")
        spec, array = _validate_data(header, frames[1], frames[2], expectation)
        return Received(DATA, header.sim_id, header.time_step, header.client_id, spec.name, array)
    if header.kind == FINISH:
        if len(frames) != 1:
            raise ProtocolError("malformed", f"FINISH has 1 frame (header), got {len(frames)}")
        n_steps = validate_finish(header, expectation)
        return Received(FINISH, header.sim_id, n_steps, header.client_id, None, None)
    raise ProtocolError(
        "malformed",
        f"a data socket takes DATA or FINISH, got {KIND_NAMES[header.kind]}",
    )


class CheckedBatch(NamedTuple):
    """validate_batch's verdict on each message of a batch, in arrival order.

    Message i was accepted when ``kind[i]`` is DATA or FINISH (then it is what validate_message would have
    returned: ``field[i]`` and ``array[i]`` set for DATA, ``time_step[i]`` the step, or FINISH's count of
    steps sent), and rejected when ``errors`` holds i (``kind[i]`` is 0). A payload is flat: what
    validate_message returns is ``array[i].reshape(shape)`` of its field.
    """

    kind: np.ndarray  # [n] u8
    sim_id: np.ndarray  # [n] u64 (read-only)
    time_step: np.ndarray  # [n] u64
    client_id: np.ndarray  # [n] u64
    field: list[str | None]
    array: list[np.ndarray | None]  # flat zero-copy views of the payload frames
    errors: dict[int, ProtocolError]


def validate_batch(messages: Sequence[Sequence[Any]], expectation: Expectation) -> CheckedBatch:
    """validate_message over a batch of messages in order, with the same verdicts, reasons and texts.

    The headers are checked together as an [n, 8] array of u64 words: the field's fixed words and the
    simulation's current credential in one comparison, and the routing rank. Then a DATA message that
    passed needs a few list look-ups (step range, known simulation, payload size) and one read of its
    payload (finite values, declared bounds). Any other message, FINISH included, goes through
    validate_message itself, so a rejection keeps its reason and text. Only
    check() changes the credentials, and only through validate_message: a simulation that went that
    way is checked message by message for the rest of the batch, so each message sees the
    credentials that the messages before it left, as one after the other would.
    """
    n = len(messages)
    batch = expectation._batch
    headers: list[Any] = [_NO_HEADER] * n
    fields = [-1] * n  # -1: not three frames with a known field name
    sizes = [-1] * n
    for i, frames in enumerate(messages):
        if not frames:
            continue
        header = frames[0]
        if len(header) == HEADER_SIZE:
            headers[i] = header
        elif (view := _buffer(header)).nbytes == HEADER_SIZE:
            headers[i] = view
        if len(frames) == 3:
            fields[i] = batch.index.get(bytes(frames[1]), -1)
            sizes[i] = len(frames[2])
    joined = b"".join(headers)
    if len(joined) != n * HEADER_SIZE:  # a frame whose len() counts items of more than a byte
        headers = [_NO_HEADER if not f or _buffer(f[0]).nbytes != HEADER_SIZE else f[0] for f in messages]
        joined = b"".join(headers)
    words = np.frombuffer(joined, dtype="<u8").reshape(n, 8)
    sim_id = words[:, 3]
    time_step = words[:, 4] & np.uint64(MAX_U32)
    client_id = words[:, 4] >> np.uint64(32)
    expected = batch.templates[fields]
    expected[:, 1:3] = expectation.credentials.current_rows(sim_id)
    # Fixed words and credential at once; a simulation with no credential yet has a zero row (never issued).
    fast = ((words & _VARIABLE_WORDS) == expected).all(axis=1) & (expected[:, 1] != 0)
    if expectation.n_ranks > 1:
        n_ranks = np.uint64(expectation.n_ranks)
        fast &= (sim_id % n_ranks + time_step % n_ranks) % n_ranks == expectation.rank
    simulations, steps, fast = sim_id.tolist(), time_step.tolist(), fast.tolist()
    known = {sim: expectation._is_known(sim) for sim in set(simulations)}
    n_steps = expectation.n_steps
    kinds = [0] * n
    names: list[str | None] = [None] * n
    arrays: list[np.ndarray | None] = [None] * n
    errors: dict[int, ProtocolError] = {}
    one_by_one: set[int] = set()  # simulations whose credentials validate_message may have changed
    specs, nbytes = batch.specs, batch.nbytes
    with np.errstate(over="ignore", invalid="ignore"):  # a sum that overflows only sends the payload to isfinite
        for i, frames in enumerate(messages):
            sim, field = simulations[i], fields[i]
            if (
                field >= 0
                and fast[i]
                and steps[i] < n_steps
                and (sizes[i] == nbytes[field] or _buffer(frames[2]).nbytes == nbytes[field])  # len(): items
                and known[sim]
                and not (one_by_one and sim in one_by_one)
            ):
                spec = specs[field]
                view = np.frombuffer(frames[2], dtype=spec.dtype)
                if view.nbytes == spec.nbytes and _finite_and_within(view, spec.bounds):
                    kinds[i], names[i], arrays[i] = DATA, spec.name, view
                    continue
            if headers[i] is not _NO_HEADER:
                one_by_one.add(sim)
            try:
                received = validate_message(frames, expectation)
            except ProtocolError as error:
                errors[i] = error
                continue
            # Its header is row i of `words` (an accepted message has a 64-byte header), so the ids are right.
            kinds[i], names[i] = received.kind, received.field
            arrays[i] = None if received.array is None else received.array.reshape(-1)
    return CheckedBatch(np.array(kinds, dtype=np.uint8), sim_id, time_step, client_id, names, arrays, errors)


def _finite_and_within(view: np.ndarray, bounds: tuple[float, float] | None) -> bool:
    """Whether a payload is finite (and within ``bounds`` when declared), reading it once when it is.

    A sum in the payload's own precision is NaN or inf when any value is; when it is not finite (a
    value is not, or finite values overflowed) isfinite decides. No boolean temporary, and less CPU
    than isfinite (float32, measured: ~15 % on 16 KB, ~25 % on 4 MB). Call under
    np.errstate(over="ignore", invalid="ignore").
    """
    if not math.isfinite(np.add.reduce(view)) and not np.isfinite(view).all():
        return False
    # As validate_message compares: the extremes as Python floats (a float32 scalar would round the bounds).
    return bounds is None or not view.size or (bounds[0] <= float(view.min()) and float(view.max()) <= bounds[1])


def validate_hello(frames: Sequence[Any], expectation: Expectation) -> Header:
    """Check a HELLO (frames after the ROUTER routing id); sim_id may be ANY_SIMULATION.

    A HELLO whose second frame declares the client's fields (:func:`encode_declaration`) is
    refused with ``field_mismatch`` when the declaration differs from what the server expects.
    """
    if len(frames) not in (1, 2):
        raise ProtocolError("malformed", f"HELLO has 1 frame (header) or 2 (header, fields), got {len(frames)}")
    header = decode_header(frames[0])
    if header.kind != HELLO:
        raise ProtocolError("malformed", f"the control socket takes HELLO, got {KIND_NAMES[header.kind]}")
    _check_sender(header, expectation, allow_any=True)
    if len(frames) == 2:
        check_declaration(decode_declaration(frames[1]), expectation)
    return header


def encode_hello(token: bytes, sim_id: int, client_id: int, declaration: bytes | None = None) -> list[bytes]:
    """Frames of a HELLO asking for simulation `sim_id` (or ANY_SIMULATION), declaring its fields if given."""
    header = encode_header(HELLO, token, sim_id, client_id=client_id)
    return [header] if declaration is None else [header, declaration]


MAX_DECLARATION_BYTES = 4096
# Slack added to the largest valid frame when capping inbound frames with ZMQ_MAXMSGSIZE
# (docs/protocol.md, "Frame size limit").
FRAME_LIMIT_MARGIN = 4096


def max_data_frame_bytes(expectation: Expectation) -> int:
    """Largest frame a data (ROUTER) socket accepts: the largest valid frame plus FRAME_LIMIT_MARGIN.

    A valid DATA message's frames are the 64-byte header, a field name of at most 64 bytes and a
    payload of exactly prod(shape) x itemsize bytes of one declared field. ZeroMQ's ZMQ_MAXMSGSIZE
    applies to each frame: a peer announcing a larger frame is disconnected before it is buffered.
    """
    largest = max(spec.nbytes for spec in expectation._specs.values())
    return max(largest, HEADER_SIZE, MAX_FIELD_NAME_BYTES) + FRAME_LIMIT_MARGIN


def max_control_frame_bytes() -> int:
    """Largest frame the control (ROUTER) socket accepts: a header plus a full declaration, plus the margin."""
    return HEADER_SIZE + MAX_DECLARATION_BYTES + FRAME_LIMIT_MARGIN


def encode_declaration(fields: Mapping[str, tuple[Sequence[int], Any]]) -> bytes:
    """A HELLO's field declaration: one line ``NAME DTYPE D0 D1 ...`` per field (e.g. ``u float64 128``)."""
    lines = []
    for name, (shape, dtype) in fields.items():
        dtype = np.dtype(dtype).newbyteorder("<")
        if dtype not in DTYPE_TO_CODE or not name or any(c.isspace() for c in name):
            raise ValueError(
                f"field {name!r}: a declared field has a name without spaces and dtype float32 or float64, got {dtype}"
            )
        if len(tuple(shape)) > MAX_NDIM:
            raise ValueError(f"field {name!r}: at most {MAX_NDIM} dimensions, got shape {tuple(shape)}")
        lines.append(" ".join([name, dtype.name, *(str(int(d)) for d in shape)]))
    text = "\n".join(lines).encode()
    if len(text) > MAX_DECLARATION_BYTES:
        raise ValueError(f"the field declaration is {len(text)} bytes; at most {MAX_DECLARATION_BYTES}")
    return text


def decode_declaration(frame: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Parse a HELLO's field declaration; ProtocolError malformed when it is not one."""
    raw = bytes(_buffer(frame))
    if len(raw) > MAX_DECLARATION_BYTES:
        raise ProtocolError("malformed", f"a field declaration has at most {MAX_DECLARATION_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError("malformed", "the field declaration is not UTF-8 text") from None
    fields: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for line in text.split("\n"):
        name, dtype_name, *dims = [*line.split(" "), ""][: max(2, len(line.split(" ")))]
        dtype = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}.get(dtype_name)
        if (
            not name
            or dtype is None
            or len(dims) > MAX_NDIM
            or name in fields
            or not all(d.isascii() and d.isdigit() and len(d) <= 10 for d in dims)  # not '²': int() refuses it
        ):
            raise ProtocolError(
                "malformed",
                f"field declaration line {line[:80]!r} is not 'NAME DTYPE D0 D1 ...' "
                "(dtype float32 or float64, at most 4 sizes, each name once)",
            )
        fields[name] = (tuple(int(d) for d in dims), dtype)
    return fields


def check_declaration(declared: Mapping[str, tuple[tuple[int, ...], np.dtype]], expectation: Expectation) -> None:
    """ProtocolError ``field_mismatch`` naming the first field whose declaration differs from the expectation."""
    expected = {spec.name: (spec.shape, spec.dtype) for spec in expectation._specs.values()}

    def text(fields: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> str:
        return ", ".join(f"{name} {list(shape)} {np.dtype(dtype).name}" for name, (shape, dtype) in fields.items())

    for name, (shape, dtype) in declared.items():
        if name not in expected:
            raise ProtocolError(
                "field_mismatch",
                f"the client declares field {name!r} {list(shape)}, which the "
                f"experiment does not declare (it expects: {text(expected)}); "
                "add it to [[solver.fields]] or stop sending it",
            )
        want_shape, want_dtype = expected[name]
        if tuple(shape) != want_shape or np.dtype(dtype) != want_dtype:
            raise ProtocolError(
                "field_mismatch",
                f"field {name!r}: the client declares {list(shape)} "
                f"{np.dtype(dtype).name}, the experiment expects "
                f"{list(want_shape)} {want_dtype.name} (solver.fields, "
                "solver.wire_dtype)",
            )
    missing = [name for name in expected if name not in declared]
    if missing:
        raise ProtocolError(
            "field_mismatch",
            f"the client does not declare field(s) {missing} that the experiment "
            f"expects at every time step (it declares: {text(declared)})",
        )


def encode_welcome(
    token: bytes,
    sim_id: int,
    client_id: int,
    addresses: Sequence[str],
    parameters: np.ndarray,
    credential: bytes,
    n_steps: int | None = None,
) -> list[bytes]:
    """Frames of a WELCOME: header, newline-separated data addresses in rank order (each rank's
    endpoints as join_endpoints writes them), float64 parameters, the attempt's credential."""
    parameters = np.ascontiguousarray(parameters, dtype="<f8")
    if parameters.ndim != 1:
        raise ValueError(f"parameters must be 1-D, got shape {parameters.shape}")
    if not addresses or any(not a or "\n" in a for a in addresses):
        raise ValueError(f"one non-empty address per rank, without newlines, expected; got {addresses!r}")
    if len(credential) != CREDENTIAL_BYTES:
        raise ValueError(f"a credential is {CREDENTIAL_BYTES} bytes, got {len(credential)}")
    header = encode_header(WELCOME, token, sim_id, n_steps or 0, client_id, DTYPE_FLOAT64, parameters.shape)
    return [header, "\n".join(addresses).encode(), parameters.tobytes(), bytes(credential)]


def encode_reject(sim_id: int, client_id: int, reason: str, message: str) -> list[bytes]:
    """Frames of a REJECT; the token field is zero so a refused peer never learns the run token."""
    return [
        encode_header(REJECT, _ZERO_TOKEN, sim_id, client_id=client_id),
        f"{reason}: {message}".encode(),
    ]


def encode_data(
    credential: bytes, sim_id: int, time_step: int, client_id: int, field: bytes, array: np.ndarray
) -> list[Any]:
    """Frames of a DATA message carrying the attempt's ``credential``; `array` must be C-contiguous
    float32/float64 and is not copied."""
    code = DTYPE_TO_CODE.get(array.dtype)
    if code is None or not array.flags.c_contiguous:
        raise ValueError(
            f"payload must be a C-contiguous little-endian float32/float64 array, got {array.dtype} "
            f"(C-contiguous: {array.flags.c_contiguous})"
        )
    return [encode_header(DATA, credential, sim_id, time_step, client_id, code, array.shape), field, array]


def encode_finish(credential: bytes, sim_id: int, client_id: int, n_steps_sent: int) -> list[bytes]:
    """Frames of a FINISH: the client is done with `sim_id` and sent `n_steps_sent` distinct steps."""
    return [encode_header(FINISH, credential, sim_id, n_steps_sent, client_id)]


def encode_received(credential: bytes, sim_id: int, client_id: int, n_steps: int, refusal: str = "") -> list[bytes]:
    """Frames of a RECEIVED answering a FINISH: its header fields echoed, then the refusal text ("" = taken)."""
    return [encode_header(RECEIVED, credential, sim_id, n_steps, client_id), refusal.encode()]


def decode_received(frames: Sequence[Any]) -> Receipt:
    """Decode a server rank's RECEIVED; ProtocolError if the message is anything else."""
    if len(frames) != 2:
        raise ProtocolError("malformed", f"RECEIVED has 2 frames (header, refusal), got {len(frames)}")
    header = decode_header(frames[0])
    if header.kind != RECEIVED:
        raise ProtocolError("malformed", f"RECEIVED expected on a data socket, got {KIND_NAMES[header.kind]}")
    refusal = bytes(_buffer(frames[1])).decode("utf-8", errors="replace")
    return Receipt(header.sim_id, header.token, header.time_step, refusal)


def join_endpoints(endpoints: Sequence[str]) -> str:
    """One rank's entry in WELCOME: its network endpoint first, then any endpoint for clients on its host."""
    if not endpoints or any(not e or e.split() != [e] for e in endpoints):
        raise ValueError(f"endpoints are non-empty and without whitespace, at least one; got {endpoints!r}")
    return " ".join(endpoints)


def split_endpoints(entry: str) -> tuple[str, ...]:
    """The endpoints of one rank's WELCOME entry (join_endpoints), the network one first."""
    return tuple(entry.split())


def decode_reply(frames: Sequence[Any]) -> Welcome | Rejection:
    """Decode the server's answer to a HELLO (WELCOME or REJECT); ProtocolError if it is neither."""
    if not frames:
        raise ProtocolError("malformed", "empty reply to HELLO")
    header = decode_header(frames[0])
    if header.kind == REJECT:
        if len(frames) != 2:
            raise ProtocolError("malformed", f"REJECT has 2 frames, got {len(frames)}")
        text = bytes(_buffer(frames[1])).decode("utf-8", errors="replace")
        reason, separator, _ = text.partition(": ")
        return Rejection(header.sim_id, header.client_id, reason if separator else "rejected", text)
    if header.kind != WELCOME:
        raise ProtocolError("malformed", f"WELCOME or REJECT expected, got {KIND_NAMES[header.kind]}")
    if len(frames) != 4:
        raise ProtocolError("malformed", f"WELCOME has 4 frames, got {len(frames)}")
    if header.dtype_code != DTYPE_FLOAT64 or header.ndim != 1:
        raise ProtocolError(
            "malformed",
            f"WELCOME parameters must be float64 1-D, got dtype code {header.dtype_code} shape {header.shape}",
        )
    raw = _buffer(frames[2])
    if raw.nbytes != 8 * header.shape[0]:
        raise ProtocolError("bad_size", f"WELCOME announces {header.shape[0]} parameters, frame has {raw.nbytes} bytes")
    try:
        addresses = tuple(bytes(_buffer(frames[1])).decode().split("\n"))
    except UnicodeDecodeError as error:
        raise ProtocolError("malformed", f"WELCOME addresses are not UTF-8: {error}") from None
    if not all(split_endpoints(address) for address in addresses):
        raise ProtocolError("malformed", f"WELCOME has an empty data address: {addresses!r}")
    parameters = np.frombuffer(raw, dtype="<f8").astype(np.float64)  # owned, native-order copy
    credential = bytes(_buffer(frames[3]))
    if len(credential) != CREDENTIAL_BYTES:
        raise ProtocolError("malformed", f"a WELCOME's credential is {CREDENTIAL_BYTES} bytes, got {len(credential)}")
    return Welcome(
        header.sim_id, header.client_id, header.token, header.time_step or None, addresses, parameters, credential
    )
