"""The server's receiver against real ZeroMQ peers: validation, rejection counts, deduplication, handshake."""

from __future__ import annotations

import collections
import logging
import threading

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from waiting import wait_until

from jaxsurro import client, protocol
from jaxsurro.server.buffers import FIFOBuffer
from jaxsurro.server.receiver import LATE, BufferSink, ExperimentMismatch, Receiver, ValidationSink
from jaxsurro.table import SimState, SimulationTable

N_SIMS, N_STEPS, SHAPE = 3, 4, (5, 5)


@pytest.fixture
def table():
    table = SimulationTable(np.arange(N_SIMS * 2, dtype=float).reshape(N_SIMS, 2))
    for record in list(table)[:2]:  # simulations 0 and 1 are submitted; 2 is still pending
        record.attempts, record.state = 1, SimState.SUBMITTED
    return table


def make_receiver(
    table: SimulationTable, sink=None, secret: bytes | None = None, shape=SHAPE, n_steps=N_STEPS, **options
) -> Receiver:
    """A receiver (not started) of one field "u" of ``shape`` on loopback, into ``sink`` (default: a ValidationSink)."""
    return Receiver(
        table=table,
        sink=ValidationSink(N_SIMS, n_steps, int(np.prod(shape))) if sink is None else sink,
        token=protocol.new_token(),
        secret=secret or protocol.new_secret(),
        fields={"u": shape},
        wire_dtype="float32",
        n_steps=n_steps,
        host="127.0.0.1",
        **options,
    )


@pytest.fixture
def receiver(table):
    receiver = make_receiver(table)
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def push(receiver):
    """A client's data socket to the receiver (a DEALER, as the client's)."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(receiver.data_address)
    yield socket
    socket.close()


def field(value: float, shape=SHAPE, dtype=np.float32) -> np.ndarray:
    return np.full(shape, value, dtype=dtype)


def issued(receiver: Receiver, sim_id: int, attempt: int = 1) -> bytes:
    """The credential a WELCOME would give attempt ``attempt`` of ``sim_id``."""
    return receiver.credentials.issue(sim_id, attempt)


def test_bad_messages_are_counted_by_reason_and_the_receiver_keeps_going(receiver, push):
    token = issued(receiver, 0)
    bad = {
        "bad_credential": protocol.encode_data(receiver.token, 0, 0, 1, b"u", field(1.0)),  # the run token is none
        "unknown_simulation": protocol.encode_data(token, 2, 0, 1, b"u", field(1.0)),  # never submitted
        "time_step_out_of_range": protocol.encode_data(token, 0, N_STEPS, 1, b"u", field(1.0)),
        "unknown_field": protocol.encode_data(token, 0, 0, 1, b"v", field(1.0)),
        "bad_shape": protocol.encode_data(token, 0, 0, 1, b"u", field(1.0, shape=(25,))),
        "bad_dtype": protocol.encode_data(token, 0, 0, 1, b"u", field(1.0, dtype=np.float64)),
        "non_finite": protocol.encode_data(token, 0, 0, 1, b"u", field(np.nan)),
        "bad_magic": [b"XXXX" + bytes(60)],
        "malformed": [b"short"],
    }
    for frames in bad.values():
        push.send_multipart(frames)
    push.send_multipart(protocol.encode_data(token, 0, 1, 1, b"u", field(7.0)))  # one good message after all
    wait_until(lambda: receiver.counters().unique_received == 1, 10, "the good message")
    assert receiver.counters().rejected == {reason: 1 for reason in bad}
    assert set(bad) <= set(protocol.REJECTION_REASONS)
    np.testing.assert_array_equal(receiver.sink.samples[0, 1], field(7.0).reshape(-1))
    assert receiver.stored.sum() == 1
    assert receiver.error is None  # the thread is still healthy, but the fields disagree with the experiment:
    with pytest.raises(ExperimentMismatch, match=r"field b'v' is not expected"):  # the first mismatch stops the run
        receiver.check()


def test_a_time_step_sent_twice_is_stored_once(receiver, push):
    for value in (1.0, 2.0):  # a restarted client resends step 0 (here with other bits, to tell them apart)
        push.send_multipart(protocol.encode_data(issued(receiver, 1), 1, 0, 1, b"u", field(value)))
    push.send_multipart(protocol.encode_finish(issued(receiver, 1), 1, 1, 1))
    wait_until(lambda: receiver.counters().finishes == 1, 10, "the FINISH")
    counters = receiver.counters()
    assert (counters.unique_received, counters.duplicates) == (1, 1)
    np.testing.assert_array_equal(receiver.sink.samples[1, 0], field(1.0).reshape(-1))  # the first copy is kept
    assert receiver.table[1].steps_finished == 1


def test_handshake_welcomes_submitted_simulations_and_refuses_others(receiver, table):
    with client.connect(server=receiver.control_address, token=receiver.token, sim_id=1, timeout=5) as sim:
        np.testing.assert_array_equal(sim.parameters, table[1].parameters)
        assert sim.n_ranks == 1
        for t in range(N_STEPS):
            sim.send("u", t, np.full(SHAPE, t, dtype=np.float64))  # float64 goes out as float32
    wait_until(lambda: receiver.counters().finishes == 1, 10, "the FINISH")
    assert receiver.counters().unique_received == N_STEPS
    np.testing.assert_array_equal(receiver.sink.samples[1, :, 0], np.arange(N_STEPS))

    with pytest.raises(client.SimulationRejected, match="unknown_simulation: simulation 2 is not in this run"):
        client.connect(server=receiver.control_address, token=receiver.token, sim_id=2, timeout=5)
    with pytest.raises(client.SimulationRejected, match="bad_token"):
        client.connect(server=receiver.control_address, token=protocol.new_token(), sim_id=0, timeout=5)
    assert receiver.counters().rejected == {"unknown_simulation": 1, "bad_token": 1}


def test_a_full_buffer_blocks_the_client_without_losing_data(table):
    # Capacity 2 and nobody reading: the receiver stops reading, the queues fill and send() blocks.
    buffer = FIFOBuffer(capacity=2, watermark=0, input_dim=3, field_size=int(np.prod(SHAPE)), seed=0)
    receiver = make_receiver(table, BufferSink(buffer, table, N_STEPS, 0.1))
    receiver.start()
    try:
        with client.connect(server=receiver.control_address, token=receiver.token, sim_id=0, timeout=5) as sim:
            for t in range(N_STEPS):
                sim.send("u", t, field(t))
            wait_until(lambda: buffer.stats().population == 2, 10, "the buffer to fill")
            # The counts show the stored steps once the receiver waits on the full sink (within 0.1 s).
            wait_until(lambda: receiver.counters().unique_received == 2, 10, "the stored steps to be counted")
            assert buffer.stats().population == 2  # the rest waits in ZeroMQ's queues, not dropped
            drained = [buffer.get_batch(2, timeout=5) for _ in range(2)]
        wait_until(lambda: receiver.counters().finishes == 1, 10, "the FINISH")
        assert receiver.counters().unique_received == N_STEPS
        ids = np.concatenate([batch.sample_ids for batch in drained])
        np.testing.assert_array_equal(np.sort(ids), np.arange(N_STEPS))  # sim 0: ids 0..3, each once
        np.testing.assert_allclose(drained[0].inputs[0], [0.0, 1.0, 0.1])  # parameters, then time (t+1)*dt
    finally:
        receiver.stop()


def test_a_time_step_arriving_after_reception_ended_is_counted_not_stored(table):
    buffer = FIFOBuffer(capacity=8, watermark=0, input_dim=3, field_size=int(np.prod(SHAPE)), seed=0)
    buffer.end_reception()
    receiver = make_receiver(table, BufferSink(buffer, table, N_STEPS, 0.1))
    receiver.start()
    try:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.connect(receiver.data_address)
        socket.send_multipart(protocol.encode_data(issued(receiver, 0), 0, 0, 1, b"u", field(1.0)))
        wait_until(lambda: receiver.counters().rejected.get(LATE) == 1, 10, "the late message to be counted")
        socket.close(linger=0)
        assert receiver.counters().unique_received == 0
        receiver.check()
    finally:
        receiver.stop()


def test_counters_are_a_consistent_snapshot_the_caller_owns(receiver, push):
    before = receiver.counters()
    assert before.unique_received == before.duplicates == before.finishes == before.bytes_received == 0
    assert before.first_data_at is None and before.last_data_at is None and before.rejected == {}
    for step in (0, 1, 1):  # two steps stored, one duplicate
        push.send_multipart(protocol.encode_data(issued(receiver, 0), 0, step, 1, b"u", field(float(step))))
    push.send_multipart(protocol.encode_data(protocol.new_token(), 0, 2, 1, b"u", field(2.0)))  # no credential
    wait_until(lambda: receiver.counters().rejected.get("bad_credential") == 1, 10, "the four messages")
    after = receiver.counters()
    assert (after.unique_received, after.duplicates) == (2, 1)
    assert after.bytes_received == 2 * field(0.0).nbytes
    assert before.last_message_at <= after.first_data_at <= after.last_data_at <= after.last_message_at
    after.rejected["bad_credential"] = 99  # a copy: the receiver's counts do not change
    assert receiver.counters().rejected == {"bad_credential": 1}


def test_the_first_rejection_of_each_reason_is_a_warning_naming_simulation_step_and_field(receiver, push, caplog):
    caplog.set_level(logging.DEBUG, logger="jaxsurro")
    for t in (0, 1):
        push.send_multipart(protocol.encode_data(issued(receiver, 0), 0, t, 1, b"u", field(np.nan)))
    wait_until(lambda: receiver.counters().rejected.get("non_finite") == 2, 10, "both rejections")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "non_finite" in warnings[0] and "'u' of simulation 0 step 0" in warnings[0]
    receiver.check()  # bad values are noise to count, not a reason to stop


def test_a_token_holder_cannot_forge_a_running_simulations_steps_or_finish(receiver, push, table):
    """A second sender holding the run token forges steps and a FINISH for simulation 1 while its real
    client runs: nothing forged is stored, every real step is, and each forgery is counted by reason."""
    real = client.connect(server=receiver.control_address, token=receiver.token, sim_id=1, timeout=5)
    forged = field(1e30)
    guessed = [
        receiver.token,  # the run token in place of a credential
        (1).to_bytes(4, "little") + bytes(12),  # attempt 1 with a guessed MAC
        protocol.AttemptCredentials(protocol.new_secret()).make(1, 1),  # made with another secret
    ]
    for credential in guessed:
        for t in range(N_STEPS):
            push.send_multipart(protocol.encode_data(credential, 1, t, 1, b"u", forged))
        push.send_multipart(protocol.encode_finish(credential, 1, 1, 1))
    # Asking for the running attempt's credential with a HELLO of its own is refused.
    with pytest.raises(client.SimulationRejected, match="stale_attempt"):
        client.connect(server=receiver.control_address, token=receiver.token, sim_id=1, timeout=5)
    with real:
        for t in range(N_STEPS):
            real.send("u", t, field(float(t)))
    n_forged = len(guessed) * (N_STEPS + 1)
    wait_until(lambda: receiver.counters().finishes == 1, 10, "the real FINISH")
    wait_until(lambda: sum(receiver.counters().rejected.values()) == n_forged + 1, 10, "every forgery counted")
    counters = receiver.counters()
    assert counters.rejected == {"bad_credential": n_forged, "stale_attempt": 1}
    assert (counters.unique_received, counters.duplicates) == (N_STEPS, 0)
    np.testing.assert_array_equal(receiver.sink.samples[1, :, 0], np.arange(N_STEPS))  # the real values only
    assert not np.isin(receiver.sink.samples, forged).any()
    assert table[1].steps_finished == N_STEPS


def test_a_stale_attempts_messages_are_refused_once_the_next_attempt_is_welcomed(receiver, table):
    """Attempt 1 of simulation 0 hangs after one step; the launcher starts attempt 2. What the leftover
    process of attempt 1 sends is refused (stale_attempt); attempt 2's steps are all stored, none lost."""
    first = client.connect(server=receiver.control_address, token=receiver.token, sim_id=0, timeout=5)
    first.send("u", 0, field(-1.0))
    wait_until(lambda: receiver.counters().unique_received == 1, 10, "attempt 1's step")
    with table.lock:  # what the launcher does when it retries (jaxsurro.launcher.supervisor)
        table[0].attempts, table[0].attempt_clients = 2, set()
    with client.connect(server=receiver.control_address, token=receiver.token, sim_id=0, timeout=5) as second:
        first.send("u", 1, field(-1.0))  # the leftover process goes on
        first.finish()
        for t in range(N_STEPS):
            second.send("u", t, field(float(t)))
    wait_until(lambda: receiver.counters().finishes == 1, 10, "attempt 2's FINISH")
    wait_until(lambda: receiver.counters().rejected.get("stale_attempt") == 2, 10, "attempt 1's step and FINISH")
    counters = receiver.counters()
    assert (counters.unique_received, counters.duplicates) == (N_STEPS, 1)  # attempt 2's step 0 was stored already
    np.testing.assert_array_equal(receiver.sink.samples[0, 1:, 0], np.arange(1, N_STEPS))
    assert table[0].steps_finished == N_STEPS


def test_with_curve_only_clients_given_the_servers_public_key_get_through(table, monkeypatch):
    """server.encryption = "curve": every socket is a CURVE server; a client without the server's public
    key gets no answer, one given it (JAXSURRO_SERVER_KEY) streams as usual."""
    public, secret = zmq.curve_keypair()
    receiver = make_receiver(table, curve_secret_key=secret)
    receiver.start()
    try:
        assert receiver.data.curve_server and receiver.control.curve_server
        monkeypatch.delenv(client.ENV_SERVER_KEY, raising=False)
        with pytest.raises(client.ServerUnreachable, match=client.ENV_SERVER_KEY):
            client.connect(server=receiver.control_address, token=receiver.token, sim_id=0, timeout=1)
        monkeypatch.setenv(client.ENV_SERVER_KEY, public.decode())
        with client.connect(server=receiver.control_address, token=receiver.token, sim_id=0, timeout=5) as sim:
            for t in range(N_STEPS):
                sim.send("u", t, field(float(t)))
        wait_until(lambda: receiver.counters().finishes == 1, 10, "the FINISH")
        assert receiver.counters().unique_received == N_STEPS
        np.testing.assert_array_equal(receiver.sink.samples[0, :, 0], np.arange(N_STEPS))
    finally:
        receiver.stop()


# -- batches: what one wakeup takes off the socket ---------------------------------------------------


def idle_receiver(table: SimulationTable, **options) -> Receiver:
    """A receiver whose thread is not started: the tests hand batches to it (Receiver._take_batch)."""
    return make_receiver(table, secret=SECRET, **options)


def take_batch(receiver: Receiver, batch: list[list[bytes]]) -> None:
    """Hands ``batch`` to an idle receiver as if one peer (no such ROUTER peer: answers are dropped) sent it."""
    receiver._take_batch(batch, [b"test peer"] * len(batch))


SECRET = bytes(range(100, 132))
MAKER = protocol.AttemptCredentials(SECRET)


def test_a_step_twice_in_one_batch_is_stored_once(table):
    receiver = idle_receiver(table)
    try:
        receiver.credentials.issue(0, 1)
        credential = MAKER.make(0, 1)
        batch = [protocol.encode_data(credential, 0, t, 1, b"u", field(v)) for t, v in ((0, 1.0), (1, 2.0), (0, 3.0))]
        take_batch(receiver, batch)
        counters = receiver._snapshot()
        assert (counters.unique_received, counters.duplicates) == (2, 1)
        assert counters.bytes_received == 2 * field(0.0).nbytes
        np.testing.assert_array_equal(receiver.sink.samples[0, 0], field(1.0).reshape(-1))  # the first is kept
        take_batch(receiver, batch[:1])  # ... and a later batch finds it stored
        assert receiver._snapshot().duplicates == 2
    finally:
        receiver.stop()


def test_a_finish_after_its_steps_in_one_batch_sees_them_stored(table):
    """Steps 0..3 and the FINISH in one batch: the FINISH is taken after the steps are stored, so the
    simulation is complete (a supervised table would otherwise count the steps as missing)."""
    table.supervised = True
    table[1].attempt_clients = {7}
    receiver = idle_receiver(table)
    try:
        receiver.credentials.issue(1, 1)
        credential = MAKER.make(1, 1)
        batch = [protocol.encode_data(credential, 1, t, 7, b"u", field(float(t))) for t in range(N_STEPS)]
        batch.append(protocol.encode_finish(credential, 1, 7, N_STEPS))
        batch.append(protocol.encode_data(credential, 1, 0, 7, b"u", field(9.0)))  # after the FINISH: a duplicate
        take_batch(receiver, batch)
        assert table[1].incomplete_finish == "" and table[1].steps_finished == N_STEPS
        counters = receiver._snapshot()
        assert (counters.unique_received, counters.duplicates, counters.finishes) == (N_STEPS, 1, 1)
    finally:
        receiver.stop()


@st.composite
def receiver_message(draw) -> list[bytes]:
    """Data for simulations 0 and 1 (attempt 1, a newer 2, or a forged credential), 2 (pending: unknown),
    steps within and past the end, NaN payloads, other shapes; FINISH with any count; some header bytes flipped."""
    sim_id = draw(st.sampled_from([0, 0, 1, 1, 2]))
    credential = draw(
        st.sampled_from([MAKER.make(sim_id, 1)] * 4 + [MAKER.make(sim_id, 2), bytes(16), protocol.new_token()])
    )
    if draw(st.integers(0, 5)) == 0:
        frames = protocol.encode_finish(credential, sim_id, 1, draw(st.integers(0, N_STEPS)))
    else:
        value = draw(st.sampled_from([1.0, 2.0, -5.0, np.nan]))
        shape = draw(st.sampled_from([SHAPE, SHAPE, SHAPE, (25,)]))
        step = draw(st.integers(0, N_STEPS))
        frames = [bytes(f) for f in protocol.encode_data(credential, sim_id, step, 1, b"u", field(value, shape))]
    if draw(st.integers(0, 7)) == 0:
        header = bytearray(frames[0])
        header[draw(st.integers(0, 63))] ^= 1 << draw(st.integers(0, 7))
        frames = [bytes(header), *frames[1:]]
    return frames


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(receiver_message(), max_size=30), st.lists(st.integers(1, 10), max_size=5))
def test_batches_store_and_count_what_one_message_at_a_time_would(messages, sizes):
    """Random mixes of valid and invalid messages, cut into random batches: the same steps are stored
    with the same values, and the same messages are counted as duplicates, finishes and rejections by
    reason, as when each message is validated (validate_message) and taken in turn."""
    table = SimulationTable(np.arange(N_SIMS * 2, dtype=float).reshape(N_SIMS, 2))
    for record in list(table)[:2]:
        record.attempts, record.state = 1, SimState.SUBMITTED
    receiver = idle_receiver(table)
    reference = protocol.Expectation(
        token=receiver.token,
        n_steps=N_STEPS,
        fields={"u": (SHAPE, np.dtype("<f4"))},
        rank=0,
        n_ranks=1,
        known_simulations=table.is_known,
        credentials=protocol.AttemptCredentials(SECRET),
    )
    try:
        for credentials in (receiver.credentials, reference.credentials):
            credentials.issue(0, 1)
            credentials.issue(1, 1)
        rejected: collections.Counter[str] = collections.Counter()
        stored = np.zeros_like(receiver.stored)
        samples = np.zeros_like(receiver.sink.samples)
        duplicates = finishes = 0
        for frames in messages:
            try:
                message = protocol.validate_message(frames, reference)
            except protocol.ProtocolError as error:
                rejected[error.reason] += 1
                continue
            if message.kind == protocol.FINISH:
                finishes += 1
            elif stored[message.sim_id, message.time_step]:
                duplicates += 1
            else:
                stored[message.sim_id, message.time_step] = True
                samples[message.sim_id, message.time_step] = message.array.reshape(-1)
        start = 0
        for size in [*sizes, len(messages)]:
            if messages[start : start + size]:
                take_batch(receiver, messages[start : start + size])
            start += size
        counters = receiver._snapshot()
        assert counters.rejected == dict(rejected)
        assert (counters.unique_received, counters.duplicates, counters.finishes) == (
            int(stored.sum()),
            duplicates,
            finishes,
        )
        np.testing.assert_array_equal(receiver.stored, stored)
        np.testing.assert_array_equal(receiver.sink.samples, samples)
    finally:
        receiver.stop()


def test_a_client_on_this_host_sends_over_ipc_and_closes_with_nothing_in_flight(table):
    """The receiver offers a Unix socket next to its TCP port and a client on its host picks it. The
    client fills every queue (a buffer of 2 that nobody drains yet) and reaches FINISH with steps still
    queued on its side: finish() returns only once the receiver answered the FINISH, and no step is
    lost at close (a sender's linger over ipc has been reported ignored, libzmq issue #4660)."""
    shape, n_steps = (256, 256), 48  # 256 KiB a step: 12 MiB, more than the socket buffers hold
    one = SimulationTable(np.zeros((1, 2)))
    one[0].attempts, one[0].state = 1, SimState.SUBMITTED
    buffer = FIFOBuffer(capacity=2, watermark=0, input_dim=3, field_size=int(np.prod(shape)), seed=0)
    receiver = make_receiver(one, BufferSink(buffer, one, n_steps, 0.1), shape=shape, n_steps=n_steps)
    receiver.start()
    outcome: dict[str, object] = {}

    def solver() -> None:
        try:
            with client.connect(server=receiver.control_address, token=receiver.token, sim_id=0, timeout=30) as sim:
                outcome["address"] = sim.addresses[0]
                for t in range(n_steps):
                    sim.send("u", t, np.full(shape, float(t)))
                outcome["finishing"] = True
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=solver, daemon=True)
    try:
        assert receiver.data_endpoints == (
            receiver.data_address,
            f"ipc://@jaxsurro-data-{receiver.data_address.rpartition(':')[2]}",
        )
        thread.start()
        wait_until(lambda: receiver.counters().unique_received == 2, 10, "the buffer to fill")
        assert "finishing" not in outcome, "the client sent everything although the server stored 2 steps"
        drained = []
        while len(drained) < n_steps:
            drained.extend(buffer.get_batch(2, timeout=10).sample_ids.tolist())
        thread.join(10)
        assert not thread.is_alive() and "error" not in outcome, outcome
        assert outcome["address"] == receiver.data_endpoints[1]
        assert sorted(drained) == list(range(n_steps))
        wait_until(lambda: receiver.counters().finishes == 1, 10, "the FINISH to be counted")
        assert one[0].steps_finished == n_steps
    finally:
        buffer.close()
        receiver.stop()


def test_with_local_transport_tcp_the_receiver_offers_only_tcp(table):
    receiver = make_receiver(table, local_transport="tcp")
    try:
        assert receiver.data_endpoints == (receiver.data_address,)
        assert receiver.addresses == (receiver.data_address,)
    finally:
        receiver.stop()
