"""1-D viscous Burgers equation solver, usable standalone or as a jaxsurro client ("bring your own solver").

Solves, on the periodic domain x in [0, 2 pi),

    du/dt + u du/dx = nu d^2u/dx^2,        u(x, 0) = A sin(x),

for two parameters ordered (A, nu): the amplitude A and the viscosity nu > 0. Every output step
carries two fields on the N-point grid x_j = 2 pi j / N, j = 0..N-1: ``u`` and its spatial derivative
``dudx``, both (N,) float64 arrays. All arithmetic is float64.

Method (pseudo-spectral in x, exponential time differencing in t):

- State: the real FFT u_hat_k = sum_j u(x_j) exp(-i k x_j), k = 0..N//2 (numpy.fft.rfft).
- The PDE in Fourier space, with the advection in conservative form u u_x = (u^2 / 2)_x:
      d u_hat_k / dt = -nu k^2 u_hat_k + N_k(u_hat),    N_k = -(i k / 2) FFT(u^2)_k.
- Dealiasing, the 2/3 rule: only |k| <= K = (N - 1) // 3 (that is, |k| < N/3) are kept, in the initial
  state and in N_k. u^2 of a field band-limited to K has modes up to 2K; on N points they alias to
  k - N <= 2K - N < -K, outside the kept band, so N_k is exact for every kept k. (N = 128: K = 42.)
- Time: ETDRK4 (Cox and Matthews 2002). The diffusion is integrated exactly (the factors exp(-nu k^2 h));
  the advection is treated explicitly, fourth order. The phi-function coefficients are evaluated by
  Kassam and Trefethen's (2005) contour integral (64 points on the unit circle around each h L_k), which
  avoids the cancellation of the closed forms at small |h L_k| (k = 0 included).
- Sub-steps: each output step of length dt is split into n equal ETDRK4 steps with
      n = ceil(dt * |A| / (cfl * dx)),  dx = 2 pi / N,  (at least 1),
  a CFL bound on the advection speed: by the maximum principle max|u(., t)| <= max|u0| = |A|, so the
  bound computed once holds for the whole run. The default cfl = 0.2 keeps the time-discretisation
  error (fourth order in h) well below the spatial one: at (A, nu) = (1.5, 0.1), N = 128, the
  difference to a 128-sub-step reference is ~3e-8 in u (8 sub-steps; 5e-7 with cfl = 0.5).
- ``dudx`` is the spectral derivative, the inverse FFT of i k u_hat_k (no finite differences).
- The mean of u is exactly conserved: N_0 = 0 and the k = 0 decay factor is 1.

Accuracy, against the exact Cole-Hopf solution (u = -2 nu phi_x / phi, phi_t = nu phi_xx,
phi(x, 0) = exp(A cos(x) / (2 nu)); see tests/test_burgers.py), N = 128, default cfl, output steps
at t = 0.05..2 (dt = 0.05, 40 steps): the error is set by the dealiased band K = 42 and the steepest
front, of width ~ 2 nu / A, at x = pi (a stationary viscous shock; it forms at t ~ 1/A):

    (A, nu)       max|u - exact|   max|dudx - exact| / max|dudx|
    (1.5, 0.10)   6.5e-5           3.7e-4        <- worst corner of the default range
    (1.0, 0.10)   1.8e-7           2.4e-6
    (1.5, 0.20)   3.1e-9           1.7e-8
    (0.5, 0.10)   2.4e-10          2.2e-9
    (0.5, 0.05)   2.0e-9           5.3e-8
    (1.0, 0.05)   6.0e-4           3.9e-3        <- under-resolved (nu / A = 0.05)
    (1.5, 0.05)   9.9e-3           3.5e-2        <- under-resolved (nu / A = 0.033)

The error falls like exp(-c K nu / A), so what matters is nu / A. The experiment's range is therefore
A in [0.5, 1.5], nu in [0.1, 0.2] (nu / A >= 1/15): nu down to 0.05 at A = 1.5 would leave errors of
0.7 % of A in u and 3.5 % in dudx at N = 128, and still 1.1e-4 and 5.6e-4 at N = 256 (K = 85).
``spectral_tail`` (printed by the command line, which warns above 1e-4) tracks the error in u
relative to |A|: 4.3e-5 at (1.5, 0.1), 3.8e-4 at (1.0, 0.05), 2.9e-3 at (1.5, 0.05).

Cost: FFTs of N = 128 points, 4 pairs per ETDRK4 step. A 40-step run takes 6 ms at A = 0.5 (3 sub-steps
per output step) to 21 ms at A = 1.5 (8 sub-steps), best of 20 on a busy 2-core machine; a whole
``python solvers/burgers.py`` process takes ~0.5 s, nearly all of it Python and numpy starting up.

Run ``python solvers/burgers.py --help`` for the command line. Importing this module needs only numpy
(the client mode imports jaxsurro.client when it starts). There is no MPI mode: one N = 128 run takes
milliseconds, so an ensemble parallelises over simulations, not within one.
"""

import argparse
import functools
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

try:
    import solver_cli
except ModuleNotFoundError:  # imported by path or run as `python -m solvers.burgers`: solvers/ is not on sys.path
    sys.path.append(str(Path(__file__).resolve().parent))
    import solver_cli

PARAMETER_NAMES = ("A", "nu")
FIELD_NAMES = ("u", "dudx")
DEFAULT_POINTS = 128
DEFAULT_STEPS = 40
DEFAULT_DT = 0.05
DEFAULT_CFL = 0.2
MIN_POINTS = 4  # the smallest N whose dealiased band (N - 1) // 3 still holds the k = 1 initial mode
CONTOUR_POINTS = 64  # points of the Kassam-Trefethen contour for the ETDRK4 coefficients


# ----------------------------------------------------------------------------- validation


def _check_parameters(parameters: ArrayLike) -> tuple[float, float]:
    """Return (A, nu) as floats: two finite numbers, nu > 0; or raise a clear error."""
    vector = solver_cli.check_vector(parameters, 2, "parameters", PARAMETER_NAMES)
    amplitude, viscosity = (float(value) for value in vector)
    if viscosity <= 0.0:
        raise ValueError(f"the viscosity nu (parameters[1]) must be > 0, got {viscosity!r}")
    return amplitude, viscosity


# ----------------------------------------------------------------------------- grid and spectral helpers


def grid(n_points: int) -> np.ndarray:
    """The N grid points x_j = 2 pi j / N, j = 0..N-1, float64."""
    size = solver_cli.check_count(n_points, "n_points", MIN_POINTS)
    return 2.0 * np.pi * np.arange(size, dtype=np.float64) / size


def wavenumbers(n_points: int) -> np.ndarray:
    """The rfft wavenumbers k = 0..N//2 as float64."""
    return np.arange(n_points // 2 + 1, dtype=np.float64)


def dealias_cutoff(n_points: int) -> int:
    """K = (N - 1) // 3: the largest kept wavenumber under the 2/3 rule (|k| < N / 3)."""
    return (n_points - 1) // 3


def substeps_for(amplitude: float, n_points: int, dt: float, cfl: float = DEFAULT_CFL) -> int:
    """ETDRK4 sub-steps per output step: ceil(dt |A| / (cfl dx)), dx = 2 pi / N, at least 1.

    |A| = max|u0| bounds max|u| for all t (maximum principle), so one count serves the whole run.
    """
    dx = 2.0 * np.pi / n_points
    return max(1, math.ceil(dt * abs(amplitude) / (cfl * dx) - 1e-12))


def etdrk4_coefficients(linear: np.ndarray, h: float) -> tuple[np.ndarray, ...]:
    """(E, E2, Q, f1, f2, f3) of the Cox-Matthews ETDRK4 scheme for the diagonal linear operator ``linear``.

    E = exp(h L), E2 = exp(h L / 2), Q = h (exp(h L / 2) - 1) / (h L), and
        f1 = h (-4 - z + e^z (4 - 3 z + z^2)) / z^3,  f2 = h (2 + z + e^z (z - 2)) / z^3,
        f3 = h (-4 - 3 z - z^2 + e^z (4 - z)) / z^3,  z = h L,
    each averaged over z + exp(2 pi i (j + 1/2) / M), j = 0..M-1 (Kassam and Trefethen 2005): the
    closed forms cancel catastrophically for small |z| and are singular at z = 0. ``linear`` is real.
    """
    z = h * np.asarray(linear, dtype=np.float64)
    roots = np.exp(2j * np.pi * (np.arange(CONTOUR_POINTS) + 0.5) / CONTOUR_POINTS)
    points = z[:, None] + roots[None, :]
    exp_points = np.exp(points)
    cubed = points**3

    def average(values: np.ndarray) -> np.ndarray:
        return h * np.mean(values, axis=1).real

    q = average((np.exp(points / 2.0) - 1.0) / points)
    f1 = average((-4.0 - points + exp_points * (4.0 - 3.0 * points + points**2)) / cubed)
    f2 = average((2.0 + points + exp_points * (points - 2.0)) / cubed)
    f3 = average((-4.0 - 3.0 * points - points**2 + exp_points * (4.0 - points)) / cubed)
    return np.exp(z), np.exp(z / 2.0), q, f1, f2, f3


# ----------------------------------------------------------------------------- the stepper


@dataclass(frozen=True, slots=True, eq=False)
class BurgersStepper:
    """Everything one ETDRK4 step of length h needs for a given (N, nu, h), precomputed once.

    Shared between callers (``make_stepper`` caches it), so its arrays are read-only and every method
    allocates its results: pure functions of their inputs, safe to use from several threads.
    """

    n_points: int  # N
    nu: float
    h: float  # the ETDRK4 step (an output step is a whole number of them)
    decay: np.ndarray  # E = exp(-nu k^2 h), (N//2 + 1,)
    half_decay: np.ndarray  # E2 = exp(-nu k^2 h / 2)
    q: np.ndarray
    f1: np.ndarray
    f2: np.ndarray
    f3: np.ndarray
    advection: np.ndarray  # -(i k / 2) on the kept band |k| <= K, 0 above (complex)
    derivative: np.ndarray  # i k on the kept band, 0 above (complex)

    def nonlinear(self, spectrum: np.ndarray) -> np.ndarray:
        """N(u_hat) = -(i k / 2) FFT(u^2), dealiased: zero above K."""
        field = np.fft.irfft(spectrum, n=self.n_points)
        return self.advection * np.fft.rfft(field * field)

    def step(self, spectrum: ArrayLike) -> np.ndarray:
        """One ETDRK4 step of length h from ``spectrum`` (the rfft of u; not modified); a new array."""
        v = np.asarray(spectrum, dtype=np.complex128)
        if v.shape != self.decay.shape:
            raise ValueError(
                f"spectrum must have shape {self.decay.shape} (the rfft of {self.n_points} points), got {v.shape}"
            )
        nv = self.nonlinear(v)
        a = self.half_decay * v + self.q * nv
        na = self.nonlinear(a)
        b = self.half_decay * v + self.q * na
        nb = self.nonlinear(b)
        c = self.half_decay * a + self.q * (2.0 * nb - nv)
        nc = self.nonlinear(c)
        return self.decay * v + self.f1 * nv + 2.0 * self.f2 * (na + nb) + self.f3 * nc

    def fields(self, spectrum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u, dudx) on the grid from the spectrum: new (N,) float64 arrays."""
        return (np.fft.irfft(spectrum, n=self.n_points), np.fft.irfft(self.derivative * spectrum, n=self.n_points))


@functools.lru_cache(maxsize=64)
def _cached_stepper(n_points: int, nu: float, h: float) -> BurgersStepper:
    """Build the stepper for validated arguments (cached: built once per (N, nu, h))."""
    k = wavenumbers(n_points)
    kept = k <= dealias_cutoff(n_points)
    coefficients = etdrk4_coefficients(-nu * k * k, h)
    return BurgersStepper(
        n_points,
        nu,
        h,
        *(solver_cli.read_only(array) for array in coefficients),
        advection=solver_cli.read_only(np.where(kept, -0.5j * k, 0.0)),
        derivative=solver_cli.read_only(np.where(kept, 1j * k, 0.0)),
    )


def make_stepper(n_points: int, nu: float, h: float) -> BurgersStepper:
    """The (cached, read-only) ETDRK4 stepper for N points, viscosity nu and step h."""
    return _cached_stepper(
        solver_cli.check_count(n_points, "n_points", MIN_POINTS),
        solver_cli.check_positive(nu, "nu"),
        solver_cli.check_positive(h, "h"),
    )


def initial_spectrum(initial_field: ArrayLike, n_points: int) -> np.ndarray:
    """The dealiased rfft of an (N,) initial field (modes above K set to zero), a new complex array."""
    size = solver_cli.check_count(n_points, "n_points", MIN_POINTS)
    field = np.asarray(initial_field, dtype=np.float64)
    if field.shape != (size,):
        raise ValueError(f"initial_field must have shape ({size},), got shape {field.shape}")
    if not np.all(np.isfinite(field)):
        raise ValueError("initial_field must be finite; it contains NaN or infinity")
    spectrum = np.fft.rfft(field)
    spectrum[dealias_cutoff(size) + 1 :] = 0.0
    return spectrum


# ----------------------------------------------------------------------------- simulation


def evolve(
    initial_field: ArrayLike,
    nu: float,
    n_steps: int,
    dt: float = DEFAULT_DT,
    *,
    cfl: float = DEFAULT_CFL,
    substeps: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (u, dudx) after output steps 1..n_steps (times dt, 2 dt, ...) from any (N,) initial field.

    The initial field is dealiased first. Each output step is ``substeps`` ETDRK4 steps of dt / substeps;
    by default ceil(dt max|u0| / (cfl dx)) (see ``substeps_for``). Inputs are checked here, when called.
    """
    field = np.asarray(initial_field, dtype=np.float64)
    if field.ndim != 1:
        raise ValueError(f"initial_field must be a 1-D array of N >= {MIN_POINTS} points, got shape {field.shape}")
    n_points = field.shape[0]
    spectrum = initial_spectrum(field, n_points)
    viscosity = solver_cli.check_positive(nu, "nu")
    steps = solver_cli.check_count(n_steps, "n_steps")
    step = solver_cli.check_positive(dt, "dt")
    if substeps is None:
        speed = float(np.max(np.abs(field)))
        substeps = substeps_for(speed, n_points, step, solver_cli.check_positive(cfl, "cfl"))
    count = solver_cli.check_count(substeps, "substeps")
    stepper = make_stepper(n_points, viscosity, step / count)
    return _run(stepper, spectrum, steps, count)


def _run(
    stepper: BurgersStepper, spectrum: np.ndarray, n_steps: int, substeps: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Generator behind ``evolve`` (inputs already validated)."""
    for _ in range(n_steps):
        for _ in range(substeps):
            spectrum = stepper.step(spectrum)
        yield stepper.fields(spectrum)


def simulate(
    parameters: ArrayLike,
    n_points: int = DEFAULT_POINTS,
    n_steps: int = DEFAULT_STEPS,
    dt: float = DEFAULT_DT,
    *,
    cfl: float = DEFAULT_CFL,
    substeps: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (u, dudx), two new (N,) float64 arrays, after each output step k = 1..n_steps (time k dt).

    ``parameters`` = (A, nu): u(x, 0) = A sin(x) and the viscosity. ``u[j]`` is at x_j = 2 pi j / N.
    Sub-steps per output step: ``substeps``, or by default ceil(dt |A| / (cfl dx)). Inputs are checked
    here, when called, not on first iteration.
    """
    amplitude, viscosity = _check_parameters(parameters)
    x = grid(n_points)
    step = solver_cli.check_positive(dt, "dt")
    if substeps is None:
        substeps = substeps_for(amplitude, x.size, step, solver_cli.check_positive(cfl, "cfl"))
    return evolve(amplitude * np.sin(x), viscosity, n_steps, step, substeps=substeps)


def spectral_tail(field: ArrayLike) -> float:
    """Resolution indicator: the largest |u_hat_k| over the top tenth of the kept band, over max |u_hat_k|.

    Small (below ~1e-6) for a resolved field; near the error level of u (relative to its size) otherwise.
    """
    values = np.asarray(field, dtype=np.float64)
    magnitudes = np.abs(np.fft.rfft(values))
    cutoff = dealias_cutoff(values.size)
    top = magnitudes[max(1, cutoff - max(1, cutoff // 10) + 1) : cutoff + 1]
    largest = magnitudes.max()
    return float(top.max() / largest) if largest > 0 and top.size else 0.0


# ----------------------------------------------------------------------------- command line


def _client_module() -> Any:
    """jaxsurro.client, or a clear exit when the package is not installed."""
    return solver_cli.client_module("burgers.py")


def run_client(n_points: int, n_steps: int, dt: float, cfl: float = DEFAULT_CFL) -> None:
    """Take (A, nu) from the jaxsurro server and stream every output step's u and dudx (t = 0..T-1)."""
    client = _client_module()
    with client.connect(fields={name: (n_points,) for name in FIELD_NAMES}) as sim:
        parameters = np.asarray(sim.parameters, dtype=np.float64)
        for t, (u, dudx) in enumerate(simulate(parameters, n_points, n_steps, dt, cfl=cfl)):
            sim.send("u", t, u)
            sim.send("dudx", t, dudx)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every option is documented in --help."""
    parser = solver_cli.solver_parser(
        "burgers.py",
        description=(
            "1-D viscous Burgers equation u_t + u u_x = nu u_xx on the periodic domain [0, 2 pi), "
            "u(x, 0) = A sin(x): pseudo-spectral in x (2/3-rule dealiasing), ETDRK4 in time with the "
            "diffusion integrated exactly. Each output step gives u and dudx at x_j = 2 pi j / N."
        ),
        parameter_names=PARAMETER_NAMES,
        parameters="amplitude A of u(x, 0) = A sin(x) and viscosity nu > 0",
        summarised="fields",
        example="python solvers/burgers.py --parameters 1.0 0.1 --output run.npy",
    )
    solver_cli.add_count_argument(parser, "--points", "N", DEFAULT_POINTS, "grid points", MIN_POINTS)
    solver_cli.add_time_arguments(parser, DEFAULT_STEPS, DEFAULT_DT, steps="output steps", dt="output time step")
    solver_cli.add_positive_argument(parser, "--cfl", DEFAULT_CFL, "sub-step bound h |A| / dx")
    solver_cli.add_output_arguments(
        parser,
        trajectory="(T, 2, N) float64 trajectory ([:, 0] = u, [:, 1] = dudx, after output steps 1..T)",
        parameters="(A, nu)",
        sent="every output step as fields 'u' and 'dudx'",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: simulate, then summarise, write a trajectory or stream to a server."""
    parser = build_parser()
    args = parser.parse_args(argv)
    solver_cli.check_parameters_source(parser, args, "two numbers A NU")
    if args.parameters is not None and args.parameters[1] <= 0.0:
        parser.error(f"argument --parameters: the viscosity NU must be > 0, got {args.parameters[1]!r}")
    solver_cli.check_output(parser, args)
    if args.client:
        run_client(args.points, args.steps, args.dt, args.cfl)
        return 0

    start = time.perf_counter()
    steps = simulate(args.parameters, args.points, args.steps, args.dt, cfl=args.cfl)
    if args.output is not None:
        solver_cli.write_trajectory(args.output, steps, (args.steps, len(FIELD_NAMES), args.points))
        return 0
    tail = 0.0
    u = dudx = None
    for u, dudx in steps:
        tail = max(tail, spectral_tail(u))
    elapsed = time.perf_counter() - start
    assert u is not None and dudx is not None  # n_steps >= 1
    amplitude, viscosity = args.parameters
    substeps = substeps_for(amplitude, args.points, args.dt, args.cfl)
    print(
        f"burgers: N={args.points} steps={args.steps} dt={args.dt:g} A={amplitude:g} nu={viscosity:g} "
        f"substeps={substeps} final t={args.steps * args.dt:g}: u min={u.min():.6g} mean={u.mean():.3g} "
        f"max={u.max():.6g} dudx min={dudx.min():.6g} max={dudx.max():.6g} spectral tail={tail:.1e} "
        f"({elapsed * 1e3 / args.steps:.3f} ms/step)"
    )
    if tail > 1e-4:
        print(
            f"burgers: warning: spectral tail {tail:.1e} > 1e-4, under-resolved; raise --points or nu", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
