"""MPI-parallel clients and the parallel heat solver, run for real under mpirun (helpers in tests/mpi/)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from waiting import wait_until

from jaxsurro import client, protocol
from jaxsurro.client.settings import (
    MPI_PMIX_RANK_VARIABLE,
    MPI_SIZE_VARIABLES,
    ParentProcess,
    launched_by_mpi,
    parent_process,
)
from jaxsurro.server import distributed
from jaxsurro.server.receiver import Receiver, ValidationSink
from jaxsurro.table import SimState, SimulationTable

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAT_PATH = REPO_ROOT / "solvers" / "heat.py"
HELPER_PATH = REPO_ROOT / "tests" / "mpi" / "parallel_client.py"
SPAWN_PATH = REPO_ROOT / "tests" / "mpi" / "spawn_heat.py"
PARAMETERS = np.array([250.0, 110.0, 480.0, 205.0, 390.0])  # (T0..T4), boundary mean differs from T0
RUN_TIMEOUT = 60  # seconds: bound on every mpirun (each takes about a second)
WAIT = 20.0  # seconds: bound on waiting for the server to receive what a finished client sent


def _load_heat() -> types.ModuleType:
    """Import solvers/heat.py by path (solvers/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("heat_solver_mpi_test", HEAT_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


heat = _load_heat()


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment without JAXSURRO_* settings, allowing Open MPI to run as root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXSURRO_")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OPENBLAS_NUM_THREADS="1")
    env.update(extra)
    return env


def mpirun(n_ranks: int, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``mpirun -n N python ARGV`` with a timeout; returns the finished process."""
    command = ["mpirun", "-n", str(n_ranks), "--oversubscribe", sys.executable, *argv]
    return subprocess.run(
        command, env=env or _environment(), capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )


def _relative_max_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected|."""
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def _dead_address() -> str:
    """A loopback TCP address where nothing listens (a port just released by the OS)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


class Server:
    """Real receivers (one per server rank) sharing a simulation table and a float64 validation sink."""

    def __init__(self, field_shape: tuple[int, ...], n_steps: int, n_ranks: int, submitted: bool = True):
        """Start `n_ranks` receivers on loopback; simulation 0 has PARAMETERS."""
        self.table = SimulationTable(PARAMETERS[None, :].copy())
        if submitted:
            self.table[0].attempts, self.table[0].state = 1, SimState.SUBMITTED
        self.trajectory_shape = (n_steps, *field_shape)  # the sink's flat samples of simulation 0, reshaped
        self.sink = ValidationSink(1, n_steps, int(np.prod(field_shape)))
        self.sink.samples = np.zeros((1, n_steps, int(np.prod(field_shape))))  # float64, to compare to 1e-10
        self.token = protocol.new_token()
        secret = protocol.new_secret()  # one per server, every rank's
        self.receivers = [
            Receiver(
                table=self.table,
                sink=self.sink,
                token=self.token,
                secret=secret,
                fields={"temperature": field_shape},
                wire_dtype="float64",
                n_steps=n_steps,
                host="127.0.0.1",
                rank=rank,
                n_ranks=n_ranks,
            )
            for rank in range(n_ranks)
        ]
        self.receivers[0].addresses = tuple(protocol.join_endpoints(r.data_endpoints) for r in self.receivers)
        for receiver in self.receivers:
            receiver.start()

    def environment(self, timeout: float = 20.0) -> dict[str, str]:
        """What the launcher would set for simulation 0, float64 on the wire."""
        return _environment(
            **{
                client.ENV_SERVER: self.receivers[0].control_address,
                client.ENV_TOKEN: self.token.hex(),
                client.ENV_SIM_ID: "0",
                client.ENV_TIMEOUT: str(timeout),
                client.ENV_WIRE_DTYPE: "float64",
            }
        )

    def wait_for_finish(self) -> None:
        """Block until every server rank got its FINISH (each rank's data precede it), or fail."""
        # Polled: a receiver publishes its counters after it marks the FINISH in the table.
        wait_until(
            lambda: all(r.counters().finishes for r in self.receivers),
            WAIT,
            f"a FINISH on every server rank: {[r.counters() for r in self.receivers]}",
        )

    def stop(self) -> None:
        """Stop every receiver thread and surface its error."""
        for receiver in self.receivers:
            receiver.stop()
            receiver.check()


@contextlib.contextmanager
def server(field_shape: tuple[int, ...], n_steps: int, n_ranks: int = 1, submitted: bool = True) -> Iterator[Server]:
    """A Server stopped on exit."""
    running = Server(field_shape, n_steps, n_ranks, submitted)
    try:
        yield running
    finally:
        running.stop()


# ----------------------------------------------------------------------------- pure pieces


def test_slab_offsets_balance_any_grid_over_any_rank_count() -> None:
    """Slabs differ by at most one row, the first M mod k get the extra one, and a rank may own none."""
    np.testing.assert_array_equal(heat.slab_offsets(13, 3), [0, 5, 9, 13])
    np.testing.assert_array_equal(heat.slab_offsets(16, 2), [0, 8, 16])
    np.testing.assert_array_equal(heat.slab_offsets(1, 3), [0, 1, 1, 1])


def test_mpi_is_detected_only_from_a_launcher_of_several_ranks() -> None:
    """Sizes > 1 from mpirun, Hydra or srun (or a PMIx rank) mean MPI; size 1, sbatch's SLURM_NTASKS or
    nothing do not; nor do variables inherited from a parent that is itself an MPI program."""
    launcher = functools.partial(ParentProcess, uses_mpi=False)
    assert launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "2"}, launcher("mpirun"))
    assert launched_by_mpi({"PMI_SIZE": "4"}, launcher("hydra_pmi_proxy"))
    assert launched_by_mpi({"SLURM_STEP_NUM_TASKS": "8"}, launcher("slurmstepd"))
    assert launched_by_mpi({"PMIX_RANK": "1"}, launcher("prted"))  # a PMIx launcher stating no count
    assert launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "2"}, None)  # no /proc: the variables decide
    assert launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "2"}, ParentProcess("bash", False))  # a wrapper script
    assert not launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "2"}, ParentProcess("python3", True))  # inherited
    assert not launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "1"}, launcher("mpirun"))
    assert not launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "1", "PMIX_RANK": "0"}, launcher("prted"))
    assert not launched_by_mpi({"SLURM_NTASKS": "8"}, launcher("slurmstepd"))
    assert not launched_by_mpi({}, None)


def test_heat_and_the_server_follow_the_clients_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """solvers/heat.py --mpi auto and the server's World.detect ask jaxsurro.client.launched_by_mpi."""
    for name in (*MPI_SIZE_VARIABLES, MPI_PMIX_RANK_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    assert not heat.launched_by_mpi() and not distributed.launched_by_mpi() and not launched_by_mpi()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    expected = launched_by_mpi()  # this process's real parent decides the rest
    assert heat.launched_by_mpi() == distributed.launched_by_mpi() == expected


def test_the_parent_process_is_read_from_proc() -> None:
    """On Linux the parent's name and whether it runs MPI come from /proc (pytest's parent runs no MPI)."""
    parent = parent_process()
    if parent is None:
        pytest.skip("no /proc on this system")
    assert parent.name and not parent.uses_mpi
    assert parent_process(2**22 + 12345) is None  # no such process


def test_a_solver_started_by_an_mpi_rank_stays_serial(tmp_path: Path) -> None:
    """heat.py started by an MPI rank (as an MPI server's launcher does) inherits the rank's MPI
    variables but not an MPI launcher as parent: it runs serially instead of joining the rank's job."""
    argv = ["--parameters", "1", "2", "3", "4", "5", "--grid-size", "6", "--steps", "2"]
    result = mpirun(2, str(SPAWN_PATH), str(tmp_path / "run"), *argv)
    assert result.returncode == 0, result.stderr
    expected = np.stack(list(heat.simulate([1, 2, 3, 4, 5], 6, 2)))
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"run-{rank}.npy"), expected)


def test_plan_gathers_rank_ordered_row_slabs_in_place() -> None:
    """Row slabs in rank order (uneven, one empty) need no copy: displacements are their row offsets."""
    plan = client.plan_assembly([(0, 0), (5, 0), (9, 0), (9, 0)], [(5, 4), (4, 4), (0, 4), (4, 4)], [(13, 4)] * 4)
    assert plan.boxes is None and plan.global_shape == (13, 4)
    assert plan.counts == (20, 16, 0, 16) and plan.displacements == (0, 20, 36, 36)


def test_plan_places_two_dimensional_blocks_and_skips_ranks_without_a_part() -> None:
    """A 2 x 2 block layout in any rank order, plus a rank holding nothing, is packed then placed."""
    starts = [None, (3, 4), (0, 0), (0, 4), (3, 0)]
    shapes = [None, (4, 6), (3, 4), (3, 6), (4, 4)]
    plan = client.plan_assembly(starts, shapes, [None, *[(7, 10)] * 4])
    assert plan.counts == (0, 24, 12, 18, 16) and plan.displacements == (0, 0, 24, 36, 54)
    assert plan.boxes is not None and plan.boxes[0] is None
    assert plan.boxes[1] == (slice(3, 7), slice(4, 10))


@pytest.mark.parametrize(
    ("starts", "shapes", "global_shapes", "match"),
    [
        ([(0, 0), (3, 0)], [(4, 5), (3, 5)], [(6, 5)] * 2, r"rank 1's part \[3:6, 0:5\] overlaps rank 0's"),
        ([(0, 0), (4, 0)], [(3, 5), (2, 5)], [(6, 5)] * 2, r"element \(3, 0\) belongs to no rank"),
        ([(0, 0), (3, 1)], [(3, 5), (3, 5)], [(6, 5)] * 2, "falls outside the global field"),
        ([(0, 0), (3, 0)], [(3, 5), (3, 5)], [(6, 5), (6, 6)], "ranks disagree on the global shape"),
        ([(0,), (3, 0)], [(3,), (3, 5)], [(6, 5)] * 2, "must both have 2 entries"),
        ([None, None], [None, None], [None, None], "no rank passed a part"),
    ],
)
def test_plan_rejects_layouts_that_do_not_tile_the_field(starts, shapes, global_shapes, match: str) -> None:
    """Overlaps, gaps, parts outside the field and disagreements are errors naming the ranks or element."""
    with pytest.raises(ValueError, match=match):
        client.plan_assembly(starts, shapes, global_shapes)


def test_serial_runs_never_import_mpi4py() -> None:
    """Importing the client and a standalone heat run (summary and --output) leave mpi4py unloaded."""
    check = (
        "import importlib.util, sys, tempfile, os; from jaxsurro import client; "
        f"spec = importlib.util.spec_from_file_location('heat', {str(HEAT_PATH)!r}); "
        "heat = importlib.util.module_from_spec(spec); spec.loader.exec_module(heat); "
        "argv = ['--parameters', '1', '2', '3', '4', '5', '--grid-size', '6', '--steps', '2']; "
        "heat.main(argv); heat.main([*argv, '--output', os.path.join(tempfile.mkdtemp(), 'run.npy')]); "
        "print(sorted(m for m in ('mpi4py', 'jax') if m in sys.modules))"
    )
    env = {k: v for k, v in _environment().items() if k not in (*MPI_SIZE_VARIABLES, MPI_PMIX_RANK_VARIABLE)}
    result = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------- parallel heat solver


@pytest.mark.parametrize(
    ("n_ranks", "grid_size", "extra"),
    [
        (2, 16, []),  # detected from mpirun's environment
        (1, 16, ["--mpi", "on"]),  # one rank, MPI path forced
        (3, 13, []),  # uneven slabs: 5, 4, 4 rows
        (2, 125, []),  # the FFT transform (2 * 126 is 7-smooth), uneven 63 / 62
    ],
)
def test_parallel_heat_output_matches_serial(tmp_path: Path, n_ranks: int, grid_size: int, extra: list[str]) -> None:
    """mpirun -n k heat.py --output writes, from rank 0, the serial trajectory to 1e-10 (max norm)."""
    steps, argv = 6, ["--parameters", *map(str, PARAMETERS), "--grid-size", str(grid_size), "--steps", "6"]
    serial, parallel = tmp_path / "serial.npy", tmp_path / "parallel.npy"
    assert heat.main([*argv, "--output", str(serial)]) == 0
    result = mpirun(n_ranks, str(HEAT_PATH), *argv, *extra, "--output", str(parallel))
    assert result.returncode == 0, result.stderr
    expected, got = np.load(serial), np.load(parallel)
    assert got.shape == (steps, grid_size, grid_size) and got.dtype == np.float64
    assert _relative_max_error(got, expected) <= 1e-10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel.npy", "serial.npy"]  # no temporary left


def test_parallel_heat_summary_is_printed_once_with_the_serial_values() -> None:
    """Without --output only rank 0 prints, the same min/mean/max as a serial run."""
    argv = ["--parameters", *map(str, PARAMETERS), "--grid-size", "11", "--steps", "4"]
    result = mpirun(2, str(HEAT_PATH), *argv)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("on 2 MPI ranks"), result.stdout
    final = list(heat.simulate(PARAMETERS, 11, 4))[-1]
    for name, number in (("min", final.min()), ("mean", final.mean()), ("max", final.max())):
        assert f"{name}={number:.6g} " in lines[0]


# ----------------------------------------------------------------------------- parallel client


def test_parallel_client_streams_the_serial_fields() -> None:
    """mpirun -n 2 heat.py --client: each rank sends its slab, two server ranks get simulate()'s fields."""
    grid, steps = 13, 6  # slabs of 7 and 6 rows
    with server((grid, grid), steps, n_ranks=2) as running:
        result = mpirun(
            2, str(HEAT_PATH), "--client", "--grid-size", str(grid), "--steps", str(steps), env=running.environment()
        )
        assert result.returncode == 0, result.stderr
        running.wait_for_finish()
        assert running.table[0].steps_finished == steps
    received = running.sink.samples[0].reshape(running.trajectory_shape)
    assert _relative_max_error(received, np.stack(list(heat.simulate(PARAMETERS, grid, steps)))) <= 1e-10
    # One client as the server sees it: every step once, whole fields, one FINISH per server rank.
    counters = [r.counters() for r in running.receivers]
    assert sum(c.unique_received for c in counters) == steps
    assert [c.unique_received for c in counters] == [3, 3]  # (0 + t) mod 2
    assert [c.finishes for c in counters] == [1, 1]
    assert all(not c.rejected and not c.duplicates for c in counters)


def test_any_block_layout_is_assembled_exactly_even_with_an_idle_root() -> None:
    """Column slabs from ranks 1 and 2 (rank 0 holds nothing) arrive as the exact whole field."""
    rows, columns, steps = 7, 10, 3
    with server((rows, columns), steps) as running:
        result = mpirun(3, str(HELPER_PATH), "columns", env=running.environment())
        assert result.returncode == 0, result.stderr
        running.wait_for_finish()
    expected = np.stack(
        [1000.0 * t + 10.0 * np.arange(rows)[:, None] + np.arange(columns) + 0.25 for t in range(steps)]
    )
    np.testing.assert_array_equal(running.sink.samples[0].reshape(running.trajectory_shape), expected)
    counters = running.receivers[0].counters()
    assert counters.unique_received == steps and not counters.rejected


def test_unreachable_server_fails_on_every_rank_within_the_timeout() -> None:
    """The root's ServerUnreachable reaches every rank: all exit with the message, none hangs."""
    address = _dead_address()
    env = _environment(
        **{
            client.ENV_SERVER: address,
            client.ENV_TOKEN: protocol.new_token().hex(),
            client.ENV_SIM_ID: "0",
            client.ENV_TIMEOUT: "1",
        }
    )
    start = time.monotonic()
    result = mpirun(2, str(HEAT_PATH), "--client", "--grid-size", "8", "--steps", "2", env=env)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 15.0, f"took {elapsed:.1f} s with a 1 s timeout"
    for rank in (0, 1):
        assert f"(MPI rank {rank} of 2): no answer from the jaxsurro server at {address}" in result.stderr
    assert "reported by the client's root (rank 0 of the communicator) to rank 1" in result.stderr


def test_refused_simulation_is_reported_on_every_rank() -> None:
    """A REJECT at the root (simulation not submitted) is the same SimulationRejected text everywhere."""
    with server((8, 8), 2, submitted=False) as running:
        result = mpirun(
            2, str(HEAT_PATH), "--client", "--grid-size", "8", "--steps", "2", env=running.environment(timeout=5)
        )
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"(MPI rank {rank} of 2): the jaxsurro server at" in result.stderr
    assert result.stderr.count("refused simulation 0") == 2, result.stderr


def test_overlapping_parts_fail_on_every_rank_and_send_nothing() -> None:
    """Parts that overlap are a ValueError on every rank; the server gets no data and no FINISH."""
    with server((7, 10), 3) as running:
        result = mpirun(3, str(HELPER_PATH), "overlap", env=running.environment(timeout=5))
    assert result.returncode != 0
    for rank in (0, 1, 2):
        assert (
            f"rank {rank}: ValueError: field 'temperature': rank 2's part [0:7, 3:10] overlaps rank 1's"
            in result.stderr
        ), result.stderr
    counters = running.receivers[0].counters()
    assert counters.unique_received == 0 and counters.finishes == 0


def test_a_rank_with_an_invalid_part_raises_its_own_error_and_the_others_name_it() -> None:
    """A complex part on rank 2: TypeError there, ValueError naming rank 2 on the others, nothing sent."""
    with server((7, 10), 3) as running:
        result = mpirun(3, str(HELPER_PATH), "invalid", env=running.environment(timeout=5))
    assert result.returncode != 0
    assert "rank 2: TypeError: field 'temperature': expected a real numeric array" in result.stderr, result.stderr
    for rank in (0, 1):
        assert f"rank {rank}: ValueError: rank(s) [2] passed invalid arguments to send()" in result.stderr
    counters = running.receivers[0].counters()
    assert counters.unique_received == 0 and counters.finishes == 0


def test_a_stuck_rank_makes_the_root_time_out_instead_of_hanging() -> None:
    """A rank that never calls send(): the root raises ClientRankTimeout after the timeout and aborts."""
    with server((7, 10), 3) as running:
        start = time.monotonic()
        result = mpirun(3, str(HELPER_PATH), "stuck", env=running.environment(timeout=1))
        elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 15.0, f"took {elapsed:.1f} s with a 1 s timeout"
    assert "rank 0: ClientRankTimeout: not every rank of the communicator called send()" in result.stderr
