"""Breed (seed 000, §3): loss-deviation statistics and AMIS resampling as pure, jittable JAX functions.

Like :mod:`jaxsurro.core.reservoir` and optax, nothing here is jitted: state is a NamedTuple pytree,
functions take and return it, and the caller jits at the call site. Shapes are static.

**Loss-deviation statistics** (paper eqs. 4-6). For each training batch i with per-sample losses
l and weights w (padding rows have w = 0), μ and σ are the weighted mean and standard deviation
(ddof = 0) of the losses of the rows with w > 0, and every such row of simulation j at time step t
gives a deviation

    δ_jt^(i) = max(l_jt^(i) − μ^(i), 0) / σ^(i).

The statistic keeps, per (simulation, time step), the sum and count of its δ (the running mean is
sum / count), so that merging the statistics of several server ranks is adding (see
:func:`combine_loss_stats` and :class:`LossMoments`). The score of simulation j is

    Q_j = mean over the time steps t of j that have a δ of (δ-sum_jt / δ-count_jt).

Memory is O(S × T) scalars; updates consume the per-sample losses the training step already
returns, so they cost no extra forward or backward pass.

The window (:func:`recent_window`) holds only simulations of the paper's Λ_J^(i'): every time
step has at least one recorded δ (:func:`fully_observed`).

**AMIS resampling** (paper §3.2, eqs. 9-12). From a window of N simulations with locations λ_j,
scores Q_j and proposal widths σ_j (one per parameter: Σ_j = diag(σ_j²)), parents are drawn
multinomially with weights w_j = Q_j / mean(Q) (optionally divided by the density of the proposal
the window was drawn from: true importance weights, :func:`proposal_density`), and each of K
children is drawn from N(parent, Σ_parent) restricted to the unit cube that the bounds map to.
By default (``boundary="truncate"``) that is an exact truncated normal, one draw per child; the
paper's rule (``boundary="retry"``: redraw with σ ← σ·0.3 at most 5 times, then keep the parent's
location) is kept as an option. Each child's final σ is returned so it is passed on to its
proposal member. Each pending simulation then gets a child with probability
r(s) = min(r_s + s·(r_e − r_s)/r_c, r_e) at resampling round s = 1, 2, ... (s = 0 is the initial
design), else a uniform draw (:func:`mixing_ratio`, :func:`mix`; the paper prints max(...), which
cannot be meant; docs/architecture.md, "Breed").

Jit with ``jax.jit(amis_resample, static_argnames=AMIS_STATIC_ARGNAMES)`` and
``jax.jit(recent_window, static_argnames=("size",))``; the other functions take no static
arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

__all__ = [
    "AMIS_STATIC_ARGNAMES",
    "BOUNDARY_RULES",
    "AmisDraw",
    "LossMoments",
    "LossStatsState",
    "amis_resample",
    "combine_loss_stats",
    "delta_mean",
    "fully_observed",
    "init_loss_stats",
    "loss_moments",
    "mix",
    "mixing_ratio",
    "proposal_density",
    "recent_window",
    "simulation_scores",
    "unit_sigma",
    "update_loss_stats",
]

AMIS_STATIC_ARGNAMES = ("n_children", "importance_weights", "max_retries", "boundary")
BOUNDARY_RULES = ("truncate", "retry")  # amis_resample's ``boundary``: see its docstring

# A batch whose losses are all equal up to float32 rounding (σ <= this × |μ|) has no deviation.
_RELATIVE_SIGMA_FLOOR = 1e-6


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def unit_sigma(physical_sigma: float, low: Sequence[float], high: Sequence[float]) -> tuple[float, ...]:
    """Convert a proposal width in physical units to unit-cube widths, one per parameter: σ / (high_i − low_i).

    The paper's proposal members are N(λ, σ²I) in the parameter space itself (Σ = σ·I_d, eq. 11), so
    in the unit cube the bounds map to, parameter i has width σ / span_i: an isotropic physical σ
    becomes a per-dimension unit-cube σ (equal components when every span is the same, as in the
    paper's [100, 500]^5). :func:`amis_resample` and :func:`proposal_density` take that vector.
    """
    spans = [float(h) - float(l) for l, h in zip(low, high, strict=True)]
    if not spans or any(not s > 0 for s in spans):
        raise ValueError(
            f"unit_sigma: expected non-empty bounds with low < high, got low={list(low)}, high={list(high)}"
        )
    return tuple(float(physical_sigma) / span for span in spans)


# ----------------------------------------------------------------------------------------------
# Loss-deviation statistics
# ----------------------------------------------------------------------------------------------


class LossStatsState(NamedTuple):
    """Additive per-(simulation, time step) sums of loss deviations δ, and when each simulation was last updated."""

    delta_sum: Array  # [S, T] float32, Σ δ over every occurrence of (sim, t) in a batch
    delta_count: Array  # [S, T] int32, number of δ summed in delta_sum
    last_update: Array  # [S] int32, n_updates value of the last update touching the simulation, -1 never
    n_updates: Array  # [] int32, update_loss_stats calls so far (one per training step, rows or not)


class LossMoments(NamedTuple):
    """Weighted moments of one batch's losses; additive, so ranks can all-reduce them (three scalars)."""

    weight_sum: Array  # [] float32, Σ w over rows with w > 0
    loss_sum: Array  # [] float32, Σ w·l
    square_sum: Array  # [] float32, Σ w·l²


def init_loss_stats(n_simulations: int, n_steps: int) -> LossStatsState:
    """Empty statistics for S simulations of T time steps each."""
    if n_simulations < 1 or n_steps < 1:
        raise ValueError(
            f"init_loss_stats: n_simulations and n_steps must be >= 1, got "
            f"n_simulations={n_simulations}, n_steps={n_steps}"
        )
    return LossStatsState(
        delta_sum=jnp.zeros((n_simulations, n_steps), jnp.float32),
        delta_count=jnp.zeros((n_simulations, n_steps), jnp.int32),
        last_update=jnp.full((n_simulations,), -1, jnp.int32),
        n_updates=jnp.zeros((), jnp.int32),
    )


def _check_batch(name: str, per_sample_loss: Array, sample_ids: Array, weights: Array) -> None:
    """Trace-time check that losses, ids and weights are three vectors of one length B."""
    shapes = (per_sample_loss.shape, sample_ids.shape, weights.shape)
    if per_sample_loss.ndim != 1 or len(set(shapes)) != 1:
        raise ValueError(
            f"{name}: expected per_sample_loss, sample_ids and weights of one shape [B], got "
            f"{per_sample_loss.shape}, {sample_ids.shape} and {weights.shape}"
        )


def loss_moments(per_sample_loss: Array, weights: Array) -> LossMoments:
    """(Σw, Σw·l, Σw·l²) over the rows with weight > 0; add them across ranks for global batch μ and σ."""
    losses = jnp.asarray(per_sample_loss, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    use = weights > 0
    w = jnp.where(use, weights, 0.0)
    l = jnp.where(use, losses, 0.0)
    return LossMoments(weight_sum=jnp.sum(w), loss_sum=jnp.sum(w * l), square_sum=jnp.sum(w * l * l))


def _mean_std_from_moments(moments: LossMoments) -> tuple[Array, Array]:
    """Weighted mean and standard deviation (ddof = 0) of a batch from its summed moments."""
    total = jnp.maximum(moments.weight_sum, jnp.finfo(jnp.float32).tiny)
    mean = moments.loss_sum / total
    variance = jnp.maximum(moments.square_sum / total - mean * mean, 0.0)
    return mean, jnp.sqrt(variance)


def _local_mean_std(losses: Array, weights: Array) -> tuple[Array, Array]:
    """Weighted mean and standard deviation (ddof = 0) of the rows with weight > 0, in two passes."""
    use = weights > 0
    w = jnp.where(use, weights, 0.0)
    total = jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)
    mean = jnp.sum(w * jnp.where(use, losses, 0.0)) / total
    centred = jnp.where(use, losses - mean, 0.0)
    return mean, jnp.sqrt(jnp.sum(w * centred * centred) / total)


def update_loss_stats(
    state: LossStatsState, per_sample_loss: Array, sample_ids: Array, weights: Array, moments: LossMoments | None = None
) -> LossStatsState:
    """Add one batch's deviations δ = max(l − μ, 0)/σ to the per-(simulation, time step) sums.

    ``sample_ids`` [B] int are ``sim_id * n_steps + t``; ``weights`` [B] mark real rows (> 0) and
    padding (0). μ and σ are the weighted batch mean and standard deviation (ddof = 0) over the real
    rows; pass ``moments`` (the :func:`loss_moments` of every rank's rows, added up) to use the global
    batch of a data-parallel step instead of this rank's rows. Each real row adds its δ once, so a
    sample appearing several times in a batch adds several δ (scatter-add). Rows with weight 0, or
    with an id outside [0, S·T) (such as the reservoir's -1 padding ids), change nothing. A batch
    whose losses are all equal (σ <= 1e-6·|μ|, float32 rounding) has δ = 0. Every call advances
    ``n_updates`` by one and stamps the touched simulations' ``last_update`` with its old value.
    """
    losses = jnp.asarray(per_sample_loss, jnp.float32)
    sample_ids = jnp.asarray(sample_ids)
    weights = jnp.asarray(weights, jnp.float32)
    _check_batch("update_loss_stats", losses, sample_ids, weights)
    n_simulations, n_steps = state.delta_sum.shape
    size = n_simulations * n_steps

    if moments is None:
        mean, std = _local_mean_std(losses, weights)
    else:
        mean, std = _mean_std_from_moments(moments)
    has_spread = jnp.isfinite(std) & (std > _RELATIVE_SIGMA_FLOOR * jnp.abs(mean)) & (std > 0)
    safe_std = jnp.where(has_spread, std, 1.0)
    delta = jnp.where(has_spread, jnp.maximum(losses - mean, 0.0) / safe_std, 0.0)

    ids = sample_ids.astype(jnp.int32)
    real = (weights > 0) & (ids >= 0) & (ids < size)
    delta = jnp.where(real & jnp.isfinite(delta), delta, 0.0)
    flat_ids = jnp.where(real, ids, size)  # out of range: dropped by the scatters
    delta_sum = state.delta_sum.reshape(size).at[flat_ids].add(delta, mode="drop").reshape(n_simulations, n_steps)
    delta_count = state.delta_count.reshape(size).at[flat_ids].add(real.astype(jnp.int32), mode="drop")
    simulations = jnp.where(real, ids // n_steps, n_simulations)
    last_update = state.last_update.at[simulations].set(state.n_updates, mode="drop")
    return LossStatsState(
        delta_sum=delta_sum,
        delta_count=delta_count.reshape(n_simulations, n_steps),
        last_update=last_update,
        n_updates=state.n_updates + 1,
    )


def delta_mean(state: LossStatsState) -> Array:
    """Running mean of δ per (simulation, time step), [S, T] float32; 0 where no δ was recorded."""
    counts = state.delta_count
    return jnp.where(counts > 0, state.delta_sum / jnp.maximum(counts, 1).astype(jnp.float32), 0.0)


def simulation_scores(state: LossStatsState) -> tuple[Array, Array]:
    """(Q [S] float32, has_score [S] bool): Q_j is the mean of δ-means over j's time steps that have a δ."""
    recorded = state.delta_count > 0
    steps_recorded = jnp.sum(recorded, axis=1)
    has_score = steps_recorded > 0
    total = jnp.sum(jnp.where(recorded, delta_mean(state), 0.0), axis=1)
    scores = jnp.where(has_score, total / jnp.maximum(steps_recorded, 1).astype(jnp.float32), 0.0)
    return scores, has_score


def fully_observed(state: LossStatsState) -> Array:
    """[S] bool: every time step of the simulation has at least one recorded δ (the paper's Λ_J^(i'), §3.1)."""
    return jnp.all(state.delta_count > 0, axis=1)


def combine_loss_stats(states: Sequence[LossStatsState]) -> LossStatsState:
    """Merge several ranks' statistics: sums and counts add, last_update and n_updates take the maximum.

    With every rank calling :func:`update_loss_stats` once per (lockstep) training step with the
    global batch's ``moments``, the merged state equals one state updated with the union of the
    ranks' rows. Across MPI, the same merge is an all-reduce: SUM of ``delta_sum`` and
    ``delta_count``, MAX of ``last_update`` and ``n_updates``.
    """
    states = list(states)
    if not states:
        raise ValueError("combine_loss_stats: expected at least one LossStatsState, got none")
    shapes = {tuple(s.delta_sum.shape) for s in states}
    if len(shapes) != 1:
        raise ValueError(f"combine_loss_stats: every state must have the same [S, T] shape, got {sorted(shapes)}")
    return LossStatsState(
        delta_sum=sum((s.delta_sum for s in states[1:]), start=states[0].delta_sum),
        delta_count=sum((s.delta_count for s in states[1:]), start=states[0].delta_count),
        last_update=jnp.max(jnp.stack([s.last_update for s in states]), axis=0),
        n_updates=jnp.max(jnp.stack([s.n_updates for s in states])),
    )


def recent_window(state: LossStatsState, size: int, eligible: Array | None = None) -> tuple[Array, Array]:
    """(sim_ids [size] int32, valid [size] bool): the ``size`` most recently updated fully observed simulations.

    The paper's window: the last N simulations in order of Q updates, most recent first, among those
    of Λ_J^(i') (§3.1: every time step has a recorded δ, :func:`fully_observed`) and (when given)
    ``eligible`` [S] bool (e.g. finished simulations). A simulation with some time step never seen
    in a batch does not qualify, whatever its other steps scored. When fewer qualify, the tail rows
    are invalid (``valid`` False, id of an arbitrary simulation). ``size`` is static.
    """
    n_simulations = state.last_update.shape[0]
    if not 1 <= size:
        raise ValueError(f"recent_window: size must be >= 1, got {size}")
    qualifies = fully_observed(state) & (state.last_update >= 0)
    if eligible is not None:
        eligible = jnp.asarray(eligible, bool)
        if eligible.shape != (n_simulations,):
            raise ValueError(f"recent_window: expected eligible of shape ({n_simulations},), got {eligible.shape}")
        qualifies = qualifies & eligible
    order_key = jnp.where(qualifies, state.last_update, -1)
    take = min(size, n_simulations)
    _, ids = jax.lax.top_k(order_key, take)
    valid = qualifies[ids]
    if size > n_simulations:
        pad = size - n_simulations
        ids = jnp.concatenate([ids, jnp.zeros((pad,), ids.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
    return ids.astype(jnp.int32), valid


# ----------------------------------------------------------------------------------------------
# AMIS resampling
# ----------------------------------------------------------------------------------------------


class AmisDraw(NamedTuple):
    """K children of one AMIS round, their parents in the window and their final proposal widths."""

    children: Array  # [K, d] float32, physical units, within [low, high]
    parents: Array  # [K] int32, index into the window (rows of `locations`)
    sigma: Array  # [K, d] float32, unit-cube σ of each child's proposal member (its parent's σ, shrunk by retries)
    uniform_fallback: Array  # [] bool, True when no usable weight existed and parents were drawn uniformly


def _widths(name: str, sigma: float | Array, rows: int, dim: int) -> Array:
    """σ broadcast to [rows, d] (NumPy rules: a scalar, [d] per parameter, [rows, 1] per row, [rows, d])."""
    sigma = jnp.asarray(sigma, jnp.float32)
    try:
        return jnp.broadcast_to(sigma, (rows, dim))
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}: expected sigma broadcastable to [{rows}, {dim}] (a scalar, [d] per parameter, "
            f"[{rows}, 1] per row or [{rows}, d]), got shape {sigma.shape}"
        ) from None


def _parent_weights(
    scores: Array, valid: Array, importance_weights: bool, proposal_density: Array | None
) -> tuple[Array, Array]:
    """Normalized multinomial weights over the window, and whether the uniform fallback was used."""
    q = jnp.where(valid & jnp.isfinite(scores), jnp.maximum(scores, 0.0), 0.0)
    if importance_weights:
        usable_density = jnp.isfinite(proposal_density) & (proposal_density > 0)
        q = jnp.where(usable_density, q / jnp.where(usable_density, proposal_density, 1.0), 0.0)
        q = jnp.where(jnp.isfinite(q), q, 0.0)
    # w_j = Q_j / mean(Q); the multinomial only needs them up to a constant, so normalize to sum 1.
    total = jnp.sum(q)
    fallback = ~(jnp.isfinite(total) & (total > 0))
    uniform = valid.astype(jnp.float32)
    uniform = jnp.where(jnp.any(valid), uniform, 1.0)
    weights = jnp.where(fallback, uniform, q)
    return weights / jnp.sum(weights), fallback


def _multinomial(uniform: Array, probabilities: Array) -> Array:
    """One index per uniform draw in [0, 1) with the given probabilities (inverse CDF; zero-probability rows
    never drawn)."""
    cumulative = jnp.cumsum(probabilities)
    # u in (0, 1]: the first index whose cumulative sum reaches u·total has positive probability.
    u = 1.0 - uniform
    picks = jnp.searchsorted(cumulative, u * cumulative[-1], side="left")
    return jnp.minimum(picks, probabilities.shape[0] - 1).astype(jnp.int32)


def _check_bounds(name: str, locations: Array, low: Array, high: Array) -> None:
    """Trace-time check that locations are [N, d] and bounds are [d]."""
    if locations.ndim != 2 or low.shape != (locations.shape[1],) or high.shape != (locations.shape[1],):
        raise ValueError(
            f"{name}: expected locations [N, d] and low, high [d], got {locations.shape}, {low.shape} and {high.shape}"
        )


def _truncated_draw(uniform: Array, parent_unit: Array, widths: Array) -> tuple[Array, Array]:
    """Children ~ N(parent, diag(σ²)) conditioned on the unit cube: one exact draw each, per coordinate,
    from ``uniform`` [K, d] draws in [0, 1)."""
    # A box and a diagonal covariance: the truncated normal factorizes into one truncated normal
    # per coordinate, drawn by inverse CDF on [Φ(−c/σ), Φ((1 − c)/σ)] (the parent c is inside), in
    # erf's terms as jax.random.truncated_normal does, from uniforms drawn with the parents' (one
    # random-bits call for the whole draw, measurably faster on CPU than two).
    lower = -parent_unit / widths
    upper = (1.0 - parent_unit) / widths
    sqrt2 = math.sqrt(2.0)
    a, b = lax.erf(lower / sqrt2), lax.erf(upper / sqrt2)
    z = sqrt2 * lax.erf_inv(jnp.maximum(a, a + uniform * (b - a)))
    # Rounding (or u = 0 on an untruncated side) may leave z on or past a bound: clamp inside.
    z = jnp.clip(z, lax.nextafter(lower, jnp.inf), lax.nextafter(upper, -jnp.inf))
    return jnp.clip(parent_unit + widths * z, 0.0, 1.0), widths


def _retry_draw(
    key: Array, parent_unit: Array, widths: Array, max_retries: int, shrink: float | Array
) -> tuple[Array, Array, Array]:
    """The paper's rule, all rounds at once: (child_unit, σ, accepted); a child never accepted is its parent."""
    # Round r (0 = first draw, then max_retries retries) uses σ·shrink^r; take each child's first success.
    n_children = parent_unit.shape[0]
    rounds = jnp.arange(max_retries + 1, dtype=jnp.float32)
    round_sigma = widths[None] * jnp.asarray(shrink, jnp.float32) ** rounds[:, None, None]  # [R+1, K, d]
    noise = jax.random.normal(key, round_sigma.shape, jnp.float32)
    candidates = parent_unit[None] + round_sigma * noise  # [R+1, K, d]
    inside = jnp.all((candidates >= 0.0) & (candidates <= 1.0), axis=-1)  # [R+1, K]
    accepted = jnp.any(inside, axis=0)
    first = jnp.argmax(inside, axis=0)  # the first successful round (0 when none; masked below)
    chosen = jnp.take_along_axis(candidates, first[None, :, None], axis=0)[0]
    child_unit = jnp.where(accepted[:, None], chosen, parent_unit)
    final_sigma = jnp.where(accepted[:, None], round_sigma[first, jnp.arange(n_children)], round_sigma[-1])
    return child_unit, final_sigma, accepted


def amis_resample(
    key: Array,
    locations: Array,
    scores: Array,
    n_children: int,
    sigma: float | Array,
    low: Array,
    high: Array,
    importance_weights: bool = False,
    proposal_density: Array | None = None,
    max_retries: int = 5,
    shrink: float | Array = 0.3,
    valid: Array | None = None,
    boundary: str = "truncate",
) -> AmisDraw:
    """Draw K = ``n_children`` children from the score-weighted Gaussian mixture around the window.

    ``locations`` [N, d] are the window's parameters (physical units, within [low, high]); ``scores``
    [N] their Q. Parents are drawn multinomially with weights Q_j / mean(Q), or with
    ``importance_weights`` Q_j / ``proposal_density``_j (true importance weights; the density [N] of
    the proposal the window was drawn from, see :func:`proposal_density`, is then required).
    Negative, non-finite or masked-out (``valid`` [N] bool False) scores weigh 0, as do entries with
    a non-positive or non-finite density. When no weight is left (all Q are 0 or non-finite),
    parents are drawn uniformly among the valid entries (among all N if none is valid) and
    ``uniform_fallback`` is True.

    ``sigma`` is the unit-cube width of each window entry's proposal member N(λ_j, diag(σ_j²)),
    broadcast to [N, d] by NumPy rules: a scalar, [d] one per parameter (:func:`unit_sigma` of a
    physical σ), [N, 1] one per entry, or [N, d]. A child starts from its parent's σ.

    ``boundary`` says what happens to the part of a member outside the unit cube [low, high] maps to:

    * ``"truncate"`` (default): the child is drawn from N(parent, diag(σ²)) *conditioned* on the
      cube, an exact truncated normal (one inverse-CDF draw per coordinate, since a diagonal
      Gaussian restricted to a box factorizes), and keeps its parent's σ. This is what the paper's
      "redraw when out of bounds" converges to without shrinking σ, it never returns the parent
      unchanged (a parent on a face or corner gets half-normal offsets into the box, where the
      paper's rule keeps the parent for e.g. (1 − 2^-d)^6 of the draws at a corner, 83 % for d = 5),
      and its density is known in closed form, so :func:`proposal_density` is exact. Reflection at
      the bounds would also keep children inside, but folds mass back next to the faces and has a
      density that is a sum over mirror images; the truncated normal is simpler and exact.
    * ``"retry"``: the paper's rule (§3.2): a child out of the cube is redrawn with σ ← σ·``shrink``,
      at most ``max_retries`` times; if every draw fails it takes its parent's location and
      σ·shrink^max_retries. The σ it was accepted with is returned, to be passed on to the member.

    All K children (and with ``"retry"`` all 1 + max_retries rounds) are drawn at once, no loop over
    samples. ``n_children``, ``importance_weights``, ``max_retries`` and ``boundary`` are static
    (:data:`AMIS_STATIC_ARGNAMES`); the children are iid given the window, so to avoid a compile
    per K draw a fixed K and use the first rows.
    """
    locations = jnp.asarray(locations, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    low = jnp.asarray(low, jnp.float32)
    high = jnp.asarray(high, jnp.float32)
    _check_bounds("amis_resample", locations, low, high)
    n_window, dim = locations.shape
    if scores.shape != (n_window,):
        raise ValueError(
            f"amis_resample: expected scores of shape ({n_window},) (one per location), got {scores.shape}"
        )
    if n_children < 1:
        raise ValueError(f"amis_resample: n_children must be >= 1, got {n_children}")
    if max_retries < 0:
        raise ValueError(f"amis_resample: max_retries must be >= 0, got {max_retries}")
    if boundary not in BOUNDARY_RULES:
        raise ValueError(f"amis_resample: boundary must be one of {BOUNDARY_RULES}, got {boundary!r}")
    if importance_weights and proposal_density is None:
        raise ValueError(
            "amis_resample: importance_weights=True divides the scores by the proposal density; "
            "pass proposal_density [N] (see proposal_density())"
        )
    if not importance_weights and proposal_density is not None:
        raise ValueError(
            "amis_resample: proposal_density is only used with importance_weights=True; "
            "set importance_weights=True or drop proposal_density"
        )
    if proposal_density is not None:
        proposal_density = jnp.asarray(proposal_density, jnp.float32)
        if proposal_density.shape != (n_window,):
            raise ValueError(
                f"amis_resample: expected proposal_density of shape ({n_window},), got {proposal_density.shape}"
            )
    valid = jnp.ones((n_window,), bool) if valid is None else jnp.asarray(valid, bool)
    if valid.shape != (n_window,):
        raise ValueError(f"amis_resample: expected valid of shape ({n_window},), got {valid.shape}")
    window_sigma = _widths("amis_resample", sigma, n_window, dim)

    probabilities, fallback = _parent_weights(scores, valid, importance_weights, proposal_density)
    if boundary == "truncate":  # one uniform draw for the parents and every coordinate of the children
        uniform = jax.random.uniform(key, (n_children, dim + 1), jnp.float32)
        parents = _multinomial(uniform[:, 0], probabilities)
    else:
        key_parents, key_noise = jax.random.split(key)
        parents = _multinomial(jax.random.uniform(key_parents, (n_children,), jnp.float32), probabilities)

    span = high - low
    parent_physical = locations[parents]  # [K, d]
    parent_unit = jnp.clip((parent_physical - low) / span, 0.0, 1.0)
    widths = window_sigma[parents]  # [K, d]
    if boundary == "truncate":
        child_unit, final_sigma = _truncated_draw(uniform[:, 1:], parent_unit, widths)
        children = jnp.clip(low + child_unit * span, low, high)
    else:
        child_unit, final_sigma, accepted = _retry_draw(key_noise, parent_unit, widths, max_retries, shrink)
        children = jnp.where(accepted[:, None], jnp.clip(low + child_unit * span, low, high), parent_physical)
    return AmisDraw(children=children, parents=parents, sigma=final_sigma, uniform_fallback=fallback)


def proposal_density(
    points: Array, centres: Array, sigmas: Array | float, low: Array, high: Array, ratio: float | Array = 1.0
) -> Array:
    """Density [M] at ``points`` [M, d] of one round's proposal r·(1/K)Σ_k TN(·|centre_k, σ_k) + (1 − r)·U.

    The proposal of an AMIS round, in the unit cube the bounds map to: its K members are Gaussians
    N(centre_k, diag(σ_k²)) truncated to the cube (TN), as :func:`amis_resample` draws them, mixed
    with the uniform density 1 at the round's ratio r (a pending simulation takes the child with
    probability r, else a uniform draw; :func:`mix`). For ``importance_weights``, evaluate the
    window's locations under the previous round's proposal: ``centres`` [K, d] are that round's
    *parents* (physical units, ``locations[draw.parents]``), ``sigmas`` the σ of each member
    (``draw.sigma``, unit cube; broadcast to [K, d] like ``amis_resample``'s ``sigma``) and
    ``ratio`` its r. With ``boundary="truncate"`` this is the exact density of that round's draws;
    with ``"retry"`` it is exact given each member's final σ, except for the children that kept
    their parent's location. Points outside the cube have density 0. Computed in log space in
    float32, so extreme σ^-d may overflow to inf, which :func:`amis_resample` treats as weight 0.
    """
    points = jnp.asarray(points, jnp.float32)
    centres = jnp.asarray(centres, jnp.float32)
    low = jnp.asarray(low, jnp.float32)
    high = jnp.asarray(high, jnp.float32)
    _check_bounds("proposal_density", points, low, high)
    _check_bounds("proposal_density", centres, low, high)
    n_centres, dim = centres.shape
    widths = _widths("proposal_density", sigmas, n_centres, dim)  # [K, d]
    span = high - low
    x = (points - low) / span
    c = jnp.clip((centres - low) / span, 0.0, 1.0)
    # Per coordinate, the mass of N(c, σ²) inside [0, 1]: the truncated normal's normalizer.
    root2 = jnp.sqrt(2.0).astype(jnp.float32)
    mass = 0.5 * (jax.lax.erf((1.0 - c) / (widths * root2)) - jax.lax.erf(-c / (widths * root2)))
    log_mass = jnp.log(jnp.maximum(mass, jnp.finfo(jnp.float32).tiny))  # [K, d]
    z = (x[:, None, :] - c[None, :, :]) / widths[None]  # [M, K, d]
    log_member = jnp.sum(
        -0.5 * z * z - jnp.log(widths)[None] - 0.5 * jnp.log(2.0 * jnp.pi) - log_mass[None], axis=-1
    )  # [M, K]
    log_mixture = jax.nn.logsumexp(log_member, axis=1) - jnp.log(float(n_centres))
    ratio = jnp.asarray(ratio, jnp.float32)
    density = ratio * jnp.exp(log_mixture) + (1.0 - ratio)
    tolerance = 1e-6
    inside = jnp.all((x >= -tolerance) & (x <= 1.0 + tolerance), axis=1)
    return jnp.where(inside, density, 0.0)


# ----------------------------------------------------------------------------------------------
# Concentrate-explore mixing
# ----------------------------------------------------------------------------------------------


def mixing_ratio(s: int | Array, r_start: float, r_end: float, r_cycles: float) -> Array:
    """r(s) = min(r_s + s·(r_e − r_s)/r_c, r_e): the probability that resampling round s uses a child.

    Rounds count as in the paper (§3.2, "at resampling iteration s, i = s·P"): s = 1 at the first
    resampling round, s = 0 being the initial uniform design, so the first round uses
    r_s + (r_e − r_s)/r_c, not r_s. Written as r_s + min(s/r_c, 1)·(r_e − r_s), which is the same
    for r_e >= r_s and also moves a decreasing schedule (r_e < r_s) monotonically to r_e. The paper
    prints max(...), which would be r_e or more from the start (docs/architecture.md, "Breed").
    Returns a [] float32 array.
    """
    if isinstance(r_cycles, (int, float)) and not r_cycles > 0:
        raise ValueError(f"mixing_ratio: r_cycles (r_c) must be > 0, got {r_cycles}")
    progress = jnp.minimum(jnp.asarray(s, jnp.float32) / jnp.asarray(r_cycles, jnp.float32), 1.0)
    return jnp.asarray(r_start, jnp.float32) + progress * (jnp.asarray(r_end, jnp.float32) - r_start)


def mix(key: Array, children: Array, uniform: Array, ratio: float | Array) -> tuple[Array, Array]:
    """(points [K, d], is_child [K] bool): each row is the child with probability ``ratio``, else the uniform draw."""
    children = jnp.asarray(children)
    uniform = jnp.asarray(uniform)
    if children.shape != uniform.shape or children.ndim != 2:
        raise ValueError(
            f"mix: expected children and uniform of one shape [K, d], got {children.shape} and {uniform.shape}"
        )
    is_child = jax.random.bernoulli(key, jnp.asarray(ratio, jnp.float32), (children.shape[0],))
    return jnp.where(is_child[:, None], children, uniform.astype(children.dtype)), is_child
