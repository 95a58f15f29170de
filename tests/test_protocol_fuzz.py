"""Property-based tests of the decoder against hostile and buggy peers.

`protocol.validate_message` and `protocol.validate_hello` take arbitrary frames (arbitrary bytes, and
valid messages with bytes flipped, replaced, cut or added, and frames dropped or added): they never raise
anything but `ProtocolError` with a known reason, and what they accept is consistent with the expectation.
A real receiver fed a few hundred such messages stores none, counts each by reason and keeps running.

Counts by reason of one run of the receiver test (printed with ``pytest -s``), 383 hostile messages:
  data socket (253): malformed 108, bad_token 57, bad_magic 31, unknown_simulation 27, bad_dtype 9,
  unknown_field 9, bad_shape 9, time_step_out_of_range 2, bad_version 1;
  control socket (130 HELLOs, each answered with REJECT): malformed 80, bad_token 26, unknown_simulation 12,
  bad_magic 10, field_mismatch 2.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from waiting import wait_until

from jaxsurro import protocol
from jaxsurro.server.receiver import Receiver, ValidationSink
from jaxsurro.table import SimState, SimulationTable

TOKEN = bytes(range(1, 17))
OTHER_TOKEN = bytes(b ^ 0xFF for b in TOKEN)  # differs from TOKEN in every byte
N_STEPS = 5
KNOWN = frozenset({0, 1, 2})
FIELDS = {"u": ((4, 3), np.dtype("<f4")), "w": ((2,), np.dtype("<f8"))}
CREDENTIALS = protocol.AttemptCredentials(bytes(range(50, 82)))
EXPECTATION = protocol.Expectation(
    token=TOKEN, n_steps=N_STEPS, fields=FIELDS, rank=1, n_ranks=2, known_simulations=KNOWN, credentials=CREDENTIALS
)
ISSUED = {sim_id: CREDENTIALS.issue(sim_id, 1) for sim_id in KNOWN}  # each known simulation's attempt 1
REASONS = set(protocol.REJECTION_REASONS) | {"malformed"}
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

frames_st = st.lists(st.binary(max_size=300), max_size=5)


@st.composite
def valid_data(draw, forged: bytes | None = None) -> list[bytes]:
    """A DATA message that validates at rank 1 of 2 (with its simulation's credential, unless ``forged``)."""
    name = draw(st.sampled_from(sorted(FIELDS)))
    shape, dtype = FIELDS[name]
    sim_id = draw(st.sampled_from(sorted(KNOWN)))
    step = draw(st.sampled_from([t for t in range(N_STEPS) if protocol.rank_for(sim_id, t, 2) == 1]))
    values = draw(st.lists(st.floats(-1e6, 1e6), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    array = np.asarray(values, dtype=dtype).reshape(shape)
    header, field, payload = protocol.encode_data(
        forged or ISSUED[sim_id], sim_id, step, draw(st.integers(0, 2**32 - 1)), name.encode(), array
    )
    return [header, field, payload.tobytes()]


@st.composite
def valid_finish(draw, forged: bytes | None = None) -> list[bytes]:
    sim_id = draw(st.sampled_from(sorted(KNOWN)))
    return protocol.encode_finish(
        forged or ISSUED[sim_id], sim_id, draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, N_STEPS))
    )


@st.composite
def valid_hello(draw, token=TOKEN) -> list[bytes]:
    sim_id = draw(st.sampled_from([*sorted(KNOWN), protocol.ANY_SIMULATION]))
    declaration = draw(st.sampled_from([None, protocol.encode_declaration(FIELDS)]))
    return protocol.encode_hello(token, sim_id, draw(st.integers(0, 2**32 - 1)), declaration)


# Byte edits three times as often as frame edits, so that many mutants keep a valid frame structure.
_OPS = ["flip", "replace"] * 3 + ["truncate", "extend", "drop", "add", "duplicate", "swap"]


@st.composite
def mutated(draw, message: st.SearchStrategy[list[bytes]]) -> list[bytes]:
    """A valid message with 1..3 mutations: bit flips, byte replacements, truncation, extension, frame edits."""
    frames = [bytearray(f) for f in draw(message)]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(_OPS))
        if not frames:
            op = "add"
        if op == "add":
            frames.insert(draw(st.integers(0, len(frames))), bytearray(draw(st.binary(max_size=80))))
            continue
        i = draw(st.integers(0, len(frames) - 1))
        frame = frames[i]
        if op == "flip" and frame:
            j = draw(st.integers(0, len(frame) - 1))
            frame[j] ^= 1 << draw(st.integers(0, 7))
        elif op == "replace" and frame:
            j = draw(st.integers(0, len(frame) - 1))
            frame[j] = draw(st.integers(0, 255))
        elif op == "truncate":
            del frame[draw(st.integers(0, len(frame))) :]
        elif op == "extend":
            frame += draw(st.binary(min_size=1, max_size=40))
        elif op == "drop":
            del frames[i]
        elif op == "duplicate":
            frames.insert(i, bytearray(frame))
        elif op == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
    return [bytes(f) for f in frames]


any_message = st.one_of(valid_data(), valid_finish(), valid_hello())
hostile = st.one_of(frames_st, mutated(any_message), mutated(mutated(any_message)))

# A field declaration parsed from arbitrary text, including non-ASCII digits such as '²' (int() refuses them).
declaration_text = st.lists(
    st.tuples(
        st.sampled_from(["u", "w", "v", "", "u u"]),
        st.sampled_from(["float32", "float64", "int8", ""]),
        st.lists(
            st.one_of(
                st.sampled_from(["4", "3", "2", "0", "99999999999", "²", "١", "-1", "", "+3"]), st.text(max_size=3)
            ),
            max_size=5,
        ),
    ).map(lambda line: " ".join([line[0], line[1], *line[2]])),
    min_size=1,
    max_size=3,
).map(lambda lines: "\n".join(lines).encode())


def check_accepted_data(frames: list[bytes], received: protocol.Received) -> None:
    """What validate_message accepted is a message the expectation allows."""
    assert received.sim_id in KNOWN
    if received.kind == protocol.FINISH:
        assert len(frames) == 1 and 0 <= received.time_step <= N_STEPS
        assert received.field is None and received.array is None
        assert protocol.decode_header(frames[0]).token == ISSUED[received.sim_id]
        return
    assert received.kind == protocol.DATA and len(frames) == 3
    assert 0 <= received.time_step < N_STEPS
    assert protocol.rank_for(received.sim_id, received.time_step, 2) == 1
    shape, dtype = FIELDS[received.field]
    assert received.array.shape == shape and received.array.dtype == dtype
    assert np.isfinite(received.array).all()
    assert protocol.decode_header(frames[0]).token == ISSUED[received.sim_id]


def check_accepted_hello(frames: list[bytes], header: protocol.Header) -> None:
    assert header.kind == protocol.HELLO and header.token == TOKEN
    assert header.sim_id in KNOWN or header.sim_id == protocol.ANY_SIMULATION
    assert len(frames) in (1, 2)
    if len(frames) == 2:
        declared = protocol.decode_declaration(frames[1])
        assert {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in declared.items()} == FIELDS


def decode(frames: list[bytes]) -> tuple[str | None, str | None]:
    """(reason of validate_message or None, reason of validate_hello or None), checking what is accepted."""
    reasons: list[str | None] = []
    event(f"frames={len(frames)}")
    for validate, check in (
        (protocol.validate_message, check_accepted_data),
        (protocol.validate_hello, check_accepted_hello),
    ):
        try:
            result = validate(frames, EXPECTATION)
        except protocol.ProtocolError as error:
            assert error.reason in REASONS, error
            reasons.append(error.reason)
        else:
            check(frames, result)
            reasons.append(None)
    event(f"data={reasons[0] or 'accepted'} control={reasons[1] or 'accepted'}")
    return reasons[0], reasons[1]


@FUZZ
@given(frames_st)
def test_arbitrary_frames_are_rejected_with_a_known_reason(frames):
    decode(frames)


@FUZZ
@given(mutated(any_message))
def test_mutated_messages_are_rejected_or_consistent(frames):
    decode(frames)


@FUZZ
@given(mutated(mutated(any_message)))
def test_heavily_mutated_messages_are_rejected_or_consistent(frames):
    decode(frames)


@FUZZ
@given(any_message)
def test_valid_messages_are_accepted_by_their_socket(frames):
    data_reason, hello_reason = decode(frames)
    kind = protocol.decode_header(frames[0]).kind
    assert (data_reason is None) == (kind in (protocol.DATA, protocol.FINISH))
    assert (hello_reason is None) == (kind == protocol.HELLO)


@FUZZ
@given(declaration_text, st.sampled_from(sorted(KNOWN)))
def test_a_hello_declaring_any_text_is_accepted_or_rejected_with_a_known_reason(declaration, sim_id):
    frames = protocol.encode_hello(TOKEN, sim_id, 7, declaration)
    decode(frames)


server_answer = st.one_of(
    st.builds(
        lambda sim_id, steps, refusal: protocol.encode_received(ISSUED[0], sim_id, 7, steps, refusal),
        st.sampled_from(sorted(KNOWN)),
        st.integers(0, N_STEPS),
        st.sampled_from(["", "stale_attempt: a later attempt runs"]),
    ),
    st.builds(
        lambda lines, parameters: protocol.encode_welcome(TOKEN, 1, 7, lines, np.asarray(parameters), ISSUED[1]),
        st.sampled_from([["tcp://a:1"], ["tcp://a:1 ipc://@jaxsurro-data-1", "tcp://b:2"]]),
        st.lists(st.floats(allow_nan=False), min_size=1, max_size=4),
    ),
    st.just(protocol.encode_reject(1, 7, "bad_token", "no")),
)


@FUZZ
@given(st.one_of(frames_st, mutated(server_answer), mutated(mutated(server_answer))))
def test_what_a_client_reads_from_the_server_decodes_or_fails_with_a_known_reason(frames):
    """A client decodes WELCOME, REJECT and RECEIVED, or raises ProtocolError with a known reason, nothing else."""
    for decoder in (protocol.decode_reply, protocol.decode_received):
        try:
            decoded = decoder(frames)
        except protocol.ProtocolError as error:
            assert error.reason in REASONS, error
        else:
            assert isinstance(decoded, (protocol.Welcome, protocol.Rejection, protocol.Receipt))


def test_a_declaration_with_non_ascii_digits_is_malformed():
    with pytest.raises(protocol.ProtocolError) as error:
        protocol.decode_declaration("u float32 4 ²".encode())
    assert error.value.reason == "malformed"


# -- through a real receiver ---------------------------------------------------------------------------

R_SHAPE, R_STEPS = (5, 5), 4


def test_a_receiver_stores_none_of_hundreds_of_hostile_messages_and_counts_each():
    table = SimulationTable(np.arange(6, dtype=float).reshape(3, 2))
    for record in list(table)[:2]:
        record.attempts, record.state = 1, SimState.SUBMITTED
    sink = ValidationSink(3, R_STEPS, int(np.prod(R_SHAPE)))
    receiver = Receiver(
        table=table,
        sink=sink,
        token=TOKEN,
        secret=protocol.new_secret(),
        fields={"u": R_SHAPE},
        wire_dtype="float32",
        n_steps=R_STEPS,
        host="127.0.0.1",
    )
    expectation = receiver.expectation
    stale = {sim_id: receiver.credentials.issue(sim_id, 1) for sim_id in (0, 1)}
    issued = {sim_id: receiver.credentials.issue(sim_id, 2) for sim_id in (0, 1)}
    context = zmq.Context.instance()
    push = context.socket(zmq.DEALER)  # a client's data socket
    dealer = context.socket(zmq.DEALER)
    receiver.start()
    try:
        push.connect(receiver.data_address)
        dealer.connect(receiver.control_address)
        dealer.setsockopt(zmq.RCVTIMEO, 10_000)
        expected_data: collections.Counter[str] = collections.Counter()
        expected_control: collections.Counter[str] = collections.Counter()

        def reason(validate, frames):
            try:
                validate(frames, expectation)
            except protocol.ProtocolError as error:
                return error.reason
            return None  # valid: not hostile, not sent

        r_fields = {"u": (R_SHAPE, np.dtype("<f4"))}

        @st.composite
        def r_data(draw):
            sim_id, step = draw(st.integers(0, 3)), draw(st.integers(0, R_STEPS))
            # The attempt's credential, the run token (no credential), another run's token, a stale attempt.
            token = draw(st.sampled_from([issued.get(sim_id, TOKEN), TOKEN, OTHER_TOKEN, stale.get(sim_id, TOKEN)]))
            value = draw(st.sampled_from([0.5, np.nan, np.inf]))
            array = np.full(
                draw(st.sampled_from([R_SHAPE, (25,), (5, 6)])), value, dtype=draw(st.sampled_from(["<f4", "<f8"]))
            )
            name = draw(st.sampled_from([b"u", b"v", b"u" * 65]))
            header, field, payload = protocol.encode_data(token, sim_id, step, 1, name, array)
            return [header, field, payload.tobytes()]

        @st.composite
        def r_control(draw):
            token = draw(st.sampled_from([TOKEN, OTHER_TOKEN]))
            declaration = draw(st.sampled_from([None, protocol.encode_declaration(r_fields), b"u float64 5 5", b"x"]))
            return protocol.encode_hello(token, draw(st.integers(0, 3)), 1, declaration)

        # Each kind of hostile message equally often: (frames, whether it goes to the control socket).
        kinds = [
            st.tuples(frames_st.filter(bool), st.booleans()),
            st.tuples(r_data(), st.just(False)),
            st.tuples(mutated(r_data()), st.just(False)),
            st.tuples(mutated(valid_finish(OTHER_TOKEN)), st.just(False)),
            st.tuples(valid_finish(TOKEN), st.just(False)),
            st.tuples(r_control(), st.just(True)),
            st.tuples(mutated(r_control()), st.just(True)),
        ]

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(st.integers(0, len(kinds) - 1).flatmap(kinds.__getitem__))
        def send_hostile(message):
            frames, to_control = message
            if not frames:  # ZeroMQ has no message of zero frames
                return
            if to_control:
                why = reason(protocol.validate_hello, frames)
                if why is None:
                    return
                dealer.send_multipart(frames)
                reply = protocol.decode_reply(dealer.recv_multipart())
                assert isinstance(reply, protocol.Rejection) and reply.reason == why
                expected_control[why] += 1
            else:
                why = reason(protocol.validate_message, frames)
                if why is None:
                    return
                push.send_multipart(frames)
                expected_data[why] += 1

        send_hostile()
        expected = expected_data + expected_control
        n_sent = sum(expected.values())
        wait_until(lambda: sum(receiver.counters().rejected.values()) >= n_sent, 30, f"{n_sent} rejections")
        counters = receiver.counters()
        print(
            f"\nhostile messages: {n_sent}; data socket: {dict(expected_data)}; "
            f"control socket: {dict(expected_control)}"
        )
        assert counters.rejected == dict(expected)
        assert set(counters.rejected) <= REASONS
        assert n_sent >= 200, n_sent
        assert counters.unique_received == counters.duplicates == counters.bytes_received == 0
        assert not receiver.stored.any() and not sink.samples.any()
        assert receiver.error is None and receiver._thread.is_alive()
        # ... and it still takes a valid step afterwards.
        good = protocol.encode_data(issued[0], 0, 0, 1, b"u", np.ones(R_SHAPE, np.float32))
        push.send_multipart(good)
        wait_until(lambda: receiver.counters().unique_received == 1, 10, "the valid step")
        assert receiver.error is None
    finally:
        push.close(linger=0)
        dealer.close(linger=0)
        receiver.stop()
