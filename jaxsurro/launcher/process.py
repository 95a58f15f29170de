"""Jobs that are local processes: their process groups, the environment they start with, their end with the server.

Shared by the backends whose jobs are subprocesses of the launcher: ``local``, and Slurm's
srun steps (where each job is a local ``srun``). On Linux every job's process group is killed
(SIGKILL) as soon as the server process is gone, however it went: a server killed with SIGKILL
cannot cancel its jobs, and a solver left running would hold its cores until its own timeout.
See docs/architecture.md, section "Launcher".
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from jaxsurro.launcher.scheduler import JobState, JobStatus

log = logging.getLogger("jaxsurro.launcher")

# A server rank started by mpirun or srun carries its MPI launcher's variables; a solver that
# inherited them would believe it is that rank and fail to start its own MPI (or hang).
_LAUNCHER_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "SLURM_STEP_", "HYDRA_", "MPI_LOCAL")
_USER_SETTINGS = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")  # a user's, kept for the solver


def job_environment() -> dict[str, str]:
    """The launcher's environment minus the MPI launcher's variables of the server rank itself."""
    return {k: v for k, v in os.environ.items() if k in _USER_SETTINGS or not k.startswith(_LAUNCHER_PREFIXES)}


class ProcessGroups:
    """Job processes in their own process groups: their states, and cancellation that reaches their children."""

    def __init__(self, prefix: str, kill_grace: float):
        self._prefix = prefix
        self._kill_grace = kill_grace
        self._processes: dict[str, subprocess.Popen] = {}
        self._cancelled: set[str] = set()
        self._ids = itertools.count()

    def start(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str], log_path: Path) -> str:
        """Starts ``argv`` in a new process group, stdout and stderr appended to ``log_path``; returns its id.

        Raises OSError when the program cannot be started.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _watchdog.watch(process.pid)
        job_id = f"{self._prefix}-{next(self._ids)}-{process.pid}"
        self._processes[job_id] = process
        return job_id

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        statuses = {}
        for job_id in job_ids:
            process = self._processes.get(job_id)
            code = None if process is None else process.poll()
            if code is not None:
                _watchdog.forget(process.pid)
            if process is None:
                statuses[job_id] = JobStatus(JobState.UNKNOWN, None)
            elif code is None:
                statuses[job_id] = JobStatus(JobState.RUNNING, None)
            elif job_id in self._cancelled:
                statuses[job_id] = JobStatus(JobState.CANCELLED, code)
            else:
                statuses[job_id] = JobStatus(JobState.COMPLETED if code == 0 else JobState.FAILED, code)
        return statuses

    def cancel(self, job_ids: Sequence[str]) -> None:
        """SIGTERM to every group, one shared grace, then SIGKILL to the groups still alive."""
        alive = []
        for job_id in job_ids:
            process = self._processes.get(job_id)
            if process is None or process.poll() is not None:
                continue
            self._cancelled.add(job_id)
            _signal_group(process, signal.SIGTERM)
            alive.append((job_id, process))
        deadline = time.monotonic() + self._kill_grace
        for job_id, process in alive:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                log.warning(
                    "job %s did not exit %.0f s after SIGTERM; killing its process group", job_id, self._kill_grace
                )
                _signal_group(process, signal.SIGKILL)
        for job_id, process in alive:
            try:
                process.wait(timeout=self._kill_grace)
                _watchdog.forget(process.pid)
            except subprocess.TimeoutExpired:
                log.error(
                    "job %s (pid %d) survived SIGKILL for %.0f s; leaving it", job_id, process.pid, self._kill_grace
                )


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


# -- the end of the jobs with the server ---------------------------------------------------------------------
# The watchdog: a small process reading "watch PGID START" and "forget PGID -" lines until its standard input
# ends, which happens when the server is gone (the kernel closes the pipe's last writer, even after a SIGKILL).
# It then kills the process group of every job still watched whose leader is the process it was told of (its
# start time in /proc/PID/stat, field 22, is unchanged): a process group id reused since is left alone.
_WATCHDOG = """
import os, signal, sys

def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None

watched = {}
for line in sys.stdin:
    verb, pgid, start = line.split()
    if verb == "watch":
        watched[int(pgid)] = start
    else:
        watched.pop(int(pgid), None)
for pgid, start in watched.items():
    if start_time(pgid) == start:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
"""
WATCHDOG_EXIT_TIMEOUT = 10.0  # seconds the watchdog may take to exit once this process closes its input


class _Watchdog:
    """This process's side of the watchdog: which job process groups die with it (Linux, which has /proc).

    One watchdog serves every backend of the process, started with the first job. One that died is
    started again, told every job still watched.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._watched: dict[int, str] = {}  # process group id (its leader's pid) -> the leader's start time

    def watch(self, pid: int) -> None:
        """The process group led by ``pid`` is killed when this process is gone."""
        start = _start_time(pid)
        if start is None:  # no /proc: the group could not be told from a later one with the same id
            return
        with self._lock:
            self._watched[pid] = start
            self._send(f"watch {pid} {start}\n")

    def forget(self, pid: int) -> None:
        """The job led by ``pid`` ended (and was reaped): its id may be reused, never kill that group."""
        with self._lock:
            if self._watched.pop(pid, None) is not None:
                self._send(f"forget {pid} -\n")

    def _send(self, line: str) -> None:
        """Tells the watchdog ``line``; a watchdog that cannot be reached only leaves the jobs unwatched."""
        try:
            self._tell(line)
        except OSError as exc:
            log.warning("the job watchdog cannot be reached (%s): jobs may outlive a killed server", exc)

    def _tell(self, line: str) -> None:
        if self._process is not None and self._process.poll() is None:
            try:
                self._process.stdin.write(line)
                self._process.stdin.flush()
                return
            except BrokenPipeError:
                pass
        if self._process is None:
            atexit.register(self.close)
        else:
            log.warning("the job watchdog (pid %d) is gone; starting another", self._process.pid)
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-c", _WATCHDOG],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # the terminal's Ctrl-C for the server is not for it
        )
        self._process.stdin.write("".join(f"watch {pid} {start}\n" for pid, start in self._watched.items()))
        self._process.stdin.flush()

    def close(self) -> None:
        """At this process's exit: the watchdog kills the jobs still watched (none, after a clean shutdown)."""
        with self._lock:
            if self._process is None:
                return
            try:
                self._process.stdin.close()
                self._process.wait(timeout=WATCHDOG_EXIT_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("the job watchdog (pid %d) did not exit: %s", self._process.pid, exc)


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks after boot, /proc/PID/stat field 22), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


_watchdog = _Watchdog()
