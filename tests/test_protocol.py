"""jaxsurro.protocol: header layout and round trip, every rejection reason, zero-copy views, routing."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import zmq

from jaxsurro import protocol
from jaxsurro.protocol import ProtocolError

TOKEN = bytes(range(16))
SECRET = bytes(range(100, 132))
SIM = 7
N_RANKS = 3
SHAPE = (4, 5)
N_STEPS = 10


def expectation(rank: int = 0, dtype: str = "float32", known=frozenset({SIM, 8, 9})) -> protocol.Expectation:
    """Rank `rank` of N_RANKS expecting one 'temperature' field of SHAPE."""
    credentials = protocol.AttemptCredentials(SECRET)
    return protocol.Expectation(TOKEN, N_STEPS, {"temperature": (SHAPE, dtype)}, rank, N_RANKS, known, credentials)


def credential(sim_id: int = SIM, attempt: int = 1) -> bytes:
    """What the server's WELCOME gives attempt ``attempt`` of ``sim_id``."""
    return protocol.AttemptCredentials(SECRET).make(sim_id, attempt)


def step_for_rank(rank: int, sim_id: int = SIM) -> int:
    """A time step that simulation `sim_id` sends to `rank`."""
    return next(t for t in range(N_STEPS) if protocol.rank_for(sim_id, t, N_RANKS) == rank)


def data_frames(time_step: int | None = None, array: np.ndarray | None = None, **header_changes) -> list:
    """A valid DATA message for rank 0 (as frames), with header fields optionally overridden."""
    if time_step is None:
        time_step = step_for_rank(0)
    if array is None:
        array = np.arange(20, dtype=np.float32).reshape(SHAPE)
    fields = dict(
        kind=protocol.DATA,
        token=credential(header_changes.get("sim_id", SIM)),
        sim_id=SIM,
        time_step=time_step,
        client_id=11,
        dtype_code=protocol.DTYPE_TO_CODE[array.dtype],
        shape=array.shape,
    )
    fields.update(header_changes)
    return [protocol.encode_header(**fields), b"temperature", array.tobytes()]


@pytest.mark.parametrize(
    "kind, sim_id, time_step, client_id, dtype_code, shape",
    [
        (protocol.HELLO, 0, 0, 0, protocol.DTYPE_NONE, ()),
        (protocol.HELLO, protocol.ANY_SIMULATION, 0, 2**32 - 1, protocol.DTYPE_NONE, ()),
        (protocol.WELCOME, 12, 100, 5, protocol.DTYPE_FLOAT64, (6,)),
        (protocol.DATA, 2**64 - 2, 2**32 - 1, 1, protocol.DTYPE_FLOAT32, (64, 64)),
        (protocol.DATA, 3, 0, 9, protocol.DTYPE_FLOAT64, (2, 3, 4, 5)),
        (protocol.DATA, 3, 1, 9, protocol.DTYPE_FLOAT32, (2**32 - 1, 1, 0)),
        (protocol.FINISH, 1, 50, 9, protocol.DTYPE_NONE, ()),
        (protocol.REJECT, 1, 0, 9, protocol.DTYPE_NONE, ()),
    ],
)
def test_header_round_trip_and_byte_layout(kind, sim_id, time_step, client_id, dtype_code, shape):
    """decode(encode(h)) == h, and each field sits at the offset docs/protocol.md gives."""
    frame = protocol.encode_header(kind, TOKEN, sim_id, time_step, client_id, dtype_code, shape)
    assert len(frame) == 64
    header = protocol.decode_header(frame)
    assert header == protocol.Header(kind, dtype_code, TOKEN, sim_id, time_step, client_id, shape, protocol.VERSION)
    assert header.ndim == len(shape)
    # The documented byte table, read independently of HEADER_FORMAT.
    assert frame[0:4] == b"JXSR"
    assert struct.unpack_from("<H", frame, 4)[0] == protocol.VERSION == 3
    assert frame[6] == kind and frame[7] == dtype_code
    assert frame[8:24] == TOKEN
    assert struct.unpack_from("<Q", frame, 24)[0] == sim_id
    assert struct.unpack_from("<I", frame, 32)[0] == time_step
    assert struct.unpack_from("<I", frame, 36)[0] == client_id
    assert frame[40] == len(shape)
    assert frame[41:44] == bytes(3) and frame[60:64] == bytes(4)
    assert struct.unpack_from("<4I", frame, 44) == (*shape, *(0,) * (4 - len(shape)))


@pytest.mark.parametrize(
    "frame",
    [
        np.frombuffer(protocol.encode_header(protocol.DATA, TOKEN, 1, 2, 3, 1, (4,)), np.uint8),
        memoryview(protocol.encode_header(protocol.DATA, TOKEN, 1, 2, 3, 1, (4,))),
        zmq.Frame(protocol.encode_header(protocol.DATA, TOKEN, 1, 2, 3, 1, (4,))),
    ],
    ids=["ndarray", "memoryview", "zmq.Frame"],
)
def test_decode_accepts_any_buffer(frame):
    """Frames from recv(copy=False), memoryviews and arrays decode alike."""
    assert protocol.decode_header(frame).shape == (4,)


@pytest.mark.parametrize(
    "arguments",
    [
        dict(shape=(1, 1, 1, 1, 1)),
        dict(sim_id=2**64),
        dict(sim_id=-1),
        dict(time_step=2**32),
        dict(shape=(2**32,)),
        dict(token=b"short"),
    ],
)
def test_encode_rejects_values_that_do_not_fit(arguments):
    """Out-of-range fields raise ValueError instead of wrapping around."""
    values = dict(kind=protocol.DATA, token=TOKEN, sim_id=1, time_step=0, client_id=0, dtype_code=1, shape=(2,))
    values.update(arguments)
    with pytest.raises(ValueError):
        protocol.encode_header(**values)


def corrupt(offset: int, value: bytes) -> bytes:
    """A valid DATA header with `value` written at `offset`."""
    frame = bytearray(protocol.encode_header(protocol.DATA, TOKEN, SIM, 0, 0, 1, SHAPE))
    frame[offset : offset + len(value)] = value
    return bytes(frame)


@pytest.mark.parametrize(
    "frame, reason",
    [
        (b"", "malformed"),
        (bytes(63), "malformed"),
        (protocol.encode_header(protocol.DATA, TOKEN, 1) + b"\0", "malformed"),
        (corrupt(0, b"JXSX"), "bad_magic"),
        (corrupt(4, struct.pack("<H", 1)), "bad_version"),
        (corrupt(6, b"\x09"), "malformed"),  # unknown kind
        (corrupt(40, b"\x05"), "malformed"),  # ndim > 4
        (corrupt(42, b"\x01"), "malformed"),  # reserved byte
        (corrupt(63, b"\x01"), "malformed"),  # reserved tail
        (corrupt(52, struct.pack("<I", 3)), "malformed"),  # shape[2] set with ndim 2
    ],
)
def test_decode_rejects_bad_headers(frame, reason):
    """Structural header errors carry their reason code."""
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_header(frame)
    assert caught.value.reason == reason


def make_bad(reason: str) -> tuple[list, protocol.Expectation]:
    """A message crafted to trigger exactly `reason`, with the expectation it is checked against."""
    good_t = step_for_rank(0)
    array = np.arange(20, dtype=np.float32).reshape(SHAPE)
    if reason == "malformed":
        return data_frames()[:2], expectation()
    if reason == "bad_magic":
        frames = data_frames()
        return [b"XXXX" + frames[0][4:], *frames[1:]], expectation()
    if reason == "bad_version":
        frames = data_frames()
        return [frames[0][:4] + struct.pack("<H", 99) + frames[0][6:], *frames[1:]], expectation()
    if reason == "bad_token":
        return protocol.encode_hello(bytes(16), SIM, 11), expectation()
    if reason == "bad_credential":
        return data_frames(token=TOKEN), expectation()  # the run token is no credential
    if reason == "stale_attempt":
        current = expectation()
        current.credentials.issue(SIM, 2)
        return data_frames(token=credential(SIM, 1)), current
    if reason == "unknown_simulation":
        sim = 1000
        return data_frames(time_step=step_for_rank(0, sim), sim_id=sim), expectation()
    if reason == "time_step_out_of_range":
        t = next(t for t in range(N_STEPS, 2 * N_STEPS) if protocol.rank_for(SIM, t, N_RANKS) == 0)
        return data_frames(time_step=t), expectation()
    if reason == "wrong_rank":
        return data_frames(time_step=step_for_rank(1)), expectation()
    if reason == "unknown_field":
        frames = data_frames()
        return [frames[0], b"pressure", frames[2]], expectation()
    if reason == "bad_dtype":
        return data_frames(time_step=good_t, array=array.astype(np.float64)), expectation()
    if reason == "bad_shape":
        return data_frames(array=array.reshape(5, 4)), expectation()
    if reason == "bad_size":
        frames = data_frames()
        return [frames[0], frames[1], frames[2][:-4]], expectation()
    if reason == "non_finite":
        array[2, 3] = np.nan
        return data_frames(array=array), expectation()
    if reason == "out_of_bounds":
        return data_frames(), dataclasses.replace(expectation(), bounds={"temperature": (0.0, 1.0)})
    if reason == "field_mismatch":  # a HELLO declaring the field with another shape
        declaration = protocol.encode_declaration({"temperature": ((5, 4), np.float32)})
        return protocol.encode_hello(TOKEN, SIM, 11, declaration), expectation()
    raise AssertionError(f"no crafted message for {reason}")


@pytest.mark.parametrize("reason", protocol.REJECTION_REASONS)
def test_every_rejection_reason_is_triggered(reason):
    """Each crafted bad message is rejected with its own reason, and the valid one passes."""
    frames, expected = make_bad(reason)
    validate = protocol.validate_hello if reason in ("field_mismatch", "bad_token") else protocol.validate_message
    with pytest.raises(ProtocolError) as caught:
        validate(frames, expected)
    assert caught.value.reason == reason, caught.value
    assert reason in str(caught.value)


def test_valid_data_passes_and_rejection_reasons_are_complete():
    """The untouched message validates; REJECTION_REASONS lists exactly the sixteen codes."""
    message = protocol.validate_message(data_frames(), expectation())
    assert message.kind == protocol.DATA and message.field == "temperature" and message.client_id == 11
    np.testing.assert_array_equal(message.array, np.arange(20, dtype=np.float32).reshape(SHAPE))
    assert len(set(protocol.REJECTION_REASONS)) == len(protocol.REJECTION_REASONS) == 16


def test_a_field_declaration_round_trips_and_a_matching_one_is_accepted():
    fields = {"temperature": (SHAPE, np.float32)}
    declared = protocol.decode_declaration(protocol.encode_declaration(fields))
    assert declared == {"temperature": (SHAPE, np.dtype("<f4"))}
    header = protocol.validate_hello(
        protocol.encode_hello(TOKEN, SIM, 11, protocol.encode_declaration(fields)), expectation()
    )
    assert header.sim_id == SIM
    scalar = protocol.decode_declaration(protocol.encode_declaration({"e": ((), np.float64)}))
    assert scalar == {"e": ((), np.dtype("<f8"))}


@pytest.mark.parametrize(
    "text",
    [b"", b"u float16 3", b"u float32 x", b"u float32 1 2 3 4 5", b"\xff", b"u float32 3\nu float32 3", b"float32"],
)
def test_a_malformed_declaration_is_refused(text):
    with pytest.raises(ProtocolError) as caught:
        protocol.validate_hello(protocol.encode_hello(TOKEN, SIM, 11, text), expectation())
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": (SHAPE, np.float32), "p": ((2,), np.float32)}, "declares field 'p'"),
        ({}, "does not declare field"),
        ({"temperature": (SHAPE, np.float64)}, "float64, the experiment expects"),
    ],
)
def test_a_declaration_that_differs_names_the_field(fields, message):
    declaration = protocol.encode_declaration(fields) if fields else b"x float32 1"
    if not fields:
        expected = expectation()
        with pytest.raises(ProtocolError, match="declares field 'x'"):
            protocol.validate_hello(protocol.encode_hello(TOKEN, SIM, 11, declaration), expected)
        return
    with pytest.raises(ProtocolError, match=message) as caught:
        protocol.validate_hello(protocol.encode_hello(TOKEN, SIM, 11, declaration), expectation())
    assert caught.value.reason == "field_mismatch"


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_non_finite_values_are_rejected(bad_value, dtype):
    """NaN, +inf and -inf anywhere in the payload are rejected."""
    array = np.ones(SHAPE, dtype=dtype)
    array[-1, -1] = bad_value
    with pytest.raises(ProtocolError, match="NaN or inf") as caught:
        protocol.validate_message(data_frames(array=array), expectation(dtype=dtype))
    assert caught.value.reason == "non_finite"


def test_huge_finite_values_are_accepted():
    """Values near the float64 maximum are finite even though their sum would overflow."""
    array = np.full(SHAPE, np.finfo(np.float64).max)
    view = protocol.validate_message(data_frames(array=array), expectation(dtype="float64")).array
    assert (view == np.finfo(np.float64).max).all()


def test_validated_view_shares_memory_with_the_frame():
    """The returned array is a view of the received payload, not a copy."""
    payload = bytearray(np.arange(20, dtype=np.float32).tobytes())
    header = protocol.decode_header(data_frames()[0])
    view = protocol.validate_data(header, b"temperature", payload, expectation())
    assert np.shares_memory(view, np.frombuffer(payload, dtype=np.uint8))
    payload[0:4] = np.float32(42).tobytes()
    assert view[0, 0] == 42


def test_zero_copy_through_real_zmq_frames():
    """recv(copy=False) frames validate into arrays backed by the ZeroMQ message buffer."""
    context = zmq.Context()
    try:
        push, pull = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
        pull.bind("inproc://zero-copy")
        push.connect("inproc://zero-copy")
        array = np.arange(20, dtype=np.float32).reshape(SHAPE)
        push.send_multipart(data_frames(array=array), copy=False)
        assert pull.poll(5000), "message not delivered"
        frames = pull.recv_multipart(copy=False)
        message = protocol.validate_message(frames, expectation())
        np.testing.assert_array_equal(message.array, array)
        assert np.shares_memory(message.array, np.frombuffer(frames[2].buffer, dtype=np.uint8))
        assert not message.array.flags.owndata
        push.close(linger=0)
        pull.close(linger=0)
    finally:
        context.destroy(linger=0)


def test_finish_message():
    """FINISH reports the client's step count; a count above n_steps is out of range; extra frames are malformed."""
    finish = protocol.encode_finish(credential(), SIM, 4, N_STEPS)
    message = protocol.validate_message(finish, expectation(rank=2))
    assert (message.kind, message.sim_id, message.time_step, message.client_id) == (protocol.FINISH, SIM, N_STEPS, 4)
    assert message.field is None and message.array is None
    with pytest.raises(ProtocolError) as caught:
        protocol.validate_message(protocol.encode_finish(credential(), SIM, 4, N_STEPS + 1), expectation())
    assert caught.value.reason == "time_step_out_of_range"
    with pytest.raises(ProtocolError) as caught:
        protocol.validate_message([*finish, b"extra"], expectation())
    assert caught.value.reason == "malformed"
    with pytest.raises(ProtocolError) as caught:
        protocol.validate_message(protocol.encode_finish(TOKEN, SIM, 4, 1), expectation())
    assert caught.value.reason == "bad_credential"
    with pytest.raises(ProtocolError) as caught:  # a credential of another simulation
        protocol.validate_message(protocol.encode_finish(credential(8), SIM, 4, 1), expectation())
    assert caught.value.reason == "bad_credential"


def test_control_messages_on_the_data_socket_are_malformed():
    """A HELLO sent to a data socket is rejected, not misread."""
    with pytest.raises(ProtocolError) as caught:
        protocol.validate_message(protocol.encode_hello(TOKEN, SIM, 1), expectation())
    assert caught.value.reason == "malformed"


def test_hello_welcome_reject_round_trip():
    """The handshake messages decode to what was encoded; REJECT never carries the token."""
    hello = protocol.validate_hello(protocol.encode_hello(TOKEN, protocol.ANY_SIMULATION, 5), expectation())
    assert hello.sim_id == protocol.ANY_SIMULATION and hello.client_id == 5
    with pytest.raises(ProtocolError) as caught:
        protocol.validate_hello(protocol.encode_hello(TOKEN, 1000, 5), expectation())
    assert caught.value.reason == "unknown_simulation"

    addresses = ("tcp://node1:6000", "tcp://node2:6001")
    parameters = np.array([0.5, 2.0, -1.0])
    welcome = protocol.decode_reply(
        protocol.encode_welcome(TOKEN, SIM, 5, addresses, parameters, credential(), N_STEPS)
    )
    assert isinstance(welcome, protocol.Welcome)
    assert (welcome.sim_id, welcome.client_id, welcome.token, welcome.n_steps) == (SIM, 5, TOKEN, N_STEPS)
    assert welcome.credential == credential()
    assert welcome.addresses == addresses
    np.testing.assert_array_equal(welcome.parameters, parameters)
    assert welcome.parameters.dtype == np.float64 and welcome.parameters.flags.writeable
    assert (
        protocol.decode_reply(protocol.encode_welcome(TOKEN, SIM, 5, addresses, parameters, credential())).n_steps
        is None
    )

    reject = protocol.encode_reject(SIM, 5, "bad_token", "token does not match")
    assert reject[0][8:24] == bytes(16)
    assert protocol.decode_reply(reject) == protocol.Rejection(SIM, 5, "bad_token", "bad_token: token does not match")


def test_received_round_trip_and_a_welcome_line_with_a_local_endpoint():
    """RECEIVED echoes the FINISH it answers, with the refusal text; a WELCOME keeps each rank's endpoints."""
    taken = protocol.decode_received(protocol.encode_received(credential(), SIM, 5, N_STEPS))
    assert taken == protocol.Receipt(SIM, credential(), N_STEPS, "")
    refused = protocol.decode_received(protocol.encode_received(credential(), SIM, 5, 3, "stale_attempt: replaced"))
    assert refused.refusal == "stale_attempt: replaced" and refused.n_steps == 3
    with pytest.raises(ProtocolError, match="RECEIVED expected"):
        protocol.decode_received([protocol.encode_header(protocol.FINISH, credential(), SIM), b""])
    with pytest.raises(ProtocolError, match="2 frames"):
        protocol.decode_received(protocol.encode_finish(credential(), SIM, 5, N_STEPS))

    line = protocol.join_endpoints(["tcp://node1:6000", "ipc://@jaxsurro-data-6000"])
    welcome = protocol.decode_reply(
        protocol.encode_welcome(TOKEN, SIM, 5, [line, "tcp://node2:6001"], np.zeros(2), credential())
    )
    assert [protocol.split_endpoints(entry) for entry in welcome.addresses] == [
        ("tcp://node1:6000", "ipc://@jaxsurro-data-6000"),
        ("tcp://node2:6001",),
    ]
    with pytest.raises(ValueError, match="without whitespace"):
        protocol.join_endpoints(["tcp://a b:1"])


def test_welcome_with_wrong_parameter_size_is_rejected():
    """A WELCOME whose parameter frame disagrees with its header is not trusted."""
    frames = protocol.encode_welcome(TOKEN, SIM, 5, ["tcp://a:1"], np.zeros(3), credential())
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_reply([frames[0], frames[1], frames[2][:-8], frames[3]])
    assert caught.value.reason == "bad_size"


@pytest.mark.parametrize("n_ranks", [1, 2, 3, 7])
def test_rank_for_balances_consecutive_steps(n_ranks):
    """Any n_ranks consecutive steps of a simulation visit every rank exactly once."""
    for sim_id in (0, 1, 5, 2**63 + 11, 2**64 - 2):
        for start in (0, 13, 2**32 - 1 - n_ranks):
            ranks = [protocol.rank_for(sim_id, t, n_ranks) for t in range(start, start + n_ranks)]
            assert sorted(ranks) == list(range(n_ranks))
            assert ranks == [(sim_id + t) % n_ranks for t in range(start, start + n_ranks)]


def test_rank_for_spreads_simulations_at_one_step():
    """Step 0 of consecutive simulations also cycles over the ranks; n_ranks=1 is always 0."""
    assert [protocol.rank_for(j, 0, 4) for j in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert {protocol.rank_for(j, t, 1) for j in range(5) for t in range(5)} == {0}
    with pytest.raises(ValueError):
        protocol.rank_for(1, 1, 0)


def test_expectation_checks_its_settings():
    """Bad expectations fail at construction, with the offending value."""
    fields = {"temperature": (SHAPE, "float32")}
    with pytest.raises(ValueError, match="token"):
        protocol.Expectation(b"short", N_STEPS, fields, 0, 1, {1}, protocol.AttemptCredentials(SECRET))
    with pytest.raises(ValueError, match="rank"):
        protocol.Expectation(TOKEN, N_STEPS, fields, 2, 2, {1}, protocol.AttemptCredentials(SECRET))
    with pytest.raises(ValueError, match="float32 or float64"):
        protocol.Expectation(
            TOKEN, N_STEPS, {"temperature": (SHAPE, "int32")}, 0, 1, {1}, protocol.AttemptCredentials(SECRET)
        )
    with pytest.raises(ValueError, match="field name"):
        protocol.Expectation(
            TOKEN, N_STEPS, {"x" * 65: (SHAPE, "float32")}, 0, 1, {1}, protocol.AttemptCredentials(SECRET)
        )
    predicate = protocol.Expectation(
        TOKEN, N_STEPS, fields, 0, 1, lambda sim: sim < 3, protocol.AttemptCredentials(SECRET)
    )
    assert predicate._is_known(2) and not predicate._is_known(3)


def test_token_hex_round_trip():
    """The launcher's 32-hex form parses back to the 16 raw bytes; other forms are refused."""
    token = protocol.new_token()
    assert protocol.token_from_hex(token.hex()) == token
    for bad in ("", "abc", token.hex() + "00", "g" * 32):
        with pytest.raises(ValueError, match="32 hexadecimal"):
            protocol.token_from_hex(bad)


def test_values_outside_a_fields_declared_bounds_are_rejected_as_out_of_bounds():
    """The payload of data_frames() is 0..19: bounds [0, 19] hold it, [0, 18.5] do not."""
    inside = dataclasses.replace(expectation(), bounds={"temperature": (0.0, 19.0)})
    assert protocol.validate_message(data_frames(), inside).field == "temperature"
    outside = dataclasses.replace(expectation(), bounds={"temperature": (0.0, 18.5)})
    with pytest.raises(ProtocolError, match=r"spans \[0, 19\], outside its declared bounds \[0.0, 18.5\]") as caught:
        protocol.validate_message(data_frames(), outside)
    assert caught.value.reason == "out_of_bounds"


def test_attempt_credentials_bind_simulation_and_attempt_and_the_latest_attempt_wins():
    """A credential is valid for its simulation only, made with the server's secret only; once a later
    attempt is issued (rank 0) or seen (another rank), the earlier attempt's credential is stale."""
    issuer, other_rank = protocol.AttemptCredentials(SECRET), protocol.AttemptCredentials(SECRET)
    first = issuer.issue(SIM, 1)
    assert protocol.attempt_of(first) == 1 and len(first) == protocol.CREDENTIAL_BYTES
    other_rank.check(SIM, first)  # any rank verifies it with the secret alone
    for forged in (TOKEN, protocol.AttemptCredentials(bytes(32)).make(SIM, 1), issuer.make(8, 1), bytes(16)):
        with pytest.raises(ProtocolError) as caught:
            issuer.check(SIM, forged)
        assert caught.value.reason == "bad_credential"
    second = issuer.issue(SIM, 2)
    with pytest.raises(ProtocolError) as caught:
        issuer.check(SIM, first)
    assert caught.value.reason == "stale_attempt"
    other_rank.check(SIM, first)  # this rank has not heard of attempt 2 yet ...
    other_rank.check(SIM, second)  # ... and now it has
    with pytest.raises(ProtocolError) as caught:
        other_rank.check(SIM, first)
    assert caught.value.reason == "stale_attempt"
    assert issuer.current_attempts() == other_rank.current_attempts() == {SIM: 2}
