"""Pure training and evaluation steps for surrogates (jit at the call site: `jaxsurro.server.parallel`).

Loss of one sample i (normalized units, so it is O(1) whatever each field's physical scale):

    l_{i,f} = mean over field f of (û_θ(x_i) − û_i)²,   û = normalize_field(u, model.scaling)
    l_i = Σ_f c_f l_{i,f} / Σ_f c_f                     (c_f: the field's weight in the loss)

The update minimizes the weighted mean L = Σ_i w_i l_i / Σ_i w_i. Each participant (device
shard, MPI rank) contributes sums (Σ w_i ∇l_i, Σ w_i l_i, Σ w_i); `reduce_fn` adds them up
across participants before the division, so every sample counts once whatever the rank
sizes, and a participant with no samples (all weights 0) contributes nothing. When the
total weight is 0 the step leaves parameters and optimizer state bitwise unchanged.

The Breed step (:func:`make_breed_train_step`) is the same step that also adds the batch's loss
deviations to Breed's statistics (:func:`jaxsurro.core.breed.update_loss_stats`) from the
per-sample losses it has just computed, with the batch mean and spread of the reduced sums
(Σ w, Σ w·l, Σ w·l²): one computation per step, no extra forward pass, dispatch or transfer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsurro.core import breed
from jaxsurro.core.model import normalize_field

__all__ = [
    "Batch",
    "BatchWithIds",
    "BreedTrainStep",
    "EvalStep",
    "ReduceFn",
    "Sums",
    "TrainState",
    "TrainStep",
    "init_train_state",
    "make_apply_sums",
    "make_breed_train_step",
    "make_eval_step",
    "make_gradient_sums",
    "make_loss_stats_update",
    "make_optimizer",
    "make_train_step",
    "per_field_loss",
    "schedule_transition_steps",
]

Params = Any  # a pytree of float32 arrays (flax variables)


class Batch(NamedTuple):
    """One training batch; padding rows carry weight 0."""

    inputs: jax.Array  # [B, d+1] float32: physical parameters then physical time
    targets: jax.Array  # [B, sample_size] float32: every field of the step, flat, physical units
    weights: jax.Array  # [B] float32: 1 for real rows, 0 for padding


class BatchWithIds(NamedTuple):
    """A batch and its rows' sample ids, as the Breed step takes it (one pytree: one transfer)."""

    batch: Batch
    sample_ids: jax.Array  # [B] int32: sim_id · n_steps + t; -1 for padding rows


class TrainState(NamedTuple):
    """Everything the training step updates."""

    step: jax.Array  # [] int32: number of updates applied (zero-weight steps do not count)
    params: Params
    opt_state: optax.OptState


class Sums(NamedTuple):
    """What each participant (device shard, MPI rank) contributes; participants combine by adding."""

    grad: Params  # Σ_i w_i ∇l_i
    loss: jax.Array  # [] Σ_i w_i l_i
    weight: jax.Array  # [] Σ_i w_i
    field_loss: jax.Array  # [F] Σ_i w_i l_{i,f}
    square_loss: jax.Array  # [] Σ_i w_i l_i² (with loss and weight: the batch's loss spread, for Breed)


# Sums -> the same sums added over every participant.
ReduceFn = Callable[[Sums], Sums]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array], jax.Array]]
# (state, stats, batch with ids) -> (new_state, new_stats, metrics, per_sample_loss [B])
BreedTrainStep = Callable[
    [TrainState, breed.LossStatsState, BatchWithIds],
    tuple[TrainState, breed.LossStatsState, dict[str, jax.Array], jax.Array],
]
# (params, batch) -> (per-sample loss [B], Σ w·l, Σ w, per-field Σ w·l_f [F])
EvalStep = Callable[[Params, Batch], tuple[jax.Array, jax.Array, jax.Array, jax.Array]]


def schedule_transition_steps(batch_size: int, halve_every_samples: int) -> int:
    """Optimizer steps between two halvings: max(1, halve_every_samples // batch_size)."""
    if batch_size <= 0 or halve_every_samples <= 0:
        raise ValueError(
            f"Expected batch_size > 0 and halve_every_samples > 0; got {batch_size} and {halve_every_samples}."
        )
    return max(1, halve_every_samples // batch_size)


def make_optimizer(learning_rate: float, batch_size: int, halve_every_samples: int) -> optax.GradientTransformation:
    """Adam whose learning rate halves every `halve_every_samples` samples (the papers' schedule).

    The schedule counts optimizer updates, one per full batch of `batch_size` samples, so the
    rate at update k is learning_rate · 0.5^floor(k / max(1, halve_every_samples // batch_size)).
    Steps with zero total weight apply no update and do not advance the schedule. The current
    rate is kept in the optimizer state (optax.inject_hyperparams) so the step can report it.
    """
    if not learning_rate > 0:
        raise ValueError(f"Expected learning_rate > 0; got {learning_rate}.")
    schedule = optax.exponential_decay(
        init_value=learning_rate,
        transition_steps=schedule_transition_steps(batch_size, halve_every_samples),
        decay_rate=0.5,
        staircase=True,
    )
    return optax.inject_hyperparams(optax.adam)(learning_rate=schedule)


def init_train_state(
    key: jax.Array, model: nn.Module, optimizer: optax.GradientTransformation, input_dim: int
) -> TrainState:
    """Initialize parameters from `key` (same key, same bits) and the optimizer state."""
    params = model.init(key, jnp.zeros((1, input_dim), dtype=jnp.float32))
    return TrainState(step=jnp.zeros((), dtype=jnp.int32), params=params, opt_state=optimizer.init(params))


def per_field_loss(model: nn.Module, params: Params, batch: Batch) -> jax.Array:
    """[B, F] mean over each field of the squared error in normalized units."""
    predicted = model.apply(params, batch.inputs, normalized_output=True)
    target = normalize_field(batch.targets.astype(jnp.float32), model.scaling)
    squared_error = jnp.square(predicted - target)
    bounds = np.cumsum((0, *model.scaling.field_sizes))
    return jnp.stack(
        [jnp.mean(squared_error[:, bounds[f] : bounds[f + 1]], axis=1) for f in range(len(bounds) - 1)], axis=1
    )


def _loss_weights(model: nn.Module, field_weights: Sequence[float] | None) -> np.ndarray:
    """The fields' weights c_f normalized to sum 1 (equal weights by default)."""
    n_fields = len(model.scaling.field_sizes)
    weights = np.ones(n_fields) if field_weights is None else np.asarray(field_weights, dtype=np.float64)
    if weights.shape != (n_fields,) or not np.all(weights >= 0) or not weights.sum() > 0:
        raise ValueError(f"Expected {n_fields} non-negative field weights with a positive sum; got {field_weights}.")
    return (weights / weights.sum()).astype(np.float32)


def _identity_reduce(sums: Sums) -> Sums:
    """Single participant: the local sums are the totals."""
    return sums


def make_gradient_sums(
    model: nn.Module, field_weights: Sequence[float] | None = None
) -> Callable[[Params, Batch], tuple[Sums, jax.Array]]:
    """Build the pure (params, batch) -> (Sums, per_sample_loss [B]).

    Sums, not means, so that participants (devices, ranks) combine by adding and each
    counts in proportion to its samples.
    """
    weights = _loss_weights(model, field_weights)

    def weighted_loss_sum(params: Params, batch: Batch) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        per_field = per_field_loss(model, params, batch)
        per_sample = per_field @ weights
        return jnp.sum(batch.weights * per_sample), (per_sample, batch.weights @ per_field)

    def gradient_sums(params: Params, batch: Batch) -> tuple[Sums, jax.Array]:
        (loss_sum, (per_sample, field_sums)), grad_sum = jax.value_and_grad(weighted_loss_sum, has_aux=True)(
            params, batch
        )
        square_sum = jnp.sum(batch.weights * jnp.square(per_sample))
        return Sums(grad_sum, loss_sum, jnp.sum(batch.weights), field_sums, square_sum), per_sample

    return gradient_sums


def make_apply_sums(
    optimizer: optax.GradientTransformation,
) -> Callable[[TrainState, Sums], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the pure (state, total sums) -> (new_state, metrics): one optimizer update from the mean gradient.

    With a total weight of 0 the state is returned unchanged (nobody had samples).
    """

    def apply_sums(state: TrainState, sums: Sums) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_sum, loss_sum, weight_sum, field_loss_sum, _ = sums
        denominator = jnp.maximum(weight_sum, jnp.finfo(jnp.float32).tiny)
        grads = jax.tree.map(lambda g: g / denominator, grad_sum)
        updates, candidate_opt_state = optimizer.update(grads, state.opt_state, state.params)
        candidate_params = optax.apply_updates(state.params, updates)

        has_samples = weight_sum > 0

        def keep_old_if_empty(new: jax.Array, old: jax.Array) -> jax.Array:
            return jnp.where(has_samples, new, old)

        new_state = TrainState(
            step=state.step + has_samples.astype(jnp.int32),
            params=jax.tree.map(keep_old_if_empty, candidate_params, state.params),
            opt_state=jax.tree.map(keep_old_if_empty, candidate_opt_state, state.opt_state),
        )
        learning_rate = optax.tree_utils.tree_get(
            candidate_opt_state,
            "learning_rate",
            filtering=lambda _path, value: isinstance(value, jax.Array),  # not the schedule state
        )
        metrics = {
            "loss": loss_sum / denominator,
            "field_loss": field_loss_sum / denominator,
            "weight": weight_sum,
            "learning_rate": (
                jnp.asarray(jnp.nan, dtype=jnp.float32)
                if learning_rate is None
                else jnp.asarray(learning_rate, dtype=jnp.float32)
            ),
            "grad_norm": optax.tree.norm(grads),
        }
        return new_state, metrics

    return apply_sums


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    reduce_fn: ReduceFn | None = None,
    field_weights: Sequence[float] | None = None,
) -> TrainStep:
    """Build the pure step (state, batch) -> (new_state, metrics, per_sample_loss [B]).

    It is gradient sums, then ``reduce_fn`` over the sums (identity by default; a sum
    across MPI ranks in a multi-rank server), then one update from the totals.
    metrics: loss (weighted mean over all participants), field_loss ([F], each field's weighted mean
    loss), weight (total weight), learning_rate
    (the rate of this update; NaN if the optimizer does not expose one through
    optax.inject_hyperparams), grad_norm (global norm of the averaged gradient). Per-sample
    losses are returned for every row, padding included; keep the rows with weight > 0.
    """
    reduce = _identity_reduce if reduce_fn is None else reduce_fn
    gradient_sums = make_gradient_sums(model, field_weights)
    apply_sums = make_apply_sums(optimizer)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
        sums, per_sample = gradient_sums(state.params, batch)
        new_state, metrics = apply_sums(state, reduce(sums))
        return new_state, metrics, per_sample

    return train_step


def make_loss_stats_update(
    reduced: bool,
) -> Callable[[breed.LossStatsState, jax.Array, BatchWithIds, Sums], breed.LossStatsState]:
    """Build the pure (stats, per_sample_loss, batch with ids, total sums) -> stats: Breed's update of one step.

    With ``reduced`` (the sums were added over several participants, e.g. MPI ranks) μ and σ come
    from the totals' moments (Σ w, Σ w·l, Σ w·l²), so every rank adds its rows' δ with the global
    batch's μ and σ and the ranks' statistics merge by adding; otherwise from this batch's rows,
    in two passes, exactly as a separate :func:`jaxsurro.core.breed.update_loss_stats` call.
    """

    def update(
        stats: breed.LossStatsState, per_sample: jax.Array, batch: BatchWithIds, totals: Sums
    ) -> breed.LossStatsState:
        moments = breed.LossMoments(totals.weight, totals.loss, totals.square_loss) if reduced else None
        return breed.update_loss_stats(stats, per_sample, batch.sample_ids, batch.batch.weights, moments)

    return update


def make_breed_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    reduce_fn: ReduceFn | None = None,
    field_weights: Sequence[float] | None = None,
) -> BreedTrainStep:
    """Build the pure step (state, stats, batch with ids) -> (new_state, new_stats, metrics, per_sample_loss [B]).

    :func:`make_train_step`'s update, and in the same computation Breed's loss-deviation
    statistics updated from its per-sample losses (:func:`make_loss_stats_update`; with a
    ``reduce_fn``, from the reduced moments). Every call advances ``stats.n_updates``, even
    with no real row, so ranks in lockstep stay in step.
    """
    reduce = _identity_reduce if reduce_fn is None else reduce_fn
    gradient_sums = make_gradient_sums(model, field_weights)
    apply_sums = make_apply_sums(optimizer)
    update_stats = make_loss_stats_update(reduced=reduce_fn is not None)

    def breed_train_step(
        state: TrainState, stats: breed.LossStatsState, batch: BatchWithIds
    ) -> tuple[TrainState, breed.LossStatsState, dict[str, jax.Array], jax.Array]:
        sums, per_sample = gradient_sums(state.params, batch.batch)
        totals = reduce(sums)
        new_state, metrics = apply_sums(state, totals)
        return new_state, update_stats(stats, per_sample, batch, totals), metrics, per_sample

    return breed_train_step


def make_eval_step(model: nn.Module, field_weights: Sequence[float] | None = None) -> EvalStep:
    """Build the pure eval_step(params, batch) -> (per_sample_loss [B], Σ w·l, Σ w, per-field Σ w·l_f [F])."""
    weights = _loss_weights(model, field_weights)

    def eval_step(params: Params, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        per_field = per_field_loss(model, params, batch)
        per_sample = per_field @ weights
        return per_sample, jnp.sum(batch.weights * per_sample), jnp.sum(batch.weights), batch.weights @ per_field

    return eval_step
