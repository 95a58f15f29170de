"""Numerical and command-line tests of the 2D heat solver solvers/heat.py (loaded from its path)."""

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg
from waiting import wait_until

HEAT_PATH = Path(__file__).resolve().parents[1] / "solvers" / "heat.py"


def _load_heat() -> types.ModuleType:
    """Import solvers/heat.py by path (solvers/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("heat_solver_under_test", HEAT_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


heat = _load_heat()

TRANSFORMS = ("matrix", "fft")
PAPER_PARAMETERS = np.array([300.0, 100.0, 500.0, 200.0, 400.0])  # (T0, T1, T2, T3, T4) in [100, 500]
# Boundary mean (296.25) differs from T0: even the M = 1 field moves (PAPER_PARAMETERS' would not).
UNEVEN_PARAMETERS = np.array([250.0, 110.0, 480.0, 205.0, 390.0])


def _trajectory(parameters: np.ndarray, grid_size: int, n_steps: int, **kwargs: float) -> np.ndarray:
    """simulate() collected into a (T, M, M) array."""
    return np.stack(list(heat.simulate(parameters, grid_size, n_steps, **kwargs)))


def _sparse_reference(parameters: np.ndarray, grid_size: int, n_steps: int, dt: float, alpha: float) -> np.ndarray:
    """The same trajectory from spsolve on the assembled sparse system, one solve per step."""
    system = heat.assemble_system(grid_size, dt, alpha)
    field = np.full((grid_size, grid_size), parameters[0])
    fields = []
    for _ in range(n_steps):
        field = scipy.sparse.linalg.spsolve(system.matrix, system.rhs(field, parameters[1:]))
        field = field.reshape(grid_size, grid_size)
        fields.append(field)
    return np.stack(fields)


def _relative_max_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected| over the whole trajectory."""
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(
    ("grid_size", "dt", "alpha"), [(1, 0.01, 1.0), (2, 0.01, 1.0), (17, 0.01, 1.0), (40, 0.003, 2.5)]
)
def test_step_and_run_match_sparse_direct_solve(transform: str, grid_size: int, dt: float, alpha: float) -> None:
    """Both solver paths agree with spsolve of the assembled system to 1e-10 relative (max norm)."""
    n_steps = 6
    reference = _sparse_reference(UNEVEN_PARAMETERS, grid_size, n_steps, dt, alpha)
    stepper = heat.make_stepper(grid_size, dt, alpha, transform=transform)
    assert stepper.transform == transform

    run = np.stack(list(stepper.run(UNEVEN_PARAMETERS[0], UNEVEN_PARAMETERS[1:], n_steps)))
    field = np.full((grid_size, grid_size), UNEVEN_PARAMETERS[0])
    stepped = []
    for _ in range(n_steps):
        field = stepper.step(field, UNEVEN_PARAMETERS[1:])
        stepped.append(field)

    assert _relative_max_error(run, reference) <= 1e-10
    assert _relative_max_error(np.stack(stepped), reference) <= 1e-10
    # The solution moved: a wrong scheme that leaves the field at T0 cannot pass by accident.
    assert np.max(np.abs(reference[-1] - UNEVEN_PARAMETERS[0])) > 1.0


def test_simulate_matches_sparse_direct_solve_at_paper_size() -> None:
    """simulate() at M = 64 (the paper's grid) agrees with spsolve to 1e-10 relative (max norm)."""
    reference = _sparse_reference(PAPER_PARAMETERS, 64, 4, 0.01, 1.0)
    assert _relative_max_error(_trajectory(PAPER_PARAMETERS, 64, 4), reference) <= 1e-10


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(("p", "q"), [(1, 1), (3, 2), (5, 19), (20, 20)])
def test_sine_mode_decays_by_implicit_euler_factor(transform: str, p: int, q: int) -> None:
    """sin(p pi x1) sin(q pi x2) with zero boundaries is multiplied by 1/(1 + dt alpha (l_p + l_q)) per step."""
    grid_size, dt, alpha, n_steps = 20, 0.01, 1.5, 4
    h = 1.0 / (grid_size + 1)
    x = h * np.arange(1, grid_size + 1)
    mode = np.outer(np.sin(p * np.pi * x), np.sin(q * np.pi * x))
    eigenvalue_p = (2.0 - 2.0 * np.cos(p * np.pi * h)) / h**2
    eigenvalue_q = (2.0 - 2.0 * np.cos(q * np.pi * h)) / h**2
    factor = 1.0 / (1.0 + dt * alpha * (eigenvalue_p + eigenvalue_q))
    assert factor < 0.99

    stepper = heat.make_stepper(grid_size, dt, alpha, transform=transform)
    zero_boundary = np.zeros(4)
    field = mode
    for k, run_field in enumerate(stepper.run(mode, zero_boundary, n_steps), start=1):
        field = stepper.step(field, zero_boundary)
        np.testing.assert_allclose(field, factor**k * mode, rtol=0, atol=1e-12)
        np.testing.assert_allclose(run_field, factor**k * mode, rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.0, 321.5, -40.0])
def test_equal_temperatures_stay_constant(temperature: float) -> None:
    """Initial and boundary temperatures all equal: the field stays at that value to rounding."""
    fields = _trajectory(np.full(5, temperature), 33, 10)
    np.testing.assert_allclose(fields, temperature, rtol=0, atol=1e-11 * max(1.0, abs(temperature)))


def test_solution_is_linear_in_the_parameters() -> None:
    """The map (T0..T4) -> field is linear: sol(a p + b q) = a sol(p) + b sol(q), a + b need not be 1."""
    rng = np.random.default_rng(7)
    first, second = rng.uniform(100.0, 500.0, size=(2, 5))
    a, b = 2.5, -1.3
    combined = _trajectory(a * first + b * second, 24, 8)
    superposed = a * _trajectory(first, 24, 8) + b * _trajectory(second, 24, 8)
    np.testing.assert_allclose(combined, superposed, rtol=0, atol=1e-10 * np.max(np.abs(combined)))


def test_swapping_boundaries_mirrors_or_transposes_the_field() -> None:
    """T1<->T2 mirrors along x1 (axis 0), T3<->T4 along x2 (axis 1), (T1,T2)<->(T3,T4) transposes."""
    t0, t1, t2, t3, t4 = 250.0, 110.0, 480.0, 205.0, 390.0
    grid_size, n_steps = 19, 7
    base = _trajectory(np.array([t0, t1, t2, t3, t4]), grid_size, n_steps)
    swapped_x1 = _trajectory(np.array([t0, t2, t1, t3, t4]), grid_size, n_steps)
    swapped_x2 = _trajectory(np.array([t0, t1, t2, t4, t3]), grid_size, n_steps)
    transposed = _trajectory(np.array([t0, t3, t4, t1, t2]), grid_size, n_steps)
    tolerance = 1e-11 * np.max(np.abs(base))

    np.testing.assert_allclose(swapped_x1, base[:, ::-1, :], rtol=0, atol=tolerance)
    np.testing.assert_allclose(swapped_x2, base[:, :, ::-1], rtol=0, atol=tolerance)
    np.testing.assert_allclose(transposed, base.transpose(0, 2, 1), rtol=0, atol=tolerance)
    # The convention itself: the node next to x1 = 0 (i = 0) is pulled toward T1, the one next to x1 = 1 toward T2.
    middle = grid_size // 2
    assert base[-1, 0, middle] < base[-1, -1, middle]


def test_maximum_principle_holds() -> None:
    """Every field stays within [min, max] of the five parameters (implicit Euler on an M-matrix)."""
    rng = np.random.default_rng(11)
    for parameters in rng.uniform(100.0, 500.0, size=(5, 5)):
        fields = _trajectory(parameters, 16, 30)
        tolerance = 1e-10 * np.max(parameters)
        assert fields.min() >= parameters.min() - tolerance
        assert fields.max() <= parameters.max() + tolerance


def test_simulate_yields_fresh_float64_fields_for_each_step() -> None:
    """n_steps new (M, M) float64 arrays, the first being one step from the constant T0 field."""
    fields = list(heat.simulate(PAPER_PARAMETERS, 12, 5))
    assert len(fields) == 5
    assert all(field.shape == (12, 12) and field.dtype == np.float64 for field in fields)
    assert len({id(field) for field in fields}) == 5
    one_step = heat.make_stepper(12).step(np.full((12, 12), PAPER_PARAMETERS[0]), PAPER_PARAMETERS[1:])
    np.testing.assert_allclose(fields[0], one_step, rtol=1e-13)
    kept = fields[0].copy()
    fields[0][...] = -1.0  # a consumer that scribbles on one yielded field cannot corrupt the run
    assert np.array_equal(np.stack(list(heat.simulate(PAPER_PARAMETERS, 12, 5)))[0], kept)


def test_step_leaves_its_input_unchanged_and_stepper_is_cached_read_only() -> None:
    """step() does not write into the given field; make_stepper shares one stepper with frozen arrays."""
    stepper = heat.make_stepper(10, 0.01, 1.0)
    assert heat.make_stepper(10, 0.01, 1.0) is stepper
    field = np.full((10, 10), 300.0)
    stepper.step(field, PAPER_PARAMETERS[1:])
    assert np.all(field == 300.0)
    with pytest.raises(ValueError):
        stepper.gain[0, 0] = 0.0


def test_transform_choice_follows_the_measured_rule() -> None:
    """FFT only for M >= 112 with a 7-smooth 2(M+1); dense sine-matrix products elsewhere."""
    assert heat.choose_transform(1) == "matrix"
    assert heat.choose_transform(64) == "matrix"
    assert heat.choose_transform(111) == "matrix"
    assert heat.choose_transform(127) == "fft"
    assert heat.choose_transform(200) == "matrix"  # 2 * 201 = 2 * 3 * 67
    assert heat.choose_transform(255) == "fft"
    assert heat.choose_transform(256) == "matrix"  # 2 * 257: a prime, pocketfft is slow there
    assert heat.choose_transform(511) == "fft"


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: heat.simulate([1.0, 2.0, 3.0, 4.0], 8, 3), ValueError, r"parameters must have shape \(5,\)"),
        (lambda: heat.simulate([1.0, 2.0, np.nan, 4.0, 5.0], 8, 3), ValueError, "non-finite entries: T2"),
        (lambda: heat.simulate(["a", 1, 2, 3, 4], 8, 3), TypeError, "parameters must be 5 numbers"),
        (lambda: heat.simulate(PAPER_PARAMETERS, 0, 3), ValueError, "grid_size must be an integer >= 1, got 0"),
        (lambda: heat.simulate(PAPER_PARAMETERS, 8.0, 3), TypeError, "grid_size must be an integer"),
        (lambda: heat.simulate(PAPER_PARAMETERS, 8, 0), ValueError, "n_steps must be an integer >= 1, got 0"),
        (lambda: heat.simulate(PAPER_PARAMETERS, 8, 3, dt=-0.1), ValueError, "dt must be a finite number > 0"),
        (lambda: heat.simulate(PAPER_PARAMETERS, 8, 3, alpha=np.inf), ValueError, "alpha must be a finite number"),
        (lambda: heat.make_stepper(8, transform="cuda"), ValueError, "transform must be one of auto, matrix, fft"),
        (lambda: heat.make_stepper(8).step(np.zeros((8, 9)), np.zeros(4)), ValueError, r"shape \(8, 8\)"),
        (lambda: heat.make_stepper(8).step(np.zeros((8, 8)), np.zeros(5)), ValueError, "boundary must have shape"),
        (lambda: heat.make_stepper(8).run(np.zeros((7, 7)), np.zeros(4), 2), ValueError, "initial_field must be"),
    ],
)
def test_bad_inputs_raise_clear_errors_at_call_time(call, error: type, match: str) -> None:
    """Wrong counts, shapes, sizes and non-finite values fail immediately with a message naming them."""
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- client branch


def test_client_mode_streams_every_step_to_a_real_server() -> None:
    """heat.py --client, a real process, sends t = 0..T-1 equal to simulate() with the server's parameters."""
    import os

    from jaxsurro import client, protocol
    from jaxsurro.server.receiver import Receiver, ValidationSink
    from jaxsurro.table import SimState, SimulationTable

    grid, steps = 9, 4
    table = SimulationTable(PAPER_PARAMETERS[None, :].copy())
    table[0].attempts, table[0].state = 1, SimState.SUBMITTED
    sink = ValidationSink(1, steps, grid * grid)
    receiver = Receiver(
        table=table,
        sink=sink,
        token=protocol.new_token(),
        secret=protocol.new_secret(),
        fields={"temperature": (grid, grid)},
        wire_dtype="float64",
        n_steps=steps,
        host="127.0.0.1",
    )
    receiver.start()
    try:
        env = {
            **os.environ,
            client.ENV_SERVER: receiver.control_address,
            client.ENV_TOKEN: receiver.token.hex(),
            client.ENV_SIM_ID: "0",
            client.ENV_TIMEOUT: "20",
            client.ENV_WIRE_DTYPE: "float64",
        }
        result = subprocess.run(
            [sys.executable, str(HEAT_PATH), "--client", "--grid-size", str(grid), "--steps", str(steps)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        wait_until(lambda: table[0].steps_finished is not None, 20, "the FINISH (it may still be queued)")
        assert table[0].steps_finished == steps
    finally:
        receiver.stop()
    counters = receiver.counters()
    assert counters.unique_received == steps and not counters.rejected
    np.testing.assert_array_equal(
        sink.samples[0].reshape(steps, grid, grid), _trajectory(PAPER_PARAMETERS, grid, steps).astype(np.float32)
    )


# ----------------------------------------------------------------------------- command line


def _run_script(*args: str) -> subprocess.CompletedProcess:
    """Run ``python solvers/heat.py ARGS`` as a separate process."""
    return subprocess.run(
        [sys.executable, str(HEAT_PATH), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_documents_every_option() -> None:
    """--help exits 0 and lists every option with its defaults."""
    result = _run_script("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--parameters", "--grid-size", "--steps", "--dt", "--alpha", "--output", "--client"):
        assert option in result.stdout
    for text in ("T0 T1 T2 T3 T4", "default 64", "default 100", "default 0.01", "default 1.0"):
        assert text in result.stdout


def test_script_prints_summary_and_never_imports_jax() -> None:
    """Run as a script it prints one summary line; importing the module pulls in neither JAX nor scipy."""
    result = _run_script("--parameters", "300", "100", "500", "200", "400", "--grid-size", "16", "--steps", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "M=16 steps=5" in lines[0] and "mean=" in lines[0]
    check = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('heat', {str(HEAT_PATH)!r}); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "list(module.simulate([1, 2, 3, 4, 5], 8, 2)); "
        "print(sorted(name for name in ('jax', 'scipy') if name in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, check=True)
    assert imported.stdout.strip() == "[]"


def test_output_writes_the_trajectory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--output writes a (T, M, M) float64 array equal to simulate()'s fields, and prints nothing."""
    output = tmp_path / "trajectory.npy"
    argv = ["--parameters", "300", "100", "500", "200", "400", "--grid-size", "11", "--steps", "7"]
    assert heat.main([*argv, "--dt", "0.02", "--alpha", "0.5", "--output", str(output)]) == 0
    written = np.load(output)
    assert written.shape == (7, 11, 11) and written.dtype == np.float64
    np.testing.assert_array_equal(written, _trajectory(PAPER_PARAMETERS, 11, 7, dt=0.02, alpha=0.5))
    assert capsys.readouterr().out == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["trajectory.npy"]  # no temporary left


def test_without_output_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Without --output the CLI only prints its summary line."""
    monkeypatch.chdir(tmp_path)
    assert heat.main(["--parameters", "1", "2", "3", "4", "5", "--grid-size", "4", "--steps", "2"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out.startswith("heat: M=4 steps=2")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--parameters", "1", "2", "3"], "--parameters"),
        (["--parameters", "1", "2", "x", "4", "5"], "--parameters"),
        (["--parameters", "1", "2", "nan", "4", "5"], "--parameters"),
        ([], "--parameters"),
        (["--parameters", "1", "2", "3", "4", "5", "--grid-size", "0"], "--grid-size"),
        (["--parameters", "1", "2", "3", "4", "5", "--grid-size", "6.5"], "--grid-size"),
        (["--parameters", "1", "2", "3", "4", "5", "--steps", "-3"], "--steps"),
        (["--parameters", "1", "2", "3", "4", "5", "--dt", "0"], "--dt"),
        (["--parameters", "1", "2", "3", "4", "5", "--alpha", "inf"], "--alpha"),
        (["--parameters", "1", "2", "3", "4", "5", "--output", "/nonexistent-dir/run.npy"], "--output"),
        (["--client", "--parameters", "1", "2", "3", "4", "5"], "--parameters"),
        (["--client", "--output", "run.npy"], "--output"),
        (["--grid"], "--grid"),
    ],
)
def test_bad_arguments_exit_nonzero_naming_the_argument(argv: list[str], named: str, capsys) -> None:
    """Invalid command lines exit with status 2 and a message that names the offending argument."""
    with pytest.raises(SystemExit) as exit_info:
        heat.main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "error:" in stderr and named in stderr


def test_bad_argument_from_the_shell_exits_nonzero() -> None:
    """The script itself (not only main()) rejects a bad value with status 2 and a clear message."""
    result = _run_script("--parameters", "1", "2", "3", "4", "5", "--grid-size", "zero")
    assert result.returncode == 2
    assert "argument --grid-size: expected an integer >= 1, got 'zero'" in result.stderr
