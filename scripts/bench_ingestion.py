"""Server ingestion (decode, validate, dedupe, buffer insert) against raw pyzmq PUSH/PULL of the same frames.

What is measured (ARCHITECTURE.md section 5): a separate sender process pushes N pre-encoded DATA
messages (``protocol.encode_data``, distinct (sim_id, time_step) pairs, the run's token) over TCP
loopback, with the client's send high-water mark, to

* the limit: a plain PULL socket with the receiver's receive high-water mark that only receives
  them (``recv_multipart(copy=False)``, the receiver's copy mode);
* ours: a real ``jaxsurro.receiver.Receiver`` thread whose sink is a ``BufferSink`` over a FIFO
  buffer large enough to hold all N samples, so the sink never blocks. Every message is decoded,
  validated (token, simulation, step, rank, field, dtype, shape, size, finite values), checked
  against the deduplication record and copied into the buffer.

Both rates are (N - 1) / (time of the last message - time of the first): for ours, the receiver's
own ``first_data_at`` / ``last_data_at`` (first and last sample *stored*); for the limit, the first
and last ``recv``. Limit and ours alternate ``--repeats`` times per field size; the medians and their
ratio (target >= 0.9) are printed for 16 KB (64x64 float32) and 4 MB (1024x1024 float32) fields.

A breakdown follows: the per-message cost of each step of the receive path, timed in this process
on frames already received (no sockets), next to the per-message time of the raw receive, so a
missed target shows where the time goes. On a 2-core machine the sender process, ZeroMQ's I/O
thread and the receiving Python thread share two cores, so every microsecond the receive thread
spends shows up in the ratio.

Usage: python scripts/bench_ingestion.py [--small-messages 20000] [--large-messages 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import zmq

from jaxsurro import client, protocol
from jaxsurro.buffers import FIFOBuffer
from jaxsurro.launcher.table import SimState, SimulationTable
from jaxsurro.receiver import RECEIVE_QUEUE_MESSAGES, BufferSink, Receiver

FIELD = "temperature"
N_PARAMETERS = 5
N_STEPS = 100  # time steps per simulation; N messages cover ceil(N / N_STEPS) simulations
DT = 0.01
HOST = "127.0.0.1"
TARGET_RATIO = 0.9
DISTINCT_PAYLOADS = 4  # the sender cycles through a few random fields (finite, so they validate)
DEADLINE_S = 60.0  # a run that has not delivered every message by then is reported as failed


class Rate(NamedTuple):
    """One timed run: messages over the first-to-last interval."""

    messages: int
    seconds: float

    @property
    def per_s(self) -> float:
        """Messages per second between the first and the last message."""
        return (self.messages - 1) / self.seconds


def send_messages(address: str, token: bytes, field_shape: tuple[int, ...], n_messages: int) -> None:
    """Sender process: encode N DATA messages up front, then push them as fast as the peer takes them."""
    rng = np.random.default_rng(1)
    payloads = [rng.random(field_shape, dtype=np.float32) for _ in range(DISTINCT_PAYLOADS)]
    messages = [protocol.encode_data(token, i // N_STEPS, i % N_STEPS, 7, FIELD.encode(),
                                     payloads[i % DISTINCT_PAYLOADS]) for i in range(n_messages)]
    context = zmq.Context(io_threads=1)
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, client.SEND_HIGH_WATER_MARK)
    push.setsockopt(zmq.SNDTIMEO, int(DEADLINE_S * 1000))
    push.setsockopt(zmq.LINGER, int(DEADLINE_S * 1000))
    push.connect(address)
    for frames in messages:
        push.send_multipart(frames, copy=False)  # pyzmq copies frames below its 64 KB threshold anyway
    push.close()
    context.term()  # returns once everything queued was handed to TCP


def start_sender(address: str, token: bytes, field_shape: tuple[int, ...], n_messages: int):
    """The sender as a fresh (spawned) process, so it shares no interpreter or GIL with the receiver."""
    process = multiprocessing.get_context("spawn").Process(
        target=send_messages, args=(address, token, field_shape, n_messages), daemon=True)
    process.start()
    return process


def join_sender(process) -> None:
    """Wait for the sender and fail loudly if it did not exit cleanly."""
    process.join(DEADLINE_S)
    if process.exitcode != 0:
        process.kill()
        raise RuntimeError(f"the sender process ended with exit code {process.exitcode} (expected 0); "
                           "its traceback is printed above")


def run_limit(field_shape: tuple[int, ...], n_messages: int) -> Rate:
    """Raw pyzmq: a PULL socket with the receiver's options that receives and drops every message."""
    context = zmq.Context.instance()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_MESSAGES)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVTIMEO, int(DEADLINE_S * 1000))
    address = f"tcp://{HOST}:{pull.bind_to_random_port(f'tcp://{HOST}')}"
    sender = start_sender(address, protocol.new_token(), field_shape, n_messages)
    try:
        pull.recv_multipart(copy=False)
        first = time.monotonic()
        for _ in range(n_messages - 1):
            pull.recv_multipart(copy=False)
        last = time.monotonic()
    except zmq.Again:
        raise RuntimeError(f"raw PULL: not every one of {n_messages} messages arrived within {DEADLINE_S:.0f} s")
    finally:
        pull.close()
    join_sender(sender)
    return Rate(n_messages, last - first)


def submitted_table(n_messages: int, rng: np.random.Generator) -> SimulationTable:
    """A table whose simulations are all submitted, as the launcher leaves them, so their data are known."""
    table = SimulationTable(rng.uniform(100.0, 500.0, size=(math.ceil(n_messages / N_STEPS), N_PARAMETERS)))
    for record in table:
        record.attempts = 1
        record.state = SimState.SUBMITTED
    return table


def make_receiver(field_shape: tuple[int, ...], n_messages: int, token: bytes,
                  rng: np.random.Generator) -> tuple[Receiver, FIFOBuffer]:
    """A real receiver into a BufferSink over a FIFO that holds every message (the sink never blocks)."""
    table = submitted_table(n_messages, rng)
    buffer = FIFOBuffer(capacity=n_messages, watermark=0, input_dim=N_PARAMETERS + 1,
                        field_size=math.prod(field_shape), seed=0)
    sink = BufferSink(buffer, table, N_STEPS, DT)
    receiver = Receiver(table=table, sink=sink, token=token, field=FIELD, field_shape=field_shape,
                        wire_dtype="float32", n_steps=N_STEPS, host=HOST)
    return receiver, buffer


def run_ours(field_shape: tuple[int, ...], n_messages: int, rng: np.random.Generator) -> Rate:
    """The server's receive path: Receiver thread -> validate -> dedupe -> BufferSink -> FIFO buffer."""
    token = protocol.new_token()
    receiver, buffer = make_receiver(field_shape, n_messages, token, rng)
    receiver.start()
    try:
        sender = start_sender(receiver.data_address, token, field_shape, n_messages)
        deadline = time.monotonic() + DEADLINE_S
        while receiver.unique_received < n_messages:
            receiver.check()
            if receiver.rejected or receiver.duplicates:
                raise RuntimeError(f"the receiver rejected or dropped messages: {receiver.stats()}; every "
                                   "message should be valid and distinct")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {receiver.unique_received} of {n_messages} messages were stored "
                                   f"within {DEADLINE_S:.0f} s: {receiver.stats()}")
            time.sleep(0.005)  # a script polling a counter; the receiver thread does the work
        join_sender(sender)
    finally:
        receiver.stop()
    stored = buffer.stats().received
    if stored != n_messages:
        raise RuntimeError(f"the buffer holds {stored} samples, expected {n_messages}")
    return Rate(n_messages, receiver.last_data_at - receiver.first_data_at)


def per_message_us(seconds: float, count: int) -> float:
    """Microseconds per message."""
    return seconds / count * 1e6


def breakdown(field_shape: tuple[int, ...], n_messages: int, rng: np.random.Generator) -> dict[str, float]:
    """Microseconds per message of each step of the receive path, on frames already received here."""
    token = protocol.new_token()
    table = submitted_table(n_messages, rng)
    buffer = FIFOBuffer(capacity=n_messages, watermark=0, input_dim=N_PARAMETERS + 1,
                        field_size=math.prod(field_shape), seed=0)
    sink = BufferSink(buffer, table, N_STEPS, DT)
    expectation = protocol.Expectation(  # as Receiver builds it
        token=token, n_steps=N_STEPS, fields={FIELD: (field_shape, np.dtype("float32"))}, rank=0, n_ranks=1,
        known_simulations=table.is_known)
    stored = np.zeros((len(table), N_STEPS), dtype=bool)  # the receiver's deduplication record
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_MESSAGES)
    pull.setsockopt(zmq.RCVTIMEO, int(DEADLINE_S * 1000))
    pull.setsockopt(zmq.LINGER, 0)
    address = f"tcp://{HOST}:{pull.bind_to_random_port(f'tcp://{HOST}')}"
    sender = start_sender(address, token, field_shape, n_messages)
    received = [pull.recv_multipart(copy=False)]
    start = time.perf_counter()
    received += [pull.recv_multipart(copy=False) for _ in range(n_messages - 1)]
    recv_s = time.perf_counter() - start
    pull.close()
    join_sender(sender)

    start = time.perf_counter()
    messages = [protocol.validate_message(frames, expectation) for frames in received]
    validate_s = time.perf_counter() - start
    start = time.perf_counter()
    for frames in received:
        protocol.decode_header(frames[0])
    header_s = time.perf_counter() - start
    start = time.perf_counter()
    for message in messages:
        protocol._all_finite(message.array)
    finite_s = time.perf_counter() - start
    start = time.perf_counter()
    for message in messages:
        if stored[message.sim_id, message.time_step]:
            raise RuntimeError("duplicate in a benchmark that sends distinct steps")
        stored[message.sim_id, message.time_step] = True
    dedupe_s = time.perf_counter() - start
    start = time.perf_counter()
    for message in messages:
        sink.accept(message.sim_id, message.time_step, message.array, timeout=0.1)
    insert_s = time.perf_counter() - start
    copy_target = np.empty(math.prod(field_shape), dtype=np.float32)
    start = time.perf_counter()
    for message in messages:
        copy_target[:] = message.array.reshape(-1)
    memcpy_s = time.perf_counter() - start
    counted = len(received) - 1  # the raw receive is timed from the second message on
    return {"raw recv (sockets, timed here)": per_message_us(recv_s, counted),
            "validate_message (all checks)": per_message_us(validate_s, n_messages),
            "  of which decode_header": per_message_us(header_s, n_messages),
            "  of which finite check": per_message_us(finite_s, n_messages),
            "dedupe (stored[sim, step])": per_message_us(dedupe_s, n_messages),
            "BufferSink.accept -> buffer.put": per_message_us(insert_s, n_messages),
            "  plain copy of one field": per_message_us(memcpy_s, n_messages)}


def bench_size(label: str, field_shape: tuple[int, ...], n_messages: int, repeats: int,
               rng: np.random.Generator) -> float:
    """Alternate limit and ours, print every run and the medians; return the ratio of the medians."""
    megabytes = math.prod(field_shape) * 4 / 1e6
    limits, ours = [], []
    for _ in range(repeats):
        limits.append(run_limit(field_shape, n_messages).per_s)
        ours.append(run_ours(field_shape, n_messages, rng).per_s)
    limit, our = statistics.median(limits), statistics.median(ours)
    ratio = our / limit
    runs = lambda rates: " ".join(f"{r:,.0f}" for r in rates)  # noqa: E731
    print(f"\n{label}: {field_shape[0]}x{field_shape[1]} float32 ({megabytes * 1e3:,.0f} KB payload), "
          f"{n_messages} messages per run, median of {repeats} runs")
    print(f"  {'':<22} {'msgs/s':>10} {'MB/s':>9}   runs (msgs/s)")
    print(f"  {'raw pyzmq PULL (limit)':<22} {limit:>10,.0f} {limit * megabytes:>9,.0f}   {runs(limits)}")
    print(f"  {'jaxsurro Receiver':<22} {our:>10,.0f} {our * megabytes:>9,.0f}   {runs(ours)}")
    print(f"  ratio ours/limit {ratio:.2f}  (target >= {TARGET_RATIO}: "
          f"{'ok' if ratio >= TARGET_RATIO else 'BELOW TARGET'})")
    return ratio


def print_breakdown(label: str, field_shape: tuple[int, ...], n_messages: int, rng: np.random.Generator) -> None:
    """One table of per-message costs."""
    costs = breakdown(field_shape, n_messages, rng)
    print(f"  per-message cost in the receive thread, {label} (us, in-process on {n_messages} received frames):")
    for name, microseconds in costs.items():
        print(f"    {name:<34} {microseconds:>9.1f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options: message counts per size, repeats, and whether to print the breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Target: ours/limit >= 0.9 for both sizes (ARCHITECTURE.md section 5).")
    parser.add_argument("--small-messages", type=int, default=20000, help="messages per run, 64x64 fields")
    parser.add_argument("--large-messages", type=int, default=200, help="messages per run, 1024x1024 fields")
    parser.add_argument("--repeats", type=int, default=3, help="alternating limit/ours runs per size")
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
    print(f"server ingestion over TCP loopback: sender process -> raw PULL (limit) vs Receiver + BufferSink + "
          f"FIFO (ours); RCVHWM {RECEIVE_QUEUE_MESSAGES}, SNDHWM {client.SEND_HIGH_WATER_MARK}, copy=False")
    for label, shape, count in (("16 KB", (64, 64), args.small_messages),
                                ("4 MB", (1024, 1024), args.large_messages)):
        bench_size(label, shape, count, args.repeats, rng)
        if not args.no_breakdown:
            print_breakdown(label, shape, count, rng)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
