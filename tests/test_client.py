"""jaxsurro.client against a small real ZeroMQ server (a control ROUTER + one data ROUTER per rank on loopback TCP)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from zmq.utils import z85

from jaxsurro import client, protocol
from jaxsurro.client.simulation import choose_endpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WAIT = 10.0  # seconds: upper bound of every wait on a condition (they normally end in milliseconds)
BIG = (512, 512)  # 1 MiB as float32: large enough to fill socket buffers quickly


class FakeServer:
    """Rank 0 control ROUTER answering HELLO, and one ROUTER data socket per rank answering FINISH
    with RECEIVED (unless ``answer_finish`` is False), served by one thread."""

    def __init__(
        self,
        n_ranks: int = 2,
        sim_ids: tuple[int, ...] = (7,),
        n_steps: int = 100,
        shape: tuple[int, ...] = (4, 4),
        dtype: str = "float32",
        parameters: np.ndarray | None = None,
        reading: bool = True,
        receive_hwm: int = 1000,
        receive_buffer: int = -1,
        answer_finish: bool = True,
    ):
        """Bind every socket on 127.0.0.1 random ports and start the serving thread."""
        self.context = zmq.Context()
        self.token = protocol.new_token()
        self.n_steps = n_steps
        self.parameters = np.array([0.25, 1.5, -3.0]) if parameters is None else parameters
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.control_address = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.answer_finish = answer_finish
        self.pulls = []  # the data sockets, ROUTERs as a server rank's
        self.addresses = []
        for _ in range(n_ranks):
            pull = self.context.socket(zmq.ROUTER)
            pull.linger = 0
            pull.rcvhwm = receive_hwm
            pull.rcvbuf = receive_buffer
            self.addresses.append(f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}")
            self.pulls.append(pull)
        fields = {"temperature": (shape, dtype)}
        # One credential check per rank, as every server rank holds the same secret.
        secret = protocol.new_secret()
        self.expectations = [
            protocol.Expectation(
                self.token, n_steps, fields, rank, n_ranks, set(sim_ids), protocol.AttemptCredentials(secret)
            )
            for rank in range(n_ranks)
        ]
        self.unassigned = list(sim_ids)
        self.received: list[list[protocol.Received]] = [[] for _ in range(n_ranks)]
        self.rejected: collections.Counter[str] = collections.Counter()
        self.hellos = 0
        self.condition = threading.Condition()
        self.reading = threading.Event()
        if reading:
            self.reading.set()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="fake-server", daemon=True)
        self._thread.start()

    def environment(self, sim_id: int = 7, timeout: float = 10.0) -> dict[str, str]:
        """The JAXSURRO_* variables a launcher would set for one simulation."""
        return {
            client.ENV_SERVER: self.control_address,
            client.ENV_TOKEN: self.token.hex(),
            client.ENV_SIM_ID: str(sim_id),
            client.ENV_TIMEOUT: str(timeout),
        }

    def _serve(self) -> None:
        """Answer HELLOs; read and validate data messages once `reading` is set."""
        try:
            poller = zmq.Poller()
            poller.register(self.router, zmq.POLLIN)
            pulls_registered = False
            while not self._stop.is_set():
                if not pulls_registered and self.reading.is_set():
                    for pull in self.pulls:
                        poller.register(pull, zmq.POLLIN)
                    pulls_registered = True
                events = dict(poller.poll(20))
                if self.router in events:
                    self._answer_hello(self.router.recv_multipart())
                for rank, pull in enumerate(self.pulls):
                    if pull in events:
                        sender, *frames = pull.recv_multipart(copy=False)
                        self._receive(rank, frames)
                        if self.answer_finish and protocol.decode_header(frames[0]).kind == protocol.FINISH:
                            header = protocol.decode_header(frames[0])
                            receipt = protocol.encode_received(
                                header.token, header.sim_id, header.client_id, header.time_step
                            )
                            pull.send_multipart([sender, *receipt])
        except BaseException as error:  # surfaced by close()
            self._error = error

    def _answer_hello(self, frames: list[bytes]) -> None:
        """WELCOME a known simulation (or the next one for ANY), REJECT anything else."""
        routing_id, rest = frames[0], frames[1:]
        try:
            header = protocol.validate_hello(rest, self.expectations[0])
        except protocol.ProtocolError as error:
            reply = protocol.encode_reject(0, 0, error.reason, error.message)
        else:
            sim_id = header.sim_id
            if sim_id == protocol.ANY_SIMULATION:
                sim_id = self.unassigned[0] if self.unassigned else None
            if sim_id is None:
                reply = protocol.encode_reject(
                    header.sim_id, header.client_id, protocol.NO_SIMULATION_LEFT, "every simulation is assigned"
                )
            else:
                if sim_id in self.unassigned:
                    self.unassigned.remove(sim_id)
                credential = self.expectations[0].credentials.issue(sim_id, 1)
                reply = protocol.encode_welcome(
                    self.token, sim_id, header.client_id, self.addresses, self.parameters, credential, self.n_steps
                )
        self.router.send_multipart([routing_id, *reply])
        with self.condition:
            self.hellos += 1
            self.condition.notify_all()

    def _receive(self, rank: int, frames: list[zmq.Frame]) -> None:
        """Validate one data message; keep a copy of its array, or count its rejection."""
        try:
            message = protocol.validate_message(frames, self.expectations[rank])
        except protocol.ProtocolError as error:
            with self.condition:
                self.rejected[error.reason] += 1
                self.condition.notify_all()
            return
        if message.array is not None:
            message = message._replace(array=message.array.copy())
        with self.condition:
            self.received[rank].append(message)
            self.condition.notify_all()

    def wait_for(self, predicate, what: str, timeout: float = WAIT) -> None:
        """Block until predicate() holds (checked on every received message), or fail naming `what`."""
        with self.condition:
            if not self.condition.wait_for(predicate, timeout):
                pytest.fail(f"server: timed out after {timeout} s waiting for {what}; got {self.summary()}")

    def finished_ranks(self) -> int:
        """Number of ranks whose last message is a FINISH."""
        return sum(1 for messages in self.received if messages and messages[-1].kind == protocol.FINISH)

    def data(self) -> list[protocol.Received]:
        """Every DATA message received, all ranks."""
        return [m for messages in self.received for m in messages if m.kind == protocol.DATA]

    def summary(self) -> str:
        """Short description of what arrived, for failure messages."""
        kinds = [[protocol.KIND_NAMES[m.kind] for m in messages] for messages in self.received]
        return f"hellos={self.hellos} per-rank kinds={kinds} rejected={dict(self.rejected)}"

    def close(self) -> None:
        """Stop the thread, close the sockets; re-raise any error the thread met."""
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "fake server thread did not stop"
        self.context.destroy(linger=0)
        if self._error is not None:
            raise self._error


@contextlib.contextmanager
def fake_server(**kwargs):
    """A FakeServer closed on exit."""
    server = FakeServer(**kwargs)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def environment(monkeypatch):
    """Clear JAXSURRO_* variables, return a setter for a server's variables."""
    for name in (client.ENV_SERVER, client.ENV_TOKEN, client.ENV_SIM_ID, client.ENV_TIMEOUT, client.ENV_WIRE_DTYPE):
        monkeypatch.delenv(name, raising=False)

    def set_for(server: FakeServer, **kwargs):
        for name, value in server.environment(**kwargs).items():
            monkeypatch.setenv(name, value)

    return set_for


def dead_address() -> str:
    """A loopback TCP address where nothing listens (a port just released by the OS)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def test_streams_all_steps_routed_by_rank_with_finish_last(environment):
    """Every step reaches rank (sim_id + t) mod R as float32, and FINISH comes after each rank's data."""
    n_steps = 10
    rng = np.random.default_rng(0)
    fields = rng.normal(size=(n_steps, 4, 4))  # float64, as a solver produces them
    with fake_server(n_ranks=2, sim_ids=(7,), n_steps=n_steps) as server:
        environment(server, sim_id=7)
        with client.connect() as sim:
            assert sim.sim_id == 7 and sim.n_ranks == 2 and sim.n_steps == n_steps
            assert sim.parameters.dtype == np.float64
            np.testing.assert_array_equal(sim.parameters, server.parameters)
            for t, field in enumerate(fields):
                sim.send("temperature", t, field)
        server.wait_for(lambda: server.finished_ranks() == 2, "FINISH on both ranks")

        for rank, messages in enumerate(server.received):
            *data, finish = messages
            assert finish.kind == protocol.FINISH and finish.time_step == n_steps
            assert finish.client_id == sim.client_id
            assert [m.time_step for m in data] == [t for t in range(n_steps) if (7 + t) % 2 == rank]
            for message in data:
                assert message.sim_id == 7 and message.field == "temperature"
                assert message.array.dtype == np.float32
                np.testing.assert_array_equal(message.array, fields[message.time_step].astype(np.float32))
        assert sim.messages_sent == [5, 5] and sim.closed
        assert not server.rejected


def test_wire_float64_keeps_values_exact(environment):
    """wire_dtype float64 sends float64 bit for bit."""
    values = np.random.default_rng(1).normal(size=(3, 4, 4))
    with fake_server(n_ranks=1, dtype="float64", n_steps=3) as server:
        environment(server)
        with client.connect(wire_dtype="float64") as sim:
            for t in range(3):
                sim.send("temperature", t, values[t])
        server.wait_for(lambda: server.finished_ranks() == 1, "FINISH")
        for message in server.data():
            assert message.array.dtype == np.float64
            np.testing.assert_array_equal(message.array, values[message.time_step])


def test_wire_dtype_from_environment(environment, monkeypatch):
    """JAXSURRO_WIRE_DTYPE=float64 selects float64 on the wire."""
    with fake_server(n_ranks=1, dtype="float64", n_steps=1) as server:
        environment(server)
        monkeypatch.setenv(client.ENV_WIRE_DTYPE, "float64")
        with client.connect() as sim:
            sim.send("temperature", 0, np.full((4, 4), 1 / 3))
        server.wait_for(lambda: server.finished_ranks() == 1, "FINISH")
        assert server.data()[0].array.dtype == np.float64 and server.data()[0].array[0, 0] == 1 / 3


@pytest.mark.parametrize("wire_dtype", ["float32", "float64"])
def test_caller_may_overwrite_array_right_after_send(environment, wire_dtype):
    """An array already in the wire dtype is copied once, so in-place reuse by the solver is safe."""
    n_steps = 8
    with fake_server(n_ranks=2, shape=BIG, dtype=wire_dtype, n_steps=n_steps) as server:
        environment(server)
        buffer = np.empty(BIG, dtype=wire_dtype)
        with client.connect(wire_dtype=wire_dtype) as sim:
            for t in range(n_steps):
                buffer[...] = t  # the solver overwrites its state in place every step
                sim.send("temperature", t, buffer)
        server.wait_for(lambda: server.finished_ranks() == 2, "FINISH on both ranks")
        assert sorted(m.time_step for m in server.data()) == list(range(n_steps))
        for message in server.data():
            assert (message.array == message.time_step).all(), f"step {message.time_step} was overwritten"


def test_non_contiguous_and_integer_arrays_are_converted(environment):
    """A strided view and an integer array arrive as C-ordered float32 with the same values."""
    base = np.arange(64.0).reshape(8, 8)
    with fake_server(n_ranks=1, n_steps=2) as server:
        environment(server)
        with client.connect() as sim:
            sim.send("temperature", 0, base[::2, ::2])
            sim.send("temperature", np.int64(1), np.arange(16).reshape(4, 4))
        server.wait_for(lambda: server.finished_ranks() == 1, "FINISH")
        first, second = sorted(server.data(), key=lambda m: m.time_step)
        np.testing.assert_array_equal(first.array, base[::2, ::2])
        np.testing.assert_array_equal(second.array, np.arange(16).reshape(4, 4))


def test_finish_counts_distinct_steps(environment):
    """A step sent twice travels twice (the server dedupes) but FINISH reports distinct steps."""
    with fake_server(n_ranks=1, n_steps=5) as server:
        environment(server)
        with client.connect() as sim:
            for t in (0, 1, 1, 2):
                sim.send("temperature", t, np.zeros((4, 4)))
            assert sim.steps_sent == 3
        server.wait_for(lambda: server.finished_ranks() == 1, "FINISH")
        assert [m.time_step for m in server.received[0]] == [0, 1, 1, 2, 3]


def test_any_simulation_gets_the_next_one(environment):
    """sim_id ANY (persistent clients) is welcomed with a concrete simulation; none left is a REJECT."""
    with fake_server(n_ranks=1, sim_ids=(3, 4)) as server:
        environment(server)
        got = []
        for _ in range(2):
            with client.connect(sim_id=client.ANY_SIMULATION) as sim:
                got.append(sim.sim_id)
        assert got == [3, 4]
        with pytest.raises(client.SimulationRejected) as caught:
            client.connect(sim_id=client.ANY_SIMULATION)
        assert caught.value.reason == protocol.NO_SIMULATION_LEFT


def test_reject_unknown_simulation_is_a_clear_error(environment):
    """The server's REJECT reason is quoted in the client's error."""
    with fake_server(sim_ids=(7,)) as server:
        environment(server, sim_id=8)
        with pytest.raises(client.SimulationRejected) as caught:
            client.connect()
        assert caught.value.reason == "unknown_simulation"
        assert "refused simulation 8" in str(caught.value) and "not in this run" in str(caught.value)
        assert server.control_address in str(caught.value)


def test_reject_bad_token(environment, monkeypatch):
    """A client with another run's token is refused with reason bad_token."""
    with fake_server() as server:
        environment(server)
        monkeypatch.setenv(client.ENV_TOKEN, protocol.new_token().hex())
        with pytest.raises(client.SimulationRejected) as caught:
            client.connect()
        assert caught.value.reason == "bad_token" and "JAXSURRO_TOKEN" in str(caught.value)


def test_unreachable_server_fails_within_timeout(environment):
    """No server: ServerUnreachable (a ConnectionError) after about the timeout, naming address and hint."""
    address = dead_address()
    start = time.monotonic()
    with pytest.raises(client.ServerUnreachable) as caught:
        client.connect(server=address, token=protocol.new_token(), sim_id=1, timeout=0.3)
    elapsed = time.monotonic() - start
    assert isinstance(caught.value, ConnectionError)
    assert 0.25 <= elapsed < 2.0, elapsed
    message = str(caught.value)
    assert address in message and "0.3 s" in message and client.ENV_TIMEOUT in message


def test_send_times_out_when_server_stops_reading(environment):
    """A server that never reads makes send block, then raise TimeoutError after the timeout."""
    timeout = 0.4
    with fake_server(n_ranks=1, shape=BIG, n_steps=1000, reading=False, receive_hwm=1, receive_buffer=65536) as server:
        environment(server, timeout=timeout)
        field = np.ones(BIG)
        durations = []
        start_all = time.monotonic()
        with pytest.raises(TimeoutError) as caught:
            with client.connect() as sim:
                for t in range(1000):
                    start = time.monotonic()
                    try:
                        sim.send("temperature", t, field)
                    finally:
                        durations.append(time.monotonic() - start)
        assert "not accepting data" in str(caught.value) and "nothing was dropped" in str(caught.value)
        assert len(durations) < 100, "send never blocked: backpressure is missing"
        assert timeout * 0.9 <= durations[-1] < timeout + 1.5, durations[-1]
        assert time.monotonic() - start_all < 10.0
        assert sim.closed


def test_no_message_dropped_under_backpressure(environment):
    """The client blocks while the server does not read, then every step arrives once it does."""
    n_steps = 60  # 60 MiB: far more than the socket buffers hold
    with fake_server(
        n_ranks=2, shape=BIG, n_steps=n_steps, reading=False, receive_hwm=1, receive_buffer=65536
    ) as server:
        environment(server, timeout=30.0)
        outcome: dict[str, object] = {}

        def solver() -> None:
            try:
                with client.connect() as sim:
                    outcome["sim"] = sim
                    for t in range(n_steps):
                        sim.send("temperature", t, np.full(BIG, float(t)))
            except BaseException as error:
                outcome["error"] = error

        thread = threading.Thread(target=solver, daemon=True)
        thread.start()
        thread.join(0.5)  # unblocked, the whole run takes a few tens of milliseconds
        assert thread.is_alive(), f"client finished although the server read nothing: {outcome}"
        assert server.data() == []
        server.reading.set()
        thread.join(WAIT)
        assert not thread.is_alive() and "error" not in outcome, outcome
        server.wait_for(lambda: server.finished_ranks() == 2, "FINISH on both ranks")
        data = server.data()
        assert sorted(m.time_step for m in data) == list(range(n_steps))
        for message in data:
            assert message.array[0, 0] == message.time_step and message.array[-1, -1] == message.time_step
        assert [m.time_step for m in server.received[0] if m.kind == protocol.FINISH] == [n_steps]
        assert not server.rejected


def test_finish_raises_when_a_rank_cannot_take_the_data(environment):
    """Queued messages that cannot be delivered within the timeout raise instead of vanishing."""
    with fake_server(n_ranks=2) as server:
        server.addresses[1] = dead_address()  # rank 1 is gone
        environment(server, timeout=0.3)
        start = time.monotonic()
        with pytest.raises(TimeoutError) as caught:
            with client.connect() as sim:
                for t in range(4):
                    sim.send("temperature", t, np.zeros((4, 4)))
        assert "server rank(s) [1]" in str(caught.value) and "did not confirm FINISH" in str(caught.value)
        assert time.monotonic() - start < 3.0


def test_finish_waits_for_every_ranks_receipt(environment):
    """FINISH is only done once each rank answers it: a rank that takes the data but never answers
    makes finish() raise after the timeout, naming that rank."""
    with fake_server(n_ranks=1, answer_finish=False) as server:
        environment(server, timeout=0.3)
        with pytest.raises(TimeoutError, match=r"server rank\(s\) \[0\] .* did not confirm FINISH within 0.3 s"):
            with client.connect() as sim:
                sim.send("temperature", 0, np.zeros((4, 4)))
        server.wait_for(lambda: server.finished_ranks() == 1, "the FINISH")
        assert sim.closed


def test_exception_in_block_closes_without_finish(environment):
    """An error inside the with-block propagates; data sent before it arrives, FINISH does not."""
    with fake_server(n_ranks=1, reading=False) as server:
        environment(server)
        monitor = server.pulls[0].get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            with pytest.raises(RuntimeError, match="solver diverged"):
                with client.connect() as sim:
                    sim.send("temperature", 0, np.zeros((4, 4)))
                    sim.send("temperature", 1, np.zeros((4, 4)))
                    raise RuntimeError("solver diverged")
            assert sim.closed
            # After the TCP disconnect, everything the client sent is queued in the data socket.
            assert monitor.poll(WAIT * 1000), "the client never disconnected"
            frames = []
            while server.pulls[0].poll(200):
                frames.append(server.pulls[0].recv_multipart()[1:])
        finally:
            server.pulls[0].disable_monitor()
            monitor.close(linger=0)
        kinds = [protocol.decode_header(message[0]).kind for message in frames]
        assert kinds == [protocol.DATA, protocol.DATA]


@pytest.mark.parametrize(
    "field, time_step, array, error",
    [
        ("temperature", -1, np.zeros((4, 4)), ValueError),
        ("temperature", 2**32, np.zeros((4, 4)), ValueError),
        ("temperature", True, np.zeros((4, 4)), TypeError),
        ("temperature", 1.0, np.zeros((4, 4)), TypeError),
        ("temperature", 0, np.zeros((1, 1, 1, 1, 1)), ValueError),
        ("temperature", 0, np.zeros((4, 4), dtype=complex), TypeError),
        ("temperature", 0, np.array(["a", "b"]), TypeError),
        ("", 0, np.zeros((4, 4)), ValueError),
        ("t" * 65, 0, np.zeros((4, 4)), ValueError),
        (b"temperature", 0, np.zeros((4, 4)), TypeError),
    ],
)
def test_send_validates_arguments(environment, field, time_step, array, error):
    """Bad arguments fail in the client, before anything is sent."""
    with fake_server(n_ranks=1) as server:
        environment(server)
        with client.connect() as sim:
            with pytest.raises(error):
                sim.send(field, time_step, array)
            assert sim.messages_sent == [0]
        with pytest.raises(RuntimeError, match="closed"):
            sim.send("temperature", 0, np.zeros((4, 4)))


@pytest.mark.parametrize("variable", [client.ENV_SERVER, client.ENV_TOKEN, client.ENV_SIM_ID])
def test_missing_environment_variable_is_named(environment, monkeypatch, variable):
    """connect() without a required variable names it and says who sets it."""
    with fake_server() as server:
        environment(server)
        monkeypatch.delenv(variable)
        with pytest.raises(client.ClientConfigurationError) as caught:
            client.connect()
        assert variable in str(caught.value) and "launcher" in str(caught.value)
        assert server.hellos == 0


@pytest.mark.parametrize(
    "variable, value",
    [
        (client.ENV_SERVER, "127.0.0.1:5555"),
        (client.ENV_TOKEN, "abc"),
        (client.ENV_TOKEN, "zz" * 16),
        (client.ENV_SIM_ID, "seven"),
        (client.ENV_SIM_ID, "-1"),
        (client.ENV_TIMEOUT, "-1"),
        (client.ENV_TIMEOUT, "nan"),
        (client.ENV_TIMEOUT, "soon"),
        (client.ENV_WIRE_DTYPE, "int8"),
        (client.ENV_WIRE_DTYPE, "float128x"),
    ],
)
def test_invalid_environment_variable_is_named(variable, value):
    """An invalid value names the variable, what was expected and what came."""
    environ = {
        client.ENV_SERVER: "tcp://127.0.0.1:5555",
        client.ENV_TOKEN: protocol.new_token().hex(),
        client.ENV_SIM_ID: "3",
        variable: value,
    }
    with pytest.raises(client.ClientConfigurationError) as caught:
        client.resolve_settings(environ=environ)
    assert variable in str(caught.value) and repr(value) in str(caught.value)


def test_settings_defaults_and_overrides():
    """Timeout 60 s and float32 by default; explicit arguments win over the environment."""
    token = protocol.new_token()
    environ = {client.ENV_SERVER: "tcp://a:1", client.ENV_TOKEN: token.hex(), client.ENV_SIM_ID: "any"}
    settings = client.resolve_settings(environ=environ)
    assert settings == client.Settings("tcp://a:1", token, client.ANY_SIMULATION, 60.0, np.dtype("<f4"))
    other = protocol.new_token()
    settings = client.resolve_settings("tcp://b:2", other, 5, 0.5, np.float64, environ=environ)
    assert settings == client.Settings("tcp://b:2", other, 5, 0.5, np.dtype("<f8"))


class FakeCommunicator:
    """Stands in for an mpi4py communicator (only Get_size is used)."""

    def __init__(self, size: int):
        self.size = size

    def Get_size(self) -> int:
        return self.size


def test_communicator_of_one_rank_only(environment):
    """A size-1 communicator gives a plain client (multi-rank clients: tests/test_mpi_client.py)."""
    with fake_server(n_ranks=1, n_steps=1) as server:
        environment(server)
        with client.connect(comm=FakeCommunicator(1)) as sim:
            sim.send("temperature", 0, np.zeros((4, 4)))
        server.wait_for(lambda: server.finished_ranks() == 1, "FINISH")


def test_send_assembled_hands_over_wire_arrays_only(environment):
    """send_assembled (the MPI root's path) sends a C-contiguous wire-dtype array as is; anything else is
    a ValueError, and its time step and field name are checked like send()'s."""
    whole = np.arange(16, dtype=np.float32).reshape(4, 4)
    with fake_server(n_ranks=2, n_steps=2) as server:
        environment(server)
        with client.connect() as sim:
            assert sim.wire_dtype == np.dtype("<f4") and sim.timeout == 10.0
            for wrong in (whole.astype(np.float64), np.ones((4, 8), np.float32)[:, ::2], whole.tolist()):
                with pytest.raises(ValueError, match="C-contiguous float32"):
                    sim.send_assembled("temperature", 0, wrong)
            with pytest.raises(ValueError, match="time_step"):
                sim.send_assembled("temperature", -1, whole)
            with pytest.raises(TypeError, match="field must be a str"):
                sim.send_assembled(b"temperature", 0, whole)
            assert sim.messages_sent == [0, 0]
            sim.send_assembled("temperature", 1, whole)
        server.wait_for(lambda: server.finished_ranks() == 2, "FINISH on both ranks")
        (message,) = server.data()
        assert message.time_step == 1 and server.received[protocol.rank_for(7, 1, 2)][0] is message
        np.testing.assert_array_equal(message.array, whole)


def test_public_names_resolve_and_dead_ones_are_gone():
    """Every name in client.__all__ is there (the MPI client's on first use); removed names stay removed."""
    for name in client.__all__:
        assert getattr(client, name) is not None, name
    for name in ("WIRE_DTYPES", "ENVIRONMENT_VARIABLES"):
        assert not hasattr(client, name), name


def test_client_process_never_imports_jax():
    """A solver process using the client loads numpy and pyzmq, not JAX (nor mpi4py, nor the MPI client)."""
    script = """
import json, sys
import numpy as np
from jaxsurro import client
with client.connect() as sim:
    for t in range(3):
        sim.send("temperature", t, np.full((4, 4), float(t)))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "mpi4py")
               or m == "jaxsurro.client.parallel")
print(json.dumps({"heavy": heavy, "parameters": sim.parameters.tolist()}))
"""
    with fake_server(n_ranks=2, n_steps=3) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAXSURRO_")}
        env.update(server.environment(sim_id=7))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["heavy"] == [], f"the client pulled in {report['heavy']}"
        assert report["parameters"] == server.parameters.tolist()
        server.wait_for(lambda: server.finished_ranks() == 2, "FINISH from the subprocess")
        assert sorted(m.time_step for m in server.data()) == [0, 1, 2]


z85_alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.text(alphabet=z85_alphabet, min_size=38, max_size=42)))
def test_a_server_key_from_the_environment_is_a_curve_key_or_refused_by_name(text):
    """JAXSURRO_SERVER_KEY: any text is either a Z85 CURVE key (40 characters, 32 bytes) or refused with a
    ClientConfigurationError naming the variable, never another exception."""
    environ = {client.ENV_SERVER: "tcp://a:1", client.ENV_TOKEN: protocol.new_token().hex(), client.ENV_SIM_ID: "1"}
    try:
        settings_ = client.resolve_settings(environ={**environ, client.ENV_SERVER_KEY: text})
    except client.ClientConfigurationError as error:
        assert client.ENV_SERVER_KEY in str(error)
        return
    if not text.strip():
        assert settings_.server_key is None
    else:
        assert len(settings_.server_key) == 40 and len(z85.decode(settings_.server_key)) == 32


def test_a_generated_server_key_is_accepted():
    public, _ = zmq.curve_keypair()
    environ = {client.ENV_SERVER: "tcp://a:1", client.ENV_TOKEN: protocol.new_token().hex(), client.ENV_SIM_ID: "1"}
    assert client.resolve_settings(environ={**environ, client.ENV_SERVER_KEY: public.decode()}).server_key == public


def test_a_client_sends_to_a_ranks_unix_socket_only_when_the_rank_is_on_its_host():
    """A rank's ipc:// endpoint is used when the host of its TCP endpoint is an address of this machine."""
    local = ("tcp://127.0.0.1:5555", "ipc://@jaxsurro-data-5555")
    assert choose_endpoint(local) == "ipc://@jaxsurro-data-5555"
    assert choose_endpoint(("tcp://localhost:5555", "ipc://@jaxsurro-data-5555")) == "ipc://@jaxsurro-data-5555"
    assert choose_endpoint(local[:1]) == "tcp://127.0.0.1:5555"  # the rank offers none (local_transport = "tcp")
    remote = "tcp://192.0.2.7:5555"  # TEST-NET-1: never an address of this machine
    assert choose_endpoint((remote, "ipc://@jaxsurro-data-5555")) == remote
    assert choose_endpoint(("tcp://no-such-host.invalid:5555", "ipc://@x")) == "tcp://no-such-host.invalid:5555"


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.sampled_from(["127.0.0.1", "localhost", "192.0.2.7", "::1", "[::1]", ""]), st.text()),
    st.integers(0, 70000),
    st.lists(st.one_of(st.text(), st.builds("ipc://{}".format, st.text())), max_size=2),
)
def test_any_welcome_address_line_yields_one_of_its_endpoints(host, port, others):
    """Whatever a WELCOME's line holds, the client picks one of its endpoints and never fails choosing."""
    endpoints = [f"tcp://{host}:{port}", *others]
    assume(all(endpoint.split() == [endpoint] for endpoint in endpoints))  # what join_endpoints accepts
    entry = protocol.join_endpoints(endpoints)
    assert choose_endpoint(protocol.split_endpoints(entry)) in endpoints
