"""The local launcher with real subprocesses: concurrency limit, retries, missing or short FINISH, silent jobs,
redraws, cancellation; and the job scripts of every backend, readable by their owner only."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from waiting import wait_until

from jaxsurro import submit
from jaxsurro.launcher import JobSpec, JobStatus, Launcher, LocalScheduler
from jaxsurro.launcher.commands import write_job_script
from jaxsurro.launcher.oar import OarScheduler
from jaxsurro.launcher.slurm import SlurmScheduler
from jaxsurro.server.ensemble import ClientAccess
from jaxsurro.table import SimState, SimulationTable

ROOT = Path(__file__).resolve().parents[1]

GATED_JOB = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)\nsys.exit(int(sys.argv[2]))"


def make_launcher(tmp_path: Path, n_sims: int, argv_for, **kwargs) -> Launcher:
    table = SimulationTable(np.zeros((n_sims, 1)))

    def job_for(sim_id: int, attempt: int) -> JobSpec:
        return JobSpec(
            f"sim-{sim_id}",
            tuple(argv_for(sim_id, attempt)),
            {"ATTEMPT": str(attempt)},
            tmp_path / f"sim-{sim_id}.log",
            tmp_path,
        )

    options = {"max_concurrent": 2, "max_attempts": 2, "poll_interval": 0.02, "finish_grace": 30.0} | kwargs
    return Launcher(table, CountingScheduler(kill_grace=2.0), job_for, **options)


class CountingScheduler(LocalScheduler):
    """The local backend, counting the launcher's polls: one per round while a job is active."""

    def __init__(self, kill_grace: float):
        super().__init__(kill_grace)
        self.polls = 0

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        self.polls += 1
        return super().poll(job_ids)


def submitted(launcher: Launcher) -> int:
    return launcher.table.counts()["submitted"]


def test_at_most_m_simulations_run_and_all_complete(tmp_path):
    gate = tmp_path / "gate"
    launcher = make_launcher(tmp_path, 5, lambda i, a: [sys.executable, "-c", GATED_JOB, str(gate), "0"])
    peak = 0

    def observe() -> None:
        """Records the peak, and plays the receiver: a running simulation's FINISH has arrived."""
        nonlocal peak
        with launcher.table.lock:
            peak = max(peak, submitted(launcher))
            for record in launcher.table:
                if record.state == SimState.SUBMITTED and record.steps_finished is None:
                    launcher.table.mark_finished(record.sim_id, 1)

    launcher.start()
    try:
        wait_until(lambda: submitted(launcher) == 2, 10, "two simulations to be submitted")
        polls = launcher.scheduler.polls
        wait_until(lambda: observe() or launcher.scheduler.polls >= polls + 20, 10, "twenty launcher rounds")
        gate.touch()
        wait_until(lambda: observe() or launcher.done.is_set(), 20, "every simulation to end")
    finally:
        launcher.shutdown()
    assert peak == 2
    assert launcher.table.counts()["completed"] == 5
    assert all(r.attempts == 1 and r.exit_code == 0 and r.job_id for r in launcher.table)


def test_a_failing_simulation_is_retried_with_the_same_parameters_then_given_up(tmp_path, caplog):
    script = "import os, sys; print('attempt', os.environ['ATTEMPT'], 'failing'); sys.exit(5)"
    launcher = make_launcher(tmp_path, 1, lambda i, a: [sys.executable, "-c", script], max_attempts=3)
    launcher.table[0].parameters[:] = 42.0
    launcher.start()
    assert launcher.done.wait(20)
    launcher.shutdown()
    record = launcher.table[0]
    assert (record.state, record.attempts, record.exit_code) == (SimState.FAILED, 3, 5)
    assert record.parameters[0] == 42.0
    assert "attempt 3/3 failed with exit code 5" in caplog.text
    assert "attempt 3 failing" in caplog.text  # the tail of the output is in the report


def test_an_exit_without_finish_counts_as_a_failed_attempt(tmp_path):
    launcher = make_launcher(tmp_path, 1, lambda i, a: [sys.executable, "-c", "pass"], finish_grace=0.1)
    launcher.start()
    assert launcher.done.wait(20)
    launcher.shutdown()
    record = launcher.table[0]
    assert (record.state, record.attempts) == (SimState.FAILED, 2)
    assert "FINISH message did not arrive" in record.error


def test_a_job_that_cannot_be_started_is_reported(tmp_path):
    launcher = make_launcher(tmp_path, 1, lambda i, a: [str(tmp_path / "no-such-solver")])
    launcher.start()
    assert launcher.done.wait(20)
    launcher.shutdown()
    assert launcher.table[0].state == SimState.FAILED
    assert "could not be submitted" in launcher.table[0].error and "no-such-solver" in launcher.table[0].error


def test_a_short_finish_fails_the_attempt_and_a_complete_one_completes_the_retry(tmp_path):
    launcher = make_launcher(tmp_path, 1, lambda i, a: [sys.executable, "-c", "pass"])
    finished: list[int] = []

    def play_receiver() -> bool:
        """The first attempt's FINISH reports 1 of 2 steps, the second's both."""
        with launcher.table.lock:
            record = launcher.table[0]
            if record.state == SimState.SUBMITTED and len(finished) < record.attempts:
                steps = 1 if record.attempts == 1 else 2
                launcher.table.mark_finished(0, steps, expected=2)
                finished.append(steps)
        return launcher.done.is_set()

    launcher.start()
    try:
        wait_until(play_receiver, 20, "the simulation to end")
    finally:
        launcher.shutdown()
    record = launcher.table[0]
    assert (record.state, record.attempts, record.steps_finished) == (SimState.COMPLETED, 2, 2)
    assert record.error == "exited with 0 but its FINISH reported 1 of the 2 time steps"


def test_a_finish_from_a_process_of_an_earlier_attempt_is_ignored():
    table = SimulationTable(np.zeros((1, 1)))
    table.supervised = True
    table[0].attempts, table[0].state = 2, SimState.SUBMITTED
    table.welcome(0, client_id=22)  # the current attempt's process
    table.mark_finished(0, 5, expected=5, client_id=11)  # late, from the first attempt's process
    assert table[0].steps_finished is None
    table.mark_finished(0, 5, expected=5, client_id=22)
    assert table[0].steps_finished == 5


def test_a_silent_job_is_cancelled_and_retried_but_one_heard_from_is_not(tmp_path):
    gate = tmp_path / "gate"
    launcher = make_launcher(
        tmp_path, 2, lambda i, a: [sys.executable, "-c", GATED_JOB, str(gate), "0"], silence_timeout=0.5
    )

    def play_receiver() -> bool:
        """Simulation 0 sends a message every round; simulation 1 never does."""
        launcher.table.heard[0] = time.monotonic()
        return launcher.table[1].attempts == 2 and launcher.table[1].state == SimState.FAILED

    launcher.start()
    try:
        wait_until(play_receiver, 20, "simulation 1 to be cancelled twice")
        gate.touch()
        with launcher.table.lock:
            launcher.table.mark_finished(0, 1)
        assert launcher.done.wait(20)
    finally:
        launcher.shutdown()
    assert (launcher.table[0].state, launcher.table[0].attempts) == (SimState.COMPLETED, 1)
    assert "sent no message for" in launcher.table[1].error and "cancelled as hung" in launcher.table[1].error


def test_an_exhausted_simulation_is_redrawn_once_the_receiver_applied_it_then_given_up(tmp_path, caplog):
    script = "import os, sys; print('attempt', os.environ['ATTEMPT'], 'diverged'); sys.exit(5)"
    draws = iter([np.array([7.0]), np.array([8.0])])
    launcher = make_launcher(
        tmp_path,
        1,
        lambda i, a: [sys.executable, "-c", script],
        max_attempts=1,
        redraw=lambda: next(draws),
        max_redraws=2,
    )
    submitted_with: list[float] = []

    def play_receiver() -> bool:
        """Applies the redraws, as the receiver does between two messages; notes what each attempt ran with."""
        with launcher.table.lock:
            record = launcher.table[0]
            if record.state == SimState.SUBMITTED and len(submitted_with) < record.attempts:
                assert record.next_parameters is None  # never submitted before the switch
                submitted_with.append(float(record.parameters[0]))
            launcher.table.apply_redraws()
        return launcher.done.is_set()

    launcher.start()
    try:
        wait_until(play_receiver, 20, "the simulation to end")
    finally:
        launcher.shutdown()
    record = launcher.table[0]
    assert (record.state, record.attempts, record.redraws) == (SimState.FAILED, 3, 2)
    assert submitted_with == [0.0, 7.0, 8.0]
    assert [float(p[0]) for p in record.previous_parameters] == [0.0, 7.0]
    assert "1 attempt(s) with parameters [7] failed, the last failed with exit code 5" == record.redraw_reason
    assert "drawing new parameters [8] (redraw 2/2)" in caplog.text and "giving up" in caplog.text


def test_shutdown_cancels_running_jobs_and_their_children(tmp_path):
    # The job starts a child of its own: cancelling must reach the whole process group.
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {GATED_JOB!r}, '{tmp_path}/never', '0'])"
    launcher = make_launcher(tmp_path, 3, lambda i, a: [sys.executable, "-c", child])
    launcher.start()
    wait_until(lambda: submitted(launcher) == 2, 10, "two running simulations")
    wait_until(lambda: len(_descendants_running(tmp_path)) == 2, 10, "the jobs' children to start")
    launcher.shutdown()
    assert launcher.table.counts() == {
        "pending": 1,
        "submitted": 0,
        "exited": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 2,
    }
    wait_until(lambda: _descendants_running(tmp_path) == [], 10, "the children to be gone")


def _descendants_running(tmp_path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"{tmp_path}/never".encode() in cmdline and b"subprocess" not in cmdline and "State:\tZ" not in status:
                pids.append(int(entry.name))
    return pids


# A server-like process: it submits one job through the local scheduler, writes the job's pid to argv[2] and waits to
# be killed. The job starts a child of its own (as mpirun starts a solver's ranks), which prints its pid to the log.
SERVER_LIKE = """
import os, sys
from pathlib import Path
from jaxsurro.launcher import JobSpec, LocalScheduler

child = "import os, time; print(os.getpid(), flush=True); time.sleep(600)"
job = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
job_id = LocalScheduler().submit(JobSpec("solver", (sys.executable, "-c", job), {}, Path(sys.argv[1]), Path.cwd()))
Path(sys.argv[2] + ".tmp").write_text(job_id.rsplit("-", 1)[1])
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
sys.stdin.read()
"""


def test_local_jobs_die_with_their_server_even_when_it_is_killed(tmp_path):
    job_pid, log = tmp_path / "job-pid", tmp_path / "job.log"
    with subprocess.Popen([sys.executable, "-c", SERVER_LIKE, str(log), str(job_pid)], stdin=subprocess.PIPE) as server:
        try:
            wait_until(lambda: job_pid.exists() and log.read_text().strip(), 30, "the job and its child to start")
            job, child = int(job_pid.read_text()), int(log.read_text())
            assert _alive(job) and _alive(child)
            server.kill()  # SIGKILL: no clean-up of the server's runs
            server.wait(timeout=10)
            wait_until(lambda: not _alive(job) and not _alive(child), 10, "the job's processes to die with the server")
        finally:
            server.kill()


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_every_job_waits_for_its_server_at_most_the_client_timeout(tmp_path):
    # A client whose server stops answering gives up after this (client.ENV_TIMEOUT): a job of a dead server that
    # the launcher could not cancel (a cluster job, or a server killed with SIGKILL) ends on its own.
    from jaxsurro import client
    from jaxsurro.config import load_config
    from jaxsurro.run import job_factory

    config = load_config(ROOT / "experiments" / "heat.toml", ["server.client_timeout=7.5"])
    job = job_factory(config, ClientAccess("tcp://127.0.0.1:5555", bytes(16)), tmp_path, "sim")(3, 1)
    assert float(job.env[client.ENV_TIMEOUT]) == 7.5


def test_unknown_scheduler_lists_the_available_ones():
    from jaxsurro.launcher import make_scheduler

    with pytest.raises(ValueError, match="available: local"):
        make_scheduler("pbs")
    assert os.environ.get("ATTEMPT") is None  # job environments never leak into the launcher's


def test_jobs_do_not_inherit_the_server_ranks_mpi_identity(monkeypatch):
    from jaxsurro.launcher.process import job_environment

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("PMIX_RANK", "1")
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")
    monkeypatch.setenv("SOLVER_LICENSE", "x")
    env = job_environment()
    assert "OMPI_COMM_WORLD_SIZE" not in env and "PMIX_RANK" not in env
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and env["SOLVER_LICENSE"] == "x"


# -- job scripts: owner-only ------------------------------------------------------------------------
def owner_only(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_write_job_script_replaces_an_old_file_whole_with_an_owner_only_one(tmp_path):
    path = tmp_path / "job.sh"
    path.write_text("old")
    path.chmod(0o644)
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    link = tmp_path / "link.sh"
    link.symlink_to(target)
    with umask(0):  # a permissive umask widens nothing
        write_job_script(path, "#!/bin/bash\nexport TOKEN=secret\n", executable=False)
        write_job_script(link, "new", executable=True)
    assert path.read_text() == "#!/bin/bash\nexport TOKEN=secret\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not link.is_symlink() and stat.S_IMODE(link.stat().st_mode) == 0o700  # replaced, not followed
    assert target.read_text() == "untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "job.sh", "link.sh"]  # no temporary left


FAKE_COMMANDS = {"sbatch": "echo 7", "oarsub": "echo OAR_JOB_ID=3"}  # each one's answer to a submission


@pytest.fixture
def fake_schedulers(tmp_path, monkeypatch) -> Path:
    """``sbatch`` and ``oarsub`` on the PATH that accept any script; a permissive umask."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, answer in FAKE_COMMANDS.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{answer}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with umask(0):
        yield tmp_path


def secret_job(tmp_path: Path) -> JobSpec:
    return JobSpec("sim-1", ("solver",), {"JAXSURRO_TOKEN": "secret"}, tmp_path / "logs" / "sim-1.log", tmp_path)


def submit_server(tmp_path: Path, scheduler: str) -> Path:
    run_dir = tmp_path / "run"
    code = submit.main(
        [str(ROOT / "experiments" / "heat.toml"), "--run-dir", str(run_dir), "--set", f"launcher.scheduler={scheduler}"]
    )
    assert code == 0
    return run_dir


@pytest.mark.parametrize(
    "backend, submit_job, script",
    [
        ("slurm job", lambda tmp: SlurmScheduler().submit(secret_job(tmp)), "logs/sim-1.sbatch"),
        ("slurm server", lambda tmp: submit_server(tmp, "slurm"), "run/server.sbatch"),
        ("oar job", lambda tmp: OarScheduler().submit(secret_job(tmp)), "logs/sim-1.oar.sh"),
        ("oar server", lambda tmp: submit_server(tmp, "oar"), "run/server-job.oar.sh"),
    ],
)
def test_job_scripts_of_every_backend_are_readable_by_their_owner_only(fake_schedulers, backend, submit_job, script):
    path = fake_schedulers / script
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a world-readable script of an earlier attempt")
    path.chmod(0o644)
    submit_job(fake_schedulers)
    assert path.read_text().startswith("#!/bin/bash\n")
    assert owner_only(path), f"{backend}: {path} has mode {stat.S_IMODE(path.stat().st_mode):o}"


def test_submit_resume_needs_a_checkpointed_run_and_submits_a_server_that_resumes_it(fake_schedulers, capsys):
    from jaxsurro import rundir
    from jaxsurro.server import checkpoint

    assert submit.CHECKPOINT_GLOB == f"checkpoints/{checkpoint.PREFIX}*"  # how the server names them
    assert submit.main([str(fake_schedulers / "nowhere"), "--resume"]) == 2
    assert "--resume needs a run directory" in capsys.readouterr().err
    for scheduler in ("slurm", "oar"):
        run_dir = submit_server(fake_schedulers / scheduler, scheduler)
        assert submit.main([str(run_dir), "--resume"]) == 2
        assert "holds no complete checkpoint to resume from" in capsys.readouterr().err
        (run_dir / rundir.CHECKPOINTS / f".{checkpoint.PREFIX}000000004.partial").mkdir(parents=True)
        assert submit.main([str(run_dir), "--resume"]) == 2  # a partial checkpoint is none
        checkpoint.directory_for(run_dir / rundir.CHECKPOINTS, 3).mkdir()
        assert submit.main(["--resume", str(run_dir)]) == 0
        assert "to resume the run" in capsys.readouterr().out
        assert (run_dir / rundir.SERVER_JOB_ID).read_text().split()[0] == scheduler
    # Slurm: the script finds the checkpoint itself (a requeued job does too); OAR: the command says --resume.
    assert "--signal=B:USR1@300" in (fake_schedulers / "slurm" / "run" / "server.sbatch").read_text()
    oar_script = (fake_schedulers / "oar" / "run" / "server-job.oar.sh").read_text()
    assert f"jaxsurro.run {fake_schedulers / 'oar' / 'run'} --resume --no-progress" in oar_script
