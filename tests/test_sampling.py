"""Samplers: bounded, seeded, and with the distribution properties of their kind."""

import numpy as np
import pytest
from scipy import stats

from jaxsurro.core.sampling import SAMPLER_KINDS, BoxSampler, sample

LOW = [100.0, 100.0, 0.0, -1.0, 100.0]
HIGH = [500.0, 500.0, 1.0, 1.0, 101.0]


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_same_seed_same_sequence_and_within_bounds(kind):
    first = sample(kind, 64, LOW, HIGH, seed=7)
    again = sample(kind, 64, LOW, HIGH, seed=7)
    other = sample(kind, 64, LOW, HIGH, seed=8)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == (64, 5)
    assert np.all(first >= LOW) and np.all(first <= HIGH)


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_successive_draws_are_reproducible(kind):
    a, b = BoxSampler(kind, LOW, HIGH, seed=3), BoxSampler(kind, LOW, HIGH, seed=3)
    np.testing.assert_array_equal(np.vstack([a.draw(5), a.draw(7)]), np.vstack([b.draw(5), b.draw(7)]))


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_marginals_are_uniform(kind):
    points = BoxSampler(kind, [0.0] * 3, [1.0] * 3, seed=0).unit(512)
    for column in points.T:
        assert stats.kstest(column, "uniform").pvalue > 1e-3


def test_halton_and_lhs_cover_the_cube_better_than_uniform():
    n, d = 256, 5
    discrepancy = {
        kind: stats.qmc.discrepancy(BoxSampler(kind, [0] * d, [1] * d, seed=1).unit(n)) for kind in SAMPLER_KINDS
    }
    assert discrepancy["halton"] < discrepancy["uniform"]
    assert discrepancy["lhs"] < discrepancy["uniform"]


def test_lhs_is_stratified():
    n = 50
    points = BoxSampler("lhs", [0.0, 0.0], [1.0, 1.0], seed=0).unit(n)
    for column in points.T:
        np.testing.assert_array_equal(np.sort(np.floor(column * n)), np.arange(n))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "sobol"}, "unknown sampler 'sobol'"),
        ({"low": [1.0, 0.0], "high": [0.0, 1.0]}, "dimensions [0]"),
        ({"low": [0.0], "high": [1.0, 2.0]}, "same non-zero length"),
    ],
)
def test_bad_arguments_are_explained(kwargs, message):
    args = {"kind": "uniform", "low": [0.0, 0.0], "high": [1.0, 1.0], "seed": 0} | kwargs
    with pytest.raises(ValueError) as info:
        BoxSampler(**args)
    assert message in str(info.value)
