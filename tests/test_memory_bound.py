"""Bounded memory before authentication: frames larger than any valid one never reach the server's memory.

The receiver caps each inbound frame with ZMQ_MAXMSGSIZE (docs/protocol.md, "Frame size limit"); a peer
announcing a larger frame is disconnected as soon as its size is read, before the frame is buffered. A
hostile peer in another process (so that its own 64 MiB buffers do not count) opens 4 connections, sends
3 frames of 64 MiB on each (a bare frame, and DATA messages whose payload frame is 64 MiB) plus garbage,
while this process samples its own resident memory. The bound: RSS before the attack + the sink's size +
RSS_MARGIN (64 MiB; the attack sends 768 MiB, a single buffered 64 MiB frame already breaks it when the
peers overlap). Measured in one run: 0.5 MiB peak growth with the limit; 224 MiB without it (the test fails).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
from waiting import wait_until

from jaxsurro import client, protocol
from jaxsurro.server.receiver import Receiver, ValidationSink
from jaxsurro.table import SimState, SimulationTable

SHAPE, N_STEPS, N_SIMS = (64, 64), 8, 2
MIB = 2**20
RSS_MARGIN = 64 * MIB
N_CONNECTIONS, N_LARGE, LARGE = 4, 3, 64 * MIB
N_GARBAGE = 200

# The hostile peer: N_CONNECTIONS DEALER sockets (as clients') without the token, each sending N_LARGE frames of LARGE
# bytes, and a further socket sending garbage. It watches its sockets' disconnections (one per large
# frame, when the server enforces the limit) and prints how many it saw.
HOSTILE = textwrap.dedent(
    """
    import sys, time
    import zmq
    import zmq.utils.monitor as monitor
    address, n_connections, n_large, large, n_garbage = sys.argv[1], *map(int, sys.argv[2:])
    context = zmq.Context()
    big = bytes(large)  # sent zero-copy: this process holds it once
    header = (b"JXSR\\x01\\x00\\x03\\x01" + bytes(16) + bytes(8) + bytes(8) + b"\\x02" + bytes(3)
              + (8192).to_bytes(4, "little") * 2 + bytes(12))
    sockets, monitors = [], []
    for i in range(n_connections):
        s = context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        monitors.append(s.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        s.connect(address)
        sockets.append(s)
    for k in range(n_large):
        for i, s in enumerate(sockets):
            if (i + k) % 2:
                s.send(big, copy=False)
            else:
                s.send_multipart([header, b"u", big], copy=False)
    garbage = context.socket(zmq.DEALER)
    garbage.connect(address)
    for k in range(n_garbage):
        garbage.send_multipart([bytes([k % 256]) * (k % 60), b"x" * (k % 5)])  # never a 64-byte header
    poller = zmq.Poller()
    for m in monitors:
        poller.register(m, zmq.POLLIN)
    disconnects, deadline = 0, time.monotonic() + 60
    while disconnects < n_connections * n_large and time.monotonic() < deadline:
        for m, _ in poller.poll(1000):
            if monitor.recv_monitor_message(m)["event"] == zmq.EVENT_DISCONNECTED:
                disconnects += 1
    print(disconnects, flush=True)
    garbage.close(linger=10000)
    """
)


def rss() -> int:
    """This process's resident memory in bytes (VmRSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRSS:
    """Samples this process's resident memory every 2 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self):
        self.peak = rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._done.wait(0.002):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, rss())


def test_oversized_frames_from_peers_without_the_token_do_not_grow_the_servers_memory():
    table = SimulationTable(np.arange(2 * N_SIMS, dtype=float).reshape(N_SIMS, 2))
    for record in table:
        record.attempts, record.state = 1, SimState.SUBMITTED
    sink = ValidationSink(N_SIMS, N_STEPS, int(np.prod(SHAPE)))
    receiver = Receiver(
        table=table,
        sink=sink,
        token=protocol.new_token(),
        secret=protocol.new_secret(),
        fields={"u": SHAPE},
        wire_dtype="float32",
        n_steps=N_STEPS,
        host="127.0.0.1",
    )
    assert protocol.max_data_frame_bytes(receiver.expectation) == 64 * 64 * 4 + protocol.FRAME_LIMIT_MARGIN
    receiver.start()
    try:
        sink.samples.fill(0.0)  # touch the sink's pages now: they are part of the bound, not of the growth
        before = rss()
        sampler = PeakRSS()
        hostile = subprocess.run(
            [sys.executable, "-c", HOSTILE, receiver.data_address]
            + [str(n) for n in (N_CONNECTIONS, N_LARGE, LARGE, N_GARBAGE)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert hostile.returncode == 0, hostile.stderr
        wait_until(lambda: sum(receiver.counters().rejected.values()) >= N_GARBAGE, 30, "the garbage to be counted")
        peak = sampler.stop()
        bound = before + sink.samples.nbytes + RSS_MARGIN
        print(
            f"\nRSS before {before / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB (growth {(peak - before) / MIB:.1f} MiB), "
            f"bound {bound / MIB:.1f} MiB; hostile peer saw {hostile.stdout.strip()} disconnections "
            f"for {N_CONNECTIONS * N_LARGE} frames of {LARGE // MIB} MiB; rejected {receiver.counters().rejected}"
        )
        assert peak < bound
        assert int(hostile.stdout) == N_CONNECTIONS * N_LARGE  # each oversized frame cost its sender the connection
        counters = receiver.counters()
        assert counters.rejected == {"malformed": N_GARBAGE}
        assert counters.unique_received == 0 and not receiver.stored.any()
        assert receiver.error is None and receiver.mismatch is None

        # A valid client is still served.
        with client.connect(server=receiver.control_address, token=receiver.token, sim_id=1, timeout=10) as sim:
            for t in range(N_STEPS):
                sim.send("u", t, np.full(SHAPE, t, dtype=np.float32))
        wait_until(lambda: receiver.counters().unique_received == N_STEPS, 10, "the valid client's steps")
        np.testing.assert_array_equal(sink.samples[1, :, 0], np.arange(N_STEPS))
        receiver.check()
    finally:
        receiver.stop()
