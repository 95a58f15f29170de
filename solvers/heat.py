"""2D heat equation solver (Breed paper, seed 000, appendix B.1), usable standalone or as a jaxsurro client.

Solves, on the unit square [0, 1]^2,

    du/dt = alpha * (d^2u/dx1^2 + d^2u/dx2^2)
    u = T1 on x1 = 0,  u = T2 on x1 = 1,  u = T3 on x2 = 0,  u = T4 on x2 = 1,
    u(x, 0) = T0 in the interior,

with second-order 5-point finite differences on an M x M interior grid (h = 1/(M+1),
x1_i = (i+1) h, x2_j = (j+1) h) and implicit Euler in time. Every step solves

    (I - dt alpha Delta_h) u^{n+1} = u^n + dt alpha b,

exactly, where b holds the boundary temperatures' contributions (T/h^2 on the nodes next to a
boundary; a corner node gets two). Array convention: ``field[i, j] = u(x1_i, x2_j)``, so axis 0
runs along x1 and axis 1 along x2. Parameters are ordered (T0, T1, T2, T3, T4). All arithmetic is
float64.

The solve is a fast diagonalisation: the orthonormal type-I discrete sine transform S (symmetric,
S @ S = I) diagonalises Delta_h, with eigenvalues -(lambda_k + lambda_l),
lambda_k = (2 - 2 cos(k pi h)) / h^2 = 4 sin^2(k pi h / 2) / h^2, k = 1..M, so

    u^{n+1} = S [ g * S (u^n + dt alpha b) S ] S,   g_kl = 1 / (1 + dt alpha (lambda_k + lambda_l)).

Two ways apply S, measured with one BLAS thread on this 2-core machine (scripts/bench_heat.py):
dense products with the M x M sine matrix through BLAS ("matrix", O(M^3)), or scipy.fft.dstn type 1
("fft"). pocketfft's DST-I runs an FFT of length 2(M+1): fast when that length has only small prime
factors, very slow otherwise (M = 256, length 2 * 257: 6.6 ms against 1.0 ms for the matrix
products). The matrix products win below M ~ 110 (M = 64: 15 us against 55 us per transform) and
whenever 2(M+1) has a large prime factor; the FFT wins from M ~ 110 on when 2(M+1) is 7-smooth
(M = 255: 0.46 ms against 1.06 ms). "auto" follows that rule; pass transform= to override it.

Run as a script, the solver keeps BLAS to one thread (OPENBLAS_NUM_THREADS=1 unless already set):
an ensemble runs many solvers per node, and a multi-threaded GEMM that waits for a descheduled
thread was measured 25x slower (M = 255 step: 62 ms against 2.4 ms) next to one busy process.

``simulate`` runs the recurrence in sine space, u_hat <- g * u_hat + g * S(dt alpha b) S, and
transforms back once per step: half the work of a full physical step, same result to rounding.

Parallel runs (MPI, ``mpirun -n k python solvers/heat.py ...``): a slab decomposition built on the
same diagonalisation. Rank r owns rows I_r of the physical field and columns I_r of the spectrum
u_hat (one balanced block partition of 0..M-1 serves both; ``slab_offsets``). The recurrence
u_hat <- g * u_hat + g * S(dt alpha b)S is elementwise, so each rank advances its spectral columns
with no communication; their initial values need none either (the constant T0 field and the boundary
source are outer products of S 1 and S e_0, S e_{M-1}). The physical slab u[I_r, :] = (S u_hat)[I_r, :] S
comes from one 1-D transform along axis 0 of the owned columns, one all-to-all transpose (MPI
Alltoallv: each rank sends every other the rows it owns of its columns, M^2/k values in all), and one
1-D transform along axis 1 of the owned rows. Per step and rank: O(M^2 log M / k) work with the FFT
transform or O(M^3 / k) with the matrix one, and one all-to-all of M^2 / k float64 values; the
result equals the serial one to rounding (about 1e-15 relative). Any M and k work (slabs differ by at
most one row; a rank may own none). Measured on this 2-core machine, 2 ranks against 1 process:
M = 64, 0.029 against 0.020 ms/step (communication dominates such small grids); M = 255, 0.68 against
0.77 ms/step. The decomposition is for fields too large for one node's memory or time budget. MPI is
used only when asked (--mpi on) or when an MPI launcher
started several ranks (--mpi auto, decided by jaxsurro.client.launched_by_mpi: a rank count > 1 in
the launcher's variables, not merely inherited from an MPI rank that started this process), so a
standalone run, or a solver started by an MPI-parallel server that passes its MPI variables on, never
imports mpi4py.

Run ``python solvers/heat.py --help`` for the command line. Importing this module needs only
numpy (scipy.fft and scipy.sparse are imported when first used), never JAX or mpi4py.
"""

import os

if __name__ == "__main__":
    # Before numpy loads BLAS: one thread per solver process (see the module docstring).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import functools
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

try:
    import solver_cli
except ModuleNotFoundError:  # imported by path or run as `python -m solvers.heat`: solvers/ is not on sys.path
    sys.path.append(str(Path(__file__).resolve().parent))
    import solver_cli

PARAMETER_NAMES = ("T0", "T1", "T2", "T3", "T4")
BOUNDARY_NAMES = PARAMETER_NAMES[1:]
FIELD_NAME = "temperature"
DEFAULT_GRID_SIZE = 64
DEFAULT_STEPS = 100
DEFAULT_DT = 0.01
DEFAULT_ALPHA = 1.0
Transform = Literal["matrix", "fft"]
TRANSFORMS: tuple[str, ...] = ("auto", "matrix", "fft")
# The FFT path wins only from this size on, and only for 7-smooth 2(M+1) (see module docstring).
FFT_MIN_GRID_SIZE = 112


# ----------------------------------------------------------------------------- choice of transform


def _largest_prime_factor(n: int) -> int:
    """Largest prime factor of ``n`` >= 2 (trial division; n is a small FFT length)."""
    largest, factor = 1, 2
    while factor * factor <= n:
        while n % factor == 0:
            largest, n = factor, n // factor
        factor += 1
    return max(largest, n)


def choose_transform(grid_size: int) -> Transform:
    """The faster way to apply the DST-I at this grid size (measured; see the module docstring)."""
    if grid_size >= FFT_MIN_GRID_SIZE and _largest_prime_factor(2 * (grid_size + 1)) <= 7:
        return "fft"
    return "matrix"


# ----------------------------------------------------------------------------- fast solver


def _add_boundary_source(rhs: np.ndarray, boundary: np.ndarray, coefficient: float) -> None:
    """Add ``coefficient * T`` (coefficient = dt alpha / h^2) to the nodes next to each boundary, in place."""
    t1, t2, t3, t4 = boundary
    rhs[0, :] += coefficient * t1  # x1 = 0
    rhs[-1, :] += coefficient * t2  # x1 = 1
    rhs[:, 0] += coefficient * t3  # x2 = 0
    rhs[:, -1] += coefficient * t4  # x2 = 1


def sine_matrix(grid_size: int) -> np.ndarray:
    """The orthonormal, symmetric DST-I matrix S[k, i] = sqrt(2/(M+1)) sin(pi (k+1)(i+1)/(M+1))."""
    index = np.arange(1, grid_size + 1, dtype=np.int64)
    period = 2 * (grid_size + 1)
    # Reduce k*i modulo the period in integers so the sine sees small, exact arguments.
    phase = np.outer(index, index) % period
    return math.sqrt(2.0 / (grid_size + 1)) * np.sin(np.pi * phase / (grid_size + 1))


def laplacian_eigenvalues(grid_size: int) -> np.ndarray:
    """lambda_k = (2 - 2 cos(k pi h)) / h^2 for k = 1..M, written as 4 sin^2(k pi h / 2) / h^2."""
    h = 1.0 / (grid_size + 1)
    k = np.arange(1, grid_size + 1, dtype=np.float64)
    return (2.0 * np.sin(0.5 * np.pi * k * h) / h) ** 2


@dataclass(frozen=True, slots=True, eq=False)
class HeatStepper:
    """Everything one implicit-Euler heat step needs for a given (M, dt, alpha), precomputed once.

    Shared between callers (``make_stepper`` caches it), so its arrays are read-only and every
    method allocates its own scratch: safe to use from several threads.
    """

    grid_size: int  # M, interior nodes per axis
    dt: float
    alpha: float
    transform: Transform  # how S is applied: "matrix" (BLAS) or "fft" (scipy.fft.dstn type 1)
    source_coefficient: float  # dt * alpha / h^2, the weight of a boundary temperature in the rhs
    gain: np.ndarray  # (M, M) float64, g_kl = 1 / (1 + dt alpha (lambda_k + lambda_l))
    sine: np.ndarray | None  # (M, M) float64 DST-I matrix for "matrix"; None for "fft"

    def _sine_transform(self, values: np.ndarray, scratch: np.ndarray, reuse_input: bool) -> np.ndarray:
        """Return S @ values @ S; with ``reuse_input`` it may overwrite ``values``; clobbers ``scratch``."""
        if self.sine is not None:
            np.matmul(self.sine, values, out=scratch)
            return np.matmul(scratch, self.sine, out=values if reuse_input else None)
        import scipy.fft

        return scipy.fft.dstn(values, type=1, norm="ortho", overwrite_x=reuse_input)

    def boundary_source(self, boundary: ArrayLike) -> np.ndarray:
        """dt alpha b as an (M, M) float64 field, for boundary temperatures (T1, T2, T3, T4)."""
        temperatures = solver_cli.check_vector(boundary, 4, "boundary", BOUNDARY_NAMES)
        source = np.zeros((self.grid_size, self.grid_size))
        _add_boundary_source(source, temperatures, self.source_coefficient)
        return source

    def step(self, field: ArrayLike, boundary: ArrayLike) -> np.ndarray:
        """One implicit-Euler step: solve (I - dt alpha Delta_h) u_new = field + dt alpha b exactly.

        ``field`` is the (M, M) interior field (not modified), ``boundary`` is (T1, T2, T3, T4).
        Returns a new (M, M) float64 array.
        """
        temperatures = solver_cli.check_vector(boundary, 4, "boundary", BOUNDARY_NAMES)
        rhs = self._copy_field(field)
        _add_boundary_source(rhs, temperatures, self.source_coefficient)
        scratch = np.empty_like(rhs)
        spectrum = self._sine_transform(rhs, scratch, reuse_input=True)
        spectrum *= self.gain
        return self._sine_transform(spectrum, scratch, reuse_input=True)

    def run(self, initial_field: ArrayLike, boundary: ArrayLike, n_steps: int) -> Iterator[np.ndarray]:
        """Yield the field after steps 1..n_steps from ``initial_field`` (a scalar or an (M, M) array).

        Iterates u_hat <- g * u_hat + g * S(dt alpha b)S in sine space and transforms back once per
        step; the only per-step allocation is the yielded array, which the caller owns.
        """
        steps = solver_cli.check_count(n_steps, "n_steps")
        temperatures = solver_cli.check_vector(boundary, 4, "boundary", BOUNDARY_NAMES)
        expected = (self.grid_size, self.grid_size)
        initial = np.asarray(initial_field, dtype=np.float64)
        if initial.shape not in ((), expected):
            raise ValueError(f"initial_field must be a scalar or have shape {expected}, got shape {initial.shape}")
        initial = np.broadcast_to(initial, expected)
        if not np.all(np.isfinite(initial)):
            raise ValueError("initial_field must be finite; it contains NaN or infinity")
        return self._run(np.array(initial), temperatures, steps)

    def _run(self, state: np.ndarray, boundary: np.ndarray, n_steps: int) -> Iterator[np.ndarray]:
        """Generator behind ``run`` (inputs already validated; ``state`` is a private copy)."""
        scratch = np.empty_like(state)
        increment = self._sine_transform(self.boundary_source(boundary), scratch, reuse_input=True)
        increment *= self.gain
        state = self._sine_transform(state, scratch, reuse_input=True)
        for _ in range(n_steps):
            np.multiply(state, self.gain, out=state)
            np.add(state, increment, out=state)
            yield self._sine_transform(state, scratch, reuse_input=False)

    def _copy_field(self, field: ArrayLike) -> np.ndarray:
        """A fresh C-contiguous float64 copy of an (M, M) field, or a clear error."""
        copy = np.array(field, dtype=np.float64, order="C")
        expected = (self.grid_size, self.grid_size)
        if copy.shape != expected:
            raise ValueError(f"field must have shape {expected} (the M x M interior grid), got {copy.shape}")
        return copy


@functools.lru_cache(maxsize=16)
def _cached_stepper(grid_size: int, dt: float, alpha: float, transform: Transform) -> HeatStepper:
    """Build the stepper for validated arguments (cached: built once per (M, dt, alpha, transform))."""
    eigenvalues = laplacian_eigenvalues(grid_size)
    gain = 1.0 / (1.0 + dt * alpha * (eigenvalues[:, None] + eigenvalues[None, :]))
    h = 1.0 / (grid_size + 1)
    return HeatStepper(
        grid_size=grid_size,
        dt=dt,
        alpha=alpha,
        transform=transform,
        source_coefficient=dt * alpha / (h * h),
        gain=solver_cli.read_only(gain),
        sine=solver_cli.read_only(sine_matrix(grid_size)) if transform == "matrix" else None,
    )


def make_stepper(
    grid_size: int, dt: float = DEFAULT_DT, alpha: float = DEFAULT_ALPHA, transform: str = "auto"
) -> HeatStepper:
    """The (cached) implicit-Euler stepper for an M x M grid; ``transform`` is auto, matrix or fft."""
    size = solver_cli.check_count(grid_size, "grid_size")
    step = solver_cli.check_positive(dt, "dt")
    diffusivity = solver_cli.check_positive(alpha, "alpha")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
    chosen: Transform = choose_transform(size) if transform == "auto" else transform  # type: ignore[assignment]
    return _cached_stepper(size, step, diffusivity, chosen)


def simulate(
    parameters: ArrayLike,
    grid_size: int,
    n_steps: int,
    dt: float = DEFAULT_DT,
    alpha: float = DEFAULT_ALPHA,
) -> Iterator[np.ndarray]:
    """Yield the (M, M) float64 interior field after each step k = 1..n_steps (time k * dt).

    ``parameters`` = (T0, T1, T2, T3, T4): initial interior temperature, then the boundary
    temperatures on x1 = 0, x1 = 1, x2 = 0, x2 = 1. ``field[i, j]`` is at (x1, x2) = ((i+1)h, (j+1)h).
    Inputs are checked here, when called, not on first iteration. Each yielded array is new.
    """
    temperatures = solver_cli.check_vector(parameters, 5, "parameters", PARAMETER_NAMES)
    stepper = make_stepper(grid_size, dt, alpha)
    return stepper.run(temperatures[0], temperatures[1:], n_steps)


# ----------------------------------------------------------------------------- MPI domain decomposition


def slab_offsets(grid_size: int, n_parts: int) -> np.ndarray:
    """Offsets (n_parts + 1,) of a balanced block partition of M rows: the first M mod k parts get one more."""
    size = solver_cli.check_count(grid_size, "grid_size")
    parts = solver_cli.check_count(n_parts, "n_parts")
    rows = np.full(parts, size // parts, dtype=np.int64)
    rows[: size % parts] += 1
    return np.concatenate(([0], np.cumsum(rows)))


def _sine_vector(stepper: HeatStepper, vector: np.ndarray) -> np.ndarray:
    """S @ vector for a length-M vector."""
    if stepper.sine is not None:
        return stepper.sine @ vector
    import scipy.fft

    return scipy.fft.dst(vector, type=1, norm="ortho")


def _sine_transform_axis(stepper: HeatStepper, values: np.ndarray, axis: int) -> np.ndarray:
    """S applied along one axis (axis 0: S @ values, axis 1: values @ S), as a new array."""
    if values.size == 0:
        return np.array(values)
    if stepper.sine is not None:
        return stepper.sine @ values if axis == 0 else values @ stepper.sine
    import scipy.fft

    return scipy.fft.dst(values, type=1, norm="ortho", axis=axis)


def simulate_distributed(
    parameters: ArrayLike,
    grid_size: int,
    n_steps: int,
    comm: Any,
    dt: float = DEFAULT_DT,
    alpha: float = DEFAULT_ALPHA,
) -> Iterator[np.ndarray]:
    """Yield this MPI rank's rows of the field after each step (collective over ``comm``).

    Rank r gets rows ``slab_offsets(M, size)[r]:[r + 1]`` of what ``simulate`` yields (the same to
    rounding, about 1e-15 relative), as new (rows, M) float64 arrays. Every rank calls it with the
    same arguments and consumes every step (each step has one all-to-all).
    """
    temperatures = solver_cli.check_vector(parameters, 5, "parameters", PARAMETER_NAMES)
    steps = solver_cli.check_count(n_steps, "n_steps")
    stepper = make_stepper(grid_size, dt, alpha)
    offsets = slab_offsets(stepper.grid_size, comm.Get_size())
    return _run_distributed(stepper, temperatures, steps, comm, offsets)


def _run_distributed(
    stepper: HeatStepper, temperatures: np.ndarray, n_steps: int, comm: Any, offsets: np.ndarray
) -> Iterator[np.ndarray]:
    """Generator behind ``simulate_distributed``: mode columns evolve locally, one transpose per step."""
    size = stepper.grid_size
    rank = comm.Get_rank()
    widths = np.diff(offsets)
    first, last = int(offsets[rank]), int(offsets[rank + 1])
    owned = last - first  # rows of the field and columns of the spectrum this rank holds
    mine = slice(first, last)
    t0, t1, t2, t3, t4 = temperatures
    # The constant initial field and the boundary source are sums of outer products of the constant
    # and edge vectors, so their spectra S X S are outer products of s = S 1, f = S e_0, l = S e_{M-1}.
    constant = _sine_vector(stepper, np.ones(size))
    edges = np.zeros((2, size))
    edges[0, 0] = edges[1, -1] = 1.0
    first_edge, last_edge = (_sine_vector(stepper, edge) for edge in edges)
    source = stepper.source_coefficient * (
        np.outer(t1 * first_edge + t2 * last_edge, constant[mine])
        + np.outer(constant, t3 * first_edge[mine] + t4 * last_edge[mine])
    )
    gain = np.ascontiguousarray(stepper.gain[:, mine])
    increment = gain * source
    state = t0 * np.outer(constant, constant[mine])  # (M, owned) spectral columns
    # Alltoallv: rank s gets rows offsets[s]:offsets[s+1] of our (M, owned) block, a contiguous run.
    send = ([int(w) * owned for w in widths], [int(o) * owned for o in offsets[:-1]])
    receive = ([owned * int(w) for w in widths], [owned * int(o) for o in offsets[:-1]])
    gathered = np.empty(owned * size)
    rows = np.empty((owned, size))
    for _ in range(n_steps):
        np.multiply(state, gain, out=state)
        np.add(state, increment, out=state)
        columns = np.ascontiguousarray(_sine_transform_axis(stepper, state, axis=0))  # (S u_hat)[:, mine]
        comm.Alltoallv([columns, send], [gathered, receive])
        for s in range(len(widths)):
            block = gathered[owned * offsets[s] : owned * offsets[s + 1]]
            rows[:, offsets[s] : offsets[s + 1]] = block.reshape(owned, int(widths[s]))
        yield _sine_transform_axis(stepper, rows, axis=1)  # (S u_hat S)[mine, :]


# ----------------------------------------------------------------------------- reference system


class HeatSystem(NamedTuple):
    """The implicit-Euler step as a sparse linear system, on the C-order flattened field.

    u_next.ravel() solves ``matrix @ u_next = u.ravel() + boundary_matrix @ (T1, T2, T3, T4)``.
    """

    matrix: Any  # scipy.sparse.csc_array (M^2, M^2): I - dt alpha Delta_h
    boundary_matrix: Any  # scipy.sparse.csc_array (M^2, 4): dt alpha b per unit boundary temperature

    def rhs(self, field: ArrayLike, boundary: ArrayLike) -> np.ndarray:
        """The right-hand side u.ravel() + dt alpha b for an (M, M) field and (T1, T2, T3, T4)."""
        temperatures = solver_cli.check_vector(boundary, 4, "boundary", BOUNDARY_NAMES)
        return np.ravel(field) + self.boundary_matrix @ temperatures


def assemble_system(grid_size: int, dt: float = DEFAULT_DT, alpha: float = DEFAULT_ALPHA) -> HeatSystem:
    """Assemble I - dt alpha Delta_h and the boundary coupling from the 5-point Laplacian on the
    (M+2) x (M+2) grid including the boundary nodes (independent of the sine-transform solver).
    """
    import scipy.sparse as sparse

    size = solver_cli.check_count(grid_size, "grid_size")
    step = solver_cli.check_positive(dt, "dt")
    diffusivity = solver_cli.check_positive(alpha, "alpha")
    padded = size + 2
    h = 1.0 / (size + 1)
    second_difference = sparse.diags_array(
        [np.ones(padded - 1), -2.0 * np.ones(padded), np.ones(padded - 1)], offsets=[-1, 0, 1]
    ) / (h * h)
    identity = sparse.eye_array(padded, format="csr")
    # Delta_h on the padded grid (its rows at boundary nodes are never used below).
    laplacian = (sparse.kron(second_difference, identity) + sparse.kron(identity, second_difference)).tocsr()

    node = np.arange(padded * padded).reshape(padded, padded)
    interior = node[1:-1, 1:-1].ravel()
    sides = (node[0, 1:-1], node[-1, 1:-1], node[1:-1, 0], node[1:-1, -1])  # T1, T2, T3, T4
    indicator = np.zeros((padded * padded, 4))
    for column, side in enumerate(sides):
        indicator[side, column] = 1.0

    interior_rows = laplacian[interior]
    matrix = sparse.eye_array(size * size, format="csc") - step * diffusivity * interior_rows[:, interior]
    boundary_matrix = step * diffusivity * (interior_rows @ indicator)
    return HeatSystem(matrix=sparse.csc_array(matrix), boundary_matrix=sparse.csc_array(boundary_matrix))


# ----------------------------------------------------------------------------- command line


def _client_module(needed_for: str = "--client", instead: str = "run without --client") -> Any:
    """jaxsurro.client, or a clear exit when the package is not installed."""
    return solver_cli.client_module("heat.py", needed_for, instead)


def run_client(grid_size: int, n_steps: int, dt: float, alpha: float, comm: Any = None) -> None:
    """Take parameters from the jaxsurro server and stream every step's field to it (t = 0..T-1), for each
    simulation it gives this process (one, or many for a persistent client).

    With an MPI communicator every rank sends its own row slab; the client's root assembles the field.
    """
    client = _client_module()
    # One simulation (the launcher named it), or, as a persistent client (JAXSURRO_SIM_ID=any), each
    # the server hands out until none is left.
    if comm is None:
        for sim in client.simulations(fields={FIELD_NAME: (grid_size, grid_size)}):
            parameters = np.asarray(sim.parameters, dtype=np.float64)
            for t, field in enumerate(simulate(parameters, grid_size, n_steps, dt, alpha)):
                sim.send(FIELD_NAME, t, field)
        return
    start = (int(slab_offsets(grid_size, comm.Get_size())[comm.Get_rank()]), 0)
    for sim in client.simulations(comm=comm, fields={FIELD_NAME: (grid_size, grid_size)}):
        parameters = np.asarray(sim.parameters, dtype=np.float64)
        slabs = simulate_distributed(parameters, grid_size, n_steps, comm, dt, alpha)
        for t, rows in enumerate(slabs):
            sim.send(FIELD_NAME, t, rows, start=start, global_shape=(grid_size, grid_size))


def write_trajectory_distributed(
    path: Path, slabs: Iterator[np.ndarray], comm: Any, n_steps: int, grid_size: int
) -> None:
    """Gather every step's row slabs at rank 0 (MPI Gatherv) and write the trajectory there only."""
    offsets = slab_offsets(grid_size, comm.Get_size())
    layout = ([int(w) * grid_size for w in np.diff(offsets)], [int(o) * grid_size for o in offsets[:-1]])
    if comm.Get_rank() != 0:
        for rows in slabs:
            comm.Gatherv(rows, None, root=0)
        return

    def gathered() -> Iterator[np.ndarray]:
        field = np.empty((grid_size, grid_size))
        for rows in slabs:
            comm.Gatherv(rows, [field, layout], root=0)
            yield field

    solver_cli.write_trajectory(path, gathered(), (n_steps, grid_size, grid_size))


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process as one of several ranks (--mpi auto).

    The rule is jaxsurro.client.launched_by_mpi, the one the server's ranks follow too.
    """
    client = _client_module("--mpi auto (the default)", "choose --mpi on or --mpi off")
    return client.launched_by_mpi(os.environ)


def _summary(args: argparse.Namespace, minimum: float, mean: float, maximum: float, seconds: float) -> str:
    """The one-line summary of a run."""
    return (
        f"heat: M={args.grid_size} steps={args.steps} dt={args.dt:g} alpha={args.alpha:g} "
        f"final t={args.steps * args.dt:g}: min={minimum:.6g} mean={mean:.6g} "
        f"max={maximum:.6g} ({seconds * 1e3 / args.steps:.3f} ms/step)"
    )


def _main_mpi(args: argparse.Namespace) -> int:
    """The command line under MPI: each rank owns a row slab; rank 0 writes or prints; --client streams."""
    try:
        from mpi4py import MPI
    except ModuleNotFoundError as error:
        raise SystemExit(
            f"heat.py under MPI needs mpi4py ({error}): install it against the MPI library that runs "
            "mpirun (pip install mpi4py), or run with --mpi off"
        ) from error
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    where = f"heat.py (MPI rank {rank} of {size})"
    try:
        if args.client:
            run_client(args.grid_size, args.steps, args.dt, args.alpha, comm=comm)
            return 0
        start = time.perf_counter()
        slabs = simulate_distributed(args.parameters, args.grid_size, args.steps, comm, args.dt, args.alpha)
        if args.output is not None:
            write_trajectory_distributed(args.output, slabs, comm, args.steps, args.grid_size)
            return 0
        final = np.empty((0, args.grid_size))
        for final in slabs:
            pass
        elapsed = time.perf_counter() - start
        minimum = comm.reduce(float(final.min(initial=np.inf)), op=MPI.MIN, root=0)
        maximum = comm.reduce(float(final.max(initial=-np.inf)), op=MPI.MAX, root=0)
        total = comm.reduce(float(final.sum()), op=MPI.SUM, root=0)
        if rank == 0:
            mean = total / args.grid_size**2
            print(f"{_summary(args, minimum, mean, maximum, elapsed)} on {size} MPI ranks", flush=True)
        return 0
    except Exception as error:
        # The parallel client raises its errors on every rank (only ClientRankTimeout may leave a rank
        # behind): exit cleanly. Anything else may leave the other ranks in a collective: abort them.
        if args.client and not isinstance(error, _client_module().ClientRankTimeout):
            raise SystemExit(f"{where}: {error}") from error
        print(f"{where}: {type(error).__name__}: {error}; aborting every rank", file=sys.stderr, flush=True)
        comm.Abort(1)
        raise


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every option is documented in --help."""
    parser = solver_cli.solver_parser(
        "heat.py",
        description=(
            "2D heat equation du/dt = alpha * Laplacian(u) on the unit square, implicit Euler in time, "
            "5-point finite differences on an M x M interior grid (h = 1/(M+1)), Dirichlet boundaries. "
            "Field convention: field[i, j] = u(x1=(i+1)h, x2=(j+1)h)."
        ),
        parameter_names=PARAMETER_NAMES,
        parameters=(
            "initial interior temperature T0, then boundary temperatures T1 (x1=0), T2 (x1=1), T3 (x2=0), T4 (x2=1)"
        ),
        summarised="field",
        example="python solvers/heat.py --parameters 300 100 500 200 400 --steps 100 --output run.npy",
    )
    solver_cli.add_count_argument(parser, "--grid-size", "M", DEFAULT_GRID_SIZE, "interior grid points per axis")
    solver_cli.add_time_arguments(parser, DEFAULT_STEPS, DEFAULT_DT, steps="time steps", dt="time step")
    solver_cli.add_positive_argument(parser, "--alpha", DEFAULT_ALPHA, "thermal diffusivity")
    solver_cli.add_output_arguments(
        parser,
        trajectory="(T, M, M) float64 trajectory (field after steps 1..T)",
        parameters="the parameters",
        sent=f"every step as field {FIELD_NAME!r}",
    )
    parser.add_argument(
        "--mpi",
        choices=("auto", "on", "off"),
        default="auto",
        help="run MPI-parallel (each rank owns a slab of rows; mpi4py needed): 'auto' (default) does "
        "when an MPI launcher (mpirun, mpiexec, srun) started several ranks, as "
        "jaxsurro.client.launched_by_mpi tells: its rank-count variable (OMPI_COMM_WORLD_SIZE, PMI_SIZE, "
        "SLURM_STEP_NUM_TASKS) is > 1 and the process did not merely inherit it from an MPI rank that "
        "started it; 'on' always (e.g. mpirun -n 1); 'off' never. A standalone run never imports mpi4py. "
        "Under MPI, --output is written by rank 0 and --client streams every rank's slab through one client",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: simulate, then summarise, write a trajectory or stream to a server."""
    parser = build_parser()
    args = parser.parse_args(argv)
    solver_cli.check_parameters_source(parser, args, "five numbers T0 T1 T2 T3 T4")
    solver_cli.check_output(parser, args)
    if args.mpi == "on" or (args.mpi == "auto" and launched_by_mpi()):
        return _main_mpi(args)
    if args.client:
        run_client(args.grid_size, args.steps, args.dt, args.alpha)
        return 0

    start = time.perf_counter()
    fields = simulate(args.parameters, args.grid_size, args.steps, args.dt, args.alpha)
    if args.output is not None:
        solver_cli.write_trajectory(args.output, fields, (args.steps, args.grid_size, args.grid_size))
        return 0
    final = None
    for final in fields:
        pass
    elapsed = time.perf_counter() - start
    assert final is not None  # n_steps >= 1
    print(_summary(args, final.min(), final.mean(), final.max(), elapsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
