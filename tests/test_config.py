"""Configuration: loading, validation with key paths, overrides, printing."""

from pathlib import Path

import pytest

from jaxsurro import config as config_module
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


def test_command_line_prints_resolved_config_and_rejects_bad_input(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the solver's script is checked relative to the working directory
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


# ----------------------------------------------------------------------------
# Ranges: every number finite and within what its consumer takes
# ----------------------------------------------------------------------------


def test_limits_agree_with_the_protocol_and_the_seeds():
    from jaxsurro import protocol
    from jaxsurro.core.sampling import derive_seed

    assert config_module.MAX_DIM == protocol.MAX_U32
    assert config_module.MAX_STEPS == protocol.MAX_U32 + 1
    assert config_module.MAX_SIMULATIONS == protocol.ANY_SIMULATION  # ids 0 .. S-1 stay below it
    assert config_module.MAX_TIMEOUT_S * 1000 <= 2**31 - 1
    assert 0 <= derive_seed(config_module.MAX_SEED, "sampler") < 2**32


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"study": {"seed": -1}}, "study.seed (-1) must be at least 0"),
        ({"study": {"seed": 2**32}}, "study.seed (4294967296) must be at most 4294967295"),
        ({"study": {"n_simulations": 0}}, "study.n_simulations (0) must be at least 1"),
        ({"study": {"n_simulations": 2**62}, "solver": {"n_steps": 4}}, "sample ids sim_id · n_steps + t are int64"),
        ({"study": {"name": "x" * 201}}, "study.name ('xxx"),
        ({"study": {"output_dir": ""}}, "study.output_dir ('') must be a non-empty directory path"),
        ({"solver": {"n_steps": 2**32 + 1}}, "solver.n_steps (4294967297) must be at most 4294967296"),
        ({"solver": {"grid_size": 2**32}}, "solver.grid_size (4294967296) must be at most 4294967295"),
        ({"solver": {"fields": [{"name": "u", "shape": [2**32]}]}}, "solver.fields[0].shape entry 4294967296"),
        ({"solver": {"dt": float("inf")}}, "solver.dt (inf) must be a positive number"),
        ({"solver": {"dt": 1e-50}}, "solver.dt (1e-50) must be a positive number whose times"),
        ({"solver": {"parameters": {"a": [0.0, float("nan")]}}}, "solver.parameters.a ([0.0, nan]) must be finite"),
        ({"solver": {"parameters": {"a": [-3e38, 3e38]}}}, "solver.parameters.a ([-3e+38, 3e+38]) must stay distinct"),
        ({"solver": {"parameters": {"a": [1.0, 1.0 + 1e-12]}}}, "must stay distinct and finite in float32"),
        ({"model": {"output_range": [0.0, 1e39]}}, "model.output_range ([0.0, 1e+39]) must stay distinct"),
        ({"model": {"layers": 1001}}, "model.layers (1001) must be at most 1000"),
        ({"train": {"learning_rate": float("inf")}}, "train.learning_rate (inf) must be a positive number"),
        ({"train": {"batch_timeout": float("nan")}}, "train.batch_timeout (nan) must be positive (seconds)"),
        ({"train": {"halve_every_samples": 2**40, "batch_size": 1}}, "train.halve_every_samples (1099511627776)"),
        (
            {"server": {"client_timeout": float("inf")}},
            "server.client_timeout (inf) must be positive (seconds), finite",
        ),
        ({"server": {"client_timeout": 3e6}}, "at most 2147483 s (int32 milliseconds in ZeroMQ)"),
        ({"server": {"startup_timeout": 0}}, "server.startup_timeout (0.0) must be positive (seconds)"),
        ({"server": {"receive_timeout": -1}}, "server.receive_timeout (-1.0) must be positive (seconds)"),
        ({"launcher": {"poll_interval": float("inf")}}, "launcher.poll_interval (inf) must be positive (seconds)"),
        ({"launcher": {"poll_interval": 0.0}}, "launcher.poll_interval (0.0) must be positive (seconds)"),
        ({"breed": {"r_cycles": float("inf")}}, "breed.r_cycles (inf) must be positive"),
        ({"breed": {"sigma_unit": float("nan")}}, "breed.sigma_unit (nan) must be in (0, 1]"),
        (
            {"sampler": {"kind": "breed"}, "study": {"n_simulations": 50}, "breed": {"min_finished": 5}},
            "breed.window (200) must not exceed study.n_simulations (50)",
        ),
        ({"server": {"host": "256.1.2.3"}}, "server.host ('256.1.2.3') is not a valid IPv4 address"),
    ],
)
def test_numbers_must_be_finite_and_within_their_consumers_range(sections, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict(_minimal(**sections))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        ("auto", None),
        ("127.0.0.1", None),
        ("0.0.0.0", None),
        ("node-12.cluster.example", None),
        ("localhost", None),
        ("256.1.2.3", "is not a valid IPv4 address"),
        ("10.1", "is not a valid IPv4 address"),
        ("::1", "is an IPv6 address"),
        ("224.0.0.1", "multicast"),
        ("", "must be"),
        ("bad host", "must be"),
        ("-node", "must be"),
        ("node..x", "must be"),
        ("a" * 64, "must be"),
        ("host.123", "must be"),
    ],
)
def test_server_host_forms(host, fragment):
    problem = config_module.host_problem(host)
    assert (problem is None) if fragment is None else (fragment in problem), problem


# ----------------------------------------------------------------------------
# This machine: the solver program, directories, server.host, memory
# ----------------------------------------------------------------------------


def _with_command(tmp_path, *command, **sections):
    raw = _minimal(**sections)
    raw["solver"]["command"] = list(command)
    raw["study"] = {"output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), **raw.get("study", {})}
    return config_from_dict(raw)


def test_a_python_solver_script_must_exist_relative_to_the_working_directory(tmp_path):
    config = _with_command(tmp_path, "{python}", "-u", "solvers/s.py", "--steps", "{n_steps}")
    (problem,) = config_module.machine_problems(config, cwd=tmp_path, server_here=False)
    assert problem.startswith("solver.command[2] ('solvers/s.py') is the solver's Python script and must exist")
    assert str(tmp_path) in problem
    (tmp_path / "solvers").mkdir()
    (tmp_path / "solvers/s.py").write_text("")
    assert config_module.machine_problems(config, cwd=tmp_path, server_here=False) == []


@pytest.mark.parametrize(
    "command",
    [
        ("{python}", "-m", "some.module"),
        ("{python}", "-c", "print(1)"),
        ("{python}", "-W", "ignore", "-X", "dev", "-c", "pass"),
        ("sh", "-c", "exit 0", "not-a-file.py"),  # other programs' arguments are theirs
    ],
)
def test_commands_without_a_script_file_pass(tmp_path, command):
    assert config_module.machine_problems(_with_command(tmp_path, *command), cwd=tmp_path, server_here=False) == []


def test_the_solver_program_must_be_on_path_or_an_executable_file(tmp_path):
    def problems(*command):
        return config_module.machine_problems(_with_command(tmp_path, *command), cwd=tmp_path, server_here=False)

    (missing,) = problems("no-such-solver-program", "--x")
    assert "solver.command[0] ('no-such-solver-program') must be the solver program" in missing
    assert "is not on PATH" in missing
    (nothing,) = problems("./bin/solver")
    assert "solver.command[0] ('./bin/solver')" in nothing and "is not a file" in nothing
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/solver").write_text("#!/bin/sh\n")
    (not_executable,) = problems("./bin/solver")
    assert "is not executable" in not_executable
    (tmp_path / "bin/solver").chmod(0o755)
    assert problems("./bin/solver", "--grid", "{grid_size}") == []


def test_output_and_cache_directories_must_be_usable(tmp_path):
    (tmp_path / "file").write_text("")
    config = _with_command(
        tmp_path, "{python}", "-c", "pass", study={"output_dir": str(tmp_path / "file"), "cache_dir": "file/sub"}
    )
    problems = config_module.machine_problems(config, cwd=tmp_path, server_here=False)
    assert any(p.startswith(f"study.output_dir ('{tmp_path / 'file'}') must be a directory") for p in problems)
    assert any(p.startswith("study.cache_dir ('file/sub') cannot be created") for p in problems)


def test_server_host_must_be_an_address_of_this_machine(tmp_path):
    def problems(host):
        config = _with_command(tmp_path, "{python}", "-c", "pass", server={"host": host})
        return config_module.machine_problems(config, cwd=tmp_path)

    assert problems("127.0.0.1") == [] and problems("auto") == [] and problems("localhost") == []
    (problem,) = problems("192.0.2.1")  # TEST-NET-1: never an address of this machine
    assert problem.startswith("server.host ('192.0.2.1') is not an address this machine can bind")
    assert (
        config_module.machine_problems(
            _with_command(tmp_path, "{python}", "-c", "pass", server={"host": "192.0.2.1"}),
            cwd=tmp_path,
            server_here=False,
        )
        == []
    )  # the submitting machine does not run the server


def test_memory_estimate_names_the_keys_and_fits_small_runs():
    config = config_from_dict(
        _minimal(
            buffer={"capacity": 100, "watermark": 10},
            train={"n_validation": 2, "batch_size": 8},
            model={"hidden": 3, "layers": 1},
            solver={"n_steps": 5},
            study={"n_simulations": 7},
        )
    )
    parts = dict((formula.split(" =")[0], nbytes) for formula, nbytes in config_module.memory_estimate(config))
    assert parts["buffer.capacity × (sample size + inputs) × 4 B"] == 100 * (4 + 2) * 4
    assert parts["train.n_validation × solver.n_steps × sample size × 4 B"] == 2 * 5 * 4 * 4
    model = next(v for k, v in parts.items() if k.startswith("model (mlp"))
    assert model == ((2 + 1) * 3 + (3 + 1) * 4) * 4 * 3
    assert config_module.memory_problem(config) is None
    total = sum(parts.values())
    problem = config_module.memory_problem(config, available=total - 1)
    assert problem.startswith("the run needs about") and "buffer.capacity × (sample size + inputs)" in problem
    assert "sample size 4: the solver.fields shapes" in problem


def test_a_grid_beyond_memory_is_refused_with_its_keys():
    config = load_config(ROOT / "experiments/heat.toml", ["solver.grid_size=1000000"])
    problem = config_module.memory_problem(config, available=64 * 2**30)
    assert "more than this machine's 64 GiB of physical memory" in problem
    assert "buffer.capacity" in problem and "solver.grid_size 1000000" in problem


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_can_run_on_this_machine(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(path)
    assert config_module.machine_problems(config) == []
    config_module.check_machine(config)


def test_the_entry_points_refuse_what_cannot_run_here(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # solvers/heat.py does not exist relative to here
    assert main([str(ROOT / "experiments/heat.toml")]) == 2
    err = capsys.readouterr().err
    assert "cannot run on this machine" in err and "solver.command[1] ('solvers/heat.py')" in err
