"""Numerical and command-line tests of the 1-D viscous Burgers solver solvers/burgers.py (loaded from its path).

The reference is the exact Cole-Hopf solution for u(x, 0) = A sin(x). With u = -2 nu phi_x / phi, Burgers'
equation becomes the heat equation phi_t = nu phi_xx, and u0 = -2 nu phi0_x / phi0 integrates to

    phi0 = exp(-(1 / (2 nu)) integral A sin) = exp(a cos x),   a = A / (2 nu)

(check: phi0_x / phi0 = -a sin x, so -2 nu phi0_x / phi0 = 2 nu a sin x = A sin x). Two forms of phi:

- series: exp(a cos x) = I_0(a) + 2 sum_{n>=1} I_n(a) cos(n x), so
      phi(x, t) = I_0(a) + 2 sum_{n>=1} I_n(a) exp(-n^2 nu t) cos(n x)
  with no (-1)^n: that sign belongs to exp(-a cos x), i.e. to u0 = -A sin x (or to x shifted by pi).
  Evaluated with scipy.special.ive (I_n(a) e^{-a}, the common factor cancels in phi_x / phi).
- heat kernel on the line (phi0 is 2 pi-periodic, so this is the same phi):
      phi(x, t) ∝ integral exp(-s^2 / (4 nu t) + a cos(x - s)) ds,
  giving u = <s> / t and u_x = 1/t - Var(s) / (2 nu t^2) under the normalised positive weight
  w(s) ∝ exp(-s^2 / (4 nu t) + a cos(x - s)): no cancellation, computed by a trapezoid rule that is
  exact to rounding here (a step of min(sigma / 16, 0.02), sigma^2 = 2 nu t, 14 sigma each side:
  halving the step or widening to 20 sigma changes u by < 4e-15 and u_x by < 6e-14).

The series is ill-conditioned where phi is exponentially small next to its terms: near the shock x = pi at
small nu t, phi(pi, t) / phi(0, t) ~ exp(-2a) (1e-13 at a = 15). Its rounding error grows like
1e-16 exp(2a): 3e-10 in u at a = 7.5, 3e-4 at (A, nu, t) = (1.5, 0.05, 0.05). So the tests check the two
forms against each other within that bound and compare the solver with the integral.
"""

import contextlib
import importlib.util
import inspect
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.special

BURGERS_PATH = Path(__file__).resolve().parents[1] / "solvers" / "burgers.py"


def _load_burgers() -> types.ModuleType:
    """Import solvers/burgers.py by path (solvers/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("burgers_solver_under_test", BURGERS_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


burgers = _load_burgers()

DT, N_STEPS, N_POINTS = 0.05, 40, 128  # the experiment's settings: output times 0.05..2


def _trajectory(parameters, n_points: int = N_POINTS, n_steps: int = N_STEPS, **kwargs) -> np.ndarray:
    """simulate() collected into a (T, 2, N) array: [:, 0] = u, [:, 1] = dudx."""
    return np.array([np.stack(pair) for pair in burgers.simulate(parameters, n_points, n_steps, **kwargs)])


def cole_hopf_series(amplitude: float, nu: float, x: np.ndarray, t: float, n_terms: int = 200):
    """(u, u_x) from the Bessel series of phi (see the module docstring); ill-conditioned for large a."""
    a = amplitude / (2.0 * nu)
    n = np.arange(1, n_terms + 1, dtype=np.float64)
    weights = scipy.special.ive(n, a) * np.exp(-n * n * nu * t)  # I_n(a) e^{-a} e^{-n^2 nu t}
    cosines, sines = np.cos(np.outer(x, n)), np.sin(np.outer(x, n))
    phi = scipy.special.ive(0, a) + 2.0 * cosines @ weights
    phi_x = -2.0 * sines @ (n * weights)
    phi_xx = -2.0 * cosines @ (n * n * weights)
    u = -2.0 * nu * phi_x / phi
    u_x = -2.0 * nu * (phi_xx / phi - (phi_x / phi) ** 2)
    return u, u_x


def cole_hopf(amplitude: float, nu: float, x: np.ndarray, t: float):
    """(u, u_x) from the heat-kernel integral of phi with a positive weight: accurate to rounding."""
    a = amplitude / (2.0 * nu)
    sigma = np.sqrt(2.0 * nu * t)
    step = min(sigma / 16.0, 0.02)
    s = np.arange(-14.0 * sigma, 14.0 * sigma + 0.5 * step, step)
    exponent = -(s * s) / (4.0 * nu * t) + a * np.cos(x[:, None] - s[None, :])
    weight = np.exp(exponent - exponent.max(axis=1, keepdims=True))
    weight /= weight.sum(axis=1, keepdims=True)
    mean = weight @ s
    variance = np.einsum("ij,ij->i", weight, (s[None, :] - mean[:, None]) ** 2)
    return mean / t, 1.0 / t - variance / (2.0 * nu * t * t)


def _errors_against_cole_hopf(amplitude: float, nu: float, n_points: int = N_POINTS) -> tuple[float, float]:
    """Max |u - exact| and max |dudx - exact| over all 40 output steps."""
    x = burgers.grid(n_points)
    error_u = error_dudx = 0.0
    for k, (u, dudx) in enumerate(burgers.simulate([amplitude, nu], n_points, N_STEPS, DT), start=1):
        exact_u, exact_dudx = cole_hopf(amplitude, nu, x, k * DT)
        error_u = max(error_u, float(np.abs(u - exact_u).max()))
        error_dudx = max(error_dudx, float(np.abs(dudx - exact_dudx).max()))
    return error_u, error_dudx


def _periodic_central_difference(u: np.ndarray, h: float, order: int) -> np.ndarray:
    """Central finite-difference derivative of periodic samples along the last axis (order 2, 4 or 6)."""
    weights = {2: [1 / 2], 4: [2 / 3, -1 / 12], 6: [3 / 4, -3 / 20, 1 / 60]}[order]
    result = np.zeros_like(u)
    for m, weight in enumerate(weights, start=1):
        result += weight * (np.roll(u, -m, axis=-1) - np.roll(u, m, axis=-1))
    return result / h


# ----------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize(("amplitude", "nu"), [(1.5, 0.1), (1.0, 0.1), (0.5, 0.2), (1.2, 0.15), (1.5, 0.05)])
def test_cole_hopf_series_and_integral_agree(amplitude: float, nu: float) -> None:
    """The two exact forms agree within the series' rounding error, ~1e-16 exp(2a) (a = A / (2 nu)).

    Measured at t = 0.05: 2e-16 at a = 1.25, 1e-12 at a = 5, 3e-10 at a = 7.5, 3e-4 at a = 15.
    """
    x = burgers.grid(N_POINTS)
    a = amplitude / (2.0 * nu)
    tolerance = 1e-13 + 1e-15 * np.exp(2.0 * a)
    for t in (0.05, 0.5, 1.0, 2.0):
        series_u, series_dudx = cole_hopf_series(amplitude, nu, x, t)
        integral_u, integral_dudx = cole_hopf(amplitude, nu, x, t)
        np.testing.assert_allclose(series_u, integral_u, rtol=0, atol=tolerance)
        np.testing.assert_allclose(series_dudx, integral_dudx, rtol=0, atol=10 * tolerance)


def test_cole_hopf_starts_from_a_sine_and_has_the_right_sign() -> None:
    """At t -> 0 both forms give u = A sin x, u_x = A cos x (the (-1)^n series would give -A sin x)."""
    x = burgers.grid(64)
    amplitude, nu, t = 1.3, 0.15, 1e-7
    for u, dudx in (cole_hopf_series(amplitude, nu, x, t), cole_hopf(amplitude, nu, x, t)):
        np.testing.assert_allclose(u, amplitude * np.sin(x), rtol=0, atol=1e-5)
        np.testing.assert_allclose(dudx, amplitude * np.cos(x), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- accuracy


# Measured max errors over the 40 output steps (N = 128, default cfl): the tolerances are about 2-3x.
# The worst corner of the experiment's range is (1.5, 0.1): the steepest front, width ~ 2 nu / A.
@pytest.mark.parametrize(
    ("amplitude", "nu", "tolerance_u", "tolerance_dudx"),
    [
        (1.5, 0.1, 1.5e-4, 8e-3),  # measured 6.5e-5, 3.3e-3 (max|dudx| = 8.9)
        (1.0, 0.1, 5e-7, 2e-5),  # 1.8e-7, 8.9e-6
        (1.5, 0.2, 1e-8, 2e-7),  # 3.1e-9, 6.9e-8
        (0.5, 0.1, 1e-9, 1e-8),  # 2.4e-10, 2.0e-9
        (0.5, 0.2, 3e-10, 2e-9),  # 9.6e-11, 4.9e-10
        (1.2, 0.15, 1e-8, 5e-7),  # 3.8e-9, 1.9e-7
        (1.5, 0.15, 1e-6, 3e-5),  # 2.8e-7, 1.3e-5
    ],
)
def test_matches_cole_hopf(amplitude: float, nu: float, tolerance_u: float, tolerance_dudx: float) -> None:
    """u and dudx after every output step match the exact solution at points spanning the range."""
    error_u, error_dudx = _errors_against_cole_hopf(amplitude, nu)
    assert error_u < tolerance_u, f"max |u - exact| = {error_u:.2e}"
    assert error_dudx < tolerance_dudx, f"max |dudx - exact| = {error_dudx:.2e}"


def test_error_is_spatial_and_vanishes_with_more_points() -> None:
    """At the worst corner, doubling N (dealiased band 42 -> 85) cuts the error by over 1000x."""
    coarse_u, coarse_dudx = _errors_against_cole_hopf(1.5, 0.1, 128)
    fine_u, fine_dudx = _errors_against_cole_hopf(1.5, 0.1, 256)
    assert fine_u < 1e-8 and fine_dudx < 5e-7
    assert fine_u < 1e-3 * coarse_u and fine_dudx < 1e-3 * coarse_dudx


def test_spectral_tail_flags_under_resolved_runs() -> None:
    """The resolution indicator is ~ the error in u relative to A: small in the range, large outside."""

    def worst_tail(parameters) -> float:
        return max(burgers.spectral_tail(u) for u, _ in burgers.simulate(parameters))

    assert worst_tail([1.5, 0.1]) < 1e-4
    assert worst_tail([0.5, 0.2]) < 1e-10
    assert worst_tail([1.5, 0.05]) > 1e-3  # 0.7 % error in u there
    assert burgers.spectral_tail(np.zeros(16)) == 0.0


def test_time_stepping_is_fourth_order_and_the_default_is_accurate() -> None:
    """Against 128 sub-steps: errors fall 16x per halving of h; the default CFL leaves < 1e-7."""
    parameters = [1.5, 0.1]
    reference = _trajectory(parameters, substeps=128)
    errors = [np.abs(_trajectory(parameters, substeps=n) - reference).max() for n in (2, 4, 8, 16)]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders > 3.5) & (orders < 4.5)), orders
    default = _trajectory(parameters)
    assert burgers.substeps_for(1.5, N_POINTS, DT) == 8
    assert np.abs(default[:, 0] - reference[:, 0]).max() < 1e-7  # measured 3.3e-8
    assert np.abs(default[:, 1] - reference[:, 1]).max() < 3e-6  # measured 8.1e-7


def test_substeps_follow_the_cfl_bound() -> None:
    """n = ceil(dt |A| / (cfl dx)) sub-steps: h |A| / dx <= cfl, and one fewer would exceed it."""
    dx = 2 * np.pi / N_POINTS
    for amplitude in (0.5, 1.0, 1.5, -1.5, 3.0):
        for cfl in (0.1, 0.2, 0.5):
            n = burgers.substeps_for(amplitude, N_POINTS, DT, cfl)
            assert DT / n * abs(amplitude) / dx <= cfl * (1 + 1e-12)
            assert n == 1 or DT / (n - 1) * abs(amplitude) / dx > cfl
    assert burgers.substeps_for(0.0, N_POINTS, DT) == 1
    assert [burgers.substeps_for(a, N_POINTS, DT) for a in (0.5, 1.0, 1.5)] == [3, 6, 8]


# ----------------------------------------------------------------------------- invariants


def test_mean_of_u_is_conserved() -> None:
    """The mean of u is constant to rounding (here 0.3 from a general initial field) and dudx has mean 0."""
    x = burgers.grid(N_POINTS)
    initial = 0.3 + np.sin(x) + 0.5 * np.cos(2 * x + 1.0) - 0.2 * np.sin(3 * x)
    steps = np.array([np.stack(pair) for pair in burgers.evolve(initial, 0.1, N_STEPS, DT)])
    np.testing.assert_allclose(steps[:, 0].mean(axis=1), 0.3, rtol=0, atol=1e-14)
    np.testing.assert_allclose(steps[:, 1].mean(axis=1), 0.0, rtol=0, atol=1e-14)
    assert np.abs(steps[-1, 0] - 0.3).max() < 0.5 * np.abs(initial - 0.3).max()  # it did evolve (and decay)
    for amplitude, nu in ((1.5, 0.1), (0.5, 0.2)):
        np.testing.assert_allclose(_trajectory([amplitude, nu])[:, 0].mean(axis=1), 0.0, rtol=0, atol=1e-15)


def test_galilean_invariance() -> None:
    """u0 = c + A sin x gives c + u(x - c t, t); with c dt = dx that is a shift by one point per step."""
    x = burgers.grid(N_POINTS)
    c = (2 * np.pi / N_POINTS) / DT
    base = _trajectory([1.0, 0.1], substeps=8)
    moving = np.array([np.stack(pair) for pair in burgers.evolve(c + np.sin(x), 0.1, N_STEPS, DT, substeps=8)])
    shifted = np.stack([np.roll(base[k], k + 1, axis=-1) for k in range(N_STEPS)])
    np.testing.assert_allclose(moving[:, 0], c + shifted[:, 0], rtol=0, atol=3e-7)  # measured 8.6e-8
    np.testing.assert_allclose(moving[:, 1], shifted[:, 1], rtol=0, atol=5e-6)  # RK4 on the extra c u_x


def test_negative_amplitude_is_the_half_period_shift() -> None:
    """-A sin x = A sin(x + pi): the solution for -A is the one for A shifted by N/2 points."""
    np.testing.assert_allclose(
        _trajectory([-1.2, 0.12]), np.roll(_trajectory([1.2, 0.12]), N_POINTS // 2, axis=-1), rtol=0, atol=1e-14
    )


def test_dudx_agrees_with_finite_differences_of_u() -> None:
    """Central differences of u converge to dudx at their order (2, 4, 6) when N doubles."""
    parameters = [1.0, 0.15]
    previous = None
    for n_points in (128, 256):
        steps = _trajectory(parameters, n_points)
        h = 2 * np.pi / n_points
        scale = np.abs(steps[:, 1]).max()
        errors = np.array(
            [
                np.abs(_periodic_central_difference(steps[:, 0], h, order) - steps[:, 1]).max() / scale
                for order in (2, 4, 6)
            ]
        )
        assert np.all(np.diff(errors) < 0)  # higher order, closer
        if previous is not None:
            np.testing.assert_array_less([2**1.8, 2**3.8, 2**5.5], previous / errors)
        previous = errors
    assert previous[2] < 1e-6  # sixth order at N = 256: measured 2.2e-7


# ----------------------------------------------------------------------------- API


def test_simulate_yields_fresh_float64_pairs() -> None:
    """n_steps pairs of new (N,) float64 arrays; scribbling on one cannot corrupt the run."""
    steps = list(burgers.simulate([1.0, 0.1], 32, 5))
    assert len(steps) == 5
    assert all(len(pair) == 2 for pair in steps)
    arrays = [array for pair in steps for array in pair]
    assert all(array.shape == (32,) and array.dtype == np.float64 for array in arrays)
    assert len({id(array) for array in arrays}) == 10
    kept = steps[0][0].copy()
    steps[0][0][...] = -1.0
    assert np.array_equal(next(iter(burgers.simulate([1.0, 0.1], 32, 5)))[0], kept)


def test_defaults_are_the_experiment_settings() -> None:
    """simulate(parameters) runs N = 128 points for 40 output steps of dt = 0.05 (final time 2)."""
    assert (burgers.DEFAULT_POINTS, burgers.DEFAULT_STEPS, burgers.DEFAULT_DT) == (N_POINTS, N_STEPS, DT)
    default = _trajectory([0.7, 0.13], N_POINTS, N_STEPS)
    explicit = np.array([np.stack(pair) for pair in burgers.simulate([0.7, 0.13])])
    np.testing.assert_array_equal(default, explicit)


def test_step_is_pure_and_stepper_is_cached_read_only() -> None:
    """step() leaves its input alone; make_stepper shares one stepper with frozen arrays."""
    stepper = burgers.make_stepper(32, 0.1, 0.01)
    assert burgers.make_stepper(32, 0.1, 0.01) is stepper
    spectrum = burgers.initial_spectrum(np.sin(burgers.grid(32)), 32)
    kept = spectrum.copy()
    first, second = stepper.step(spectrum), stepper.step(spectrum)
    assert np.array_equal(spectrum, kept) and np.array_equal(first, second) and first is not spectrum
    with pytest.raises(ValueError):
        stepper.decay[0] = 0.0


def test_etdrk4_coefficients_match_the_closed_forms() -> None:
    """The contour integrals equal the closed forms where those are well conditioned, and the limits at 0."""
    h = 0.01
    linear = np.array([0.0, -1.0, -50.0, -400.0, -2000.0])
    decay, half_decay, q, f1, f2, f3 = burgers.etdrk4_coefficients(linear, h)
    z = h * linear[1:]
    np.testing.assert_allclose(decay, np.exp(h * linear), rtol=1e-15)
    np.testing.assert_allclose(half_decay, np.exp(h * linear / 2), rtol=1e-15)
    np.testing.assert_allclose(q[1:], h * (np.exp(z / 2) - 1) / z, rtol=1e-10)
    np.testing.assert_allclose(f1[3:], h * (-4 - z + np.exp(z) * (4 - 3 * z + z * z))[2:] / z[2:] ** 3, rtol=1e-12)
    np.testing.assert_allclose(f2[3:], h * (2 + z + np.exp(z) * (z - 2))[2:] / z[2:] ** 3, rtol=1e-12)
    np.testing.assert_allclose(f3[3:], h * (-4 - 3 * z - z * z + np.exp(z) * (4 - z))[2:] / z[2:] ** 3, rtol=1e-12)
    # z = 0: Q = h/2, f1 = h/6, f2 = h/6, f3 = h/6 (the RK4 weights times h)
    np.testing.assert_allclose([q[0], f1[0], f2[0], f3[0]], [h / 2, h / 6, h / 6, h / 6], rtol=1e-13)


def test_dealiasing_keeps_modes_below_a_third_of_n() -> None:
    """K = (N - 1) // 3, i.e. |k| < N/3; nothing above K ever appears in u."""
    assert [burgers.dealias_cutoff(n) for n in (4, 6, 7, 128, 129, 130, 256)] == [1, 1, 2, 42, 42, 43, 85]
    u, _ = list(burgers.simulate([1.5, 0.1], N_POINTS, 10))[-1]
    assert np.abs(np.fft.rfft(u)[43:]).max() < 1e-12


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: burgers.simulate([1.0], 32, 3), ValueError, r"parameters must have shape \(2,\)"),
        (lambda: burgers.simulate([1.0, np.nan], 32, 3), ValueError, "non-finite entries: nu"),
        (lambda: burgers.simulate(["a", 0.1], 32, 3), TypeError, "parameters must be 2 numbers"),
        (lambda: burgers.simulate([1.0, 0.0], 32, 3), ValueError, "viscosity nu .* must be > 0"),
        (lambda: burgers.simulate([1.0, 0.1], 3, 3), ValueError, "n_points must be an integer >= 4, got 3"),
        (lambda: burgers.simulate([1.0, 0.1], 32.0, 3), TypeError, "n_points must be an integer"),
        (lambda: burgers.simulate([1.0, 0.1], 32, 0), ValueError, "n_steps must be an integer >= 1, got 0"),
        (lambda: burgers.simulate([1.0, 0.1], 32, 3, -0.1), ValueError, "dt must be a finite number > 0"),
        (lambda: burgers.simulate([1.0, 0.1], 32, 3, cfl=np.inf), ValueError, "cfl must be a finite number > 0"),
        (lambda: burgers.simulate([1.0, 0.1], 32, 3, substeps=0), ValueError, "substeps must be an integer >= 1"),
        (lambda: burgers.evolve(np.zeros((4, 4)), 0.1, 3), ValueError, "initial_field must be a 1-D array"),
        (lambda: burgers.evolve(np.full(8, np.inf), 0.1, 3), ValueError, "initial_field must be finite"),
        (lambda: burgers.make_stepper(8, 0.1, 0.01).step(np.zeros(4)), ValueError, r"spectrum must have shape \(5,\)"),
    ],
)
def test_bad_inputs_raise_clear_errors_at_call_time(call, error: type, match: str) -> None:
    """Wrong counts, shapes, sizes and non-finite values fail immediately with a message naming them."""
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- client branch


class _FakeSimulation:
    """Records what the solver sends; ``parameters`` as the server would give them."""

    def __init__(self, parameters) -> None:
        self.parameters = np.asarray(parameters, dtype=np.float64)
        self.sent: list[tuple[str, int, np.ndarray]] = []
        self.exit_error: BaseException | None = None

    def send(self, field: str, time_step: int, array) -> None:
        self.sent.append((field, time_step, np.array(array)))


class _FakeClient:
    """Stands in for jaxsurro.client with the extended API connect(fields=...)."""

    def __init__(self, parameters) -> None:
        self.parameters = parameters
        self.connections: list[tuple[dict, _FakeSimulation]] = []

    @contextlib.contextmanager
    def connect(self, **kwargs):
        simulation = _FakeSimulation(self.parameters)
        self.connections.append((kwargs, simulation))
        try:
            yield simulation
        except BaseException as error:
            simulation.exit_error = error
            raise


def test_client_mode_declares_both_fields_and_sends_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """--client: one connect(fields={"u": (N,), "dudx": (N,)}), then u and dudx for t = 0..T-1."""
    fake = _FakeClient([1.1, 0.14])
    monkeypatch.setattr(burgers, "_client_module", lambda: fake)
    assert burgers.main(["--client", "--points", "48", "--steps", "6", "--dt", "0.04"]) == 0
    [(kwargs, simulation)] = fake.connections
    assert kwargs == {"fields": {"u": (48,), "dudx": (48,)}}
    assert [(field, t) for field, t, _ in simulation.sent] == [(f, t) for t in range(6) for f in ("u", "dudx")]
    expected = _trajectory([1.1, 0.14], 48, 6, dt=0.04)
    sent = np.array([array for _, _, array in simulation.sent]).reshape(6, 2, 48)
    np.testing.assert_array_equal(sent, expected)
    assert sent.dtype == np.float64 and simulation.exit_error is None


def test_client_mode_fails_inside_the_connection_on_wrong_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server giving three parameters: ValueError raised inside the `with` (the client aborts), nothing sent."""
    fake = _FakeClient([1.0, 0.1, 5.0])
    monkeypatch.setattr(burgers, "_client_module", lambda: fake)
    with pytest.raises(ValueError, match=r"parameters must have shape \(2,\)"):
        burgers.run_client(32, 3, 0.05)
    [(_, simulation)] = fake.connections
    assert isinstance(simulation.exit_error, ValueError) and simulation.sent == []


def test_client_call_fits_the_real_connect_signature() -> None:
    """jaxsurro.client.connect accepts the fields= declaration the solver passes."""
    from jaxsurro import client

    inspect.signature(client.connect).bind(fields={"u": (N_POINTS,), "dudx": (N_POINTS,)})


# ----------------------------------------------------------------------------- command line


def _run_script(*args: str) -> subprocess.CompletedProcess:
    """Run ``python solvers/burgers.py ARGS`` as a separate process."""
    return subprocess.run(
        [sys.executable, str(BURGERS_PATH), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_documents_every_option() -> None:
    """--help exits 0 and lists every option with its defaults."""
    result = _run_script("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--parameters", "--points", "--steps", "--dt", "--cfl", "--output", "--client"):
        assert option in result.stdout
    for text in ("A nu", "default 128", "default 40", "default 0.05", "default 0.2"):
        assert text in result.stdout


def test_script_prints_summary_and_imports_only_numpy() -> None:
    """Run as a script it prints one summary line; the module and simulate pull in no jax, scipy, jaxsurro."""
    result = _run_script("--parameters", "1.0", "0.1", "--points", "64", "--steps", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "N=64 steps=5" in lines[0] and "spectral tail=" in lines[0]
    assert result.stderr == ""
    check = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('burgers', {str(BURGERS_PATH)!r}); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "list(module.simulate([1.0, 0.1], 16, 2)); "
        "print(sorted(name for name in ('jax', 'scipy', 'jaxsurro') if name in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, check=True)
    assert imported.stdout.strip() == "[]"


def test_under_resolved_run_warns(capsys: pytest.CaptureFixture[str]) -> None:
    """Outside the resolved range (nu / A = 1/30 at N = 128) the summary comes with a warning on stderr."""
    assert burgers.main(["--parameters", "1.5", "0.05"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("burgers: N=128 steps=40")
    assert "under-resolved" in captured.err


def test_output_writes_the_trajectory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--output writes a (T, 2, N) float64 array ([:, 0] = u, [:, 1] = dudx) equal to simulate(), prints nothing."""
    output = tmp_path / "trajectory.npy"
    argv = ["--parameters", "1.2", "0.11", "--points", "64", "--steps", "7", "--dt", "0.03", "--cfl", "0.3"]
    assert burgers.main([*argv, "--output", str(output)]) == 0
    written = np.load(output)
    assert written.shape == (7, 2, 64) and written.dtype == np.float64
    np.testing.assert_array_equal(written, _trajectory([1.2, 0.11], 64, 7, dt=0.03, cfl=0.3))
    assert capsys.readouterr().out == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["trajectory.npy"]  # no temporary left


def test_without_output_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Without --output the CLI only prints its summary line."""
    monkeypatch.chdir(tmp_path)
    assert burgers.main(["--parameters", "0.5", "0.2", "--points", "16", "--steps", "2"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out.startswith("burgers: N=16 steps=2")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--parameters", "1"], "--parameters"),
        (["--parameters", "1", "x"], "--parameters"),
        (["--parameters", "1", "nan"], "--parameters"),
        (["--parameters", "1", "0"], "--parameters"),
        (["--parameters", "1", "-0.1"], "--parameters"),
        ([], "--parameters"),
        (["--parameters", "1", "0.1", "--points", "3"], "--points"),
        (["--parameters", "1", "0.1", "--points", "6.5"], "--points"),
        (["--parameters", "1", "0.1", "--steps", "-3"], "--steps"),
        (["--parameters", "1", "0.1", "--dt", "0"], "--dt"),
        (["--parameters", "1", "0.1", "--cfl", "inf"], "--cfl"),
        (["--parameters", "1", "0.1", "--output", "/nonexistent-dir/run.npy"], "--output"),
        (["--client", "--parameters", "1", "0.1"], "--parameters"),
        (["--client", "--output", "run.npy"], "--output"),
    ],
)
def test_bad_arguments_exit_nonzero_naming_the_argument(argv: list[str], named: str, capsys) -> None:
    """Invalid command lines exit with status 2 and a message that names the offending argument."""
    with pytest.raises(SystemExit) as exit_info:
        burgers.main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "error:" in stderr and named in stderr
