"""Surrogate networks: map (physical parameters λ, physical time t) to every field of a time step.

A sample is the flat row of the experiment's fields (:mod:`jaxsurro.core.fields`). Scaling
is fixed before training starts, so every rank normalizes alike and the stream needs
no statistics pass:

    x̂_i = (λ_i − low_i) / (high_i − low_i),   t̂ = t / time_scale,
    û_f = (u_f − field_low_f) / (field_high_f − field_low_f)   for each field f

Parameter bounds and the time range come from the experiment; each field's range from
the validation set or a declared ``model.output_range`` (see ``docs/architecture.md``,
"Training"). The network works in normalized units (losses are O(1) whatever the
physical scale of each field) and maps its output back to physical units.

Model contract (what :mod:`jaxsurro.core.train` relies on, and what a model registered
with :func:`register_model` or named ``"module:factory"`` must provide): a
``flax.linen.Module`` with ``fields: tuple[FieldSpec, ...]`` and ``scaling: Scaling``
attributes whose ``__call__(inputs [B, d+1] float32, normalized_output: bool = False)``
returns flat rows ``[B, sample_size]`` in physical units or, with
``normalized_output=True``, in the normalized units of :func:`normalize_field`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsurro.core.fields import FieldSpec, sample_size

__all__ = [
    "MLP",
    "MODELS",
    "ConvDecoder",
    "Scaling",
    "denormalize_field",
    "make_model",
    "normalize_field",
    "normalize_inputs",
    "register_model",
]


class Scaling(NamedTuple):
    """The fixed input and output scaling of a surrogate, in physical units."""

    param_low: tuple[float, ...]  # [d] lower bound of each physical parameter
    param_high: tuple[float, ...]  # [d] upper bound of each physical parameter
    time_scale: float  # final physical time T·Δt; time t maps to t / time_scale
    field_low: tuple[float, ...]  # [F] low end of each field's range (physical units)
    field_high: tuple[float, ...]  # [F] high end of each field's range
    field_sizes: tuple[int, ...]  # [F] elements of each field in the flat sample row

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
                f"Scaling expects a finite time_scale > 0 (the final physical time T·Δt); got {self.time_scale}."
            )
        if not (len(self.field_low) == len(self.field_high) == len(self.field_sizes) > 0):
            raise ValueError(
                f"Scaling needs one (low, high, size) per field; got {len(self.field_low)} lows, "
                f"{len(self.field_high)} highs and {len(self.field_sizes)} sizes."
            )
        for index, (low, high) in enumerate(zip(self.field_low, self.field_high, strict=True)):
            if not (math.isfinite(low) and math.isfinite(high) and high > low):
                raise ValueError(
                    f"Scaling expects finite field_low[{index}] < field_high[{index}]; got {low} and "
                    f"{high}. Give the field's range (model.output_range) or check its validation data."
                )
        return self

    def element_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-element low and span of the flat sample row, ``[sample_size]`` float32 each (host constants)."""
        sizes = np.asarray(self.field_sizes)
        low = np.repeat(np.asarray(self.field_low, np.float32), sizes)
        span = np.repeat(np.asarray(self.field_high, np.float32) - np.asarray(self.field_low, np.float32), sizes)
        return low, span


def normalize_inputs(inputs: jax.Array, scaling: Scaling) -> jax.Array:
    """Map [B, d+1] physical (parameters, time) to [0, 1]: params by bounds, time by time_scale."""
    low = jnp.asarray(scaling.param_low + (0.0,), dtype=inputs.dtype)
    span = jnp.asarray(
        tuple(h - l for l, h in zip(scaling.param_low, scaling.param_high, strict=True)) + (scaling.time_scale,),
        dtype=inputs.dtype,
    )
    return (inputs - low) / span


def normalize_field(rows: jax.Array, scaling: Scaling) -> jax.Array:
    """Physical flat rows ``[..., sample_size]`` -> normalized: û_f = (u_f − low_f) / (high_f − low_f)."""
    low, span = scaling.element_bounds()
    return (rows - low) / span


def denormalize_field(normalized: jax.Array, scaling: Scaling) -> jax.Array:
    """Inverse of :func:`normalize_field`: u_f = low_f + û_f · (high_f − low_f)."""
    low, span = scaling.element_bounds()
    return low + normalized * span


def _check_inputs(name: str, inputs: jax.Array, scaling: Scaling) -> None:
    expected_columns = scaling.num_params + 1
    if inputs.ndim != 2 or inputs.shape[-1] != expected_columns:
        raise ValueError(
            f"{name} expects inputs of shape [batch, {expected_columns}] (the {scaling.num_params} "
            f"parameters then the time); got {inputs.shape}. Stack parameters and time per row, and use "
            "jax.vmap for extra batch axes."
        )


def _check_layout(fields: Sequence[FieldSpec], scaling: Scaling) -> None:
    sizes = tuple(spec.size for spec in fields)
    if sizes != tuple(scaling.field_sizes):
        raise ValueError(f"the model's fields have sizes {sizes} but its scaling was made for {scaling.field_sizes}")


class MLP(nn.Module):
    """The papers' surrogate: normalized (λ, t) → ``layers`` × Dense(``hidden``)+ReLU → one Dense block per field."""

    fields: tuple[FieldSpec, ...]
    scaling: Scaling
    hidden: int = 256
    layers: int = 2

    @nn.compact
    def __call__(self, inputs: jax.Array, normalized_output: bool = False) -> jax.Array:
        """[B, d+1] physical (params, time) → [B, sample_size] flat fields (physical or normalized)."""
        self.scaling.validate()  # Python-level checks, run once per trace
        _check_layout(self.fields, self.scaling)
        _check_inputs("MLP", inputs, self.scaling)
        activations = normalize_inputs(inputs.astype(jnp.float32), self.scaling)
        for layer_index in range(self.layers):
            activations = nn.relu(nn.Dense(self.hidden, name=f"hidden_{layer_index}")(activations))
        blocks = [nn.Dense(spec.size, name=f"output_{index}")(activations) for index, spec in enumerate(self.fields)]
        normalized = jnp.concatenate(blocks, axis=-1) if len(blocks) > 1 else blocks[0]
        return normalized if normalized_output else denormalize_field(normalized, self.scaling)


class ConvDecoder(nn.Module):
    """A decoder for fields on one grid: (λ, t) → Dense → a coarse grid → 2 × (ConvTranspose ×2 + ReLU) → Conv.

    Every field must be 1-D or 2-D on the same grid; each field is one output channel. The
    coarse grid is the field grid divided by 4 (rounded up), so each layer sees local
    structure, with far fewer parameters than an MLP's dense output layer on large grids.
    """

    fields: tuple[FieldSpec, ...]
    scaling: Scaling
    hidden: int = 256
    layers: int = 2
    channels: int = 32

    @nn.compact
    def __call__(self, inputs: jax.Array, normalized_output: bool = False) -> jax.Array:
        """[B, d+1] physical (params, time) → [B, sample_size] flat fields (physical or normalized)."""
        self.scaling.validate()
        _check_layout(self.fields, self.scaling)
        _check_inputs("ConvDecoder", inputs, self.scaling)
        grid = conv_grid(self.fields)
        coarse = tuple(-(-n // 4) for n in grid)
        activations = normalize_inputs(inputs.astype(jnp.float32), self.scaling)
        for layer_index in range(self.layers):
            activations = nn.relu(nn.Dense(self.hidden, name=f"hidden_{layer_index}")(activations))
        activations = nn.Dense(math.prod(coarse) * self.channels, name="to_grid")(activations)
        activations = nn.relu(activations.reshape(inputs.shape[0], *coarse, self.channels))
        window = (3,) * len(grid)
        for stage in range(2):
            activations = nn.ConvTranspose(
                self.channels, window, strides=(2,) * len(grid), padding="SAME", name=f"upsample_{stage}"
            )(activations)
            activations = nn.relu(activations)
        out = nn.Conv(len(self.fields), window, padding="SAME", name="output")(activations)
        out = out[(slice(None), *(slice(0, n) for n in grid))]  # crop the grid rounded up to multiples of 4
        blocks = [out[..., index].reshape(inputs.shape[0], -1) for index in range(len(self.fields))]
        normalized = jnp.concatenate(blocks, axis=-1)
        return normalized if normalized_output else denormalize_field(normalized, self.scaling)


def conv_grid(fields: Sequence[FieldSpec]) -> tuple[int, ...]:
    """The one 1-D or 2-D grid that every field of a :class:`ConvDecoder` shares; ValueError otherwise."""
    shapes = {spec.shape for spec in fields}
    if len(shapes) != 1 or len(next(iter(shapes))) not in (1, 2):
        raise ValueError(
            "model 'conv' needs every field on one 1-D or 2-D grid; the fields are "
            f'{[(spec.name, spec.shape) for spec in fields]}. Use model.name = "mlp" for other layouts.'
        )
    return next(iter(shapes))


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "conv": ConvDecoder}


def register_model(name: str, constructor: Callable[..., nn.Module]) -> None:
    """Make another architecture available to :func:`make_model` (it must follow the model contract)."""
    if name in MODELS:
        raise ValueError(f"A model named {name!r} is already registered ({MODELS[name]!r}); pick another name.")
    MODELS[name] = constructor


def model_constructor(name: str) -> Callable[..., nn.Module]:
    """The constructor called ``name``: a registered name, or ``"package.module:attribute"`` imported."""
    if name in MODELS:
        return MODELS[name]
    module_name, colon, attribute = name.partition(":")
    if not colon:
        raise ValueError(
            f"Unknown model {name!r}; known models: {sorted(MODELS)}. Register new architectures with "
            "jaxsurro.core.model.register_model, or name one as 'package.module:factory'."
        )
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model {name!r}: cannot load {attribute!r} from module {module_name!r}: {exc}") from None


def make_model(name: str, *, fields: Sequence[FieldSpec], scaling: Scaling, **kwargs) -> nn.Module:
    """Build a surrogate by name: ``make_model("mlp", fields=(FieldSpec("u", (64, 64)),), scaling=s)``."""
    constructor = model_constructor(name)
    if not isinstance(scaling, Scaling):
        raise TypeError(
            f"make_model expects scaling to be a jaxsurro.core.model.Scaling; got {type(scaling).__name__}."
        )
    fields = tuple(FieldSpec(spec.name, tuple(spec.shape)) for spec in fields)
    scaling.validate()
    _check_layout(fields, scaling)
    if constructor is ConvDecoder:
        conv_grid(fields)
    if sample_size(fields) < 1:
        raise ValueError("a surrogate needs at least one field element to predict")
    return constructor(fields=fields, scaling=scaling, **kwargs)


def describe_model(name: str, fields: Sequence[FieldSpec], scaling: Scaling, **kwargs) -> dict:
    """A JSON-ready description from which :func:`model_from_description` rebuilds the same model."""
    return {
        "name": name,
        "options": dict(kwargs),
        "fields": [{"name": spec.name, "shape": list(spec.shape)} for spec in fields],
        "scaling": {
            key: list(value) if isinstance(value, tuple) else value for key, value in scaling._asdict().items()
        },
    }


def model_from_description(description: dict) -> nn.Module:
    """The model that :func:`describe_model` described (untrained: load the parameters separately)."""
    fields = tuple(FieldSpec(item["name"], tuple(item["shape"])) for item in description["fields"])
    raw = description["scaling"]
    scaling = Scaling(
        param_low=tuple(float(v) for v in raw["param_low"]),
        param_high=tuple(float(v) for v in raw["param_high"]),
        time_scale=float(raw["time_scale"]),
        field_low=tuple(float(v) for v in raw["field_low"]),
        field_high=tuple(float(v) for v in raw["field_high"]),
        field_sizes=tuple(int(v) for v in raw["field_sizes"]),
    )
    return make_model(description["name"], fields=fields, scaling=scaling, **description.get("options", {}))
