"""Jobs that are local processes: their process groups, and the environment they start with.

Shared by the backends whose jobs are subprocesses of the launcher: ``local``, and Slurm's
srun steps (where each job is a local ``srun``). See docs/architecture.md, section "Launcher".
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
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
        job_id = f"{self._prefix}-{next(self._ids)}-{process.pid}"
        self._processes[job_id] = process
        return job_id

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        statuses = {}
        for job_id in job_ids:
            process = self._processes.get(job_id)
            code = None if process is None else process.poll()
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
            except subprocess.TimeoutExpired:
                log.error(
                    "job %s (pid %d) survived SIGKILL for %.0f s; leaving it", job_id, process.pid, self._kill_grace
                )


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
