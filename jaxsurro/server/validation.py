"""The fixed validation set: Halton parameters run through the same solver and client path, cached.

The set depends only on the solver (its command and the files it names), the
physics settings, the parameter bounds and the number of simulations, so it is
cached under a key made of exactly those and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxsurro.config import Config
from jaxsurro.core import sampling
from jaxsurro.core.model import Scaling

log = logging.getLogger("jaxsurro.server.validation")


class ValidationSet(NamedTuple):
    parameters: np.ndarray  # [V, d] float64
    samples: np.ndarray  # [V, T, sample_size] float32: every field after step t, flat, at index t

    def inputs(self, dt: float) -> np.ndarray:
        """Model inputs [V*T, d+1] float32: each simulation's parameters and the time (t+1)*dt."""
        n_sims, n_steps = self.samples.shape[:2]
        times = (np.arange(n_steps) + 1) * dt
        rows = np.empty((n_sims, n_steps, self.parameters.shape[1] + 1), dtype=np.float32)
        rows[:, :, :-1] = self.parameters[:, None, :]
        rows[:, :, -1] = times[None, :]
        return rows.reshape(n_sims * n_steps, -1)

    def targets(self) -> np.ndarray:
        """Targets [V*T, sample_size] float32 in the order of :meth:`inputs`."""
        return self.samples.reshape(-1, self.samples.shape[-1])


def validation_parameters(config: Config) -> np.ndarray:
    """The Halton parameters of the validation simulations."""
    return sampling.validation_parameters(config.train.n_validation, config.solver.low, config.solver.high)


def cache_key(config: Config, root: Path | None = None) -> str:
    """A digest of everything that determines the validation set, solver files' contents included.

    Command arguments that name files (relative to ``root``, default the working directory, where
    the launcher starts the solvers) enter by content, so editing the solver invalidates the cache.
    """
    root = Path.cwd() if root is None else root
    solver = config.solver
    files = {}
    for part in solver.argv(python="python"):
        path = root / part
        if path.is_file():
            files[part] = hashlib.sha256(path.read_bytes()).hexdigest()
    description = {
        "command": list(solver.command),
        "files": files,
        "parameters": {k: list(v) for k, v in solver.parameters.items()},
        "fields": {name: list(shape) for name, shape in solver.field_shapes.items()},
        "grid_size": solver.grid_size,
        "n_steps": solver.n_steps,
        "dt": solver.dt,
        "wire_dtype": solver.wire_dtype,
        "n_validation": config.train.n_validation,
        "seed": sampling.VALIDATION_SEED,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(config: Config) -> Path:
    return Path(config.study.cache_dir) / f"validation-{config.study.name}-{cache_key(config)}.npz"


def load_cached(config: Config) -> ValidationSet | None:
    """The cached validation set for this configuration, or None when there is none (or it is unusable)."""
    path = cache_path(config)
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            cached = ValidationSet(data["parameters"], data["samples"])
    except (OSError, KeyError, ValueError) as exc:
        log.warning("ignoring the unreadable validation cache %s (%s); producing it again", path, exc)
        return None
    expected = (config.train.n_validation, config.solver.n_steps, config.solver.sample_size)
    if cached.samples.shape != expected or not np.array_equal(cached.parameters, validation_parameters(config)):
        log.warning("ignoring the validation cache %s: it does not match this configuration", path)
        return None
    return cached


def save(config: Config, validation: ValidationSet) -> Path:
    """Writes the set atomically (temporary file, then rename) so an interrupted run leaves no torn cache."""
    path = cache_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, parameters=validation.parameters, samples=validation.samples)
    partial.replace(path)
    return path


def mean_field_mse(validation: ValidationSet, scaling: Scaling, field_weights: Sequence[float]) -> float:
    """The baseline: the MSE (normalized units, fields mixed by their loss weights) of predicting the mean field."""
    low, span = scaling.element_bounds()
    normalized = (validation.targets().astype(np.float64) - low) / span
    squared = (normalized - normalized.mean(axis=0)) ** 2
    bounds = np.cumsum((0, *scaling.field_sizes))
    per_field = np.array([squared[:, bounds[f] : bounds[f + 1]].mean() for f in range(len(bounds) - 1)])
    weights = np.asarray(field_weights, dtype=np.float64)
    return float(per_field @ weights / weights.sum())


def per_step_mean_field_mse(validation: ValidationSet, scaling: Scaling, field_weights: Sequence[float]) -> float:
    """A stronger baseline: the MSE of predicting, at each time step, the validation set's mean field at that step.

    The "time-resolved mean field" predictor ignores the parameters and knows only the time:
    f(λ, t) = mean over the V validation simulations of their fields after step t. Like
    :func:`mean_field_mse` (which predicts one mean over every simulation *and* step) it is scored in
    normalized units, fields mixed by their loss weights, over the same V × T rows; it is never
    worse than :func:`mean_field_mse`, and for a solution that mostly relaxes in time from a
    parameter-independent start (the heat equation's mean temperature) it is much better, so a
    surrogate that does not beat it has learnt little about the parameters.
    """
    return _stepwise_mse(validation, scaling, field_weights, lambda fields: fields.mean(axis=0))


def parameter_mean_mse(validation: ValidationSet, scaling: Scaling, field_weights: Sequence[float]) -> float:
    """The baseline of a predictor that fills every field with the mean of the simulation's parameters.

    Meaningful when the parameters are in the fields' units (the heat equation's initial and boundary
    temperatures: the field relaxes toward a mix of them); scored like :func:`mean_field_mse`.
    """
    guess = validation.parameters.mean(axis=1)[:, None]  # [V, 1], physical units
    return _stepwise_mse(validation, scaling, field_weights, lambda fields: guess)


def _stepwise_mse(
    validation: ValidationSet,
    scaling: Scaling,
    field_weights: Sequence[float],
    predict: Callable[[np.ndarray], np.ndarray],
) -> float:
    """The MSE (normalized units, fields mixed by their loss weights) of ``predict``, which maps one time
    step's fields [V, sample_size] (physical, float64) to its prediction of them (broadcastable).

    Computed one time step at a time, so memory stays at one step of the set."""
    _, span = scaling.element_bounds()  # the offset cancels in a difference
    bounds = np.cumsum((0, *scaling.field_sizes))
    n_fields = len(bounds) - 1
    squared_sums = np.zeros(n_fields, dtype=np.float64)
    n_sims, n_steps = validation.samples.shape[:2]
    for t in range(n_steps):
        fields = validation.samples[:, t].astype(np.float64)
        squared = ((fields - predict(fields)) / span) ** 2  # [V, sample_size]
        squared_sums += [squared[:, bounds[f] : bounds[f + 1]].sum() for f in range(n_fields)]
    per_field = squared_sums / (n_sims * n_steps * np.diff(bounds))
    weights = np.asarray(field_weights, dtype=np.float64)
    return float(per_field @ weights / weights.sum())
