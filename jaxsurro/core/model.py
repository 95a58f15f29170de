"""Surrogate networks: map (physical parameters λ, physical time t) to a physical field.

Scaling comes from known bounds, never from data, so a network trained online on a
stream needs no statistics pass and gives the same normalization on every rank:

    x̂_i = (λ_i − low_i) / (high_i − low_i),   t̂ = t / time_scale,
    û = (u − field_low) / (field_high − field_low)

The network works in normalized units (inputs and outputs in [0, 1]-ish, so losses are
O(1) whatever the temperature scale) and maps its output back to physical units.

Model contract (what `jaxsurro.core.train` relies on, and what a model registered with
`register_model` must provide): a `flax.linen.Module` with a `scaling: Scaling` field
whose `__call__(inputs [B, d+1] float32, normalized_output: bool = False)` returns the
field `[B, *field_shape]`, in physical units or, with `normalized_output=True`, in the
normalized units of `normalize_field`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "MLP",
    "MODELS",
    "Scaling",
    "denormalize_field",
    "heat_equation_scaling",
    "make_model",
    "normalize_field",
    "normalize_inputs",
    "register_model",
]


class Scaling(NamedTuple):
    """Known bounds that fix the input and output scaling of a surrogate (no data statistics)."""

    param_low: tuple[float, ...]  # [d] lower bound of each physical parameter
    param_high: tuple[float, ...]  # [d] upper bound of each physical parameter
    time_scale: float  # final physical time T·Δt; time t maps to t / time_scale
    field_low: float  # lowest value the field can take (physical units)
    field_high: float  # highest value the field can take (physical units)

    @property
    def num_params(self) -> int:
        """Number of physical parameters d (the model input has d + 1 columns)."""
        return len(self.param_low)

    def validate(self) -> Scaling:
        """Check that every bound is finite and ordered; return self so calls can chain."""
        if len(self.param_low) != len(self.param_high) or not self.param_low:
            raise ValueError(
                f"Scaling needs one (low, high) pair per parameter; got {len(self.param_low)} "
                f"lows {self.param_low} and {len(self.param_high)} highs {self.param_high}. "
                "Pass tuples of equal, non-zero length."
            )
        for index, (low, high) in enumerate(zip(self.param_low, self.param_high, strict=True)):
            if not (math.isfinite(low) and math.isfinite(high) and high > low):
                raise ValueError(
                    f"Scaling expects finite param_low[{index}] < param_high[{index}]; got "
                    f"{low} and {high}. Fix the parameter bounds in the config."
                )
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(
                f"Scaling expects a finite time_scale > 0 (the final physical time T·Δt); got "
                f"{self.time_scale}."
            )
        if not (
            math.isfinite(self.field_low)
            and math.isfinite(self.field_high)
            and self.field_high > self.field_low
        ):
            raise ValueError(
                f"Scaling expects finite field_low < field_high; got {self.field_low} and "
                f"{self.field_high}. Give the known range of the output field."
            )
        return self


def heat_equation_scaling(
    param_low: tuple[float, ...], param_high: tuple[float, ...], time_scale: float
) -> Scaling:
    """Scaling for the heat equation whose parameters are temperatures (initial, boundaries).

    By the maximum principle the field stays within [min(param_low), max(param_high)].
    """
    low = tuple(float(value) for value in param_low)
    high = tuple(float(value) for value in param_high)
    return Scaling(
        param_low=low,
        param_high=high,
        time_scale=float(time_scale),
        field_low=min(low),
        field_high=max(high),
    ).validate()


def normalize_inputs(inputs: jax.Array, scaling: Scaling) -> jax.Array:
    """Map [B, d+1] physical (parameters, time) to [0, 1]: params by bounds, time by time_scale."""
    low = jnp.asarray(scaling.param_low + (0.0,), dtype=inputs.dtype)
    span = jnp.asarray(
        tuple(h - l for l, h in zip(scaling.param_low, scaling.param_high, strict=True))
        + (scaling.time_scale,),
        dtype=inputs.dtype,
    )
    return (inputs - low) / span


def normalize_field(field: jax.Array, scaling: Scaling) -> jax.Array:
    """Physical field → normalized units: û = (u − field_low) / (field_high − field_low)."""
    return (field - scaling.field_low) / (scaling.field_high - scaling.field_low)


def denormalize_field(normalized: jax.Array, scaling: Scaling) -> jax.Array:
    """Inverse of `normalize_field`: u = field_low + û · (field_high − field_low)."""
    return scaling.field_low + normalized * (scaling.field_high - scaling.field_low)


class MLP(nn.Module):
    """The papers' surrogate: normalized (λ, t) → `layers` × Dense(`hidden`)+ReLU → Dense(M·M)."""

    field_shape: tuple[int, ...]  # shape of one output field, e.g. (64, 64)
    scaling: Scaling
    hidden: int = 256
    layers: int = 2

    @nn.compact
    def __call__(self, inputs: jax.Array, normalized_output: bool = False) -> jax.Array:
        """[B, d+1] physical (params, time) → [B, *field_shape] field (physical or normalized)."""
        self.scaling.validate()  # Python-level check, runs once per trace
        expected_columns = self.scaling.num_params + 1
        if inputs.ndim != 2 or inputs.shape[-1] != expected_columns:
            raise ValueError(
                f"MLP expects inputs of shape [batch, {expected_columns}] (the "
                f"{self.scaling.num_params} parameters then the time); got {inputs.shape}. "
                "Stack parameters and time per row, and use jax.vmap for extra batch axes."
            )
        hidden_activations = normalize_inputs(inputs.astype(jnp.float32), self.scaling)
        for layer_index in range(self.layers):
            hidden_activations = nn.Dense(self.hidden, name=f"hidden_{layer_index}")(
                hidden_activations
            )
            hidden_activations = nn.relu(hidden_activations)
        flat = nn.Dense(math.prod(self.field_shape), name="output")(hidden_activations)
        normalized = flat.reshape((inputs.shape[0], *self.field_shape))
        if normalized_output:
            return normalized
        return denormalize_field(normalized, self.scaling)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP}


def register_model(name: str, constructor: Callable[..., nn.Module]) -> None:
    """Make another architecture available to `make_model` (it must follow the model contract)."""
    if name in MODELS:
        raise ValueError(
            f"A model named {name!r} is already registered ({MODELS[name]!r}); pick another name."
        )
    MODELS[name] = constructor


def make_model(name: str, **kwargs) -> nn.Module:
    """Build a registered surrogate by name: make_model("mlp", field_shape=(64, 64), scaling=s)."""
    if name not in MODELS:
        raise ValueError(
            f"Unknown model {name!r}; known models: {sorted(MODELS)}. "
            "Register new architectures with jaxsurro.core.model.register_model."
        )
    scaling = kwargs.get("scaling")
    if scaling is not None:
        if not isinstance(scaling, Scaling):
            raise TypeError(
                f"make_model expects scaling to be a jaxsurro.core.model.Scaling; got "
                f"{type(scaling).__name__}."
            )
        scaling.validate()
    return MODELS[name](**kwargs)
