"""Server ingestion (decode, validate, dedupe, buffer insert) against raw pyzmq PUSH/PULL of the same frames.

What is measured (docs/architecture.md, "Performance"): a separate sender process pushes N pre-encoded
DATA messages (``protocol.encode_data``, distinct (sim_id, time_step) pairs, each with its attempt
credential) over TCP loopback, with the client's send high-water mark, to

* the limit: a plain PULL socket with the receiver's receive high-water mark that only receives
  them, with the receiver's receive call (``recv_multipart(copy=False)``);
* a reference: the same PULL socket that also copies each payload into preallocated rows, the one
  copy that any buffer owning its memory must make (it bounds what ours can reach, shown for
  context; the target is against the limit);
* ours over TCP (what a client on another host uses): the library's receive path, a
  ``jaxsurro.server.receiver.Receiver`` built by ``Receiver.from_config`` (experiments/heat.toml with
  the field size of each run) whose sink is a ``BufferSink`` over a FIFO buffer that holds all N
  samples, so the sink never blocks. Each wakeup
  takes a batch of messages off the socket; their headers are checked together
  (``protocol.validate_batch``: credential, simulation, step, rank, field, dtype, shape, size), each
  payload is checked for finite values (one float sum), the batch is checked against the
  deduplication record and each payload is copied once into the buffer (``put_many``). The sender
  is a DEALER, as a client's, towards the receiver's ROUTER;
* ours, CURVE encrypted: the same with ``server.encryption = "curve"`` (ZeroMQ CURVE on the sender's
  and the receiver's sockets), the cost of transport security;
* raw PULL over ipc, and ours over ipc (what a client on the server's host uses): the limit over an
  ipc:// endpoint (a Unix socket), and ours with the sender connected where a client on the
  receiver's host connects (the receiver's own Unix socket, as ``client.simulation.choose_endpoint``
  picks it).

Rates are (N - 1) / (time of the last message - time of the first): for ours the receiver's own
``first_data_at`` / ``last_data_at`` (first and last sample *stored*, from ``Receiver.counters()``),
for the others the first and last ``recv``. The variants run one after another, ``--repeats`` times,
for 16 KB (64x64 float32) and 4 MB (1024x1024 float32) fields. Printed: median msgs/s and MB/s of
each, and the ratio to the limit (median over repeats of ours / the limit of the same repeat, so slow
drifts in machine load cancel). Target: ours / limit >= 0.9.

Also printed, because wall-clock rates on a shared 2-core machine move by tens of percent with
outside load: the CPU time per message of the receiving process (all threads, ZeroMQ's I/O thread
included) and of the sender process, and their ratio to the limit's total, (limit's receive + send
CPU) / (this variant's receive + send CPU). When the two cores are saturated, as they are here,
throughput is inversely proportional to that total, so this CPU ratio estimates the rate ratio of
an otherwise idle machine and is the steadier of the two figures. A breakdown table (per-message
cost of each step of the receive path, on hot frames in this process) follows each size.

On a 2-core machine the sender process, the two ZeroMQ I/O threads and the receiving Python thread
share two cores, so every microsecond the receiving thread adds per message shows in the ratio, and
the figures move by 10-20 % with other load on the machine. The last lines are, for each size,
``ratio ingestion_<size>_ours_over_limit <rate ratio>`` and ``ratio ingestion_<size>_cpu_limit_over_ours
<CPU ratio>``, ``ratio ingestion_<size>_curve_over_limit <rate ratio>`` for the encrypted path, and for
ipc: ``..._ipc_limit_over_limit`` (raw ipc over raw TCP), ``..._ipc_over_ipc_limit`` (ours over ipc
over raw ipc) and ``..._ipc_over_limit`` (ours over ipc over the TCP limit: what a local client gains).

Usage: python scripts/bench_ingestion.py [--small-messages 20000] [--large-messages 200] [--repeats 3]
       [--no-breakdown]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zmq

from jaxsurro import client, protocol
from jaxsurro.client.simulation import choose_endpoint, encrypt
from jaxsurro.config import Config, load_config
from jaxsurro.server.buffers import FIFOBuffer
from jaxsurro.server.receiver import BATCH_BYTES, BATCH_MESSAGES, RECEIVE_QUEUE_MESSAGES, BufferSink, Receiver
from jaxsurro.table import SimState, SimulationTable

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "heat.toml"
N_STEPS = 100  # time steps per simulation; N messages cover ceil(N / N_STEPS) simulations
HOST = "127.0.0.1"
TARGET_RATIO = 0.9
DISTINCT_PAYLOADS = 4  # the sender cycles through a few random fields (finite, so they validate)
DEADLINE_S = 60.0  # a run that has not delivered every message by then fails with a message
BREAKDOWN_MESSAGES = {(64, 64): 2000, (1024, 1024): 40}  # hot-cache timing of the pieces


class Rate(NamedTuple):
    """One timed run: messages over the first-to-last interval, and this process's CPU time meanwhile."""

    messages: int
    seconds: float
    cpu_seconds: float  # all threads of the receiving process (ZeroMQ's I/O thread included)
    sender_cpu_seconds: float  # all threads of the sender process, from connecting to the last message out

    @property
    def per_s(self) -> float:
        """Messages per second between the first and the last message."""
        return (self.messages - 1) / self.seconds

    @property
    def cpu_us_per_message(self) -> float:
        """Receiving-side CPU microseconds per message (less noisy than the rate under outside load)."""
        return self.cpu_seconds / self.messages * 1e6

    @property
    def sender_cpu_us_per_message(self) -> float:
        """Sending-side CPU microseconds per message."""
        return self.sender_cpu_seconds / self.messages * 1e6


# --- the sender --------------------------------------------------------------------------------


class Sender(NamedTuple):
    """A running sender process, the pipe on which it reports its CPU time, and (over ipc) the pipe
    on which it is told that everything arrived, so that it may close."""

    process: multiprocessing.process.BaseProcess
    report: multiprocessing.connection.Connection
    release: multiprocessing.connection.Connection | None


def send_messages(
    address: str,
    secret: bytes,
    field: str,
    field_shape: tuple[int, ...],
    n_messages: int,
    report: multiprocessing.connection.Connection,
    server_key: bytes | None = None,
    release: multiprocessing.connection.Connection | None = None,
    socket_type: int = zmq.DEALER,
) -> None:
    """Sender process: encode N DATA messages up front, send them as fast as the peer takes them, report CPU.

    Each simulation's messages carry attempt 1's credential, made with the server's ``secret`` (what the
    WELCOME would have handed each client). ``socket_type``: a client's DEALER towards a receiver's
    ROUTER, a PUSH towards a plain PULL. ``release``: keep the socket open until told (the limit's
    sender over ipc, so that nothing is in flight when it closes; a client waits for RECEIVED instead)."""
    rng = np.random.default_rng(1)
    payloads = [rng.random(field_shape, dtype=np.float32) for _ in range(DISTINCT_PAYLOADS)]
    credentials = protocol.AttemptCredentials(secret)
    issued = [credentials.make(sim_id, 1) for sim_id in range(math.ceil(n_messages / N_STEPS))]
    messages = [
        protocol.encode_data(
            issued[i // N_STEPS], i // N_STEPS, i % N_STEPS, 7, field.encode(), payloads[i % DISTINCT_PAYLOADS]
        )
        for i in range(n_messages)
    ]
    cpu_start = time.process_time()
    context = zmq.Context(io_threads=1)
    push = context.socket(socket_type)
    encrypt(push, server_key, zmq.curve_keypair())  # as the client does when the run encrypts
    push.setsockopt(zmq.SNDHWM, client.SEND_HIGH_WATER_MARK)
    push.setsockopt(zmq.SNDTIMEO, int(DEADLINE_S * 1000))
    push.setsockopt(zmq.LINGER, int(DEADLINE_S * 1000))
    push.connect(address)
    for frames in messages:
        push.send_multipart(frames, copy=False)  # pyzmq copies frames below its 64 KB threshold anyway
    if release is not None:
        release.poll(DEADLINE_S)
    push.close()
    context.term()  # returns once everything queued was handed to TCP
    report.send(time.process_time() - cpu_start)  # all threads of this process, I/O thread included


def start_sender(
    address: str,
    secret: bytes,
    field: str,
    field_shape: tuple[int, ...],
    n_messages: int,
    server_key: bytes | None = None,
    socket_type: int = zmq.DEALER,
) -> Sender:
    """The sender as a fresh (spawned) process, so it shares no interpreter or GIL with the receiver.

    To an ipc:// address it keeps its socket open until join_sender releases it."""
    context = multiprocessing.get_context("spawn")
    report, child_end = context.Pipe(duplex=False)
    held, release = context.Pipe(duplex=False) if address.startswith("ipc://") else (None, None)
    process = context.Process(
        target=send_messages,
        args=(address, secret, field, field_shape, n_messages, child_end, server_key, held, socket_type),
        daemon=True,
    )
    process.start()
    child_end.close()
    return Sender(process, report, release)


def check_sender(sender: Sender, deadline: float, waiting_for: str) -> None:
    """Fail fast when the sender died or the deadline passed, instead of waiting forever."""
    if sender.process.exitcode not in (None, 0):
        raise RuntimeError(
            f"the sender process ended with exit code {sender.process.exitcode} while "
            f"{waiting_for}; its traceback is printed above"
        )
    if time.monotonic() > deadline:
        raise RuntimeError(f"timed out after {DEADLINE_S:.0f} s while {waiting_for}")


def join_sender(sender: Sender) -> float:
    """Wait for the sender, fail loudly if it did not exit cleanly, and return its CPU seconds."""
    if sender.release is not None:
        sender.release.send(True)
    cpu_seconds = sender.report.recv() if sender.report.poll(DEADLINE_S) else None
    sender.process.join(DEADLINE_S)
    if sender.process.exitcode != 0 or cpu_seconds is None:
        sender.process.kill()
        raise RuntimeError(
            f"the sender process ended with exit code {sender.process.exitcode} (expected 0) "
            f"without reporting its CPU time; its traceback is printed above"
        )
    return cpu_seconds


# --- the limit and the reference --------------------------------------------------------------


def plain_pull(ipc_dir: str | None = None) -> tuple[zmq.Socket, str]:
    """A PULL socket with the receiver's queue size, bound to a free loopback port (or, given a
    directory, to an ipc:// endpoint in it)."""
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_MESSAGES)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVTIMEO, 1000)
    if ipc_dir is not None:
        pull.bind(f"ipc://{ipc_dir}/pull")
        return pull, f"ipc://{ipc_dir}/pull"
    return pull, f"tcp://{HOST}:{pull.bind_to_random_port(f'tcp://{HOST}')}"


def receive(pull: zmq.Socket, sender: Sender, deadline: float) -> list[zmq.Frame]:
    """One message, as the receiver takes it (copy=False); RCVTIMEO wakes it up to check on the sender."""
    while True:
        try:
            return pull.recv_multipart(copy=False)
        except zmq.Again:
            check_sender(sender, deadline, "the raw PULL socket waited for messages")


def run_raw(config: Config, n_messages: int, copy_into_rows: bool, ipc: bool = False) -> Rate:
    """Raw pyzmq PULL with the receiver's options; optionally copy each payload into preallocated rows.

    ``ipc``: over an ipc:// endpoint (a Unix socket in a private directory) instead of TCP loopback."""
    with tempfile.TemporaryDirectory(prefix="jaxsurro-bench-") as ipc_dir:
        return _run_raw(config, n_messages, copy_into_rows, ipc_dir if ipc else None)


def _run_raw(config: Config, n_messages: int, copy_into_rows: bool, ipc_dir: str | None) -> Rate:
    field_shape = next(iter(config.solver.field_shapes.values()))
    rows = np.full((n_messages if copy_into_rows else 1, math.prod(field_shape)), 0.0, dtype=np.float32)
    pull, address = plain_pull(ipc_dir)
    sender = start_sender(
        address, protocol.new_secret(), next(iter(config.solver.field_shapes)), field_shape, n_messages, None, zmq.PUSH
    )
    deadline = time.monotonic() + DEADLINE_S
    cpu_start = time.process_time()
    try:
        frames = receive(pull, sender, deadline)
        first = time.monotonic()
        if copy_into_rows:
            rows[0] = np.frombuffer(frames[2], dtype=np.float32)
            for i in range(1, n_messages):
                rows[i] = np.frombuffer(receive(pull, sender, deadline)[2], dtype=np.float32)
        else:
            for _ in range(n_messages - 1):
                receive(pull, sender, deadline)
        last = time.monotonic()
        cpu_seconds = time.process_time() - cpu_start
    finally:
        pull.close()
    sender_cpu_seconds = join_sender(sender)
    return Rate(n_messages, last - first, cpu_seconds, sender_cpu_seconds)


# --- ours --------------------------------------------------------------------------------------


def sized_config(field_shape: tuple[int, ...]) -> Config:
    """experiments/heat.toml with square fields of this shape, N_STEPS steps per simulation, on loopback."""
    if len(field_shape) != 2 or field_shape[0] != field_shape[1]:
        raise ValueError(f"square fields only (solver.grid_size), got {field_shape}")
    return load_config(
        DEFAULT_CONFIG, [f"solver.grid_size={field_shape[0]}", f"solver.n_steps={N_STEPS}", f"server.host='{HOST}'"]
    )


def submitted_table(config: Config, n_messages: int, rng: np.random.Generator) -> SimulationTable:
    """A table whose simulations are all submitted, as the launcher leaves them, so their data are known."""
    solver = config.solver
    n_simulations = math.ceil(n_messages / solver.n_steps)
    table = SimulationTable(rng.uniform(solver.low, solver.high, size=(n_simulations, len(solver.parameters))))
    for record in table:
        record.attempts = 1
        record.state = SimState.SUBMITTED
    return table


def make_receiver(
    config: Config,
    n_messages: int,
    secret: bytes,
    rng: np.random.Generator,
    curve_secret_key: bytes | None = None,
) -> tuple[Receiver, FIFOBuffer]:
    """The library's receiver into a BufferSink over a FIFO that holds every message (the sink never blocks).

    Every simulation's attempt 1 is issued its credential, as rank 0 does when it welcomes the client."""
    solver = config.solver
    table = submitted_table(config, n_messages, rng)
    buffer = FIFOBuffer(
        capacity=n_messages, watermark=0, input_dim=len(solver.parameters) + 1, field_size=solver.sample_size, seed=0
    )
    sink = BufferSink(buffer, table, solver.n_steps, solver.dt)
    receiver = Receiver.from_config(
        config,
        table,
        sink,
        protocol.new_token(),
        secret,
        curve_secret_key=curve_secret_key,
    )
    for record in table:
        receiver.credentials.issue(record.sim_id, 1)
    return receiver, buffer


def run_ours(
    config: Config, n_messages: int, rng: np.random.Generator, encrypted: bool = False, ipc: bool = False
) -> Rate:
    """The server's receive path: Receiver thread -> validate -> dedupe -> BufferSink -> FIFO buffer.

    ``encrypted``: with ZeroMQ CURVE on both ends (server.encryption = "curve"); ``ipc``: the sender
    connects where a client on the receiver's host does (the receiver's Unix socket, which the client
    picks, simulation.choose_endpoint), else to the receiver's TCP endpoint, as a remote client does."""
    secret = protocol.new_secret()
    public_key, secret_key = zmq.curve_keypair() if encrypted else (None, None)
    receiver, buffer = make_receiver(config, n_messages, secret, rng, secret_key)
    address = choose_endpoint(receiver.data_endpoints) if ipc else receiver.data_address
    if ipc and not address.startswith("ipc://"):
        raise RuntimeError(f"a client on the receiver's host would send to {address}, expected its ipc:// endpoint")
    receiver.start()
    try:
        sender = start_sender(
            address,
            secret,
            next(iter(config.solver.field_shapes)),
            next(iter(config.solver.field_shapes.values())),
            n_messages,
            public_key,
        )
        deadline = time.monotonic() + DEADLINE_S
        cpu_start = time.process_time()
        while (counters := receiver.counters()).unique_received < n_messages:
            receiver.check()
            check_sender(sender, deadline, f"the receiver had stored {counters.unique_received} of {n_messages}")
            if counters.rejected or counters.duplicates:
                raise RuntimeError(
                    f"the receiver rejected or dropped messages: {counters}; every message should be valid and distinct"
                )
            time.sleep(0.005)  # a script polling a counter; the receiver thread does the work
        cpu_seconds = time.process_time() - cpu_start
        sender_cpu_seconds = join_sender(sender)
    finally:
        receiver.stop()
    stored = buffer.stats().received
    if stored != n_messages:
        raise RuntimeError(f"the buffer holds {stored} samples, expected {n_messages}")
    return Rate(n_messages, counters.last_data_at - counters.first_data_at, cpu_seconds, sender_cpu_seconds)


# --- the breakdown -----------------------------------------------------------------------------


def microseconds_each(call: Callable[[object], object], items: Sequence[object]) -> float:
    """Mean microseconds of ``call`` over ``items``."""
    start = time.perf_counter()
    for item in items:
        call(item)
    return (time.perf_counter() - start) / len(items) * 1e6


def breakdown(config: Config, rng: np.random.Generator) -> dict[str, float]:
    """Microseconds per message of each step of the library's receive path, on hot frames in this process."""
    field_shape = next(iter(config.solver.field_shapes.values()))
    n_messages = BREAKDOWN_MESSAGES[field_shape]
    secret = protocol.new_secret()
    receiver, _ = make_receiver(config, n_messages, secret, rng)  # never started: its checks and sink, called here
    receiver.stop()  # closes its sockets
    expectation, sink = receiver.expectation, receiver.sink
    pool = 8  # a few distinct received messages, reused so that the timing sees hot caches
    pull, address = plain_pull()
    sender = start_sender(address, secret, next(iter(config.solver.field_shapes)), field_shape, pool, None, zmq.PUSH)
    deadline = time.monotonic() + DEADLINE_S
    received = [receive(pull, sender, deadline) for _ in range(pool)]
    pull.close()
    join_sender(sender)
    # Batches as one wakeup takes them: a full receive queue, or BATCH_BYTES of payload.
    size = max(1, min(RECEIVE_QUEUE_MESSAGES, BATCH_MESSAGES, BATCH_BYTES // (4 * math.prod(field_shape))))
    frames_list = [received[i % pool] for i in range(n_messages)]
    batches = [frames_list[i : i + size] for i in range(0, n_messages - size + 1, size)]
    checked = [protocol.validate_batch(batch, expectation) for batch in batches]
    arrays = [array for batch in checked for array in batch.array]
    stored = np.zeros_like(receiver.stored)
    target = np.empty(math.prod(field_shape), dtype=np.float32)

    def per_message(call: Callable[[object], object], items: Sequence[object]) -> float:
        return microseconds_each(call, items) / size

    def finite(view: np.ndarray) -> bool:
        with np.errstate(over="ignore", invalid="ignore"):
            return math.isfinite(np.add.reduce(view))

    return {
        "validate_message (one at a time)": microseconds_each(
            lambda frames: protocol.validate_message(frames, expectation), frames_list
        ),
        f"validate_batch (batches of {size})": per_message(
            lambda batch: protocol.validate_batch(batch, expectation), batches
        ),
        "  of which the finite check (sum)": microseconds_each(finite, arrays),
        "dedupe lookup stored[sims, steps]": per_message(
            lambda c: stored[c.sim_id.astype(np.intp), c.time_step.astype(np.intp)], checked
        ),
        "BufferSink.accept_many (put_many)": per_message(
            lambda c: sink.accept_many(c.sim_id, c.time_step, c.array, timeout=0.1), checked
        ),
        "  of which the field copy": microseconds_each(lambda array: np.copyto(target, array), arrays),
    }


# --- the report --------------------------------------------------------------------------------


def bench_size(
    label: str, field_shape: tuple[int, ...], n_messages: int, args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, float]:
    """Run every variant ``repeats`` times in turn, print medians, MB/s and ratios; return the ratios by name."""
    config = sized_config(field_shape)
    variants: dict[str, Callable[[], Rate]] = {
        "raw pyzmq PULL (limit)": lambda: run_raw(config, n_messages, copy_into_rows=False),
        "raw PULL + copy to rows": lambda: run_raw(config, n_messages, copy_into_rows=True),
        "ours over TCP (remote)": lambda: run_ours(config, n_messages, rng),
        "ours, CURVE encrypted": lambda: run_ours(config, n_messages, rng, encrypted=True),
        "raw PULL over ipc": lambda: run_raw(config, n_messages, copy_into_rows=False, ipc=True),
        "ours over ipc (local)": lambda: run_ours(config, n_messages, rng, ipc=True),
    }
    runs: dict[str, list[Rate]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            runs[name].append(run())
    megabytes = math.prod(field_shape) * 4 / 1e6
    limit = [rate.per_s for rate in runs["raw pyzmq PULL (limit)"]]
    print(
        f"\n{label}: {field_shape[0]}x{field_shape[1]} float32 ({megabytes * 1e3:,.0f} KB payload), "
        f"{n_messages} messages per run, medians of {args.repeats} runs"
    )
    print(
        f"  {'':<24} {'msgs/s':>8} {'MB/s':>6} {'ratio':>6}  {'CPU us/msg: recv':>16} {'send':>6} {'ratio':>6}"
        f"   runs (msgs/s)"
    )
    ratios, cpu_ratios = {}, {}
    limit_cpu = statistics.median(
        rate.cpu_us_per_message + rate.sender_cpu_us_per_message for rate in runs["raw pyzmq PULL (limit)"]
    )
    for name, rates in runs.items():
        ratios[name] = statistics.median(rate.per_s / lim for rate, lim in zip(rates, limit, strict=True))
        median = statistics.median(rate.per_s for rate in rates)
        receive_cpu = statistics.median(rate.cpu_us_per_message for rate in rates)
        send_cpu = statistics.median(rate.sender_cpu_us_per_message for rate in rates)
        each = " ".join(f"{rate.per_s:,.0f}" for rate in rates)
        cpu_ratios[name] = limit_cpu / (receive_cpu + send_cpu)
        print(
            f"  {name:<24} {median:>8,.0f} {median * megabytes:>6,.0f} {ratios[name]:>6.2f}  {receive_cpu:>16.1f} "
            f"{send_cpu:>6.1f} {cpu_ratios[name]:>6.2f}   {each}"
        )
    ours, local = ratios["ours over TCP (remote)"], ratios["ours over ipc (local)"]
    ipc_limit = [rate.per_s for rate in runs["raw PULL over ipc"]]
    ipc_ours = statistics.median(
        rate.per_s / lim for rate, lim in zip(runs["ours over ipc (local)"], ipc_limit, strict=True)
    )

    def verdict(ratio: float) -> str:
        return f"{ratio:.2f} ({'meets' if ratio >= TARGET_RATIO else 'BELOW'} the target >= {TARGET_RATIO})"

    print(f"  a client on another host (TCP): ours / TCP limit = {verdict(ours)}")
    print(
        f"  a client on the server's host (the library picks ipc): ours / TCP limit = {verdict(local)}; "
        f"ours / raw ipc PULL = {ipc_ours:.2f}"
    )
    if not args.no_breakdown:
        print(
            "  per-message cost of the receive path (us, hot frames, in this process; "
            f"the limit takes {1e6 / statistics.median(limit):.1f} us per message end to end):"
        )
        for name, microseconds in breakdown(config, rng).items():
            print(f"    {name:<34} {microseconds:>8.1f}")
    return {
        "ours_over_limit": ours,
        "cpu_limit_over_ours": cpu_ratios["ours over TCP (remote)"],
        "curve_over_limit": ratios["ours, CURVE encrypted"],
        "ipc_limit_over_limit": ratios["raw PULL over ipc"],
        "ipc_over_ipc_limit": ipc_ours,
        "ipc_over_limit": ratios["ours over ipc (local)"],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options: message counts per size, repeats and the breakdown."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog='Target: ours / limit >= 0.9 for both sizes (docs/architecture.md, "Performance").',
    )
    parser.add_argument("--small-messages", type=int, default=20000, help="messages per run, 64x64 fields")
    parser.add_argument("--large-messages", type=int, default=200, help="messages per run, 1024x1024 fields")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every variant per size")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-step cost table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.small_messages < 2 or args.large_messages < 2 or args.repeats < 1:
        parser.error("message counts must be >= 2 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Benchmark both field sizes and print one block each."""
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    print(
        f"server ingestion over TCP loopback (and ipc://), one sender process: RCVHWM {RECEIVE_QUEUE_MESSAGES}, "
        f"SNDHWM {client.SEND_HIGH_WATER_MARK}, the limit's recv_multipart(copy=False); ratio = median of "
        "per-repeat ratios to the TCP limit"
    )
    ratios = {}
    for label, shape, count in (("16KB", (64, 64), args.small_messages), ("4MB", (1024, 1024), args.large_messages)):
        ratios[label] = bench_size(label, shape, count, args, rng)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    for label, named in ratios.items():
        for name, value in named.items():
            print(f"ratio ingestion_{label}_{name} {value:.3f}")


if __name__ == "__main__":
    main()
