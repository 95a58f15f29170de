"""Host buffers under real producer/consumer threads: no loss, no duplicates, blocking and ending rules."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from waiting import wait_until

from jaxsurro.config import buffer_capacity_problems, load_config
from jaxsurro.server.buffers import (
    BufferClosed,
    FIFOBuffer,
    FIROBuffer,
    ReservoirBuffer,
    SampleBatch,
    buffer_from_config,
    make_buffer,
)

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["fifo", "firo", "reservoir"]
INPUT_DIM = 3
FIELD_SHAPE = (2, 4)
FIELD_SIZE = 8
WAIT_S = 10.0  # generous deadline for conditions that should hold within milliseconds


def sample_arrays(sample_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and field that encode the sample id, so a batch row can be checked against its id."""
    inputs = np.full(INPUT_DIM, sample_id, dtype=np.float64)  # float64 on purpose: put must cast
    field = np.arange(FIELD_SIZE, dtype=np.float32).reshape(FIELD_SHAPE) + 1000.0 * sample_id
    return inputs, field


def check_rows(batch: SampleBatch) -> None:
    """Every row of the batch carries the data put with its id."""
    assert batch.inputs.dtype == np.float32 and batch.targets.dtype == np.float32
    assert batch.sample_ids.dtype == np.int64
    assert batch.inputs.shape == (len(batch.sample_ids), INPUT_DIM)
    assert batch.targets.shape == (len(batch.sample_ids), FIELD_SIZE)
    np.testing.assert_array_equal(batch.inputs, np.repeat(batch.sample_ids[:, None], INPUT_DIM, 1))
    expected = np.arange(FIELD_SIZE)[None, :] + 1000.0 * batch.sample_ids[:, None]
    np.testing.assert_array_equal(batch.targets, expected.astype(np.float32))


def build(kind: str, capacity: int = 16, watermark: int = 4, seed: int = 0):
    return make_buffer(
        kind, capacity=capacity, watermark=watermark, input_dim=INPUT_DIM, field_size=FIELD_SIZE, seed=seed
    )


def put_ids(buffer, ids) -> None:
    for sample_id in ids:
        buffer.put(sample_id, *sample_arrays(sample_id), timeout=WAIT_S)


class ThreadResult:
    """A thread running a callable, keeping its return value or exception."""

    def __init__(self, target: Callable[[], object]) -> None:
        self.value: object = None
        self.error: BaseException | None = None
        self.finished = threading.Event()

        def run() -> None:
            try:
                self.value = target()
            except BaseException as error:
                self.error = error
            finally:
                self.finished.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> object:
        assert self.finished.wait(WAIT_S), "thread did not finish before the deadline"
        self.thread.join(WAIT_S)
        if self.error is not None:
            raise self.error
        return self.value


@pytest.mark.parametrize("kind", KINDS)
def test_threaded_stream_loses_nothing(kind: str) -> None:
    """A producer thread streams N unique ids while the consumer trains: nothing is lost or duplicated."""
    n_samples, batch_size = 1500, 8
    buffer = build(kind, capacity=64, watermark=16, seed=1)

    def produce() -> None:
        put_ids(buffer, range(n_samples))
        buffer.end_reception()

    producer = ThreadResult(produce)
    drawn: list[np.ndarray] = []
    n_batches = 0
    while (batch := buffer.get_batch(batch_size, timeout=WAIT_S)) is not None:
        check_rows(batch)
        assert 1 <= len(batch.sample_ids) <= batch_size
        drawn.append(batch.sample_ids)
        n_batches += 1
        assert n_batches < 1_000_000, "training never ended"
    producer.join()
    ids = np.concatenate(drawn)
    stats = buffer.stats()
    assert stats.received == n_samples and stats.population == 0 and stats.reception_over
    assert stats.evicted == n_samples and stats.drawn == len(ids)
    unique, counts = np.unique(ids, return_counts=True)
    np.testing.assert_array_equal(unique, np.arange(n_samples))  # every id reached training
    if kind == "fifo":
        np.testing.assert_array_equal(ids, np.arange(n_samples))  # arrival order, once each
    elif kind == "firo":
        assert np.all(counts == 1)
        assert not np.array_equal(ids, np.arange(n_samples))  # random positions, not arrival order
    else:
        assert np.all(counts >= 1)  # evict-on-draw ending draws every remaining sample once more
    histogram = buffer.repetition_histogram()
    assert histogram.sum() == n_samples
    assert (np.arange(len(histogram)) * histogram).sum() == len(ids)
    np.testing.assert_array_equal(histogram, np.bincount(counts, minlength=len(histogram)))
    assert buffer.get_batch(batch_size, timeout=0) is None  # stays ended


@pytest.mark.parametrize("kind", KINDS)
def test_get_batch_returns_none_exactly_when_reception_over_and_drained(kind: str) -> None:
    buffer = build(kind, capacity=8, watermark=2)
    with pytest.raises(TimeoutError):  # empty but reception ongoing: wait, do not end training
        buffer.get_batch(2, timeout=0.01)
    put_ids(buffer, range(5))
    buffer.end_reception()
    seen: list[int] = []
    while (batch := buffer.get_batch(2, timeout=0)) is not None:
        check_rows(batch)
        seen.extend(batch.sample_ids.tolist())
        assert len(seen) <= 5
    assert sorted(seen) == list(range(5))
    assert buffer.stats().population == 0
    assert buffer.get_batch(2, timeout=0) is None


@pytest.mark.parametrize("kind", KINDS)
def test_end_reception_wakes_a_waiting_consumer(kind: str) -> None:
    buffer = build(kind, capacity=8, watermark=2)
    consumer = ThreadResult(lambda: buffer.get_batch(4, timeout=WAIT_S))
    assert not consumer.finished.wait(0.05)  # nothing to draw: it waits
    buffer.end_reception()
    assert consumer.join() is None


@pytest.mark.parametrize("kind", ["fifo", "firo"])
def test_evicting_buffers_block_producer_when_full(kind: str) -> None:
    buffer = build(kind, capacity=4, watermark=0)
    put_ids(buffer, range(4))
    producer = ThreadResult(lambda: put_ids(buffer, [4]))
    assert not producer.finished.wait(0.05), "put into a full buffer returned"
    assert buffer.stats().population == 4
    batch = buffer.get_batch(1, timeout=WAIT_S)
    producer.join()
    assert buffer.stats().population == 4 and buffer.stats().received == 5
    if kind == "fifo":
        assert batch.sample_ids.tolist() == [0]


def test_reservoir_blocks_producer_only_when_every_sample_is_unseen() -> None:
    buffer = ReservoirBuffer(capacity=4, watermark=4, input_dim=INPUT_DIM, field_size=FIELD_SIZE, seed=3)
    put_ids(buffer, range(4))
    producer = ThreadResult(lambda: put_ids(buffer, [4]))
    assert not producer.finished.wait(0.05), "put into a reservoir full of unseen samples returned"
    assert buffer.stats().unseen == 4
    batch = buffer.get_batch(1, timeout=WAIT_S)  # one sample becomes seen: it is the only one evictable
    producer.join()
    stats = buffer.stats()
    assert (stats.population, stats.unseen, stats.evicted, stats.received) == (4, 4, 1, 5)
    buffer.end_reception()
    remaining = np.concatenate([b.sample_ids for b in iter(lambda: buffer.get_batch(3, timeout=0), None)])
    assert sorted(remaining.tolist()) == sorted(set(range(5)) - set(batch.sample_ids.tolist()))


def test_reservoir_evicts_only_seen_samples() -> None:
    """hist[0] counts samples never used; while reception is on it equals the stored unseen count."""
    buffer = ReservoirBuffer(capacity=10, watermark=5, input_dim=INPUT_DIM, field_size=FIELD_SIZE, seed=4)
    rng = np.random.default_rng(0)
    next_id = 0
    for _ in range(400):
        for _ in range(rng.integers(0, 4)):
            try:
                buffer.put(next_id, *sample_arrays(next_id), timeout=0)
                next_id += 1
            except TimeoutError as error:  # every stored sample is unseen: the producer would block
                assert buffer.stats().unseen == 10, str(error)
        if buffer.stats().population >= 5:
            check_rows(buffer.get_batch(int(rng.integers(1, 4)), timeout=0))
        stats = buffer.stats()
        assert buffer.repetition_histogram()[0] == stats.unseen
        assert stats.received == next_id and stats.population == min(next_id, 10)
    assert buffer.stats().evicted > 100


def test_firo_waits_for_population_above_watermark_until_reception_ends() -> None:
    buffer = FIROBuffer(capacity=20, watermark=10, input_dim=INPUT_DIM, field_size=FIELD_SIZE, seed=5)
    put_ids(buffer, range(10))
    with pytest.raises(TimeoutError, match="watermark 10"):
        buffer.get_batch(2, timeout=0.01)  # population 10 is not above the watermark
    put_ids(buffer, [10])
    assert len(buffer.get_batch(2, timeout=0).sample_ids) == 2  # 11 > 10
    with pytest.raises(TimeoutError):
        buffer.get_batch(1, timeout=0.01)  # back to 9
    buffer.end_reception()  # threshold drops to zero
    sizes = [len(b.sample_ids) for b in iter(lambda: buffer.get_batch(4, timeout=0), None)]
    assert sizes == [4, 4, 1]


def test_fifo_needs_a_full_batch_until_reception_ends() -> None:
    buffer = FIFOBuffer(capacity=8, watermark=0, input_dim=INPUT_DIM, field_size=FIELD_SIZE, seed=0)
    put_ids(buffer, range(3))
    with pytest.raises(TimeoutError, match="needs 4 stored samples"):
        buffer.get_batch(4, timeout=0.01)
    buffer.end_reception()
    assert buffer.get_batch(4, timeout=0).sample_ids.tolist() == [0, 1, 2]


def test_reservoir_never_waits_for_new_data_once_watermark_reached() -> None:
    buffer = ReservoirBuffer(capacity=32, watermark=6, input_dim=INPUT_DIM, field_size=FIELD_SIZE, seed=6)
    put_ids(buffer, range(5))
    with pytest.raises(TimeoutError):
        buffer.get_batch(4, timeout=0.01)
    put_ids(buffer, [5])
    for _ in range(200):  # timeout=0: any wait would raise
        batch = buffer.get_batch(16, timeout=0)  # larger than the population: with replacement
        check_rows(batch)
        assert len(batch.sample_ids) == 16 and set(batch.sample_ids.tolist()) <= set(range(6))
    stats = buffer.stats()
    assert stats.unseen == 0 and stats.drawn == 3200 and stats.population == 6
    histogram = buffer.repetition_histogram()
    assert histogram.sum() == 6 and (np.arange(len(histogram)) * histogram).sum() == 3200


@pytest.mark.parametrize("kind", KINDS)
def test_timeouts_explain_the_state(kind: str) -> None:
    buffer = build(kind, capacity=2, watermark=1)
    with pytest.raises(TimeoutError, match=r"population 0/2 \(capacity\), 0 unseen"):
        buffer.get_batch(2, timeout=0.01)
    put_ids(buffer, range(2))
    with pytest.raises(TimeoutError, match=r"put of sample 7 timed out .* population 2/2 \(capacity\), 2 unseen"):
        buffer.put(7, *sample_arrays(7), timeout=0.01)


@pytest.mark.parametrize("kind", KINDS)
def test_close_wakes_blocked_producer_and_consumer(kind: str) -> None:
    buffer = build(kind, capacity=2, watermark=1)
    put_ids(buffer, range(2))
    producer = ThreadResult(lambda: put_ids(buffer, [2]))
    empty = build(kind, capacity=2, watermark=1)
    consumer = ThreadResult(lambda: empty.get_batch(1, timeout=WAIT_S))
    assert not producer.finished.wait(0.05) and not consumer.finished.wait(0.0)
    buffer.close()
    empty.close()
    with pytest.raises(BufferClosed):
        producer.join()
    with pytest.raises(BufferClosed):
        consumer.join()
    with pytest.raises(BufferClosed):
        buffer.get_batch(1, timeout=0)


@pytest.mark.parametrize("kind", KINDS)
def test_put_after_end_reception_is_an_error(kind: str) -> None:
    buffer = build(kind)
    buffer.end_reception()
    with pytest.raises(RuntimeError, match="after end_reception"):
        buffer.put(0, *sample_arrays(0), timeout=0)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_and_arrivals_give_the_same_batches(kind: str) -> None:
    def run() -> list[list[int]]:
        buffer = build(kind, capacity=16, watermark=4, seed=42)
        out = []
        for start in range(0, 64, 8):
            for sample_id in range(start, start + 8):
                try:  # a reservoir full of unseen samples refuses; deterministic given the seed
                    buffer.put(sample_id, *sample_arrays(sample_id), timeout=0)
                except TimeoutError:
                    out.append([-sample_id])
            out.append(buffer.get_batch(8, timeout=0).sample_ids.tolist())
        return out

    assert run() == run()


def test_constructor_and_argument_validation() -> None:
    with pytest.raises(ValueError, match=r"fifo buffer: capacity \(0\) must be at least 1"):
        build("fifo", capacity=0, watermark=0)
    with pytest.raises(ValueError, match=r"watermark \(9\) must not exceed capacity \(8\).*never"):
        build("reservoir", capacity=8, watermark=9)
    with pytest.raises(ValueError, match=r"watermark \(-1\) must be at least 0"):
        build("firo", capacity=8, watermark=-1)
    with pytest.raises(ValueError, match=r"watermark \(8\) must be below capacity \(8\) for a FIRO buffer"):
        build("firo", capacity=8, watermark=8)
    with pytest.raises(ValueError, match=r"watermark \(0\) must be at least 1 for a reservoir"):
        build("reservoir", capacity=8, watermark=0)
    with pytest.raises(ValueError, match="input_dim and field_size must be >= 1"):
        make_buffer("fifo", capacity=4, watermark=0, input_dim=0, field_size=1, seed=0)
    with pytest.raises(TypeError, match="capacity must be an int"):
        make_buffer("fifo", capacity=4.0, watermark=0, input_dim=1, field_size=1, seed=0)
    with pytest.raises(
        ValueError, match=r"unknown buffer kind 'lifo'; expected one of \['fifo', 'firo', 'reservoir'\]"
    ):
        make_buffer("lifo", capacity=4, watermark=0, input_dim=1, field_size=1, seed=0)
    buffer = build("fifo", capacity=4, watermark=0)
    with pytest.raises(ValueError, match=r"batch_size \(5\) must not exceed capacity \(4\) for a FIFO buffer"):
        buffer.get_batch(5, timeout=0)
    with pytest.raises(ValueError, match=r"batch_size \(5\) must not exceed"):  # checked on every new size
        buffer.get_batch(5, timeout=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        buffer.get_batch(0, timeout=0)
    with pytest.raises(ValueError, match=r"field must have 8 values .* got shape \(3, 3\)"):
        buffer.put(0, np.zeros(INPUT_DIM), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"inputs must have 3 values"):
        buffer.put(0, np.zeros(4), np.zeros(FIELD_SIZE))
    assert build("reservoir", capacity=8, watermark=8).capacity == 8  # reservoir reaches W == C


@pytest.mark.parametrize(
    ("kind", "capacity", "watermark", "batch_size"),
    [
        ("fifo", 0, 0, 1),
        ("firo", 8, 8, 4),
        ("firo", 8, 9, 4),
        ("reservoir", 8, 0, 4),
        ("fifo", 4, 0, 5),
        ("firo", 4, 2, 5),
        ("reservoir", 4, 2, 50),
        ("fifo", 4, 4, 4),
    ],
)
def test_the_buffers_apply_the_configurations_size_rules(
    kind: str, capacity: int, watermark: int, batch_size: int
) -> None:
    """One statement of the rules (jaxsurro.config.buffer_capacity_problems): what the configuration
    rejects at load is exactly what a buffer refuses to be built with or to draw."""
    problems = buffer_capacity_problems(
        kind, capacity, watermark, batch_size, names=("capacity", "watermark", "batch_size")
    )
    size_problems = buffer_capacity_problems(kind, capacity, watermark, names=("capacity", "watermark", "batch_size"))
    if size_problems:
        with pytest.raises(ValueError) as info:
            build(kind, capacity=capacity, watermark=watermark)
        assert str(info.value) == f"{kind} buffer: " + "; ".join(size_problems)
        return
    buffer = build(kind, capacity=capacity, watermark=watermark)
    if problems:
        with pytest.raises(ValueError) as info:
            buffer.get_batch(batch_size, timeout=0)
        assert str(info.value) == f"{kind} buffer: " + "; ".join(problems)
    else:
        buffer.end_reception()
        assert buffer.get_batch(batch_size, timeout=0) is None  # empty and over: a valid request


def test_buffer_from_config_follows_the_buffer_section_and_the_solver() -> None:
    """The configured kind, capacity and watermark; rows of (parameters, time) and of the solver's sample."""
    overrides = ["buffer.kind=firo", "buffer.capacity=500", "buffer.watermark=100", "solver.grid_size=8"]
    config = load_config(ROOT / "experiments" / "heat.toml", overrides)
    buffer = buffer_from_config(config, seed=3)
    assert isinstance(buffer, FIROBuffer)
    assert (buffer.capacity, buffer.watermark) == (500, 100)
    assert (buffer.input_dim, buffer.field_size) == (len(config.solver.parameters) + 1, config.solver.sample_size)
    assert buffer.field_size == 64


@pytest.mark.parametrize("kind", ["fifo", "firo", "reservoir"])
def test_a_restored_snapshot_behaves_like_the_buffer_it_was_taken_from(kind):
    """Same samples, uses, counters and random draws: a resumed run continues as the original would have."""
    original = make_buffer(kind, capacity=8, watermark=2, input_dim=2, field_size=3, seed=7)
    for i in range(6):
        original.put(i, np.full(2, i, np.float32), np.full(3, i, np.float32), timeout=1)
    original.get_batch(2, timeout=1)
    snapshot = original.snapshot()
    restored = make_buffer(kind, capacity=8, watermark=2, input_dim=2, field_size=3, seed=99)
    restored.restore(snapshot)
    assert restored.stats() == original.stats()
    np.testing.assert_array_equal(restored.repetition_histogram(), original.repetition_histogram())
    for i in range(6, 8):
        for buffer in (original, restored):
            buffer.put(i, np.full(2, i, np.float32), np.full(3, i, np.float32), timeout=1)
    for _ in range(2):
        a, b = original.get_batch(2, timeout=1), restored.get_batch(2, timeout=1)
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        np.testing.assert_array_equal(a.targets, b.targets)
    with pytest.raises(ValueError, match="needs an empty"):
        restored.restore(snapshot)


def put_many_ids(buffer, ids, timeout: float | None = WAIT_S) -> int:
    """put_many of these ids (their inputs and fields as put_ids makes them); how many were stored."""
    arrays = [sample_arrays(sample_id) for sample_id in ids]
    inputs = np.array([inputs for inputs, _ in arrays]).reshape(len(arrays), INPUT_DIM)
    return buffer.put_many(np.asarray(list(ids), dtype=np.int64), inputs, [field for _, field in arrays], timeout)


@pytest.mark.parametrize("kind", KINDS)
def test_put_many_stores_as_puts_one_at_a_time_would(kind: str) -> None:
    """Same seed and arrivals: put_many in chunks and put one id at a time take the same slots, evict the
    same samples (a Reservoir's random seen ones) and give the same batches, counts and histograms."""

    def run(batched: bool) -> tuple[list, list]:
        buffer = build(kind, capacity=16, watermark=4, seed=7)
        batches, stored = [], []
        next_id = 0
        for chunk in (16, 5, 9, 3, 12, 7, 1, 20, 6):
            ids = range(next_id, next_id + chunk)
            if batched:
                count = put_many_ids(buffer, ids, timeout=0)
            else:
                count = 0
                for sample_id in ids:
                    try:
                        buffer.put(sample_id, *sample_arrays(sample_id), timeout=0)
                    except TimeoutError:  # full: the rest of the chunk comes back next time
                        break
                    count += 1
            stored.append(count)
            next_id += count
            for _ in range(2):
                try:
                    batch = buffer.get_batch(4, timeout=0)
                except TimeoutError:  # not enough for a batch yet: the same in both runs
                    batches.append(None)
                    continue
                check_rows(batch)
                batches.append(batch.sample_ids.tolist())
        buffer.end_reception()
        while (batch := buffer.get_batch(4, timeout=0)) is not None:
            batches.append(batch.sample_ids.tolist())
        return batches, [stored, buffer.stats(), buffer.repetition_histogram().tolist()]

    batches, state = run(batched=True)
    assert (batches, state) == run(batched=False)
    assert 0 < sum(state[0]) < sum((16, 5, 9, 3, 12, 7, 1, 20, 6))  # some stopped at a full buffer


@pytest.mark.parametrize("kind", KINDS)
def test_put_many_waits_for_room_and_loses_nothing(kind: str) -> None:
    """A producer puts chunks larger than the buffer with put_many (no timeout): each waits for the
    consumer's draws, and every id is drawn; nothing is lost or stored twice."""
    n_samples = 400
    buffer = build(kind, capacity=8, watermark=2, seed=1)

    def produce() -> None:
        for start in range(0, n_samples, 50):
            assert put_many_ids(buffer, range(start, start + 50), timeout=None) == 50
        buffer.end_reception()

    producer = ThreadResult(produce)
    drawn = []
    while (batch := buffer.get_batch(4, timeout=WAIT_S)) is not None:
        check_rows(batch)
        drawn.extend(batch.sample_ids.tolist())
    producer.join()
    assert buffer.stats().received == n_samples
    if kind == "reservoir":
        assert set(drawn) == set(range(n_samples))  # a Reservoir never evicts an unseen sample
    else:
        assert sorted(drawn) == list(range(n_samples))


@pytest.mark.parametrize("kind", KINDS)
def test_put_many_stops_at_the_end_of_reception_with_an_exact_count(kind: str) -> None:
    buffer = build(kind, capacity=8, watermark=2)
    assert put_many_ids(buffer, range(5)) == 5
    assert put_many_ids(buffer, range(5, 15), timeout=0.01) == 3  # 3 fit, then the wait for room timed out
    assert buffer.stats().received == 8
    waiting = ThreadResult(lambda: put_many_ids(buffer, range(8, 12), timeout=None))
    assert not waiting.finished.wait(0.05)  # full of unseen samples: it waits
    buffer.get_batch(2, timeout=WAIT_S)  # room for two (a Reservoir: seen samples to evict)
    wait_until(lambda: buffer.stats().received == 10, WAIT_S, "two more stored; it waits for room for the rest")
    buffer.end_reception()
    assert waiting.join() == 2  # what it stored before the end of reception: counted, not raised
    with pytest.raises(RuntimeError, match="put of sample 20 after end_reception"):
        put_many_ids(buffer, range(20, 22))
    with pytest.raises(ValueError, match=r"inputs of shape \(2, 3\)"):
        buffer.put_many(np.arange(2), np.zeros((2, 4)), [np.zeros(FIELD_SIZE)] * 2)
