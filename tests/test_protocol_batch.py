"""The batched check of data messages (`protocol.validate_batch`) against one message at a time.

On random mixes of valid, invalid and mutated DATA and FINISH messages, cut into random batches,
validate_batch gives every message the verdict that `protocol.validate_message` gives it in the same
order: the same acceptance, reason and text, ids, field and payload, and leaves the attempt credentials
in the same state (a newer attempt seen mid-batch makes the same later messages stale).
"""

from __future__ import annotations

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxsurro import protocol

SECRET = bytes(range(40, 72))
TOKEN = bytes(range(1, 17))
N_STEPS = 6
FIELDS = {"u": ((3, 2), np.dtype("<f4")), "w": ((2,), np.dtype("<f8"))}
BOUNDS = {"w": (-10.0, 10.0)}
KNOWN = frozenset({0, 1, 2, 5})
SIMULATIONS = [0, 1, 2, 3, 5, 2**40, protocol.ANY_SIMULATION]  # 3 and 2**40 unknown, the last reserved
RANK, N_RANKS = 1, 2
BATCHED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAKER = protocol.AttemptCredentials(SECRET)  # makes credentials; holds no state the tests compare


def expectation(n_ranks: int = N_RANKS, rank: int = RANK) -> protocol.Expectation:
    """A fresh expectation whose credentials know attempt 2 of simulations 0 and 1 (2 and 5: none yet)."""
    credentials = protocol.AttemptCredentials(SECRET)
    for sim_id in (0, 1):
        credentials.issue(sim_id, 2)
    return protocol.Expectation(
        token=TOKEN,
        n_steps=N_STEPS,
        fields=FIELDS,
        rank=rank,
        n_ranks=n_ranks,
        known_simulations=KNOWN,
        credentials=credentials,
        bounds=BOUNDS,
    )


credential_st = st.one_of(
    st.tuples(st.sampled_from(SIMULATIONS[:5]), st.integers(1, 3)).map(lambda pair: MAKER.make(*pair)),
    st.sampled_from([TOKEN, bytes(16), b"\x01" + bytes(15)]),
    st.binary(min_size=16, max_size=16),
)
value_st = st.sampled_from([0.5, -3.0, 10.0, 20.0, 3e38, -3e38, np.nan, np.inf, -np.inf])


@st.composite
def valid_data(draw) -> list[bytes]:
    """A DATA message that passes at rank 1 of 2 when its attempt is current: attempt 2 of simulations 0
    and 1 (or 3, a newer one; 1, a stale one), or any attempt of 2 and 5, unseen until then."""
    sim_id = draw(st.sampled_from([0, 0, 1, 2, 5]))
    attempt = draw(st.sampled_from([2, 2, 2, 3, 1])) if sim_id < 2 else draw(st.integers(1, 2))
    step = draw(st.sampled_from([t for t in range(N_STEPS) if protocol.rank_for(sim_id, t, N_RANKS) == RANK]))
    name = draw(st.sampled_from(["u", "w"]))
    shape, dtype = FIELDS[name]
    low, high = BOUNDS.get(name, (-3.4e38, 3.4e38))  # float32 values near the largest: their sum overflows
    size = int(np.prod(shape))
    values = draw(
        st.lists(st.floats(float(np.float32(low)), float(np.float32(high)), width=32), min_size=size, max_size=size)
    )
    array = np.asarray(values, dtype=dtype).reshape(shape)
    client_id = draw(st.integers(0, 2**32 - 1))
    header, field, payload = protocol.encode_data(
        MAKER.make(sim_id, attempt), sim_id, step, client_id, name.encode(), array
    )
    return [header, field, payload.tobytes()]


@st.composite
def data_message(draw) -> list[bytes]:
    """A DATA message wrong in one or several of its parts, sometimes none."""
    sim_id = draw(st.sampled_from(SIMULATIONS[:-1]))
    name = draw(st.sampled_from(["u", "u", "w", "w", "v"]))
    shape, dtype = FIELDS.get(name, FIELDS["u"])
    shape = draw(st.sampled_from([shape, shape, (6,), ()]))
    dtype = draw(st.sampled_from([dtype, dtype, dtype, np.dtype("<f8") if dtype.itemsize == 4 else np.dtype("<f4")]))
    values = draw(st.lists(value_st, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    credential = draw(st.one_of(st.just(MAKER.make(sim_id, 2) if sim_id < 2**32 else TOKEN), credential_st))
    step = draw(st.integers(0, N_STEPS))
    client_id = draw(st.integers(0, 2**32 - 1))
    with np.errstate(over="ignore"):
        array = np.asarray(values, dtype=np.float64).astype(dtype).reshape(shape)
    header, field, payload = protocol.encode_data(credential, sim_id, step, client_id, name.encode(), array)
    return [header, field, payload.tobytes()]


@st.composite
def finish_message(draw) -> list[bytes]:
    sim_id = draw(st.sampled_from(SIMULATIONS[:-1]))
    credential = draw(st.one_of(st.just(MAKER.make(sim_id, 2) if sim_id < 2**32 else TOKEN), credential_st))
    return protocol.encode_finish(
        credential, sim_id, draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, N_STEPS + 1))
    )


@st.composite
def mutated(draw, message: st.SearchStrategy[list[bytes]]) -> list[bytes]:
    """A message with a byte changed, a frame cut, extended, dropped or added."""
    frames = [bytearray(frame) for frame in draw(message)]
    op = draw(st.sampled_from(["flip", "flip", "flip", "truncate", "extend", "drop", "add"]))
    i = draw(st.integers(0, len(frames) - 1))
    if op == "flip" and frames[i]:
        j = draw(st.integers(0, len(frames[i]) - 1))
        frames[i][j] ^= 1 << draw(st.integers(0, 7))
    elif op == "truncate":
        del frames[i][draw(st.integers(0, len(frames[i]))) :]
    elif op == "extend":
        frames[i] += draw(st.binary(min_size=1, max_size=16))
    elif op == "drop" and len(frames) > 1:
        del frames[i]
    elif op == "add":
        frames.insert(i, bytearray(draw(st.binary(max_size=70))))
    return [bytes(frame) for frame in frames]


message_st = st.one_of(
    *[valid_data()] * 6, data_message(), finish_message(), mutated(valid_data()), mutated(finish_message())
)


def outcome(result: protocol.Received | protocol.ProtocolError) -> tuple:
    """What a verdict says, comparable across the two paths (payloads flat, as bytes)."""
    if isinstance(result, protocol.ProtocolError):
        return ("rejected", result.reason, result.message)
    payload = None if result.array is None else (result.array.dtype.str, result.array.tobytes())
    return (result.kind, result.sim_id, result.time_step, result.client_id, result.field, payload)


def one_by_one(messages: list[list], expected: protocol.Expectation) -> list[tuple]:
    verdicts = []
    for frames in messages:
        try:
            verdicts.append(outcome(protocol.validate_message(frames, expected)))
        except protocol.ProtocolError as error:
            verdicts.append(outcome(error))
    return verdicts


def batched(messages: list[list], expected: protocol.Expectation, sizes: list[int]) -> list[tuple]:
    verdicts, start = [], 0
    sizes = [*sizes, len(messages)]  # the rest in one batch
    for size in sizes:
        batch = messages[start : start + size]
        start += size
        if not batch:
            continue
        checked = protocol.validate_batch(batch, expected)
        for i in range(len(batch)):
            if i in checked.errors:
                assert checked.kind[i] == 0
                verdicts.append(outcome(checked.errors[i]))
                continue
            array = checked.array[i]
            received = protocol.Received(
                int(checked.kind[i]),
                int(checked.sim_id[i]),
                int(checked.time_step[i]),
                int(checked.client_id[i]),
                checked.field[i],
                None if array is None else array.reshape(expected.fields[checked.field[i]][0]),
            )
            verdicts.append(outcome(received))
    return verdicts


def credential_state(expected: protocol.Expectation) -> tuple:
    """The credentials' current attempts, and their dense rows agreeing with them."""
    credentials = expected.credentials
    current = credentials.current_attempts()
    rows = credentials.current_rows(np.array(sorted(KNOWN), dtype=np.uint64))
    for sim_id, row in zip(sorted(KNOWN), rows, strict=True):
        want = MAKER.make(sim_id, current[sim_id]) if sim_id in current else bytes(16)
        assert row.tobytes() == want
    return tuple(sorted(current.items()))


@BATCHED
@given(st.lists(message_st, max_size=40), st.lists(st.integers(0, 12), max_size=6))
def test_a_batch_gets_the_verdicts_of_one_message_at_a_time(messages, sizes):
    reference, tested = expectation(), expectation()
    assert batched(messages, tested, sizes) == one_by_one(messages, reference)
    assert credential_state(tested) == credential_state(reference)


@settings(max_examples=100, deadline=None)
@given(st.lists(message_st, max_size=20), st.sampled_from(["frame", "memoryview", "cast"]))
def test_any_buffer_type_gets_the_same_verdicts(messages, kind):
    """zmq.Frame (what the receiver passes), memoryviews, and memoryviews whose len() counts 8-byte items."""

    def wrap(frame: bytes):
        if kind == "frame":
            return zmq.Frame(frame)
        view = memoryview(frame)
        return view.cast("Q") if kind == "cast" and len(frame) % 8 == 0 and frame else view

    wrapped = [[wrap(frame) for frame in frames] for frames in messages]
    assert batched(wrapped, expectation(), []) == one_by_one(messages, expectation())


@pytest.mark.parametrize("n_ranks, rank", [(1, 0), (3, 2)])
def test_valid_messages_pass_the_vector_checks_at_any_rank(n_ranks, rank, monkeypatch):
    expected = expectation(n_ranks, rank)
    monkeypatch.setattr(protocol, "validate_message", None)  # not one message goes one at a time
    messages = [
        protocol.encode_data(MAKER.make(sim_id, 2), sim_id, step, 7, b"u", np.full((3, 2), step, np.float32))
        for sim_id in (0, 1)
        for step in range(N_STEPS)
        if protocol.rank_for(sim_id, step, n_ranks) == rank
    ]
    checked = protocol.validate_batch(messages, expected)
    assert not checked.errors and (checked.kind == protocol.DATA).all()
    np.testing.assert_array_equal(checked.time_step, [int(protocol.decode_header(m[0]).time_step) for m in messages])
    for message, array in zip(messages, checked.array, strict=True):
        assert array.base is not None and np.shares_memory(array, message[2])  # a view of the frame, not a copy


def test_a_newer_attempt_mid_batch_makes_the_rest_of_the_older_attempt_stale():
    """Attempt 3 of simulation 0 appears in the middle of a batch of attempt 2's steps: the steps of
    attempt 2 after it are stale, exactly as when each message is checked in turn."""
    expected = expectation(n_ranks=1, rank=0)
    old, new = MAKER.make(0, 2), MAKER.make(0, 3)
    values = np.zeros((3, 2), np.float32)
    messages = [protocol.encode_data(c, 0, t, 1, b"u", values) for c, t in ((old, 0), (new, 1), (old, 2), (new, 3))]
    checked = protocol.validate_batch(messages, expected)
    assert checked.kind.tolist() == [protocol.DATA, protocol.DATA, 0, protocol.DATA]
    assert checked.errors[2].reason == "stale_attempt"
    assert expected.credentials.current_attempts()[0] == 3


def test_finite_checks_read_a_sum_and_fall_back_to_isfinite():
    """Finite float32 values whose sum overflows are finite; one NaN or inf among them is not."""
    expected = expectation(n_ranks=1, rank=0)
    huge = np.full((3, 2), 3e38, np.float32)  # the float32 sum is inf, every value finite
    with_nan = huge.copy()
    with_nan[1, 1] = np.nan
    messages = [protocol.encode_data(MAKER.make(0, 2), 0, t, 1, b"u", a) for t, a in enumerate((huge, with_nan))]
    checked = protocol.validate_batch(messages, expected)
    assert checked.kind[0] == protocol.DATA and checked.errors[1].reason == "non_finite"


def test_the_dense_credentials_leave_large_simulation_ids_to_the_dictionary():
    credentials = protocol.AttemptCredentials(SECRET)
    large = protocol.DENSE_SIMULATIONS + 5
    credentials.issue(large, 1)
    credentials.issue(3, 1)
    rows = credentials.current_rows(np.array([3, large, 2**64 - 1, 4], dtype=np.uint64))
    assert rows[0].tobytes() == MAKER.make(3, 1)
    assert not rows[1:].any()  # not in the dense rows: such a message is checked one at a time
    credentials.check(large, MAKER.make(large, 1))  # ... which accepts it


def test_bounds_are_compared_as_validate_message_compares_them():
    """float32(0.1) is above the bound 0.1: out of bounds in both paths (a float32 comparison would round the bound)."""
    credentials = protocol.AttemptCredentials(SECRET)
    credentials.issue(0, 1)
    expected = protocol.Expectation(
        token=TOKEN,
        n_steps=N_STEPS,
        fields={"u": ((2,), np.dtype("<f4"))},
        rank=0,
        n_ranks=1,
        known_simulations=KNOWN,
        credentials=credentials,
        bounds={"u": (-0.1, 0.1)},
    )
    messages = [
        protocol.encode_data(MAKER.make(0, 1), 0, t, 1, b"u", np.array([v, 0.0], np.float32))
        for t, v in enumerate((0.1, 0.0999, -0.0999))
    ]
    assert batched(messages, expected, []) == one_by_one(messages, expected)
    assert [v[1] if v[0] == "rejected" else "accepted" for v in one_by_one(messages, expected)] == [
        "out_of_bounds",
        "accepted",
        "accepted",
    ]
