"""Trainer steps/s while clients stream, against the same jitted step on batches already on the device.

What is measured (docs/architecture.md, "Performance"), with one ``jaxsurro.server.trainer.Trainer``
built by ``Trainer.from_config`` from an experiment file (the first argument, e.g. experiments/heat.toml,
with ``--set section.key=value`` overrides):

* the limit: a few batches are put on the device once (``trainer.to_device``), then the trainer's
  jitted step runs on them (``trainer.step_on_device``), blocking on the state at the end.
* ours: a real streaming set-up and the server's own loop. A ``Receiver`` built by
  ``Receiver.from_config`` (control and data sockets, validation, deduplication) feeds a
  ``BufferSink`` into the configured buffer (a Reservoir in heat.toml); sender processes connect
  with ``jaxsurro.client.connect(...)`` (explicit arguments, one HELLO/WELCOME and FINISH per
  simulation) and send random fields at a fixed pace (``--send-rate`` messages/s in all). Once the
  buffer holds its watermark, the library's ``Prefetcher`` (``jaxsurro.server.prefetch``, as
  ``jaxsurro.server.online`` runs it) draws and prepares the next batches in its thread while the
  main thread puts each on the devices and steps (``trainer.put`` + ``trainer.step_on_device``),
  blocking on the state at the end.
* for the diagnosis, "no streaming": the same prefetched loop on a full buffer of the same kind
  with nothing streaming, which separates the cost of preparing batches on the host from the cost
  of the streaming itself; and "limit while streaming": the limit's device-resident steps while the
  senders stream, which measures what the streaming takes from the step's own compute (shared
  cores, caches, memory bandwidth) with nothing to feed, so that ours over it is the cost of feeding
  the device alone. With ``--serial``, also the loop without prefetching (``buffer.get_batch``
  then ``trainer.step`` in the main thread) on the streaming buffer.

To keep outside load (other jobs on a shared machine) from biasing the ratio, the variants run
interleaved in blocks of ``--block`` steps until each has run ``--steps`` steps; the senders are
paused during the limit and no-streaming blocks, so those see no streaming at all. Printed: steps/s
of each variant and its ratio to the limit (target: ours / limit >= 0.95 while production keeps up,
i.e. while the buffer population stays above the watermark, checked and printed), the host time
per step spent waiting for the batch and in the step call, the samples received, and the senders'
CPU. The last line is ``ratio starvation_ours_over_limit <value>`` (after
``ratio starvation_ours_over_streaming_limit <value>`` and, with ``--serial``,
``ratio starvation_serial_over_limit <value>``).

On the 2-core machine this project is developed on, XLA's compute threads use both cores, so the
host work of the training loop, the receiver thread, ZeroMQ's I/O threads and the senders all take
CPU from the step: the ratio here is a lower bound for a machine with spare cores. ``--pin`` makes
the CPU stand for a device and its host: XLA's compute threads get the first core alone once they
exist, and every host thread, the training loop's included, the others; what is left between the
limit and ours is then the cost of feeding the device, as on a GPU node. The senders are
paced (default 1000 messages/s in all, a few percent of a core) rather than sending flat out, which
would take a whole core from XLA and measure CPU sharing rather than starvation; a Reservoir keeps
serving batches above its watermark whatever the production rate.

Usage: python scripts/bench_starvation.py experiments/heat.toml [--set train.batch_size=128 ...]
       [--steps 400] [--block 25] [--send-rate 1000] [--senders 1] [--serial] [--pin]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import multiprocessing.synchronize
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import zmq

from jaxsurro import client, protocol
from jaxsurro.config import Config, add_config_arguments, load_config
from jaxsurro.core.train import Batch
from jaxsurro.server.buffers import Buffer, SampleBatch, buffer_from_config
from jaxsurro.server.prefetch import Prefetcher
from jaxsurro.server.receiver import BufferSink, Receiver
from jaxsurro.server.trainer import Trainer, range_scaling
from jaxsurro.table import SimState, SimulationTable

TARGET_RATIO = 0.95
STREAMING_LIMIT = "limit while streaming"  # device-resident batches with the senders on: interference only
DEVICE_BATCHES = 4  # distinct device-resident batches the limit cycles through
WARMUP_STEPS = 10
DEADLINE_S = 60.0  # for the watermark to be reached, a batch to come, a sender to report
STREAM_SECONDS_PLANNED = 120.0  # the simulation table holds enough simulations to stream this long
CLIENT_TIMEOUT_S = 30.0


# --- the senders -------------------------------------------------------------------------------


def stream_fields(
    server: str,
    token: bytes,
    sim_ids: Sequence[int],
    field: str,
    n_steps: int,
    field_shape: tuple[int, ...],
    low: float,
    high: float,
    rate: float,
    sending: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    report: multiprocessing.connection.Connection,
    cores: set[int] | None,
) -> None:
    """Sender process: for each simulation, HELLO, then paced random fields, then FINISH; report CPU.

    Sends only while ``sending`` is set (the limit is timed with the senders paused) and ends when
    ``stop`` is set. With ``cores``, the process runs on those cores only.
    """
    if cores:
        os.sched_setaffinity(0, cores)
    rng = np.random.default_rng(sim_ids[0] if sim_ids else 0)
    pool = [rng.uniform(low, high, size=field_shape).astype(np.float32) for _ in range(8)]
    interval = 1.0 / rate
    sent = 0
    cpu_start = time.process_time()
    next_send = time.monotonic()
    for sim_id in sim_ids:
        if stop.is_set():
            break
        with client.connect(server=server, token=token, sim_id=sim_id, timeout=CLIENT_TIMEOUT_S) as simulation:
            for time_step in range(n_steps):
                if not sending.is_set():  # paused: resume at the set pace, without a burst to catch up
                    while not sending.wait(0.1) and not stop.is_set():
                        pass
                    next_send = time.monotonic()
                if stop.is_set():
                    break
                simulation.send(field, time_step, pool[(sim_id + time_step) % len(pool)])
                sent += 1
                next_send += interval
                delay = next_send - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing: this sender's share of --send-rate
                elif delay < -0.1:  # fell far behind (the machine is busy): do not send a burst to catch up
                    next_send = time.monotonic()
    report.send((sent, time.process_time() - cpu_start))


class Senders(NamedTuple):
    """Running sender processes, their pause and stop signals and their report pipes."""

    processes: list[multiprocessing.process.BaseProcess]
    reports: list[multiprocessing.connection.Connection]
    sending: multiprocessing.synchronize.Event
    stop: multiprocessing.synchronize.Event


def start_senders(config: Config, receiver: Receiver, n_senders: int, rate: float, cores: set[int] | None) -> Senders:
    """Spawn the senders (sending); sender k streams simulations k, k + n_senders, ... of the table."""
    context = multiprocessing.get_context("spawn")
    sending, stop = context.Event(), context.Event()
    sending.set()
    processes, reports = [], []
    solver = config.solver
    low, high = min(config.solver.low), max(config.solver.high)  # heat: max. principle
    n_simulations = len(receiver.table)
    for k in range(n_senders):
        report, child_end = context.Pipe(duplex=False)
        process = context.Process(
            target=stream_fields,
            args=(
                receiver.control_address,
                receiver.token,
                list(range(k, n_simulations, n_senders)),
                next(iter(solver.field_shapes)),
                solver.n_steps,
                next(iter(solver.field_shapes.values())),
                low,
                high,
                rate / n_senders,
                sending,
                stop,
                child_end,
                cores,
            ),
            daemon=True,
        )
        process.start()
        child_end.close()
        processes.append(process)
        reports.append(report)
    return Senders(processes, reports, sending, stop)


def stop_senders(senders: Senders) -> tuple[int, float]:
    """Signal the senders to stop; return the messages they sent and their CPU seconds, in all."""
    senders.stop.set()
    senders.sending.set()
    sent = cpu_seconds = 0
    for process, report in zip(senders.processes, senders.reports, strict=True):
        if not report.poll(DEADLINE_S):
            process.kill()
            raise RuntimeError(
                f"a sender process (exit code {process.exitcode}) did not report within "
                f"{DEADLINE_S:.0f} s of being told to stop; its traceback, if any, is above"
            )
        count, cpu = report.recv()
        process.join(DEADLINE_S)
        sent += count
        cpu_seconds += cpu
    return sent, cpu_seconds


def check_senders(senders: Senders) -> None:
    """Fail fast when a sender died."""
    for process in senders.processes:
        if process.exitcode not in (None, 0):
            raise RuntimeError(f"a sender process ended with exit code {process.exitcode}; its traceback is above")


# --- the measurements --------------------------------------------------------------------------


class Blocks:
    """Accumulated timing of one variant over its interleaved blocks of steps."""

    def __init__(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self.wait_s = 0.0  # waiting for the prefetched batch (or in get_batch)
        self.step_s = 0.0  # in trainer.put + trainer.step_on_device (or trainer.step)
        self.received = 0  # unique samples stored during the blocks
        self.min_population = math.inf  # smallest buffer population seen before a draw

    @property
    def per_s(self) -> float:
        """Steps per second over all blocks."""
        return self.steps / self.seconds


def device_batches(trainer: Trainer, config: Config, rng: np.random.Generator) -> list[Batch]:
    """A few random batches of the configured shapes, put on the device once (as trainer.step puts them)."""
    solver = config.solver
    low, high = min(config.solver.low), max(config.solver.high)  # heat: max. principle
    batches = []
    for _ in range(DEVICE_BATCHES):
        parameters = rng.uniform(solver.low, solver.high, size=(trainer.batch_size, len(solver.parameters)))
        times = rng.uniform(0.0, solver.n_steps * solver.dt, size=(trainer.batch_size, 1))
        host = SampleBatch(
            inputs=np.concatenate([parameters, times], axis=1).astype(np.float32),
            targets=rng.uniform(low, high, size=(trainer.batch_size, solver.sample_size)).astype(np.float32),
            sample_ids=np.arange(trainer.batch_size, dtype=np.int64),
        )
        batches.append(trainer.to_device(host))
    return batches


def filled_buffer(config: Config, rng: np.random.Generator) -> Buffer:
    """A buffer of the configured kind filled to capacity with random samples, for the no-streaming variant."""
    solver = config.solver
    low, high = min(config.solver.low), max(config.solver.high)  # heat: max. principle
    buffer = buffer_from_config(config, seed=config.study.seed + 1)
    fields = rng.uniform(low, high, size=(64, solver.sample_size)).astype(np.float32)
    inputs = rng.uniform(low, high, size=(64, len(solver.parameters) + 1)).astype(np.float32)
    for sample in range(buffer.capacity):
        buffer.put(sample, inputs[sample % 64], fields[sample % 64], timeout=1.0)
    return buffer


def run_limit(trainer: Trainer, batches: list[Batch], steps: int, into: Blocks) -> None:
    """``steps`` jitted steps on device-resident batches, blocking on the state at the end."""
    start = time.perf_counter()
    for k in range(steps):
        trainer.step_on_device(batches[k % len(batches)])
    jax.block_until_ready(trainer.state)
    into.steps += steps
    into.seconds += time.perf_counter() - start


def run_timed_steps(
    trainer: Trainer,
    buffer: Buffer,
    steps: int,
    into: Blocks,
    next_batch: Callable[[], Any],
    step: Callable[[Any], object],
) -> None:
    """``steps`` of ``step(next_batch())``, timing the wait for each batch and each step call into ``into``
    (with the buffer's lowest population), then blocking on the trainer's state."""
    for _ in range(steps):
        into.min_population = min(into.min_population, buffer.population)
        waited = time.perf_counter()
        batch = next_batch()
        stepped = time.perf_counter()
        step(batch)
        into.wait_s += stepped - waited
        into.step_s += time.perf_counter() - stepped
    jax.block_until_ready(trainer.state)


def run_serial(trainer: Trainer, buffer: Buffer, receiver: Receiver, steps: int, into: Blocks) -> None:
    """``steps`` of get_batch + trainer.step in this thread (no prefetching), blocking on the state at the end."""
    received_before = receiver.counters().unique_received
    start = time.perf_counter()
    run_timed_steps(
        trainer, buffer, steps, into, lambda: buffer.get_batch(trainer.batch_size, timeout=DEADLINE_S), trainer.step
    )
    into.steps += steps
    into.seconds += time.perf_counter() - start
    into.received += receiver.counters().unique_received - received_before


def run_prefetched(
    trainer: Trainer, buffer: Buffer, prefetcher: Prefetcher, receiver: Receiver | None, steps: int, into: Blocks
) -> None:
    """``steps`` of the server's loop: the prefetched batch, put on the devices, stepped; blocking at the end."""

    def next_ready() -> object:
        ready = prefetcher.get(timeout=DEADLINE_S)
        if ready is None:
            raise RuntimeError("the buffer reported drained during the benchmark")
        return ready

    received_before = receiver.counters().unique_received if receiver is not None else 0
    start = time.perf_counter()
    run_timed_steps(
        trainer, buffer, steps, into, next_ready, lambda ready: trainer.step_on_device(trainer.put(ready.prepared))
    )
    into.steps += steps
    into.seconds += time.perf_counter() - start
    if receiver is not None:
        into.received += receiver.counters().unique_received - received_before


def ready_population(kind: str, watermark: int, batch_size: int) -> int:
    """The population at which the buffer releases a batch without waiting (jaxsurro.server.buffers' rules)."""
    if kind == "reservoir":
        return max(watermark, 1)
    if kind == "firo":
        return max(watermark + 1, batch_size)
    return batch_size  # fifo


def split_cores() -> tuple[set[int], set[int]]:
    """The first usable core for XLA's compute threads, the others for every host thread."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit(f"--pin needs at least 2 usable cores, this process may use {cores}")
    return {cores[0]}, set(cores[1:])


def start_on(start: Callable[[], None], cores: set[int] | None) -> None:
    """Call ``start`` from a helper thread restricted to ``cores``, so threads it starts inherit them."""

    def pinned_start() -> None:
        if cores:
            os.sched_setaffinity(0, cores)  # 0 = the calling thread
        start()

    helper = threading.Thread(target=pinned_start, name="pinned-start")
    helper.start()
    helper.join()


def submitted_table(config: Config, n_simulations: int, rng: np.random.Generator) -> SimulationTable:
    """Simulations with parameters in the configured bounds, all submitted so that their clients are welcome."""
    solver = config.solver
    table = SimulationTable(rng.uniform(solver.low, solver.high, size=(n_simulations, len(solver.parameters))))
    for record in table:
        record.attempts = 1
        record.state = SimState.SUBMITTED
    return table


def wait_for_watermark(buffer: Buffer, receiver: Receiver, senders: Senders) -> float:
    """Block until the buffer holds its watermark; return the seconds it took."""
    start = time.monotonic()
    while buffer.population < max(buffer.watermark, 1):
        receiver.check()
        check_senders(senders)
        if time.monotonic() - start > DEADLINE_S:
            raise RuntimeError(
                f"the buffer did not reach its watermark ({buffer.watermark}) within {DEADLINE_S:.0f} "
                f"s: {buffer.stats()}; receiver {receiver.counters()}"
            )
        time.sleep(0.01)  # a script polling a counter
    return time.monotonic() - start


# --- the report --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options: experiment file and overrides, steps, sender pace and count, the prototype."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog='Target: ours / limit >= 0.95 while production keeps up (docs/architecture.md, "Performance").',
    )
    add_config_arguments(parser, "experiment TOML file, e.g. experiments/heat.toml")
    parser.add_argument("--steps", type=int, default=400, help="timed steps K per variant")
    parser.add_argument("--block", type=int, default=25, help="steps per interleaved block")
    parser.add_argument("--send-rate", type=float, default=1000.0, help="messages per second, all senders together")
    parser.add_argument("--senders", type=int, default=1, help="sender processes")
    parser.add_argument(
        "--serial", action="store_true", help="also time the loop without prefetching (get_batch + trainer.step)"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give XLA's compute threads the first core alone, as a device of their own, and every host "
        "thread (the training loop, the prefetch and receiver threads, ZeroMQ's I/O thread, the senders) "
        "the others",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.block < 1 or args.send_rate <= 0 or args.senders < 1:
        parser.error("--steps, --block and --senders must be >= 1 and --send-rate > 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Interleave the limit and the streaming loop in blocks; print both rates and their ratio."""
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    solver = config.solver
    rng = np.random.default_rng(args.seed)
    total_start = time.perf_counter()
    trainer_cores, ingest_cores = split_cores() if args.pin else (None, None)
    if trainer_cores:
        os.sched_setaffinity(0, trainer_cores)  # before XLA's thread pool exists, so it is sized and placed here

    trainer = Trainer.from_config(config, range_scaling(config, min(solver.low), max(solver.high)))
    batches = device_batches(trainer, config, rng)
    idle_buffer = filled_buffer(config, rng) if config.buffer.kind == "reservoir" else None
    warmup = Blocks()
    run_limit(trainer, batches, WARMUP_STEPS, warmup)  # compiles the step
    if trainer_cores:
        # XLA's compute threads exist now, on the trainer's core; this thread (the training loop, host
        # work like the receiver's) moves to the others, so that core computes steps only, as a device.
        os.sched_setaffinity(0, ingest_cores)
    n_simulations = math.ceil(args.send_rate * STREAM_SECONDS_PLANNED / solver.n_steps) + args.senders
    table = submitted_table(config, n_simulations, rng)
    buffer = buffer_from_config(config, seed=config.study.seed)
    context = zmq.Context(io_threads=1)
    for core in sorted(ingest_cores or ()):
        context.set(zmq.THREAD_AFFINITY_CPU_ADD, core)  # the I/O thread is started with the first socket
    receiver = Receiver.from_config(
        config,
        table,
        BufferSink(buffer, table, solver.n_steps, solver.dt),
        protocol.new_token(),
        protocol.new_secret(),
        context=context,
    )
    names = ["limit (device-resident batches)"]
    if idle_buffer is not None:
        names.append("no streaming (full buffer)")
    names.append(STREAMING_LIMIT)
    names.append("ours (live streaming)")
    if args.serial:
        names.append("serial: no prefetching")
    blocks = {name: Blocks() for name in names}
    # The server's prefetch thread, on the ingest cores with --pin (it inherits the starting thread's cores).
    prefetcher = Prefetcher(buffer, trainer.prefetch, trainer.batch_size)
    idle_prefetcher = Prefetcher(idle_buffer, trainer.prefetch, trainer.batch_size) if idle_buffer is not None else None
    start_on(receiver.start, ingest_cores)  # the receiver thread inherits the starting thread's cores
    senders_started = time.perf_counter()
    senders = start_senders(config, receiver, args.senders, args.send_rate, ingest_cores)
    try:
        fill_s = wait_for_watermark(buffer, receiver, senders)
        for started in (prefetcher, idle_prefetcher):
            if started is not None:
                start_on(started.__enter__, ingest_cores)
        run_prefetched(trainer, buffer, prefetcher, receiver, WARMUP_STEPS, warmup)
        for _ in range(math.ceil(args.steps / args.block)):
            senders.sending.clear()  # the limit and the no-streaming loop run with the senders paused
            run_limit(trainer, batches, args.block, blocks[names[0]])
            if idle_prefetcher is not None:
                run_prefetched(
                    trainer, idle_buffer, idle_prefetcher, None, args.block, blocks["no streaming (full buffer)"]
                )
            senders.sending.set()
            run_limit(trainer, batches, args.block, blocks[STREAMING_LIMIT])
            run_prefetched(trainer, buffer, prefetcher, receiver, args.block, blocks["ours (live streaming)"])
            if args.serial:
                run_serial(trainer, buffer, receiver, args.block, blocks["serial: no prefetching"])
            receiver.check()
            check_senders(senders)
    finally:
        senders.stop.set()
        buffer.close()  # a sample still arriving is counted as late, so no sender blocks on a full buffer
        for started in (prefetcher, idle_prefetcher):
            if started is not None:
                started.stop()
        sent, sender_cpu_s = stop_senders(senders)
        receiver.stop()
        context.term()
    senders_wall_s = time.perf_counter() - senders_started  # bounds the senders' lifetime from above

    limit = blocks[names[0]]
    ours = blocks["ours (live streaming)"]
    ratio = ours.per_s / limit.per_s
    devices = ", ".join(str(device) for device in trainer.mesh.devices.flat)
    print(f"trainer starvation: {Path(args.config).name} {' '.join(args.overrides)}".rstrip())
    print(
        f"  model {config.model.name} {len(solver.parameters) + 1} -> {config.model.layers}x{config.model.hidden} -> "
        f"{solver.grid_size}x{solver.grid_size}, batch {trainer.batch_size}, {config.buffer.kind} buffer "
        f"(capacity {buffer.capacity}, watermark {buffer.watermark}), devices: {devices}"
    )
    print(
        f"  streaming: {args.senders} sender process(es) paced at {args.send_rate:,.0f} msgs/s in all "
        f"({solver.sample_size * 4 / 1e3:,.0f} KB fields), watermark reached in {fill_s:.1f} s; "
        f"{limit.steps} steps per variant in interleaved blocks of {args.block} (senders paused during the "
        "limit and no-streaming blocks)"
    )
    if trainer_cores:
        print(
            f"  pinned: XLA's compute threads on core(s) {sorted(trainer_cores)}, as a device; the training loop, "
            f"the prefetch and receiver threads, ZeroMQ's I/O thread and the senders on core(s) {sorted(ingest_cores)}"
        )
    print(f"  {'':<34} {'steps/s':>8} {'ratio':>6}  {'ms/step: batch wait':>19} {'step call':>9}")
    for name, timing in blocks.items():
        waits = (
            f"{timing.wait_s / timing.steps * 1e3:>19.2f} {timing.step_s / timing.steps * 1e3:>9.2f}"
            if timing.wait_s or timing.step_s
            else f"{'':>19} {timing.seconds / timing.steps * 1e3:>9.2f}"
        )
        print(f"  {name:<34} {timing.per_s:>8.1f} {timing.per_s / limit.per_s:>6.3f}  {waits}")
    print(f"  ours / limit = {ratio:.3f}: {'meets' if ratio >= TARGET_RATIO else 'BELOW'} the target >= {TARGET_RATIO}")
    interference = blocks[STREAMING_LIMIT].per_s / limit.per_s
    feeding = ours.per_s / blocks[STREAMING_LIMIT].per_s
    print(
        f"  of which: the streaming's interference with the step's compute {interference:.3f} (limit while "
        f"streaming / limit), the cost of feeding the device {feeding:.3f} (ours / limit while streaming)"
    )
    needed = ready_population(config.buffer.kind, buffer.watermark, trainer.batch_size)
    kept_up = ours.min_population >= needed
    print(
        f"  during the streaming blocks: {ours.received / ours.seconds:,.0f} samples/s received, "
        f"{ours.per_s * trainer.batch_size:,.0f} samples/s trained; buffer population never below "
        f"{ours.min_population} ({needed} releases a batch: "
        f"{'production kept up' if kept_up else 'the trainer waited for data'})"
    )
    print(
        f"  senders: {sent} messages, {sender_cpu_s:.2f} CPU s over at most {senders_wall_s:.1f} s "
        f"({sender_cpu_s / senders_wall_s:.0%} of a core or more, start-up included)"
    )
    if not trainer_cores:
        print(
            f"  the senders, the receiver thread and ZeroMQ's I/O threads share this machine's "
            f"{len(os.sched_getaffinity(0))} cores with XLA's compute threads, so the ratio is a lower bound for "
            "a machine with spare cores (--pin separates them)"
        )
    print(f"total {time.perf_counter() - total_start:.1f} s")
    if args.serial:
        print(f"ratio starvation_serial_over_limit {blocks['serial: no prefetching'].per_s / limit.per_s:.3f}")
    print(f"ratio starvation_ours_over_streaming_limit {feeding:.3f}")
    print(f"ratio starvation_ours_over_limit {ratio:.3f}")


if __name__ == "__main__":
    main()
