"""Data parallelism over the local devices of one process: a 1-D "data" mesh and NamedSharding.

Each process (MPI rank) builds its own mesh over `jax.local_devices()`; the batch is split
along its leading axis across that mesh, the state is replicated, and XLA inserts the
on-node reductions of the step's sums. Reduction across processes is not done here: it
plugs into `jaxsurro.core.train.make_train_step(reduce_fn=...)`. Host→device copies are
explicit (`put_batch`, `replicate`), so the loop runs under `jax.transfer_guard("disallow")`;
read results back with `jax.device_get`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsurro.core.train import (
    Batch,
    BreedTrainStep,
    EvalStep,
    ReduceFn,
    TrainStep,
    make_apply_sums,
    make_breed_train_step,
    make_gradient_sums,
    make_loss_stats_update,
    make_train_step,
)

__all__ = [
    "DATA_AXIS",
    "jit_breed_train_step",
    "jit_eval_step",
    "jit_reduced_train_step",
    "jit_train_step",
    "make_data_mesh",
    "pad_batch",
    "put_batch",
    "replicate",
]

DATA_AXIS = "data"
_REPLICATED = P()  # the state, parameters and metrics: a copy on every device
_SHARDED = P(DATA_AXIS)  # the batch and per-sample values: split along the leading axis


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """One-axis ("data") mesh over `devices` (default: this process's local devices)."""
    chosen = list(jax.local_devices() if devices is None else devices)
    if not chosen:
        raise ValueError(
            "make_data_mesh needs at least one device; got an empty list. Pass None to use jax.local_devices()."
        )
    foreign = [device for device in chosen if device.process_index != jax.process_index()]
    if foreign:
        raise ValueError(
            f"make_data_mesh builds a per-process mesh, but devices {foreign} belong to other "
            f"processes (this is process {jax.process_index()}). Use jax.local_devices(); "
            "cross-process reduction goes through reduce_fn."
        )
    return Mesh(np.asarray(chosen, dtype=object), (DATA_AXIS,))


def pad_batch(batch: Batch, multiple: int, min_size: int = 0) -> Batch:
    """Pad NumPy rows with zeros (weight 0) to a multiple of `multiple`, at least `min_size`."""
    inputs = np.asarray(batch.inputs, dtype=np.float32)
    targets = np.asarray(batch.targets, dtype=np.float32)
    weights = np.asarray(batch.weights, dtype=np.float32)
    rows = inputs.shape[0] if inputs.ndim >= 1 else -1
    if inputs.ndim != 2 or weights.shape != (rows,) or targets.ndim < 1 or targets.shape[0] != rows:
        raise ValueError(
            "Expected a Batch with inputs [B, d+1], targets [B, sample_size] and weights [B] "
            f"sharing B; got inputs {inputs.shape}, targets {targets.shape}, weights "
            f"{weights.shape}."
        )
    if multiple <= 0:
        raise ValueError(f"Expected a padding multiple > 0 (the device count); got {multiple}.")
    target_rows = max(rows, min_size)
    target_rows = -(-target_rows // multiple) * multiple
    extra = target_rows - rows
    if extra == 0:
        return Batch(inputs, targets, weights)

    def padded(array: np.ndarray) -> np.ndarray:
        out = np.zeros((target_rows, *array.shape[1:]), dtype=np.float32)
        out[:rows] = array
        return out

    return Batch(padded(inputs), padded(targets), padded(weights))


def put_batch(batch: Batch, mesh: Mesh, min_size: int = 0) -> Batch:
    """Pad a NumPy batch to a multiple of the mesh size (and at least `min_size`) and shard it.

    Passing `min_size` = the nominal batch size keeps shapes fixed for the last, partial
    batches, so the jitted step is not recompiled for them.
    """
    padded = pad_batch(batch, multiple=mesh.devices.size, min_size=min_size)
    return jax.device_put(padded, NamedSharding(mesh, _SHARDED))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy a pytree to every device of the mesh (always a fresh copy, safe to donate later)."""
    placed = jax.device_put(tree, NamedSharding(mesh, _REPLICATED), may_alias=False)
    # Onto a larger mesh, device_put may reuse a device array's buffer as one device's copy despite
    # may_alias=False; donating the result would then delete the caller's array. Copy those leaves.
    return jax.tree.map(lambda source, copy: copy.copy() if isinstance(source, jax.Array) else copy, tree, placed)


def _jit_on_mesh(function: Any, mesh: Mesh, in_specs: Sequence[P], out_specs: Sequence[P], **jit_options: Any) -> Any:
    """``jax.jit(function, **jit_options)`` with each argument and result placed on `mesh` by its PartitionSpec."""
    return jax.jit(
        function,
        in_shardings=tuple(NamedSharding(mesh, spec) for spec in in_specs),
        out_shardings=tuple(NamedSharding(mesh, spec) for spec in out_specs),
        **jit_options,
    )


def jit_train_step(train_step: TrainStep, mesh: Mesh) -> TrainStep:
    """Jit the step once: replicated state in and out (donated), data-sharded batch and losses."""
    return _jit_on_mesh(
        train_step, mesh, (_REPLICATED, _SHARDED), (_REPLICATED, _REPLICATED, _SHARDED), donate_argnums=0
    )


def jit_breed_train_step(breed_step: BreedTrainStep, mesh: Mesh) -> BreedTrainStep:
    """Jit the Breed step once: replicated state and statistics in and out (both donated), sharded batch and losses."""
    return _jit_on_mesh(
        breed_step,
        mesh,
        (_REPLICATED, _REPLICATED, _SHARDED),
        (_REPLICATED, _REPLICATED, _REPLICATED, _SHARDED),
        donate_argnums=(0, 1),
    )


def jit_eval_step(eval_step: EvalStep, mesh: Mesh) -> EvalStep:
    """Jit the evaluation once: replicated params, data-sharded batch and per-sample losses."""
    return _jit_on_mesh(eval_step, mesh, (_REPLICATED, _SHARDED), (_SHARDED, _REPLICATED, _REPLICATED, _REPLICATED))


def jit_reduced_train_step(
    model: Any,
    optimizer: Any,
    reduce_fn: ReduceFn | None,
    mesh: Mesh,
    field_weights: Sequence[float] | None = None,
    loss_stats: bool = False,
) -> TrainStep | BreedTrainStep:
    """The train step with a cross-process ``reduce_fn`` (mpi4jax), jitted for this mesh.

    With ``loss_stats`` it is the Breed step (state, stats, batch with ids), which also updates
    Breed's statistics from the reduced moments (``core.train.make_breed_train_step``); otherwise
    the plain step (state, batch). On a one-device mesh (one GPU per rank) it is a single jitted
    step with the reduction inside. mpi4jax's ordered effects cannot run inside a computation over
    several devices, so on a multi-device mesh the step is three jitted pieces: the gradient sums,
    sharded over the local devices and summed by XLA; the reduction across ranks, run on one
    device; the update (and Breed's statistics), replicated. The result is the same step, bit for
    bit on every rank, and Breed adds no piece.
    """
    if reduce_fn is None or mesh.devices.size == 1:
        if loss_stats:
            return jit_breed_train_step(make_breed_train_step(model, optimizer, reduce_fn, field_weights), mesh)
        return jit_train_step(make_train_step(model, optimizer, reduce_fn, field_weights), mesh)
    gradient_sums = _jit_on_mesh(
        make_gradient_sums(model, field_weights), mesh, (_REPLICATED, _SHARDED), (_REPLICATED, _SHARDED)
    )
    reduce_on_one_device = jax.jit(reduce_fn)
    replicated = NamedSharding(mesh, _REPLICATED)

    def reduced_sums(state, batch):
        sums, per_sample = gradient_sums(state.params, batch)
        one_copy = jax.tree.map(lambda x: x.addressable_shards[0].data, sums)  # replicated: any shard is the value
        return jax.device_put(reduce_on_one_device(one_copy), replicated), per_sample

    apply_sums = make_apply_sums(optimizer)
    if not loss_stats:
        apply = _jit_on_mesh(apply_sums, mesh, (_REPLICATED, _REPLICATED), (_REPLICATED, _REPLICATED), donate_argnums=0)

        def train_step(state, batch):
            totals, per_sample = reduced_sums(state, batch)
            state, metrics = apply(state, totals)
            return state, metrics, per_sample

        return train_step

    update_stats = make_loss_stats_update(reduced=True)

    def apply_and_update(state, stats, totals, per_sample, batch):
        state, metrics = apply_sums(state, totals)
        return state, update_stats(stats, per_sample, batch, totals), metrics

    apply_breed = _jit_on_mesh(
        apply_and_update,
        mesh,
        (_REPLICATED, _REPLICATED, _REPLICATED, _SHARDED, _SHARDED),
        (_REPLICATED, _REPLICATED, _REPLICATED),
        donate_argnums=(0, 1),
    )

    def breed_train_step(state, stats, batch):
        totals, per_sample = reduced_sums(state, batch.batch)
        state, stats, metrics = apply_breed(state, stats, totals, per_sample, batch)
        return state, stats, metrics, per_sample

    return breed_train_step
