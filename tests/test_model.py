"""Tests for jaxsurro.core.model: bound-based scaling, the MLP surrogate and the model registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsurro.core.fields import FieldSpec, join_fields, split_fields
from jaxsurro.core.model import (
    MLP,
    MODELS,
    ConvDecoder,
    Scaling,
    denormalize_field,
    make_model,
    normalize_field,
    normalize_inputs,
    register_model,
)

SCALING = Scaling(
    param_low=(100.0, -2.0, 0.5),
    param_high=(500.0, 3.0, 1.5),
    time_scale=0.25,
    field_low=(100.0,),
    field_high=(500.0,),
    field_sizes=(20,),
)
FIELDS = (FieldSpec("u", (4, 5)),)


def test_inputs_at_bounds_map_to_zero_and_one():
    low = np.array([[*SCALING.param_low, 0.0]], dtype=np.float32)
    high = np.array([[*SCALING.param_high, SCALING.time_scale]], dtype=np.float32)
    middle = (low + high) / 2
    stacked = jnp.asarray(np.concatenate([low, high, middle]))
    normalized = np.asarray(normalize_inputs(stacked, SCALING))
    np.testing.assert_allclose(normalized[0], 0.0, atol=1e-7)
    np.testing.assert_allclose(normalized[1], 1.0, rtol=1e-6)
    np.testing.assert_allclose(normalized[2], 0.5, rtol=1e-6)


def test_field_bounds_map_to_zero_and_one_and_denormalize_inverts():
    np.testing.assert_allclose(normalize_field(jnp.full(20, 100.0, jnp.float32), SCALING), 0.0, atol=1e-7)
    np.testing.assert_allclose(normalize_field(jnp.full(20, 500.0, jnp.float32), SCALING), 1.0, rtol=1e-6)
    field = np.random.default_rng(0).uniform(50.0, 550.0, size=(3, 20)).astype(np.float32)
    round_trip = denormalize_field(normalize_field(jnp.asarray(field), SCALING), SCALING)
    np.testing.assert_allclose(np.asarray(round_trip), field, rtol=1e-6)
    assert round_trip.dtype == jnp.float32


def test_each_field_has_its_own_scale():
    scaling = SCALING._replace(field_low=(0.0, -1.0), field_high=(2.0, 1.0), field_sizes=(2, 1))
    np.testing.assert_allclose(normalize_field(jnp.asarray([1.0, 2.0, 0.0]), scaling), [0.5, 1.0, 0.5])


def test_split_and_join_fields_round_trip():
    layout = (FieldSpec("a", (2, 3)), FieldSpec("s", ()), FieldSpec("v", (4,)))
    rows = np.arange(2 * 11, dtype=np.float32).reshape(2, 11)
    parts = split_fields(rows, layout)
    assert parts["a"].shape == (2, 2, 3) and parts["s"].shape == (2,) and parts["v"].shape == (2, 4)
    np.testing.assert_array_equal(parts["s"], rows[:, 6])
    np.testing.assert_array_equal(join_fields(parts, layout, np), rows)


@pytest.mark.parametrize(
    "bad, message",
    [
        (SCALING._replace(param_high=(500.0, 3.0)), "one \\(low, high\\) pair per parameter"),
        (SCALING._replace(param_high=(500.0, -3.0, 1.5)), "param_low\\[1\\] < param_high\\[1\\]"),
        (SCALING._replace(time_scale=0.0), "time_scale > 0"),
        (SCALING._replace(field_high=(100.0,)), "field_low\\[0\\] < field_high\\[0\\]"),
    ],
)
def test_invalid_scaling_is_rejected_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match=message):
        bad.validate()
    with pytest.raises(ValueError, match=message):
        make_model("mlp", fields=FIELDS, scaling=bad)


def test_mlp_shapes_and_physical_output_is_denormalized_normalized_output():
    model = MLP(fields=FIELDS, scaling=SCALING, hidden=16, layers=3)
    inputs = jnp.asarray(np.random.default_rng(1).uniform(0.0, 1.0, size=(7, 4)).astype(np.float32))
    params = model.init(jax.random.key(0), inputs)
    kernels = [params["params"][f"hidden_{i}"]["kernel"].shape for i in range(3)]
    assert kernels == [(4, 16), (16, 16), (16, 16)]
    assert params["params"]["output_0"]["kernel"].shape == (16, 20)
    physical = model.apply(params, inputs)
    normalized = model.apply(params, inputs, normalized_output=True)
    assert physical.shape == (7, 20) and physical.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(physical), np.asarray(denormalize_field(normalized, SCALING)), rtol=1e-6)


def test_mlp_rejects_wrong_input_columns():
    model = MLP(fields=FIELDS, scaling=SCALING, hidden=4)
    with pytest.raises(ValueError, match=r"inputs of shape \[batch, 4\].*got \(3, 3\)"):
        model.init(jax.random.key(0), jnp.zeros((3, 3), dtype=jnp.float32))


def test_make_model_by_name_and_unknown_name_lists_known_models():
    model = make_model("mlp", fields=FIELDS, scaling=SCALING, hidden=8, layers=1)
    assert isinstance(model, MLP) and model.hidden == 8 and model.layers == 1
    with pytest.raises(ValueError, match=r"Unknown model 'resnet'; known models: \['conv', 'mlp'"):
        make_model("resnet", fields=FIELDS, scaling=SCALING)
    assert make_model("jaxsurro.core.model:MLP", fields=FIELDS, scaling=SCALING).hidden == 256
    with pytest.raises(ValueError, match="cannot load 'Nope'"):
        make_model("jaxsurro.core.model:Nope", fields=FIELDS, scaling=SCALING)


def test_register_model_plugs_in_by_name_and_refuses_duplicates():
    name = "test_wide_mlp"
    register_model(name, lambda **kwargs: MLP(hidden=32, **kwargs))
    try:
        model = make_model(name, fields=FIELDS, scaling=SCALING)
        assert model.hidden == 32
        with pytest.raises(ValueError, match="already registered"):
            register_model(name, MLP)
    finally:
        MODELS.pop(name)


@pytest.mark.parametrize("shape", [(12,), (10, 7)])
def test_conv_decoder_predicts_every_field_on_its_grid(shape):
    fields = (FieldSpec("u", shape), FieldSpec("v", shape))
    size = int(np.prod(shape))
    scaling = SCALING._replace(field_low=(0.0, -1.0), field_high=(1.0, 1.0), field_sizes=(size, size))
    model = make_model("conv", fields=fields, scaling=scaling, hidden=8, layers=1, channels=4)
    assert isinstance(model, ConvDecoder)
    inputs = jnp.ones((3, 4), jnp.float32)
    params = model.init(jax.random.key(0), inputs)
    out = model.apply(params, inputs)
    assert out.shape == (3, 2 * size)
    np.testing.assert_allclose(
        out, denormalize_field(model.apply(params, inputs, normalized_output=True), scaling), rtol=1e-6
    )


def test_conv_decoder_refuses_fields_off_one_grid():
    fields = (FieldSpec("u", (8,)), FieldSpec("s", ()))
    scaling = SCALING._replace(field_low=(0.0, 0.0), field_high=(1.0, 1.0), field_sizes=(8, 1))
    with pytest.raises(ValueError, match="one 1-D or 2-D grid"):
        make_model("conv", fields=fields, scaling=scaling)
