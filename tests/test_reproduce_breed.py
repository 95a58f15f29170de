"""The pure parts of ``scripts/reproduce_breed.py``: Breed's score on a pool, and coverage of a test set."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script() -> ModuleType:
    """The script as a module (scripts/ is not a package; it imports scripts/compare_breed.py by name)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("reproduce_breed", ROOT / "scripts" / "reproduce_breed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script()


def test_breed_scores_are_the_mean_excess_loss_over_a_simulations_steps(script):
    """δ = max(l − μ, 0)/σ over all rows, then the mean over each simulation's steps (core.breed's rule)."""
    losses = np.array([1.0, 1.0, 1.0, 5.0, 3.0, 1.0])  # two simulations of three steps
    mean, std = losses.mean(), losses.std()
    expected = [np.mean(np.maximum(losses[:3] - mean, 0) / std), np.mean(np.maximum(losses[3:] - mean, 0) / std)]
    np.testing.assert_allclose(script.breed_scores(losses.reshape(2, 3)), expected)
    assert script.breed_scores(losses.reshape(2, 3))[0] == 0.0  # never above the mean: no score


def test_nearest_distance_measures_coverage_in_the_unit_cube(script):
    low, high = np.array([100.0, 0.0]), np.array([500.0, 1.0])
    points = np.array([[100.0, 0.0], [500.0, 1.0]])
    spread = np.array([[100.0, 0.0], [500.0, 1.0]])  # on both points
    clustered = np.array([[100.0, 0.0], [100.0, 0.1]])  # both near the first
    assert script.nearest_distance(points, spread, low, high) == 0.0
    assert script.nearest_distance(points, clustered, low, high) == pytest.approx((0.0 + np.hypot(1.0, 0.9)) / 2)
