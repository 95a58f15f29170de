"""The trained surrogate as a product: load a run directory, predict fields in physical units.

    from jaxsurro import surrogate
    model = surrogate.load("runs/heat-20261203-101500")
    fields = model.predict(parameters=[[300, 100, 500, 200, 400]], times=[0.1, 0.25])
    fields["temperature"].shape      # (1, 2, 32, 32): [parameter sets, times, *field shape]

A run directory holds the model's description (``model.json``: architecture, fields,
scaling) and its trained parameters (``params.msgpack``); :func:`load` rebuilds the
network from them. The model's time input is the physical time: step ``t`` of a
simulation (0-based) is at time ``(t + 1) * dt`` (:meth:`Surrogate.step_times`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from jaxsurro import rundir
from jaxsurro.core.fields import FieldSpec, split_fields
from jaxsurro.core.model import Scaling, model_from_description

__all__ = ["Surrogate", "load"]


class Surrogate:
    """A trained network with its fields and scaling; :meth:`apply` is pure and jittable."""

    def __init__(self, model: nn.Module, params: Any, parameter_names: Sequence[str], dt: float, n_steps: int):
        self.model = model
        self.params = params
        self.parameter_names = tuple(parameter_names)
        self.dt = float(dt)
        self.n_steps = int(n_steps)
        self._apply = jax.jit(self.apply)

    @property
    def fields(self) -> tuple[FieldSpec, ...]:
        return self.model.fields

    @property
    def scaling(self) -> Scaling:
        return self.model.scaling

    def apply(self, params: Any, inputs: jax.Array) -> jax.Array:
        """Pure: ``inputs [B, d+1]`` (physical parameters, then physical time) -> flat fields ``[B, sample_size]``."""
        return self.model.apply(params, inputs)

    def step_times(self, steps: Sequence[int] | None = None) -> np.ndarray:
        """Physical times of 0-based time steps (all of a simulation's by default): ``(t + 1) * dt``."""
        steps = np.arange(self.n_steps) if steps is None else np.asarray(steps)
        return (steps + 1) * self.dt

    def predict(self, parameters: Any, times: Any) -> dict[str, np.ndarray]:
        """Every field at each (parameter set, time): ``{name: [P, T, *shape]}`` in physical units.

        ``parameters`` is ``[P, d]`` (or one set ``[d]``), ``times`` ``[T]`` physical times.
        """
        parameters = np.atleast_2d(np.asarray(parameters, dtype=np.float32))
        times = np.atleast_1d(np.asarray(times, dtype=np.float32))
        if parameters.shape[1] != len(self.parameter_names):
            raise ValueError(
                f"parameters must have {len(self.parameter_names)} columns "
                f"({', '.join(self.parameter_names)}), got shape {parameters.shape}"
            )
        n_sets, n_times = len(parameters), len(times)
        inputs = np.empty((n_sets, n_times, parameters.shape[1] + 1), dtype=np.float32)
        inputs[:, :, :-1] = parameters[:, None, :]
        inputs[:, :, -1] = times[None, :]
        rows = self._apply(self.params, jnp.asarray(inputs.reshape(n_sets * n_times, -1)))
        return {
            name: np.asarray(value).reshape(n_sets, n_times, *value.shape[1:])
            for name, value in split_fields(np.asarray(rows), self.fields).items()
        }


def load(run_dir: str | Path) -> Surrogate:
    """The surrogate trained in ``run_dir`` (its ``model.json``, ``params.msgpack`` and ``config.toml``)."""
    run_dir = Path(run_dir)
    missing = [name for name in (rundir.MODEL, rundir.PARAMS, rundir.CONFIG) if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} is not a finished run directory: {', '.join(missing)} missing "
            "(parameters are written when a run ends or is interrupted)"
        )
    description = json.loads((run_dir / rundir.MODEL).read_text())
    model = model_from_description(description)
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, model.scaling.num_params + 1)))
    params = serialization.from_state_dict(
        template, serialization.msgpack_restore((run_dir / rundir.PARAMS).read_bytes())
    )
    return Surrogate(model, params, description["parameter_names"], description["dt"], description["n_steps"])
