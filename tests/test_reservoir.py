"""Device reservoir: jit behaviour, invariants under random streams, and agreement with the host buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxsurro.core import reservoir
from jaxsurro.server.buffers import ReservoirBuffer

INPUT_DIM = 2
FIELD_SHAPE = (3, 2)
STATIC = ("batch_size", "watermark", "evict")

jit_add = jax.jit(reservoir.add)
jit_add_many = jax.jit(reservoir.add_many)
jit_sample = jax.jit(reservoir.sample, static_argnames=STATIC)
jit_histogram = jax.jit(reservoir.repetition_histogram)
jit_unseen = jax.jit(reservoir.num_unseen)


def sample_arrays(sample_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets that encode the id, so drawn rows can be checked against their ids."""
    inputs = np.full(INPUT_DIM, sample_id, np.float32)
    targets = (np.arange(6, dtype=np.float32) + 100.0 * sample_id).reshape(FIELD_SHAPE)
    return inputs, targets


def stream(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = [sample_arrays(int(i)) for i in ids]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def check_batch(inputs, targets, ids, valid) -> None:
    """Valid rows carry their id's data; invalid rows are zero with id -1."""
    inputs, targets, ids, valid = map(np.asarray, (inputs, targets, ids, valid))
    expected_inputs, expected_targets = stream(np.where(valid, ids, 0))
    np.testing.assert_array_equal(inputs[valid], expected_inputs[valid])
    np.testing.assert_array_equal(targets[valid], expected_targets[valid])
    assert np.all(ids[~valid] == -1) and not inputs[~valid].any() and not targets[~valid].any()


def stored_ids(state: reservoir.ReservoirState) -> np.ndarray:
    return np.asarray(state.sample_ids)[np.asarray(state.occupied)]


def add_one(state, key, sample_id: int):
    return jit_add(state, key, *sample_arrays(sample_id), sample_id)


def test_jit_compiles_once_and_fixed_key_is_reproducible() -> None:
    traces = {"add": 0, "sample": 0}

    def counted_add(state, key, inputs, targets, sample_id):
        traces["add"] += 1
        return reservoir.add(state, key, inputs, targets, sample_id)

    def counted_sample(state, key, batch_size, watermark, evict=False):
        traces["sample"] += 1
        return reservoir.sample(state, key, batch_size, watermark, evict)

    add = jax.jit(counted_add)
    sample = jax.jit(counted_sample, static_argnames=STATIC)

    def run(key):
        state = reservoir.init(8, INPUT_DIM, FIELD_SHAPE)
        batches = []
        for i in range(12):
            state, _ = add(state, jax.random.fold_in(key, 2 * i), *sample_arrays(i), i)
            state, *batch = sample(state, jax.random.fold_in(key, 2 * i + 1), batch_size=4, watermark=3)
            batches.append(batch)
        return state, batches

    first = run(jax.random.key(0))
    assert traces == {"add": 1, "sample": 1}
    assert add._cache_size() == 1 and sample._cache_size() == 1
    second = run(jax.random.key(0))
    assert traces == {"add": 1, "sample": 1}  # the second run compiled nothing
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = run(jax.random.key(1))
    assert not all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(first[1]), jax.tree.leaves(other[1]), strict=True)
    )


def test_add_many_is_a_scan_over_add() -> None:
    state = reservoir.init(5, INPUT_DIM, FIELD_SHAPE)
    state, *_ = jit_sample(state, jax.random.key(9), batch_size=1, watermark=0)  # no-op on empty
    ids = np.arange(8)
    key = jax.random.key(3)
    # Fill, mark some samples seen, then add a chunk that must evict and then be refused.
    state, accepted = jit_add_many(state, key, *stream(ids[:5]), ids[:5])
    assert np.asarray(accepted).all()
    state, *_ = jit_sample(state, jax.random.key(4), batch_size=2, watermark=5)
    n_seen = int(np.asarray(state.seen).sum())
    chunk_state, chunk_accepted = jit_add_many(state, key, *stream(ids[5:]), ids[5:])
    loop_state, loop_accepted = state, []
    for sample_key, i in zip(jax.random.split(key, 3), ids[5:], strict=True):
        loop_state, ok = add_one(loop_state, sample_key, int(i))
        loop_accepted.append(bool(ok))
    assert np.asarray(chunk_accepted).tolist() == loop_accepted == [True] * n_seen + [False] * (3 - n_seen)
    for a, b in zip(jax.tree.leaves(chunk_state), jax.tree.leaves(loop_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("seed", [0, 1])
def test_random_streams_keep_the_invariants(seed: int) -> None:
    """add never evicts an unseen sample, refuses exactly when full of unseen ones; sample reads stored slots."""
    capacity, watermark = 6, 3
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    state = reservoir.init(capacity, INPUT_DIM, FIELD_SHAPE, max_uses=8)
    next_id, refused, evicted = 0, 0, 0
    for step in range(150):
        for _ in range(rng.integers(0, 6)):
            occupied, seen = np.asarray(state.occupied), np.asarray(state.seen)
            ids_before = np.asarray(state.sample_ids).copy()
            unseen_before = set(ids_before[occupied & ~seen].tolist())
            should_accept = (~occupied).any() or (occupied & seen).any()
            state, accepted = add_one(state, jax.random.fold_in(key, 2 * next_id + 10_000 * step), next_id)
            assert bool(accepted) == should_accept
            after = set(stored_ids(state).tolist())
            assert unseen_before <= after, "an unseen sample was evicted"
            gone = set(ids_before[occupied].tolist()) - after
            if accepted:
                assert next_id in after and len(gone) == int(occupied.all())
                assert gone <= set(ids_before[occupied & seen].tolist())
                evicted += len(gone)
                next_id += 1
            else:
                refused += 1
                np.testing.assert_array_equal(np.asarray(state.sample_ids), ids_before)
        before = stored_ids(state)
        batch_size = int(rng.integers(1, 5))
        state, *batch = jit_sample(
            state, jax.random.fold_in(key, 10**6 + step), batch_size=batch_size, watermark=watermark
        )
        check_batch(*batch)
        valid = np.asarray(batch[3])
        assert valid.all() == (len(before) >= watermark) and (valid.all() or not valid.any())
        assert set(np.asarray(batch[2])[valid].tolist()) <= set(before.tolist())
        assert int(state.population) == len(stored_ids(state)) == min(next_id, capacity)
        histogram = np.asarray(jit_histogram(state))
        assert histogram[0] == int(jit_unseen(state))  # no sample left the buffer unused
    assert refused > 0 and evicted > 20, (refused, evicted)
    assert int(state.received) == next_id and int(state.evicted) == evicted


def test_below_watermark_nothing_is_drawn_and_state_is_unchanged() -> None:
    state = reservoir.init(8, INPUT_DIM, FIELD_SHAPE)
    state, _ = jit_add_many(state, jax.random.key(0), *stream(np.arange(3)), np.arange(3))
    new_state, inputs, targets, ids, valid = jit_sample(state, jax.random.key(1), batch_size=4, watermark=4)
    assert not np.asarray(valid).any()
    check_batch(inputs, targets, ids, valid)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("batch_size", [3, 20])
def test_evicting_draws_empty_the_buffer(batch_size: int) -> None:
    capacity = 10
    state = reservoir.init(capacity, INPUT_DIM, FIELD_SHAPE)
    state, _ = jit_add_many(state, jax.random.key(0), *stream(np.arange(8)), np.arange(8))
    state, *batch = jit_sample(state, jax.random.key(1), batch_size=4, watermark=8)  # some become seen
    drawn = [np.asarray(batch[2])]
    key = jax.random.key(2)
    calls = 0
    while int(state.population) > 0:
        population = int(state.population)
        state, *batch = jit_sample(
            state, jax.random.fold_in(key, calls), batch_size=batch_size, watermark=8, evict=True
        )
        check_batch(*batch)
        valid = np.asarray(batch[3])
        assert valid.sum() == min(batch_size, population) and valid[: valid.sum()].all()
        ids = np.asarray(batch[2])[valid]
        assert len(set(ids.tolist())) == len(ids)  # distinct
        drawn.append(ids)
        calls += 1
        assert calls <= 8
    assert calls == -(-8 // batch_size)
    assert not np.asarray(state.occupied).any() and (np.asarray(state.sample_ids) == -1).all()
    all_drawn = np.concatenate(drawn)
    assert set(all_drawn.tolist()) == set(range(8))
    histogram = np.asarray(jit_histogram(state))
    assert histogram.sum() == 8 and (np.arange(len(histogram)) * histogram).sum() == len(all_drawn)
    assert int(state.drawn) == len(all_drawn) and int(state.evicted) == 8
    state, *batch = jit_sample(state, key, batch_size=batch_size, watermark=8, evict=True)
    assert not np.asarray(batch[3]).any()


def test_shape_errors_say_what_was_expected() -> None:
    state = reservoir.init(4, INPUT_DIM, FIELD_SHAPE)
    with pytest.raises(ValueError, match=r"expected inputs of shape \(2,\) and targets of shape \(3, 2\).*add_many"):
        reservoir.add(state, jax.random.key(0), jnp.zeros(3), jnp.zeros(FIELD_SHAPE), 0)
    with pytest.raises(ValueError, match=r"expected sample_ids of shape \(2,\)"):
        reservoir.add_many(state, jax.random.key(0), jnp.zeros((2, 2)), jnp.zeros((2, 3, 2)), jnp.zeros(3))
    with pytest.raises(ValueError, match="capacity, input_dim and max_uses must be >= 1"):
        reservoir.init(0, INPUT_DIM, FIELD_SHAPE)


# --- host and device versions side by side ------------------------------------------------------

CAPACITY, WATERMARK, BATCH = 40, 10, 4


def run_host(schedule: list[int], n_samples: int, seed: int):
    """Drive the host ReservoirBuffer single-threaded: per step try puts (timeout 0), then draw."""
    buffer = ReservoirBuffer(CAPACITY, WATERMARK, INPUT_DIM, int(np.prod(FIELD_SHAPE)), seed=seed)
    next_id, drawn, refused = 0, [], 0
    for attempts in schedule:
        if next_id == n_samples:  # stream complete: reception ends
            break
        for _ in range(min(attempts, n_samples - next_id)):
            try:
                buffer.put(next_id, *sample_arrays(next_id), timeout=0)
                next_id += 1
            except TimeoutError:  # full of unseen samples: retry this sample next step
                refused += 1
                break
        if buffer.stats().population >= WATERMARK:
            drawn.append(buffer.get_batch(BATCH, timeout=0).sample_ids)
        assert buffer.repetition_histogram()[0] == buffer.stats().unseen  # only seen samples evicted
    assert next_id == n_samples
    buffer.end_reception()
    while (batch := buffer.get_batch(BATCH, timeout=0)) is not None:
        drawn.append(batch.sample_ids)
    return np.concatenate(drawn), buffer.repetition_histogram(), buffer.stats().evicted, refused


def run_device(schedule: list[int], n_samples: int, seed: int):
    """Drive the device reservoir with the same schedule: a refused add is retried next step."""
    state = reservoir.init(CAPACITY, INPUT_DIM, FIELD_SHAPE, max_uses=1024)  # no clipping in the histogram
    key = jax.random.key(seed)
    next_id, drawn, refused = 0, [], 0
    for step, attempts in enumerate(schedule):
        if next_id == n_samples:  # stream complete: reception ends
            break
        for _ in range(min(attempts, n_samples - next_id)):
            state, accepted = add_one(state, jax.random.fold_in(key, 3 * next_id + 1), next_id)
            if not accepted:
                refused += 1
                break
            next_id += 1
        state, _, _, ids, valid = jit_sample(
            state, jax.random.fold_in(key, 3 * step + 2), batch_size=BATCH, watermark=WATERMARK
        )
        drawn.append(np.asarray(ids)[np.asarray(valid)])
        assert np.asarray(jit_histogram(state))[0] == int(jit_unseen(state))  # only seen samples evicted
    assert next_id == n_samples
    step = 0
    while int(state.population) > 0:
        state, _, _, ids, valid = jit_sample(
            state, jax.random.fold_in(key, 10**6 + step), batch_size=BATCH, watermark=WATERMARK, evict=True
        )
        drawn.append(np.asarray(ids)[np.asarray(valid)])
        step += 1
    histogram = np.asarray(jit_histogram(state))
    return np.concatenate(drawn), np.trim_zeros(histogram, "b"), int(state.evicted), refused


def test_host_and_device_reservoirs_behave_alike() -> None:
    """Same stream and schedule: same invariants, same repetition statistics within stated tolerances.

    The schedule alternates 150-step phases of fast production (Poisson(6) put attempts per step
    against one batch of 4) and slow production (Poisson(0.8)), so both versions fill up with unseen
    samples and refuse, evict only seen samples, and repeat samples when starved. Over 1500 samples,
    between the two versions: mean uses per sample within 3% (observed spread over seeds <= 0.3%),
    standard deviation of uses within 15% (observed <= 7%), fraction of samples used exactly once
    within 0.03 (observed <= 0.011).
    """
    n_samples = 1500
    rng = np.random.default_rng(7)
    steps = np.arange(3000)
    schedule = np.where((steps // 150) % 2 == 0, rng.poisson(6, len(steps)), rng.poisson(0.8, len(steps))).tolist()
    host = run_host(schedule, n_samples, seed=11)
    device = run_device(schedule, n_samples, seed=11)
    summaries = []
    for ids, hist, evicted, refused in (host, device):
        counts = np.bincount(ids, minlength=n_samples)
        assert counts.min() >= 1  # every sample reached training
        np.testing.assert_array_equal(hist, np.bincount(counts))
        assert hist.sum() == n_samples and evicted == n_samples
        assert refused > 50  # the producer was held back by unseen samples
        mean = (np.arange(len(hist)) * hist).sum() / n_samples
        assert mean == len(ids) / n_samples
        summaries.append((mean, counts.std(), hist[1] / n_samples))
    (host_mean, host_std, host_once), (device_mean, device_std, device_once) = summaries
    assert host_std > 1.0  # samples are repeated unevenly: starved phases reuse stored samples
    assert abs(host_mean - device_mean) / host_mean < 0.03, summaries
    assert abs(host_std - device_std) / host_std < 0.15, summaries
    assert abs(host_once - device_once) < 0.03, summaries


def test_host_and_device_draw_uniformly_among_stored_samples() -> None:
    """Fill both with the same 40 samples, draw 500 batches of 8: per-sample counts pass chi-square.

    Each of 40 samples expects 100 draws; the test fails if a chi-square test against the uniform
    distribution rejects at the 0.1% level (fixed seeds, so the outcome is deterministic).
    """
    n_batches, batch_size = 500, 8
    ids = np.arange(CAPACITY) + 1000
    buffer = ReservoirBuffer(CAPACITY, WATERMARK, INPUT_DIM, int(np.prod(FIELD_SHAPE)), seed=3)
    for i in ids:
        buffer.put(int(i), *sample_arrays(int(i)), timeout=0)
    host_draws = np.concatenate([buffer.get_batch(batch_size, timeout=0).sample_ids for _ in range(n_batches)])

    state = reservoir.init(CAPACITY, INPUT_DIM, FIELD_SHAPE)
    state, _ = jit_add_many(state, jax.random.key(0), *stream(ids), ids)

    def draw(state, key):
        state, _, _, batch_ids, _ = reservoir.sample(state, key, batch_size, WATERMARK)
        return state, batch_ids

    state, device_draws = jax.jit(lambda s, k: jax.lax.scan(draw, s, jax.random.split(k, n_batches)))(
        state, jax.random.key(5)
    )
    device_draws = np.asarray(device_draws).ravel()
    expected = np.full(CAPACITY, n_batches * batch_size / CAPACITY)
    for draws in (host_draws, device_draws):
        counts = np.bincount(draws - 1000, minlength=CAPACITY)
        assert len(counts) == CAPACITY  # only stored samples were drawn
        assert scipy_stats.chisquare(counts, expected).pvalue > 1e-3
    np.testing.assert_array_equal(np.asarray(state.use_count), np.bincount(device_draws - 1000, minlength=CAPACITY))
    assert np.asarray(state.seen).all()
