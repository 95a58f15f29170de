"""Configuration: loading, validation with key paths, overrides, printing."""

from pathlib import Path

import pytest

from jaxsurro.config import ConfigError, apply_overrides, config_from_dict, dumps, load_config, main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_loads(path):
    config = load_config(path)
    assert config.study.n_simulations >= 1
    assert config.solver.parameters and config.solver.fields
    assert load_config(path, [f"study.name={config.study.name}"]) == config


def test_resolved_config_round_trips(tmp_path):
    config = load_config(ROOT / "experiments/heat.toml")
    (tmp_path / "resolved.toml").write_text(dumps(config))
    assert load_config(tmp_path / "resolved.toml") == config


def test_config_is_frozen():
    config = load_config(ROOT / "experiments/heat.toml")
    with pytest.raises(AttributeError):
        config.train.batch_size = 3


def _minimal(**sections):
    raw = {
        "solver": {
            "command": ["{python}", "solver.py"],
            "parameters": {"a": [0.0, 1.0]},
            "fields": [{"name": "u", "shape": [4]}],
        },
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def test_defaults_fill_missing_sections():
    config = config_from_dict(_minimal())
    assert config.buffer.kind == "reservoir"
    assert config.model.output_range is None


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"buffer": {"capacity": 300, "watermark": 500}},
            "buffer.watermark (500) must not exceed buffer.capacity (300)",
        ),
        ({"buffer": {"capcity": 3}}, "buffer.capcity is not a known key"),
        ({"buffer": {"kind": "lifo"}}, "buffer.kind ('lifo') must be one of 'fifo', 'firo', 'reservoir'"),
        ({"train": {"batch_size": "64"}}, "train.batch_size ('64') must be an integer"),
        ({"train": {"batch_size": 0}}, "train.batch_size (0) must be at least 1"),
        ({"train": {"learning_rate": -1.0}}, "train.learning_rate (-1.0) must be a positive number"),
        ({"solver": {"parameters": {"a": [2.0, 1.0]}}}, "solver.parameters.a ([2.0, 1.0]) must be finite"),
        ({"solver": {"parameters": {"a": [0.0]}}}, "solver.parameters ("),
        ({"solver": {"command": ["{pyton}"]}}, "solver.command[0] ('{pyton}') has an unknown placeholder"),
        ({"launcher": {"max_concurrent": 0}}, "launcher.max_concurrent (0) must be at least 1"),
        ({"model": {"name": "cnn"}}, "model.name ('cnn') must be one of mlp, conv or name a factory"),
        ({"study": {"n_simulations": 1.5}}, "study.n_simulations (1.5) must be an integer"),
        ({"bogus": {"x": 1}}, "bogus is not a known key"),
    ],
)
def test_invalid_values_name_the_key_path(sections, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict(_minimal(**sections))
    assert expected in str(info.value)


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="solver.command is required"):
        config_from_dict({"solver": {"parameters": {"a": [0, 1]}}})


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        config_from_dict(_minimal(train={"batch_size": 0, "learning_rate": 0.0}))
    assert "train.batch_size" in str(info.value) and "train.learning_rate" in str(info.value)


def test_overrides_parse_toml_literals_and_bare_words():
    raw = apply_overrides(
        _minimal(),
        ["train.batch_size=32", "buffer.kind=fifo", "solver.parameters.b=[1, 2]", "train.learning_rate=1e-4"],
    )
    config = config_from_dict(raw)
    assert config.train.batch_size == 32
    assert config.buffer.kind == "fifo"
    assert config.solver.parameters["b"] == (1.0, 2.0)
    assert config.train.learning_rate == 1e-4


def test_override_of_unknown_key_fails_at_load():
    with pytest.raises(ConfigError, match="train.batchsize is not a known key"):
        load_config(ROOT / "experiments/heat.toml", ["train.batchsize=3"])


def test_malformed_override_says_the_expected_form():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["batch_size"])


def test_unreadable_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[study\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_command_line_prints_resolved_config_and_rejects_bad_input(capsys):
    assert main([str(ROOT / "experiments/heat.toml"), "--set", "buffer.kind=firo"]) == 0
    assert 'kind = "firo"' in capsys.readouterr().out
    assert main([str(ROOT / "experiments/heat.toml"), "--set", "buffer.watermark=99999"]) == 2
    assert "buffer.watermark (99999) must not exceed buffer.capacity" in capsys.readouterr().err


def test_solver_argv_fills_placeholders():
    config = load_config(ROOT / "experiments/heat.toml")
    argv = config.solver.argv(python="/usr/bin/python3")
    assert argv[0] == "/usr/bin/python3"
    assert str(config.solver.grid_size) in argv and str(config.solver.n_steps) in argv


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"buffer": {"kind": "firo", "capacity": 100, "watermark": 100}},
            "buffer.watermark (100) must be below buffer.capacity (100) for a FIRO buffer",
        ),
        (
            {"buffer": {"kind": "fifo", "capacity": 100}, "train": {"batch_size": 128}},
            "train.batch_size (128) must not exceed buffer.capacity (100) for a FIFO buffer",
        ),
        ({"buffer": {"kind": "reservoir", "watermark": 0}}, "buffer.watermark (0) must be at least 1"),
    ],
)
def test_cross_section_rules_are_checked_at_load(sections, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict(_minimal(**sections))
    assert expected in str(info.value)
