"""Time batch assembly from the host buffers against a plain NumPy gather of the same rows.

The limit (docs/architecture.md, "Performance") is ``inputs[idx], targets[idx]`` on arrays of the
buffer's size; the buffer adds locking, random slot choice and bookkeeping on top. Paper sizes: capacity
6000, 64x64 float32 fields, 6 inputs (5 parameters + time), batch 128. For each buffer kind the
buffer's get_batch and the plain gather are timed alternately in the same run, and the median
per-batch times and their ratio (target <= 1.5) are printed, then one line
``ratio batch_assembly_<kind>_buffer_over_gather <value>`` per kind (times; lower is better).
Usage: python scripts/bench_batch_assembly.py [--repeats 200] [--capacity 6000] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from jaxsurro.server.buffers import Buffer, make_buffer

INPUT_DIM = 6
FIELD_SHAPE = (64, 64)
TARGET_RATIO = 1.5


def parse_args() -> argparse.Namespace:
    """Command-line options: sizes and the number of timed batches per kind."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200, help="timed batches per kind")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def timed_ms(call: Callable[[], object]) -> tuple[float, object]:
    """Milliseconds one call takes, and its result."""
    start = time.perf_counter_ns()
    result = call()
    return (time.perf_counter_ns() - start) / 1e6, result


class SampleSource:
    """Cycles through a small pool of random samples so that filling a buffer costs no generation."""

    def __init__(self, rng: np.random.Generator, field_size: int, pool: int = 64) -> None:
        self.inputs = rng.random((pool, INPUT_DIM), dtype=np.float32)
        self.fields = rng.random((pool, field_size), dtype=np.float32)
        self.next_id = 0

    def put(self, buffer: Buffer, count: int) -> None:
        """Put the next ``count`` samples (ids 0, 1, 2, ... in arrival order)."""
        for _ in range(count):
            row = self.next_id % len(self.inputs)
            buffer.put(self.next_id, self.inputs[row], self.fields[row], timeout=10.0)
            self.next_id += 1


def bench_kind(kind: str, args: argparse.Namespace, rng: np.random.Generator) -> tuple[float, float]:
    """Median ms per batch for get_batch and for the plain gather of the same rows."""
    field_size = int(np.prod(FIELD_SHAPE))
    buffer = make_buffer(
        kind,
        capacity=args.capacity,
        watermark=min(1000, args.capacity - 1),
        input_dim=INPUT_DIM,
        field_size=field_size,
        seed=args.seed,
    )
    plain_inputs = rng.random((args.capacity, INPUT_DIM), dtype=np.float32)
    plain_targets = rng.random((args.capacity, field_size), dtype=np.float32)
    source = SampleSource(rng, field_size)
    source.put(buffer, args.capacity)  # full; ids 0..C-1 sit in slots 0..C-1
    batch = plain_batch = None
    buffer_ms: list[float] = []
    plain_ms: list[float] = []
    warmup = 50
    for repeat in range(warmup + args.repeats):
        if kind != "reservoir":  # reading evicts: top the buffer up again (not timed)
            source.put(buffer, args.capacity - buffer.stats().population)
        elapsed, batch = timed_ms(lambda: buffer.get_batch(args.batch_size, timeout=10.0))
        if kind == "firo":  # slots are recycled in free-list order: gather random distinct rows
            rows = rng.choice(args.capacity, size=args.batch_size, replace=False)
        else:  # reservoir (nothing evicted) and FIFO ring: the sample id gives its slot
            rows = batch.sample_ids % args.capacity
        # Keep the result alive until the next gather, as `batch` is, so both see the same allocations.
        plain_elapsed, plain_batch = timed_ms(lambda: (plain_inputs[rows], plain_targets[rows]))
        if repeat >= warmup:
            buffer_ms.append(elapsed)
            plain_ms.append(plain_elapsed)
    return statistics.median(buffer_ms), statistics.median(plain_ms)


def main() -> None:
    """Benchmark every kind and print one line each."""
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    mib = args.batch_size * (INPUT_DIM + int(np.prod(FIELD_SHAPE))) * 4 / 2**20
    print(
        f"batch assembly: capacity {args.capacity}, field {FIELD_SHAPE[0]}x{FIELD_SHAPE[1]} float32, "
        f"batch {args.batch_size} ({mib:.1f} MiB), median of {args.repeats} batches"
    )
    print(f"{'buffer':<10} {'get_batch ms':>12} {'numpy gather ms':>16} {'ratio':>6}  target <= {TARGET_RATIO}")
    start = time.perf_counter()
    ratios = {}
    for kind in ("reservoir", "fifo", "firo"):
        buffer_ms, plain_ms = bench_kind(kind, args, rng)
        ratios[kind] = buffer_ms / plain_ms
        verdict = "ok" if ratios[kind] <= TARGET_RATIO else "ABOVE TARGET"
        print(f"{kind:<10} {buffer_ms:>12.3f} {plain_ms:>16.3f} {ratios[kind]:>6.2f}  {verdict}")
    print(f"total {time.perf_counter() - start:.1f} s")
    for kind, ratio in ratios.items():
        print(f"ratio batch_assembly_{kind}_buffer_over_gather {ratio:.3f}")


if __name__ == "__main__":
    main()
