"""Breed: loss-deviation statistics against a NumPy reference, and the AMIS draw's distribution and rules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxsurro.core import breed

P_MIN = 1e-3  # fixed keys make every statistical test deterministic; this is the bar each one clears

amis = jax.jit(breed.amis_resample, static_argnames=breed.AMIS_STATIC_ARGNAMES)
update = jax.jit(breed.update_loss_stats)
scores_of = jax.jit(breed.simulation_scores)
window_of = jax.jit(breed.recent_window, static_argnames=("size",))
mix = jax.jit(breed.mix)

LOW = np.full(5, 100.0, np.float32)
HIGH = np.full(5, 500.0, np.float32)


def as_numpy(draw: breed.AmisDraw) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(x) for x in draw)


# ----------------------------------------------------------------------------------------------
# AMIS
# ----------------------------------------------------------------------------------------------


def test_fixed_key_is_bitwise_reproducible_and_keys_differ() -> None:
    rng = np.random.default_rng(0)
    locations = rng.uniform(100.0, 500.0, (40, 5)).astype(np.float32)
    scores = rng.exponential(1.0, 40).astype(np.float32)
    first = as_numpy(amis(jax.random.key(3), locations, scores, 64, 0.05, LOW, HIGH))
    second = as_numpy(amis(jax.random.key(3), locations, scores, 64, 0.05, LOW, HIGH))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    other = as_numpy(amis(jax.random.key(4), locations, scores, 64, 0.05, LOW, HIGH))
    assert not np.array_equal(first[0], other[0])


def test_retry_rule_children_lie_within_bounds_and_sigma_follows_the_shrink_rule() -> None:
    """The paper's rule, kept as boundary="retry": σ·0.3^r for the first successful round r."""
    rng = np.random.default_rng(1)
    low = np.array([0.0, -1.0, 10.0], np.float32)
    high = np.array([1.0, 1.0, 12.0], np.float32)
    # Half the window sits on the faces and corners of the box, so many first draws fall outside.
    unit = rng.uniform(0.0, 1.0, (50, 3))
    unit[:25] = rng.integers(0, 2, (25, 3))
    locations = (low + unit * (high - low)).astype(np.float32)
    sigma = 0.2
    children, parents, sigmas, fallback = as_numpy(
        amis(jax.random.key(0), locations, np.ones(50, np.float32), 4000, sigma, low, high, boundary="retry")
    )
    assert children.shape == (4000, 3) and parents.shape == (4000,) and sigmas.shape == (4000, 3)
    assert np.all(children >= low) and np.all(children <= high)
    assert not fallback
    assert np.all(sigmas == sigmas[:, :1])  # an isotropic σ shrinks in every coordinate together
    sigmas = sigmas[:, 0]
    allowed = sigma * 0.3 ** np.arange(6)
    assert np.all(np.min(np.abs(sigmas[:, None] - allowed[None, :]), axis=1) <= 1e-7)
    assert np.any(sigmas < sigma) and np.any(sigmas == np.float32(sigma))  # some retried, some did not
    kept_parent = np.all(children == locations[parents], axis=1)
    # Only children that exhausted every retry may sit exactly on their parent.
    assert np.all(np.isclose(sigmas[kept_parent], sigma * 0.3**5))


def test_children_match_the_gaussian_mixture_they_are_drawn_from() -> None:
    """No truncation (parents >= 8σ from every face): children ~ Σ_j w_j N(λ_j, σ²) in the unit cube."""
    rng = np.random.default_rng(2)
    n_window, dim, count, sigma = 6, 3, 6000, 0.03
    unit_locations = rng.uniform(0.25, 0.75, (n_window, dim))
    low = np.array([100.0, 0.0, -5.0])
    high = np.array([500.0, 1.0, 5.0])
    locations = (low + unit_locations * (high - low)).astype(np.float32)
    scores = np.array([1.0, 3.0, 0.5, 2.0, 0.0, 4.0], np.float32)
    children, parents, sigmas, _ = as_numpy(amis(jax.random.key(7), locations, scores, count, sigma, low, high))
    np.testing.assert_array_equal(sigmas, np.float32(sigma))  # nothing retried
    child_unit = (children - low) / (high - low)

    reference_rng = np.random.default_rng(12345)
    reference_parents = reference_rng.choice(n_window, size=count, p=scores / scores.sum())
    reference = unit_locations[reference_parents] + sigma * reference_rng.standard_normal((count, dim))
    for axis in range(dim):
        result = scipy_stats.ks_2samp(child_unit[:, axis], reference[:, axis])
        assert result.pvalue > P_MIN, f"coordinate {axis}: KS p = {result.pvalue}"
    # Given the parents, the offsets are N(0, σ²) in every coordinate.
    offsets = (child_unit - (locations[parents] - low) / (high - low)) / sigma
    result = scipy_stats.kstest(offsets.ravel(), "norm")
    assert result.pvalue > P_MIN, f"offsets/σ vs N(0, 1): KS p = {result.pvalue}"


def test_parents_are_drawn_in_proportion_to_the_scores() -> None:
    scores = np.array([1.0, 2.0, 0.0, 3.0, 4.0, 10.0, 0.0, 0.5], np.float32)
    locations = np.full((8, 5), 300.0, np.float32)
    count = 20000
    _, parents, _, fallback = as_numpy(amis(jax.random.key(11), locations, scores, count, 0.01, LOW, HIGH))
    assert not fallback
    observed = np.bincount(parents, minlength=8)
    assert observed[2] == 0 and observed[6] == 0  # zero score: never a parent
    positive = scores > 0
    expected = count * scores[positive] / scores[positive].sum()
    result = scipy_stats.chisquare(observed[positive], expected)
    assert result.pvalue > P_MIN, f"chi-square p = {result.pvalue}, observed {observed}"


def test_importance_weights_divide_the_scores_by_the_proposal_density() -> None:
    scores = np.array([2.0, 2.0, 1.0, 4.0], np.float32)
    density = np.array([1.0, 4.0, 0.5, 2.0], np.float32)
    locations = np.full((4, 5), 300.0, np.float32)
    count = 20000
    _, parents, _, _ = as_numpy(
        amis(
            jax.random.key(5),
            locations,
            scores,
            count,
            0.01,
            LOW,
            HIGH,
            importance_weights=True,
            proposal_density=density,
        )
    )
    weights = scores / density  # [2, 0.5, 2, 2]
    result = scipy_stats.chisquare(np.bincount(parents, minlength=4), count * weights / weights.sum())
    assert result.pvalue > P_MIN
    # Without the option the same scores give different frequencies (the density matters).
    _, plain, _, _ = as_numpy(amis(jax.random.key(5), locations, scores, count, 0.01, LOW, HIGH))
    assert scipy_stats.chisquare(np.bincount(plain, minlength=4), count * weights / weights.sum()).pvalue < 1e-6
    with pytest.raises(ValueError, match="pass proposal_density"):
        breed.amis_resample(jax.random.key(0), locations, scores, 4, 0.01, LOW, HIGH, importance_weights=True)
    with pytest.raises(ValueError, match="only used with importance_weights=True"):
        breed.amis_resample(jax.random.key(0), locations, scores, 4, 0.01, LOW, HIGH, proposal_density=density)


def test_retry_rule_out_of_bounds_after_every_retry_keeps_the_parent_location() -> None:
    """boundary="retry", a parent at a corner with a huge σ: all six draws leave the cube, so child = parent."""
    low = np.zeros(3, np.float32)
    high = np.ones(3, np.float32)
    corner = np.array([[0.0, 0.0, 1.0]], np.float32)
    sigma = 1e6
    children, parents, sigmas, _ = as_numpy(
        amis(jax.random.key(0), corner, np.ones(1, np.float32), 256, sigma, low, high, boundary="retry")
    )
    np.testing.assert_array_equal(parents, 0)
    np.testing.assert_array_equal(children, np.broadcast_to(corner, (256, 3)))
    np.testing.assert_allclose(sigmas, sigma * 0.3**5, rtol=1e-6)
    # max_retries = 0: one draw, then the parent, with σ unchanged.
    children, _, sigmas, _ = as_numpy(
        amis(jax.random.key(0), corner, np.ones(1, np.float32), 16, sigma, low, high, max_retries=0, boundary="retry")
    )
    np.testing.assert_array_equal(children, np.broadcast_to(corner, (16, 3)))
    np.testing.assert_array_equal(sigmas, np.float32(sigma))


def test_per_location_sigma_is_inherited_by_the_children() -> None:
    locations = np.full((2, 5), 300.0, np.float32)
    window_sigma = np.array([0.01, 0.001], np.float32)
    children, parents, sigmas, _ = as_numpy(
        amis(jax.random.key(2), locations, np.ones(2, np.float32), 500, window_sigma[:, None], LOW, HIGH)
    )
    np.testing.assert_array_equal(sigmas, np.broadcast_to(window_sigma[parents][:, None], (500, 5)))
    spread = [np.std((children[parents == j] - 300.0) / 400.0) for j in (0, 1)]
    np.testing.assert_allclose(spread, window_sigma, rtol=0.1)


@pytest.mark.parametrize(
    "scores", [np.zeros(5), np.full(5, np.nan), np.array([np.inf, 0, 0, 0, 0]), np.array([-1.0, -2, 0, 0, 0])]
)
def test_all_zero_or_non_finite_scores_fall_back_to_uniform_parents(scores: np.ndarray) -> None:
    locations = np.full((5, 5), 300.0, np.float32)
    count = 10000
    _, parents, _, fallback = as_numpy(
        amis(jax.random.key(8), locations, scores.astype(np.float32), count, 0.01, LOW, HIGH)
    )
    assert fallback
    assert scipy_stats.chisquare(np.bincount(parents, minlength=5)).pvalue > P_MIN


def test_non_finite_and_masked_scores_weigh_nothing() -> None:
    locations = np.full((5, 5), 300.0, np.float32)
    scores = np.array([1.0, np.nan, 1.0, 5.0, np.inf], np.float32)
    valid = np.array([True, True, True, False, True])
    _, parents, _, fallback = as_numpy(amis(jax.random.key(9), locations, scores, 5000, 0.01, LOW, HIGH, valid=valid))
    assert not fallback
    assert set(np.unique(parents)) == {0, 2}
    # Nothing usable and only two valid rows: uniform among the valid ones.
    _, parents, _, fallback = as_numpy(
        amis(
            jax.random.key(9),
            locations,
            np.zeros(5, np.float32),
            5000,
            0.01,
            LOW,
            HIGH,
            valid=np.array([False, True, False, False, True]),
        )
    )
    assert fallback and set(np.unique(parents)) == {1, 4}


def test_jitted_amis_compiles_once_for_fixed_shapes() -> None:
    traces = []

    @functools.wraps(breed.amis_resample)  # the signature lets jit map static_argnames to positions
    def counted(*args, **kwargs):
        traces.append(1)
        return breed.amis_resample(*args, **kwargs)

    jitted = jax.jit(counted, static_argnames=breed.AMIS_STATIC_ARGNAMES)
    rng = np.random.default_rng(3)
    for round_index in range(4):
        locations = rng.uniform(100.0, 500.0, (30, 5)).astype(np.float32)
        scores = rng.exponential(1.0, 30).astype(np.float32)
        draw = jitted(
            jax.random.fold_in(jax.random.key(0), round_index),
            locations,
            scores,
            20,
            jnp.float32(0.0125 * (round_index + 1)),
            LOW,
            HIGH,
        )
        jax.block_until_ready(draw)
    assert len(traces) == 1 and jitted._cache_size() == 1


def test_amis_rejects_mismatched_shapes_with_a_clear_message() -> None:
    locations = np.full((4, 5), 300.0, np.float32)
    with pytest.raises(ValueError, match=r"scores of shape \(4,\)"):
        breed.amis_resample(jax.random.key(0), locations, np.ones(3), 2, 0.01, LOW, HIGH)
    with pytest.raises(ValueError, match=r"low, high \[d\]"):
        breed.amis_resample(jax.random.key(0), locations, np.ones(4), 2, 0.01, LOW[:3], HIGH[:3])


def truncated_mixture_density(points_unit, centres_unit, sigmas, ratio):
    """scipy reference: r·mean_k Π_i truncnorm(x_i | c_ki, σ_ki on [0, 1]) + (1 − r), in the unit cube."""
    sigmas = np.broadcast_to(sigmas, centres_unit.shape)
    members = []
    for c, s in zip(centres_unit, sigmas, strict=True):
        a, b = (0.0 - c) / s, (1.0 - c) / s
        members.append(np.prod(scipy_stats.truncnorm(a, b, loc=c, scale=s).pdf(points_unit), axis=1))
    return ratio * np.mean(members, axis=0) + (1 - ratio)


def test_proposal_density_is_the_truncated_mixture_the_draws_come_from() -> None:
    """Members N(c_k, diag(σ_k²)) truncated to the cube (as amis_resample draws them), mixed with U at r."""
    rng = np.random.default_rng(4)
    low = np.array([0.0, 100.0])
    high = np.array([2.0, 500.0])
    # Centres near and on the faces, where truncation matters, and per-dimension σ.
    centres_unit = rng.uniform(0.0, 1.0, (7, 2))
    centres_unit[:2] = [[0.0, 0.03], [1.0, 1.0]]
    sigmas = rng.uniform(0.05, 0.3, (7, 2))
    points_unit = rng.uniform(0.0, 1.0, (11, 2))
    ratio = 0.7
    density = np.asarray(
        breed.proposal_density(
            low + points_unit * (high - low), low + centres_unit * (high - low), sigmas, low, high, ratio
        )
    )
    np.testing.assert_allclose(density, truncated_mixture_density(points_unit, centres_unit, sigmas, ratio), rtol=1e-4)
    # Points outside the cube have density 0; a scalar σ broadcasts like amis_resample's.
    outside = np.asarray(
        breed.proposal_density(np.array([[2.5, 300.0]]), ((low + high) / 2)[None], 0.1, low, high, ratio)
    )
    np.testing.assert_array_equal(outside, 0.0)
    scalar = np.asarray(
        breed.proposal_density(low + points_unit * (high - low), ((low + high) / 2)[None], 0.1, low, high)
    )
    np.testing.assert_allclose(
        scalar, truncated_mixture_density(points_unit, np.full((1, 2), 0.5), np.full((1, 2), 0.1), 1.0), rtol=1e-4
    )


def test_proposal_density_integrates_to_one_over_the_cube() -> None:
    """A density of the draws: with truncated members it integrates to 1 even for centres on a corner."""
    low, high = np.zeros(2), np.ones(2)
    grid = (np.arange(400) + 0.5) / 400
    points = np.stack(np.meshgrid(grid, grid), axis=-1).reshape(-1, 2)
    centres = np.array([[0.0, 0.0], [1.0, 0.4], [0.5, 0.5]])
    density = np.asarray(breed.proposal_density(points, centres, np.array([[0.1, 0.2]]), low, high, 0.6))
    assert density.mean() == pytest.approx(1.0, abs=2e-3)


def test_truncated_children_of_a_corner_parent_are_inside_and_spread() -> None:
    """Default boundary="truncate": a corner parent's children are half-normal offsets into the box, never it."""
    low, high = np.zeros(5, np.float32), np.ones(5, np.float32)
    corner = np.array([[0.0, 1.0, 0.0, 1.0, 1.0]], np.float32)
    sigma = 0.1
    children, parents, sigmas, _ = as_numpy(
        amis(jax.random.key(0), corner, np.ones(1, np.float32), 4000, sigma, low, high)
    )
    np.testing.assert_array_equal(parents, 0)
    assert np.all(children >= 0.0) and np.all(children <= 1.0)
    assert not np.any(np.all(children == corner, axis=1)), "a child kept its parent's location"
    np.testing.assert_array_equal(sigmas, np.float32(sigma))  # nothing shrinks: the parent's σ is passed on
    offsets = np.abs(children - corner) / sigma  # per coordinate, |N(0, 1)| conditioned on the box
    for axis in range(5):
        result = scipy_stats.kstest(offsets[:, axis], scipy_stats.truncnorm(0.0, 1.0 / sigma).cdf)
        assert result.pvalue > P_MIN, f"coordinate {axis}: KS p = {result.pvalue}"
    assert np.all(np.std(offsets, axis=0) > 0.5)  # spread on the scale of σ (half-normal: 0.60)


def test_truncated_children_near_a_face_follow_the_truncated_normal() -> None:
    """A parent 0.05 from a face with σ = 0.1 per dimension: the child's coordinate is exactly truncnorm."""
    low, high = np.zeros(2, np.float32), np.ones(2, np.float32)
    parent = np.array([[0.05, 0.5]], np.float32)
    sigma = np.array([[0.1, 0.02]], np.float32)
    children, _, _, _ = as_numpy(amis(jax.random.key(3), parent, np.ones(1, np.float32), 5000, sigma, low, high))
    near = scipy_stats.truncnorm(-0.5, 9.5, loc=0.05, scale=0.1)
    assert scipy_stats.kstest(children[:, 0], near.cdf).pvalue > P_MIN
    assert scipy_stats.kstest((children[:, 1] - 0.5) / 0.02, "norm").pvalue > P_MIN  # far from faces: N(0, σ²)
    # The paper's rule would shrink σ here; the truncated normal keeps its width.
    assert np.std(children[:, 0]) == pytest.approx(near.std(), rel=0.05)


def test_per_dimension_sigma_is_isotropic_in_physical_units() -> None:
    """A physical σ on parameters of unequal spans: unit_sigma gives σ/span_i, children spread σ in every unit."""
    low = np.array([100.0, 0.0, -50.0], np.float32)
    high = np.array([500.0, 40.0, 50.0], np.float32)
    sigma_unit = breed.unit_sigma(2.0, low, high)
    np.testing.assert_allclose(sigma_unit, [2.0 / 400, 2.0 / 40, 2.0 / 100])
    parent = ((low + high) / 2)[None]
    children, _, sigmas, _ = as_numpy(
        amis(jax.random.key(4), parent, np.ones(1, np.float32), 4000, np.asarray(sigma_unit, np.float32), low, high)
    )
    np.testing.assert_allclose(sigmas, np.broadcast_to(np.float32(sigma_unit), (4000, 3)))
    offsets = (children - parent) / 2.0  # physical offsets in units of the physical σ
    for axis in range(3):
        result = scipy_stats.kstest(offsets[:, axis], "norm")
        assert result.pvalue > P_MIN, f"coordinate {axis}: KS p = {result.pvalue}"
    with pytest.raises(ValueError, match=r"broadcastable to \[1, 3\]"):
        breed.amis_resample(jax.random.key(0), parent, np.ones(1), 2, np.ones(2), low, high)
    with pytest.raises(ValueError, match="boundary must be one of"):
        breed.amis_resample(jax.random.key(0), parent, np.ones(1), 2, 0.1, low, high, boundary="reflect")


# ----------------------------------------------------------------------------------------------
# Mixing
# ----------------------------------------------------------------------------------------------


def test_mixing_ratio_follows_the_corrected_schedule() -> None:
    values = [float(breed.mixing_ratio(s, 0.5, 0.9, 3)) for s in range(6)]
    np.testing.assert_allclose(values, [0.5, 0.5 + 0.4 / 3, 0.5 + 0.8 / 3, 0.9, 0.9, 0.9], rtol=1e-6)
    # Traceable: a round counter inside jit gives the same values.
    np.testing.assert_allclose(jax.jit(breed.mixing_ratio)(jnp.arange(6), 0.5, 0.9, 3.0), values, rtol=1e-6)
    # A decreasing schedule moves monotonically down to r_e and stays there.
    np.testing.assert_allclose(
        [float(breed.mixing_ratio(s, 1.0, 0.1, 5)) for s in (0, 5, 9)], [1.0, 0.1, 0.1], rtol=1e-6
    )
    with pytest.raises(ValueError, match="r_cycles"):
        breed.mixing_ratio(1, 0.5, 0.9, 0)


def test_mix_takes_a_child_with_probability_ratio() -> None:
    count = 20000
    children = np.zeros((count, 2), np.float32)
    uniform = np.ones((count, 2), np.float32)
    points, is_child = (np.asarray(x) for x in mix(jax.random.key(0), children, uniform, 0.7))
    np.testing.assert_array_equal(points[is_child], 0.0)
    np.testing.assert_array_equal(points[~is_child], 1.0)
    assert scipy_stats.binomtest(int(is_child.sum()), count, 0.7).pvalue > P_MIN
    _, all_children = mix(jax.random.key(1), children, uniform, 1.0)
    _, no_children = mix(jax.random.key(1), children, uniform, 0.0)
    assert bool(jnp.all(all_children)) and not bool(jnp.any(no_children))


# ----------------------------------------------------------------------------------------------
# Loss-deviation statistics
# ----------------------------------------------------------------------------------------------


def reference_stats(batches, n_simulations: int, n_steps: int):
    """Straightforward NumPy loops over rows: the paper's eqs. 4-6 with per-(sim, t) lists of δ."""
    deltas: dict[tuple[int, int], list[float]] = {}
    last_update = np.full(n_simulations, -1)
    for step, (losses, ids, weights) in enumerate(batches):
        rows = [i for i in range(len(losses)) if weights[i] > 0]
        w = np.array([weights[i] for i in rows], np.float64)
        l = np.array([losses[i] for i in rows], np.float64)
        mean = np.sum(w * l) / np.sum(w) if rows else 0.0
        std = np.sqrt(np.sum(w * (l - mean) ** 2) / np.sum(w)) if rows else 0.0
        for i in rows:
            if not 0 <= ids[i] < n_simulations * n_steps:
                continue
            sim, t = divmod(int(ids[i]), n_steps)
            delta = max(losses[i] - mean, 0.0) / std if std > 0 else 0.0
            deltas.setdefault((sim, t), []).append(delta)
            last_update[sim] = step
    delta_sum = np.zeros((n_simulations, n_steps))
    delta_count = np.zeros((n_simulations, n_steps), int)
    for (sim, t), values in deltas.items():
        delta_sum[sim, t] = sum(values)
        delta_count[sim, t] = len(values)
    scores = np.zeros(n_simulations)
    has_score = np.zeros(n_simulations, bool)
    for sim in range(n_simulations):
        means = [np.mean(deltas[(sim, t)]) for t in range(n_steps) if (sim, t) in deltas]
        if means:
            scores[sim] = np.mean(means)
            has_score[sim] = True
    return delta_sum, delta_count, last_update, scores, has_score


def random_batches(rng: np.random.Generator, count: int, batch_size: int, n_ids: int):
    """Batches with repeated ids, padding rows (weight 0) and a few out-of-range ids (-1, as the reservoir pads)."""
    batches = []
    for _ in range(count):
        losses = rng.exponential(1.0, batch_size).astype(np.float32)
        ids = rng.integers(0, n_ids // 2, batch_size)  # half the id range: many repeats
        ids[rng.random(batch_size) < 0.05] = -1
        weights = (rng.random(batch_size) < 0.85).astype(np.float32)
        batches.append((losses, ids.astype(np.int32), weights))
    return batches


def test_loss_stats_match_a_numpy_reference_with_repeated_ids() -> None:
    rng = np.random.default_rng(5)
    n_simulations, n_steps = 9, 7
    batches = random_batches(rng, 30, 48, n_simulations * n_steps)
    state = breed.init_loss_stats(n_simulations, n_steps)
    for batch in batches:
        state = update(state, *batch)
    delta_sum, delta_count, last_update, scores, has_score = reference_stats(batches, n_simulations, n_steps)
    np.testing.assert_array_equal(np.asarray(state.delta_count), delta_count)
    np.testing.assert_allclose(np.asarray(state.delta_sum), delta_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.last_update), last_update)
    assert int(state.n_updates) == len(batches)
    got_scores, got_has_score = scores_of(state)
    np.testing.assert_array_equal(np.asarray(got_has_score), has_score)
    assert has_score.any() and not has_score.all()  # the test covers both cases
    np.testing.assert_allclose(np.asarray(got_scores), scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(breed.delta_mean(state)),
        np.where(delta_count > 0, delta_sum / np.maximum(delta_count, 1), 0.0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_weighted_batch_statistics_and_degenerate_batches() -> None:
    state = breed.init_loss_stats(2, 2)
    # Weighted μ and σ: weight 3 on loss 0 and 1 on loss 4 -> μ = 1, σ = √3; δ(4) = 3/√3 = √3.
    state = update(
        state, np.array([0.0, 4.0], np.float32), np.array([0, 3], np.int32), np.array([3.0, 1.0], np.float32)
    )
    np.testing.assert_allclose(np.asarray(state.delta_sum), [[0.0, 0.0], [0.0, np.sqrt(3.0)]], rtol=1e-6)
    # Equal losses (σ = 0) and an all-padding batch add counts with δ = 0, or nothing, and no NaN.
    state = update(state, np.full(3, 0.7, np.float32), np.array([1, 1, 2], np.int32), np.ones(3, np.float32))
    state = update(state, np.array([5.0, 1.0], np.float32), np.array([0, 1], np.int32), np.zeros(2, np.float32))
    np.testing.assert_array_equal(np.asarray(state.delta_count), [[1, 2], [1, 1]])
    assert np.all(np.isfinite(np.asarray(state.delta_sum)))
    np.testing.assert_array_equal(np.asarray(state.last_update), [1, 1])
    assert int(state.n_updates) == 3


def test_merging_two_ranks_equals_computing_on_the_union() -> None:
    """Each step's global batch is split between two ranks that share its moments (an all-reduce of 3 scalars)."""
    rng = np.random.default_rng(6)
    n_simulations, n_steps = 6, 5
    batches = random_batches(rng, 25, 40, n_simulations * n_steps)
    union = breed.init_loss_stats(n_simulations, n_steps)
    ranks = [breed.init_loss_stats(n_simulations, n_steps) for _ in range(2)]
    moments_of = jax.jit(breed.loss_moments)
    for losses, ids, weights in batches:
        union = update(union, losses, ids, weights)
        parts = [slice(0, 17), slice(17, None)]  # unequal shares
        local = [moments_of(losses[p], weights[p]) for p in parts]
        total = jax.tree.map(lambda a, b: a + b, *local)
        ranks = [update(state, losses[p], ids[p], weights[p], total) for state, p in zip(ranks, parts, strict=True)]
    merged = breed.combine_loss_stats(ranks)
    np.testing.assert_array_equal(np.asarray(merged.delta_count), np.asarray(union.delta_count))
    np.testing.assert_allclose(np.asarray(merged.delta_sum), np.asarray(union.delta_sum), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(merged.last_update), np.asarray(union.last_update))
    assert int(merged.n_updates) == int(union.n_updates) == len(batches)
    np.testing.assert_allclose(np.asarray(scores_of(merged)[0]), np.asarray(scores_of(union)[0]), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="same"):
        breed.combine_loss_stats([union, breed.init_loss_stats(3, 5)])


def test_recent_window_takes_the_most_recently_updated_scored_simulations() -> None:
    state = breed.init_loss_stats(6, 2)
    for sim in (4, 1, 5, 0):  # update order; simulations 2 and 3 are never seen
        state = update(
            state, np.array([1.0, 3.0], np.float32), np.array([2 * sim, 2 * sim + 1], np.int32), np.ones(2, np.float32)
        )
    ids, valid = (np.asarray(x) for x in window_of(state, size=3))
    np.testing.assert_array_equal(ids, [0, 5, 1])
    assert valid.all()
    ids, valid = (np.asarray(x) for x in window_of(state, size=8))
    np.testing.assert_array_equal(ids[valid], [0, 5, 1, 4])
    assert valid.sum() == 4 and ids.shape == (8,)
    eligible = np.array([False, True, True, True, True, True])
    ids, valid = (np.asarray(x) for x in window_of(state, size=2, eligible=eligible))
    np.testing.assert_array_equal(ids, [5, 1])


def test_recent_window_admits_only_simulations_with_every_time_step_seen() -> None:
    """The paper's Λ_J^(i') (§3.1): a simulation with a time step never seen in a batch is not in the window."""
    state = breed.init_loss_stats(4, 3)
    # Simulation 2 is updated last and scores high, but its step 2 was never in a batch.
    for sim, steps in ((0, (0, 1, 2)), (1, (0, 1, 2)), (3, (0,)), (2, (0, 1))):
        ids = np.array([3 * sim + t for t in steps] + [11], np.int32)  # id 11: sim 3, step 2 (a low loss)
        losses = np.array([5.0] * len(steps) + [0.0], np.float32)
        state = update(state, losses, ids, np.ones(len(ids), np.float32))
    np.testing.assert_array_equal(np.asarray(breed.fully_observed(state)), [True, True, False, False])
    _, has_score = scores_of(state)
    assert bool(has_score[2])  # it has a score, from the steps it has
    ids, valid = (np.asarray(x) for x in window_of(state, size=4))
    np.testing.assert_array_equal(ids[valid], [1, 0])
    assert valid.sum() == 2


def test_loss_stats_update_compiles_once_and_rejects_bad_shapes() -> None:
    traces = []

    def counted(*args):
        traces.append(1)
        return breed.update_loss_stats(*args)

    jitted = jax.jit(counted)
    state = breed.init_loss_stats(4, 3)
    rng = np.random.default_rng(7)
    for _ in range(3):
        state = jitted(
            state, rng.random(8, np.float32), rng.integers(0, 12, 8).astype(np.int32), np.ones(8, np.float32)
        )
    assert len(traces) == 1
    with pytest.raises(ValueError, match=r"one shape \[B\]"):
        breed.update_loss_stats(state, np.ones(8), np.zeros(7, np.int32), np.ones(8))
    with pytest.raises(ValueError, match="n_simulations"):
        breed.init_loss_stats(0, 3)


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def test_config_defaults_are_table_1_and_sigma_converts_to_the_unit_cube() -> None:
    from jaxsurro.config import BreedConfig

    settings = BreedConfig()
    assert (settings.window, settings.period, settings.r_start, settings.r_end, settings.r_cycles) == (
        200,
        200,
        0.5,
        0.9,
        3.0,
    )
    assert settings.importance_weights is False
    assert breed.unit_sigma(settings.sigma, [100.0] * 5, [500.0] * 5) == pytest.approx((0.0125,) * 5)
    # Unequal spans: one unit-cube width per parameter (the paper's σ·I_d is in the parameter space).
    assert breed.unit_sigma(5.0, [0.0, 0.0], [1.0, 2.0]) == pytest.approx((5.0, 2.5))
    with pytest.raises(ValueError, match="low < high"):
        breed.unit_sigma(5.0, [0.0], [0.0])


def test_config_converts_breed_sigma_per_parameter() -> None:
    from pathlib import Path

    from jaxsurro.config import load_config

    heat = Path(__file__).resolve().parents[1] / "experiments/heat.toml"
    config = load_config(heat, ["solver.parameters.T1=[100.0, 140.0]", "solver.parameters.T2=[0.0, 4000.0]"])
    assert config.breed_sigma_unit == pytest.approx((0.0125, 0.125, 0.00125, 0.0125, 0.0125))
    assert load_config(heat, ["breed.sigma_unit=0.02"]).breed_sigma_unit == pytest.approx((0.02,) * 5)
