"""The reduced train step on a multi-device mesh equals the single-jit step; a world of one is trivial."""

import jax
import numpy as np
import pytest

from jaxsurro.core import breed
from jaxsurro.core.fields import FieldSpec
from jaxsurro.core.model import Scaling, make_model
from jaxsurro.core.train import Batch, BatchWithIds, init_train_state, make_optimizer, make_train_step
from jaxsurro.server.distributed import World, gradient_allreduce, launched_by_mpi
from jaxsurro.server.parallel import (
    DATA_AXIS,
    jit_reduced_train_step,
    jit_train_step,
    make_data_mesh,
    put_batch,
    replicate,
)


def twice(sums):
    """Stands for the sum over two ranks that hold the same batch."""
    return jax.tree.map(lambda x: 2 * x, sums)


def test_split_step_on_several_devices_matches_the_single_jitted_step():
    assert jax.device_count() == 2
    scaling = Scaling((0.0, 0.0), (1.0, 1.0), 1.0, (0.0,), (1.0,), (9,))
    model = make_model("mlp", hidden=16, layers=2, fields=(FieldSpec("u", (3, 3)),), scaling=scaling)
    optimizer = make_optimizer(1e-2, 8, 1000)
    mesh = make_data_mesh()
    rng = np.random.default_rng(0)
    batch = Batch(rng.random((8, 3), dtype=np.float32), rng.random((8, 9), dtype=np.float32), np.ones(8, np.float32))
    state = init_train_state(jax.random.key(0), model, optimizer, 3)
    split = jit_reduced_train_step(model, optimizer, twice, mesh)
    single = jit_train_step(make_train_step(model, optimizer, twice), make_data_mesh(jax.devices()[:1]))
    state_split, state_single = replicate(state, mesh), replicate(state, make_data_mesh(jax.devices()[:1]))
    for _ in range(3):
        state_split, metrics_split, _ = split(state_split, put_batch(batch, mesh))
        state_single, metrics_single, _ = single(state_single, put_batch(batch, make_data_mesh(jax.devices()[:1])))
    np.testing.assert_allclose(metrics_split["loss"], metrics_single["loss"], rtol=1e-5)
    assert float(metrics_split["weight"]) == 16.0  # both "ranks" counted
    for a, b in zip(jax.tree.leaves(state_split.params), jax.tree.leaves(state_single.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_split_breed_step_on_several_devices_matches_the_single_jitted_one():
    """With an MPI reduction on two devices, Breed's statistics ride in the update piece: the same result."""
    scaling = Scaling((0.0, 0.0), (1.0, 1.0), 1.0, (0.0,), (1.0,), (9,))
    model = make_model("mlp", hidden=16, layers=2, fields=(FieldSpec("u", (3, 3)),), scaling=scaling)
    optimizer = make_optimizer(1e-2, 8, 1000)
    rng = np.random.default_rng(1)
    weights = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    batch = Batch(rng.random((8, 3), dtype=np.float32), rng.random((8, 9), dtype=np.float32), weights)
    ids = np.array([0, 3, 3, 7, 11, 2, -1, -1], np.int32)
    state = init_train_state(jax.random.key(0), model, optimizer, 3)
    results = []
    for mesh in (make_data_mesh(), make_data_mesh(jax.devices()[:1])):
        step = jit_reduced_train_step(model, optimizer, twice, mesh, loss_stats=True)
        on_mesh = jax.device_put(
            BatchWithIds(batch, ids), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
        )
        train_state, stats = replicate(state, mesh), replicate(breed.init_loss_stats(3, 4), mesh)
        for _ in range(3):
            train_state, stats, metrics, losses = step(train_state, stats, on_mesh)
        results.append((jax.device_get(stats), jax.device_get(losses), float(metrics["weight"])))
    (split_stats, split_losses, split_weight), (single_stats, single_losses, single_weight) = results
    assert split_weight == single_weight == 12.0  # both "ranks" counted
    np.testing.assert_allclose(split_losses, single_losses, rtol=1e-5)
    np.testing.assert_array_equal(split_stats.delta_count, single_stats.delta_count)
    np.testing.assert_allclose(split_stats.delta_sum, single_stats.delta_sum, rtol=1e-5, atol=1e-6)
    assert int(split_stats.n_updates) == 3 and split_stats.delta_count.sum() == 18
    assert np.asarray(split_stats.delta_sum).sum() > 0


def test_a_world_of_one_needs_no_mpi(monkeypatch):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_mpi()
    world = World.detect()
    assert (world.rank, world.size, world.is_root, world.distributed) == (0, 1, True, False)
    np.testing.assert_array_equal(world.sum(np.array([1, 2]), 1.0, "x"), [1, 2])
    assert world.broadcast("v", 1.0, "x") == "v" and world.gather(3, 1.0, "x") == [3]
    assert gradient_allreduce(world) is None


@pytest.mark.parametrize("variable", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "PMIX_RANK"])
def test_mpi_launchers_are_recognised(monkeypatch, variable):
    monkeypatch.setenv(variable, "2")
    assert launched_by_mpi()
