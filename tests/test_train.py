"""Tests for jaxsurro.core.train and jaxsurro.server.parallel: the pure step, its sharding and its numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compiles import count_backend_compiles

from jaxsurro.core import breed
from jaxsurro.core.fields import FieldSpec
from jaxsurro.core.model import Scaling, make_model
from jaxsurro.core.train import (
    Batch,
    BatchWithIds,
    TrainState,
    init_train_state,
    make_breed_train_step,
    make_eval_step,
    make_optimizer,
    make_train_step,
    schedule_transition_steps,
)
from jaxsurro.server.parallel import (
    DATA_AXIS,
    jit_breed_train_step,
    jit_eval_step,
    jit_train_step,
    make_data_mesh,
    pad_batch,
    put_batch,
    replicate,
)

NUM_PARAMS = 3
FIELD_SHAPE = (4, 4)
FIELD_SIZE = 16
SCALING = Scaling(
    param_low=(100.0,) * NUM_PARAMS,
    param_high=(500.0,) * NUM_PARAMS,
    time_scale=2.0,
    field_low=(100.0,),
    field_high=(500.0,),
    field_sizes=(16,),
)
# Float32 sums split over two devices are added in another order than on one device.
CROSS_DEVICE_RTOL = 1e-5
CROSS_DEVICE_ATOL = 1e-6


def small_model(hidden: int = 16):
    return make_model("mlp", fields=(FieldSpec("u", FIELD_SHAPE),), scaling=SCALING, hidden=hidden, layers=2)


def random_batch(seed: int, rows: int, real_rows: int | None = None) -> Batch:
    """A host (NumPy) batch in physical units; rows past `real_rows` have weight 0."""
    rng = np.random.default_rng(seed)
    params = rng.uniform(100.0, 500.0, size=(rows, NUM_PARAMS))
    time = rng.uniform(0.0, SCALING.time_scale, size=(rows, 1))
    weights = np.ones(rows, dtype=np.float32)
    if real_rows is not None:
        weights[real_rows:] = 0.0
    return Batch(
        inputs=np.concatenate([params, time], axis=1).astype(np.float32),
        targets=rng.uniform(100.0, 500.0, size=(rows, FIELD_SIZE)).astype(np.float32),
        weights=weights,
    )


def fresh_state(model, optimizer, seed: int = 0) -> TrainState:
    return init_train_state(jax.random.key(seed), model, optimizer, input_dim=NUM_PARAMS + 1)


def host_leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]


def run_steps(mesh, num_steps: int, rows: int = 8, seed: int = 0):
    """Train `num_steps` steps on a mesh; return host params and per-step losses."""
    model = small_model()
    optimizer = make_optimizer(1e-3, batch_size=rows, halve_every_samples=10_000)
    step = jit_train_step(make_train_step(model, optimizer), mesh)
    state = replicate(fresh_state(model, optimizer, seed), mesh)
    losses, per_sample_losses = [], []
    for index in range(num_steps):
        state, metrics, per_sample = step(state, put_batch(random_batch(index, rows), mesh))
        losses.append(jax.device_get(metrics["loss"]))
        per_sample_losses.append(jax.device_get(per_sample))
    return host_leaves(state), np.array(losses), np.array(per_sample_losses)


def test_two_fake_devices_are_available():
    assert jax.device_count() == 2, "tests/conftest.py should force two CPU devices"
    assert make_data_mesh().shape == {DATA_AXIS: 2}


def test_two_device_step_matches_one_device_step():
    assert jax.device_count() == 2
    params_one, losses_one, per_sample_one = run_steps(make_data_mesh(jax.devices()[:1]), 4)
    params_two, losses_two, per_sample_two = run_steps(make_data_mesh(), 4)
    np.testing.assert_allclose(losses_two, losses_one, rtol=CROSS_DEVICE_RTOL)
    np.testing.assert_allclose(per_sample_two, per_sample_one, rtol=CROSS_DEVICE_RTOL)
    for two, one in zip(params_two, params_one, strict=True):
        np.testing.assert_allclose(two, one, rtol=CROSS_DEVICE_RTOL, atol=CROSS_DEVICE_ATOL)
    assert losses_one[-1] < losses_one[0]


def test_second_call_of_jitted_step_compiles_nothing():
    mesh = make_data_mesh()
    model = small_model()
    optimizer = make_optimizer(1e-3, batch_size=8, halve_every_samples=64)
    step = jit_train_step(make_train_step(model, optimizer), mesh)
    state = replicate(fresh_state(model, optimizer), mesh)
    with count_backend_compiles() as first_call:
        state, metrics, _ = step(state, put_batch(random_batch(0, 8), mesh))
        jax.block_until_ready(metrics)
    assert len(first_call) >= 1, "the counter must see the first compilation"
    with count_backend_compiles() as later_calls:
        for index in range(1, 4):
            state, metrics, _ = step(state, put_batch(random_batch(index, 8), mesh))
        # A short final batch padded to the nominal size keeps the compiled shape.
        state, metrics, _ = step(state, put_batch(random_batch(9, 5), mesh, min_size=8))
        jax.block_until_ready(metrics)
    assert later_calls == []
    assert step._cache_size() == 1
    assert int(jax.device_get(state.step)) == 5


def test_fixed_keys_give_bitwise_identical_params_and_losses():
    model = small_model()
    optimizer = make_optimizer(1e-3, batch_size=8, halve_every_samples=64)
    first = host_leaves(fresh_state(model, optimizer, seed=7).params)
    second = host_leaves(fresh_state(model, optimizer, seed=7).params)
    other = host_leaves(fresh_state(model, optimizer, seed=8).params)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(first, other, strict=True))

    params_a, losses_a, per_sample_a = run_steps(make_data_mesh(), 3, seed=7)
    params_b, losses_b, per_sample_b = run_steps(make_data_mesh(), 3, seed=7)
    np.testing.assert_array_equal(losses_a, losses_b)
    np.testing.assert_array_equal(per_sample_a, per_sample_b)
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(a, b)


def test_zero_weight_batch_leaves_state_bitwise_unchanged():
    mesh = make_data_mesh()
    model = small_model()
    optimizer = make_optimizer(1e-3, batch_size=8, halve_every_samples=64)
    step = jit_train_step(make_train_step(model, optimizer), mesh)
    state = replicate(fresh_state(model, optimizer), mesh)
    state, _, _ = step(state, put_batch(random_batch(0, 8), mesh))  # non-trivial Adam moments
    before = host_leaves(state)
    state, metrics, per_sample = step(state, put_batch(random_batch(1, 8, real_rows=0), mesh))
    after = host_leaves(state)
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(new, old)
    metrics = jax.device_get(metrics)
    assert metrics["weight"] == 0.0 and metrics["loss"] == 0.0
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] == 0.0
    assert np.all(np.isfinite(jax.device_get(per_sample)))
    assert int(jax.device_get(state.step)) == 1


def test_padding_rows_do_not_change_the_update():
    model = small_model()
    optimizer = make_optimizer(1e-3, batch_size=8, halve_every_samples=64)
    step = jax.jit(make_train_step(model, optimizer))
    padded = random_batch(3, 8, real_rows=6)  # rows 6 and 7 hold random data, weight 0
    real = Batch(*(np.asarray(leaf)[:6] for leaf in padded))
    state_real, metrics_real, losses_real = step(fresh_state(model, optimizer), real)
    state_pad, metrics_pad, losses_pad = step(fresh_state(model, optimizer), padded)
    for a, b in zip(host_leaves(state_pad), host_leaves(state_real), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(metrics_pad["loss"], metrics_real["loss"], rtol=1e-6)
    np.testing.assert_allclose(losses_pad[:6], losses_real, rtol=1e-6)
    assert float(metrics_pad["weight"]) == 6.0


def test_put_batch_pads_to_device_multiple_and_shards_rows():
    mesh = make_data_mesh()
    device_batch = put_batch(random_batch(0, 7), mesh)
    assert device_batch.inputs.shape == (8, NUM_PARAMS + 1)
    assert device_batch.targets.shape == (8, FIELD_SIZE)
    np.testing.assert_array_equal(jax.device_get(device_batch.weights), [1] * 7 + [0])
    np.testing.assert_array_equal(jax.device_get(device_batch.targets)[7], 0.0)
    for leaf in device_batch:
        assert leaf.sharding.spec == jax.sharding.PartitionSpec(DATA_AXIS)
        assert {shard.data.shape[0] for shard in leaf.addressable_shards} == {4}
    assert put_batch(random_batch(0, 3), mesh, min_size=8).weights.shape == (8,)
    with pytest.raises(ValueError, match="sharing B"):
        pad_batch(random_batch(0, 4)._replace(weights=np.ones(3, np.float32)), multiple=2)


def test_sum_reduction_across_participants_weights_by_sample_count():
    """Three simulated ranks (4, 2 and 0 real rows) reduced with psum equal one 6-row step."""
    model = small_model()
    optimizer = make_optimizer(1e-3, batch_size=4, halve_every_samples=64)
    full = random_batch(5, 6)
    rank_batches = [
        Batch(*(np.asarray(leaf)[:4] for leaf in full)),
        pad_batch(Batch(*(np.asarray(leaf)[4:] for leaf in full)), multiple=4),
        random_batch(6, 4, real_rows=0),
    ]
    stacked = Batch(*(np.stack(leaves) for leaves in zip(*rank_batches, strict=True)))
    ranked_step = jax.jit(
        jax.vmap(
            make_train_step(model, optimizer, reduce_fn=lambda sums: jax.lax.psum(sums, "ranks")),
            in_axes=(None, 0),
            axis_name="ranks",
        )
    )
    state_ranks, metrics_ranks, _ = ranked_step(fresh_state(model, optimizer), stacked)
    state_single, metrics_single, _ = jax.jit(make_train_step(model, optimizer))(fresh_state(model, optimizer), full)
    for ranked, single in zip(host_leaves(state_ranks), host_leaves(state_single), strict=True):
        for rank in range(3):
            np.testing.assert_array_equal(ranked[rank], ranked[0])  # identical on every rank
        np.testing.assert_allclose(ranked[0], single, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics_ranks["loss"][0], metrics_single["loss"], rtol=1e-6)
    np.testing.assert_array_equal(metrics_ranks["weight"], [6.0, 6.0, 6.0])


def test_learning_rate_halves_every_n_samples():
    assert schedule_transition_steps(batch_size=4, halve_every_samples=8) == 2
    assert schedule_transition_steps(batch_size=4, halve_every_samples=10) == 2
    assert schedule_transition_steps(batch_size=128, halve_every_samples=100) == 1
    model = small_model()
    optimizer = make_optimizer(0.1, batch_size=4, halve_every_samples=8)
    step = jax.jit(make_train_step(model, optimizer))
    state = fresh_state(model, optimizer)
    rates = []
    for index in range(6):
        state, metrics, _ = step(state, random_batch(index, 4))
        rates.append(float(metrics["learning_rate"]))
        if index == 2:  # an empty batch applies no update and does not advance the schedule
            state, _, _ = step(state, random_batch(99, 4, real_rows=0))
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rtol=1e-6)
    assert int(state.step) == 6


def test_training_loop_runs_under_transfer_guard_disallow():
    mesh = make_data_mesh()
    model = small_model()
    optimizer = make_optimizer(1e-3, batch_size=8, halve_every_samples=64)
    step = jit_train_step(make_train_step(model, optimizer), mesh)
    evaluate = jit_eval_step(make_eval_step(model), mesh)
    host_state = jax.device_get(fresh_state(model, optimizer))
    host_batches = [random_batch(index, 8) for index in range(3)]
    with jax.transfer_guard("disallow"):
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jnp.asarray(np.ones(3, dtype=np.float32)) + 1  # the guard is really on
        state = replicate(host_state, mesh)
        for batch in host_batches:
            state, metrics, per_sample = step(state, put_batch(batch, mesh))
        losses, loss_sum, weight_sum, _ = evaluate(state.params, put_batch(host_batches[0], mesh))
        metrics, losses, loss_sum, weight_sum = jax.device_get((metrics, losses, loss_sum, weight_sum))
    assert losses.shape == (8,) and weight_sum == 8.0
    np.testing.assert_allclose(loss_sum, losses.sum(), rtol=1e-6)
    assert np.isfinite(metrics["loss"])


def test_eval_step_matches_train_step_losses_and_ignores_padding():
    mesh = make_data_mesh()
    model = small_model()
    optimizer = make_optimizer(1e-3, batch_size=8, halve_every_samples=64)
    state = fresh_state(model, optimizer)
    batch = random_batch(4, 8, real_rows=5)
    evaluate = jit_eval_step(make_eval_step(model), mesh)
    losses, loss_sum, weight_sum, field_sums = jax.device_get(
        evaluate(replicate(state.params, mesh), put_batch(batch, mesh))
    )
    _, metrics, train_losses = jax.jit(make_train_step(model, optimizer))(state, batch)
    np.testing.assert_allclose(losses, train_losses, rtol=1e-6)
    assert weight_sum == 5.0
    np.testing.assert_allclose(loss_sum, losses[:5].sum(), rtol=1e-6)
    np.testing.assert_allclose(loss_sum / weight_sum, metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(field_sums, [loss_sum], rtol=1e-6)  # one field: its loss is the loss


def smooth_field(inputs: np.ndarray) -> np.ndarray:
    """A smooth synthetic 'solution': relaxation from λ0 toward λ1 with a spatial pattern."""
    x = np.linspace(0.0, 1.0, FIELD_SHAPE[0])[:, None]
    y = np.linspace(0.0, 1.0, FIELD_SHAPE[1])[None, :]
    pattern = np.sin(np.pi * x) * np.sin(np.pi * y)
    start, end, amplitude = (inputs[:, i, None, None] for i in range(NUM_PARAMS))
    decay = np.exp(-2.0 * inputs[:, NUM_PARAMS, None, None])
    blend = end + (start - end) * decay
    return (blend + 0.2 * (amplitude - 300.0) * pattern * decay).astype(np.float32).reshape(len(inputs), -1)


def test_mlp_learns_a_smooth_problem():
    rng = np.random.default_rng(0)

    def sample(rows: int) -> Batch:
        params = rng.uniform(100.0, 500.0, size=(rows, NUM_PARAMS))
        time = rng.uniform(0.0, SCALING.time_scale, size=(rows, 1))
        inputs = np.concatenate([params, time], axis=1).astype(np.float32)
        return Batch(inputs, smooth_field(inputs), np.ones(rows, dtype=np.float32))

    model = small_model(hidden=64)
    optimizer = make_optimizer(3e-3, batch_size=32, halve_every_samples=4_000)
    step = jax.jit(make_train_step(model, optimizer))
    evaluate = jax.jit(make_eval_step(model))
    state = fresh_state(model, optimizer)
    held_out = sample(256)
    _, initial_sum, count, _ = evaluate(state.params, held_out)
    for _ in range(400):
        state, _, _ = step(state, sample(32))
    _, final_sum, _, _ = evaluate(state.params, held_out)
    initial, final = float(initial_sum / count), float(final_sum / count)
    assert final < initial / 100, f"loss went from {initial:.3g} to {final:.3g}"


def test_per_field_losses_are_weighted_and_reported_per_field():
    """Two fields of different scales: each field's loss is its own normalized MSE; weights mix them."""
    fields = (FieldSpec("u", (3,)), FieldSpec("s", ()))
    scaling = Scaling((0.0,), (1.0,), 1.0, field_low=(0.0, -10.0), field_high=(1.0, 10.0), field_sizes=(3, 1))
    model = make_model("mlp", fields=fields, scaling=scaling, hidden=8, layers=1)
    optimizer = make_optimizer(1e-3, batch_size=4, halve_every_samples=100)
    state = init_train_state(jax.random.key(0), model, optimizer, input_dim=2)
    rng = np.random.default_rng(0)
    batch = Batch(
        rng.uniform(0, 1, (4, 2)).astype(np.float32),
        np.concatenate([rng.uniform(0, 1, (4, 3)), rng.uniform(-10, 10, (4, 1))], 1).astype(np.float32),
        np.ones(4, np.float32),
    )
    predicted = np.asarray(model.apply(state.params, batch.inputs, normalized_output=True))
    target = (batch.targets - np.array([0, 0, 0, -10.0])) / np.array([1, 1, 1, 20.0])
    expected_u = ((predicted[:, :3] - target[:, :3]) ** 2).mean(1)
    expected_s = (predicted[:, 3] - target[:, 3]) ** 2
    _, metrics, per_sample = jax.jit(make_train_step(model, optimizer, field_weights=(3.0, 1.0)))(state, batch)
    np.testing.assert_allclose(per_sample, 0.75 * expected_u + 0.25 * expected_s, rtol=1e-5)
    np.testing.assert_allclose(metrics["field_loss"], [expected_u.mean(), expected_s.mean()], rtol=1e-5)
    with pytest.raises(ValueError, match="2 non-negative field weights"):
        make_train_step(model, optimizer, field_weights=(1.0,))


# ----------------------------------------------------------------------------------------------
# The Breed step: the train step that also updates Breed's loss statistics
# ----------------------------------------------------------------------------------------------

N_SIMS, N_STEPS = 5, 4  # Breed statistics of these tests: ids in [0, 20)


def ids_for(seed: int, rows: int, real_rows: int) -> np.ndarray:
    """Sample ids with repeats (as a Reservoir draws them), -1 on padding rows."""
    ids = np.random.default_rng(seed).integers(0, N_SIMS * N_STEPS, rows).astype(np.int32)
    ids[real_rows:] = -1
    return ids


def test_breed_step_updates_the_statistics_exactly_as_a_separate_call_and_trains_alike():
    """Sharded over two devices: same state as the plain step, and the statistics of update_loss_stats."""
    mesh = make_data_mesh()
    model = small_model()
    optimizer = make_optimizer(1e-3, batch_size=8, halve_every_samples=64)
    plain = jit_train_step(make_train_step(model, optimizer), mesh)
    breed_step = jit_breed_train_step(make_breed_train_step(model, optimizer), mesh)
    separate_update = jax.jit(breed.update_loss_stats)
    state_plain = replicate(fresh_state(model, optimizer), mesh)
    state_breed = replicate(fresh_state(model, optimizer), mesh)
    stats = replicate(breed.init_loss_stats(N_SIMS, N_STEPS), mesh)
    expected = breed.init_loss_stats(N_SIMS, N_STEPS)
    for index in range(5):
        real_rows = 8 if index % 2 else 6
        batch = random_batch(index, 8, real_rows)
        ids = ids_for(index, 8, real_rows)
        state_plain, metrics_plain, losses_plain = plain(state_plain, put_batch(batch, mesh))
        sharded = jax.device_put(
            BatchWithIds(batch, ids), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
        )
        state_breed, stats, metrics_breed, losses_breed = breed_step(state_breed, stats, sharded)
        expected = separate_update(expected, jax.device_get(losses_breed), ids, batch.weights)
        np.testing.assert_array_equal(jax.device_get(losses_breed), jax.device_get(losses_plain))
        np.testing.assert_array_equal(jax.device_get(metrics_breed["loss"]), jax.device_get(metrics_plain["loss"]))
    for with_stats, without in zip(host_leaves(state_breed), host_leaves(state_plain), strict=True):
        np.testing.assert_array_equal(with_stats, without)
    got, want = jax.device_get(stats), jax.device_get(expected)
    np.testing.assert_array_equal(got.delta_count, want.delta_count)
    # The separate call sums μ and σ on one device, the step over two: float32 rounding apart.
    np.testing.assert_allclose(got.delta_sum, want.delta_sum, rtol=CROSS_DEVICE_RTOL, atol=CROSS_DEVICE_ATOL)
    np.testing.assert_array_equal(got.last_update, want.last_update)
    assert int(got.n_updates) == 5 and got.delta_count.sum() == 6 + 8 + 6 + 8 + 6
    assert np.ptp(got.delta_sum) > 0  # the deviations do differ


def test_breed_step_on_three_ranks_merges_to_the_statistics_of_one_rank():
    """Ranks of 4, 2 and 0 real rows, sums reduced with psum: each adds its δ with the global μ and σ."""
    model = small_model()
    optimizer = make_optimizer(1e-3, batch_size=4, halve_every_samples=64)
    full = random_batch(5, 6)
    full_ids = ids_for(5, 6, 6)
    rank_rows = [slice(0, 4), slice(4, 6), slice(0, 0)]
    rank_batches = []
    for rows in rank_rows:
        part = Batch(*(np.asarray(leaf)[rows] for leaf in full))
        padded = pad_batch(part, multiple=4, min_size=4)
        ids = np.full(4, -1, np.int32)
        ids[: len(full_ids[rows])] = full_ids[rows]
        rank_batches.append(BatchWithIds(padded, ids))
    stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *rank_batches)
    empty = breed.init_loss_stats(N_SIMS, N_STEPS)
    ranked_step = jax.jit(
        jax.vmap(
            make_breed_train_step(model, optimizer, reduce_fn=lambda sums: jax.lax.psum(sums, "ranks")),
            in_axes=(None, 0, 0),
            axis_name="ranks",
        )
    )
    rank_stats = jax.tree.map(lambda leaf: np.stack([leaf] * 3), jax.device_get(empty))
    _, rank_stats, _, _ = ranked_step(fresh_state(model, optimizer), rank_stats, stacked)
    merged = breed.combine_loss_stats([jax.tree.map(lambda leaf, r=r: leaf[r], rank_stats) for r in range(3)])
    _, single, _, _ = jax.jit(make_breed_train_step(model, optimizer))(
        fresh_state(model, optimizer), empty, BatchWithIds(full, full_ids)
    )
    np.testing.assert_array_equal(np.asarray(merged.delta_count), np.asarray(single.delta_count))
    np.testing.assert_allclose(np.asarray(merged.delta_sum), np.asarray(single.delta_sum), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(merged.last_update), np.asarray(single.last_update))
    assert int(merged.n_updates) == int(single.n_updates) == 1
    assert np.asarray(single.delta_sum).sum() > 0
