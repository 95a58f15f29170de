"""The Reservoir training buffer (SC23 Melissa paper, Algorithm 1) as pure, jittable JAX functions.

For users who keep a replay buffer on the device inside their own JAX code. Like an optax
``init``/``update`` pair, nothing here is jitted: ``init`` builds a :class:`ReservoirState` pytree,
``add``/``add_many`` insert samples and ``sample`` draws a batch, each taking the state and an
explicit PRNG key and returning the new state. Shapes are static: the capacity, the sample shapes,
``batch_size``, ``watermark`` and ``evict`` are fixed at trace time, so jit ``sample`` with
``static_argnames=("batch_size", "watermark", "evict")``.

Rules (the same as :class:`jaxsurro.server.buffers.ReservoirBuffer`; docs/architecture.md,
"Buffers"): a new sample takes the first free slot, else overwrites a uniformly random *seen*
sample; when every slot holds an unseen sample, ``add`` refuses it (``accepted=False``), the device
analogue of the host producer blocking, and the caller retries after the next draw. ``sample``
draws ``batch_size`` slots uniformly with replacement among the stored samples once the population
reaches the watermark; drawn samples become seen and their use counts grow by one per draw. With
``evict=True`` (reception over) it draws ``min(batch_size, population)`` distinct stored samples
and frees their slots, so the buffer empties.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

__all__ = ["ReservoirState", "add", "add_many", "init", "num_unseen", "repetition_histogram", "sample"]


class ReservoirState(NamedTuple):
    """Storage, per-slot flags and counters of a device reservoir of capacity C."""

    inputs: Array  # [C, input_dim] float32
    targets: Array  # [C, *field_shape] float32
    sample_ids: Array  # [C] int32, -1 for an empty slot
    occupied: Array  # [C] bool, slot holds a sample
    seen: Array  # [C] bool, the stored sample was drawn at least once (False for empty slots)
    use_count: Array  # [C] int32, draws of the stored sample (0 for empty slots)
    population: Array  # [] int32, occupied slots
    received: Array  # [] int32, samples accepted by add
    evicted: Array  # [] int32, samples removed (overwritten by add, or drawn with evict=True)
    drawn: Array  # [] int32, valid rows returned by sample, duplicates included
    evicted_uses: Array  # [max_uses + 1] int32, evicted samples by use count; the last bin is ">= max_uses"


def init(capacity: int, input_dim: int, field_shape: tuple[int, ...], max_uses: int = 64) -> ReservoirState:
    """An empty reservoir; ``max_uses`` bounds the repetition histogram (larger counts share its last bin)."""
    field_shape = tuple(field_shape)
    if capacity < 1 or input_dim < 1 or max_uses < 1:
        raise ValueError(
            f"reservoir.init: capacity, input_dim and max_uses must be >= 1, got capacity={capacity}, "
            f"input_dim={input_dim}, max_uses={max_uses}"
        )
    if any(d < 1 for d in field_shape):
        raise ValueError(f"reservoir.init: field_shape dimensions must be >= 1, got {field_shape}")
    zero = jnp.zeros((), jnp.int32)
    return ReservoirState(
        inputs=jnp.zeros((capacity, input_dim), jnp.float32),
        targets=jnp.zeros((capacity, *field_shape), jnp.float32),
        sample_ids=jnp.full((capacity,), -1, jnp.int32),
        occupied=jnp.zeros((capacity,), bool),
        seen=jnp.zeros((capacity,), bool),
        use_count=jnp.zeros((capacity,), jnp.int32),
        population=zero,
        received=zero,
        evicted=zero,
        drawn=zero,
        evicted_uses=jnp.zeros((max_uses + 1,), jnp.int32),
    )


def _check_sample_shapes(state: ReservoirState, inputs: Array, targets: Array, leading: tuple[int, ...]) -> None:
    """Trace-time check that samples match the reservoir's row shapes."""
    want_inputs = (*leading, *state.inputs.shape[1:])
    want_targets = (*leading, *state.targets.shape[1:])
    if tuple(inputs.shape) != want_inputs or tuple(targets.shape) != want_targets:
        hint = "; for several samples use add_many" if not leading else "; for one sample use add"
        raise ValueError(
            f"reservoir: expected inputs of shape {want_inputs} and targets of shape {want_targets}, got "
            f"{tuple(inputs.shape)} and {tuple(targets.shape)}{hint}"
        )


def _kth_true(mask: Array, k: Array) -> Array:
    """Index of the k-th (0-based) True entry of a boolean vector."""
    rank = jnp.cumsum(mask.astype(jnp.int32)) - 1
    return jnp.argmax(mask & (rank == k))


def add(
    state: ReservoirState, key: Array, inputs: Array, targets: Array, sample_id: Array | int
) -> tuple[ReservoirState, Array]:
    """Store one sample in the first free slot, else over a uniformly random seen one; returns accepted."""
    inputs = jnp.asarray(inputs)
    targets = jnp.asarray(targets)
    _check_sample_shapes(state, inputs, targets, ())
    free = ~state.occupied
    has_free = jnp.any(free)
    evictable = state.occupied & state.seen
    n_evictable = jnp.sum(evictable.astype(jnp.int32))
    victim = _kth_true(evictable, jax.random.randint(key, (), 0, jnp.maximum(n_evictable, 1)))
    accepted = has_free | (n_evictable > 0)
    slot = jnp.where(has_free, jnp.argmax(free), victim)
    evicting = accepted & ~has_free

    old_uses = state.use_count[slot]
    last_bin = state.evicted_uses.shape[0] - 1
    return ReservoirState(
        inputs=state.inputs.at[slot].set(jnp.where(accepted, inputs.astype(jnp.float32), state.inputs[slot])),
        targets=state.targets.at[slot].set(jnp.where(accepted, targets.astype(jnp.float32), state.targets[slot])),
        sample_ids=state.sample_ids.at[slot].set(
            jnp.where(accepted, jnp.asarray(sample_id, jnp.int32), state.sample_ids[slot])
        ),
        occupied=state.occupied.at[slot].set(state.occupied[slot] | accepted),
        seen=state.seen.at[slot].set(state.seen[slot] & ~accepted),
        use_count=state.use_count.at[slot].set(jnp.where(accepted, 0, old_uses)),
        population=state.population + (accepted & has_free).astype(jnp.int32),
        received=state.received + accepted.astype(jnp.int32),
        evicted=state.evicted + evicting.astype(jnp.int32),
        drawn=state.drawn,
        evicted_uses=state.evicted_uses.at[jnp.minimum(old_uses, last_bin)].add(evicting.astype(jnp.int32)),
    ), accepted


def add_many(
    state: ReservoirState, key: Array, inputs: Array, targets: Array, sample_ids: Array
) -> tuple[ReservoirState, Array]:
    """Add n samples in order (a lax.scan over add); returns accepted [n] bool."""
    inputs = jnp.asarray(inputs)
    targets = jnp.asarray(targets)
    sample_ids = jnp.asarray(sample_ids)
    count = inputs.shape[0] if inputs.ndim else 0
    _check_sample_shapes(state, inputs, targets, (count,))
    if sample_ids.shape != (count,):
        raise ValueError(f"reservoir.add_many: expected sample_ids of shape ({count},), got {sample_ids.shape}")

    def step(carry: ReservoirState, sample: tuple[Array, Array, Array, Array]) -> tuple[ReservoirState, Array]:
        sample_key, sample_inputs, sample_targets, sample_id = sample
        return add(carry, sample_key, sample_inputs, sample_targets, sample_id)

    return jax.lax.scan(step, state, (jax.random.split(key, count), inputs, targets, sample_ids))


def _zero_invalid_rows(valid: Array, rows: Array) -> Array:
    """Zero the rows of a batch whose valid flag is False."""
    return jnp.where(valid.reshape(valid.shape + (1,) * (rows.ndim - 1)), rows, jnp.zeros((), rows.dtype))


def sample(
    state: ReservoirState, key: Array, batch_size: int, watermark: int, evict: bool = False
) -> tuple[ReservoirState, Array, Array, Array, Array]:
    """Draw a batch; returns (state, inputs [B, D], targets [B, ...], sample_ids [B], valid_mask [B]).

    Without ``evict``: B slots uniformly with replacement among stored samples, only when
    population >= max(watermark, 1) (else valid_mask is all False and the state is unchanged).
    With ``evict`` (reception over, threshold lifted): min(B, population) distinct stored samples,
    whose slots are freed. Invalid rows are zero and their ids -1. ``batch_size``, ``watermark`` and
    ``evict`` are static.
    """
    if batch_size < 1:
        raise ValueError(f"reservoir.sample: batch_size must be >= 1, got {batch_size}")
    if watermark < 0:
        raise ValueError(f"reservoir.sample: watermark must be >= 0, got {watermark}")
    capacity = state.occupied.shape[0]
    last_bin = state.evicted_uses.shape[0] - 1
    if not evict:
        (stored_slots,) = jnp.nonzero(state.occupied, size=capacity, fill_value=0)
        ready = state.population >= max(watermark, 1)
        positions = jax.random.randint(key, (batch_size,), 0, jnp.maximum(state.population, 1))
        slots = stored_slots[positions]
        valid = jnp.broadcast_to(ready, (batch_size,))
        draws = jnp.zeros((capacity,), jnp.int32).at[slots].add(valid.astype(jnp.int32))
        new_state = state._replace(
            seen=state.seen | (draws > 0),
            use_count=state.use_count + draws,
            drawn=state.drawn + batch_size * ready.astype(jnp.int32),
        )
    else:
        # A random permutation, then stored slots first (stable): the first `population` entries are a
        # uniformly random ordering of the stored samples.
        permutation = jax.random.permutation(key, capacity)
        order = permutation[jnp.argsort(~state.occupied[permutation], stable=True)]
        taken = min(batch_size, capacity)
        slots = order[:taken]
        if batch_size > capacity:  # pad with an out-of-range slot; scatters drop it, gathers clamp it
            slots = jnp.concatenate([slots, jnp.full((batch_size - capacity,), capacity, slots.dtype)])
        valid = jnp.arange(batch_size) < state.population
        leaving = jnp.zeros((capacity,), bool).at[slots].set(valid, mode="drop")
        uses_at_exit = jnp.minimum(state.use_count.at[slots].get(mode="clip") + 1, last_bin)
        n_valid = jnp.sum(valid.astype(jnp.int32))
        new_state = state._replace(
            sample_ids=jnp.where(leaving, -1, state.sample_ids),
            occupied=state.occupied & ~leaving,
            seen=state.seen & ~leaving,
            use_count=jnp.where(leaving, 0, state.use_count),
            population=state.population - n_valid,
            evicted=state.evicted + n_valid,
            drawn=state.drawn + n_valid,
            evicted_uses=state.evicted_uses.at[uses_at_exit].add(valid.astype(jnp.int32)),
        )
    batch_inputs = _zero_invalid_rows(valid, state.inputs.at[slots].get(mode="clip"))
    batch_targets = _zero_invalid_rows(valid, state.targets.at[slots].get(mode="clip"))
    batch_ids = jnp.where(valid, state.sample_ids.at[slots].get(mode="clip"), -1)
    return new_state, batch_inputs, batch_targets, batch_ids, valid


def num_unseen(state: ReservoirState) -> Array:
    """Stored samples never drawn ([] int32); add refuses a sample when this equals the capacity."""
    return jnp.sum((state.occupied & ~state.seen).astype(jnp.int32))


def repetition_histogram(state: ReservoirState) -> Array:
    """counts[k] = samples ever stored that were used exactly k times ([max_uses + 1] int32; last bin >= max_uses)."""
    last_bin = state.evicted_uses.shape[0] - 1
    stored = (
        jnp.zeros_like(state.evicted_uses)
        .at[jnp.minimum(state.use_count, last_bin)]
        .add(state.occupied.astype(jnp.int32))
    )
    return state.evicted_uses + stored
