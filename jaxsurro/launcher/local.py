"""The ``local`` backend: every job is a subprocess of the launcher on this machine."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
from collections.abc import Sequence

from jaxsurro.launcher.scheduler import JobSpec, JobState, JobStatus


class LocalScheduler:
    """Runs jobs as subprocesses, each in its own process group so that cancel reaches its children."""

    def __init__(self, kill_grace: float = 5.0):
        self._kill_grace = kill_grace
        self._processes: dict[str, subprocess.Popen] = {}
        self._cancelled: set[str] = set()
        self._ids = itertools.count()

    def submit(self, job: JobSpec) -> str:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log_path, "ab") as log:
            try:
                process = subprocess.Popen(
                    list(job.argv), cwd=job.cwd, env={**job_environment(), **job.env}, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                raise RuntimeError(f"cannot start job {job.name!r}: {exc} (command: {list(job.argv)})") from exc
        job_id = f"local-{next(self._ids)}-{process.pid}"
        self._processes[job_id] = process
        return job_id

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        statuses = {}
        for job_id in job_ids:
            process = self._processes.get(job_id)
            if process is None:
                statuses[job_id] = JobStatus(JobState.UNKNOWN, None)
                continue
            code = process.poll()
            if code is None:
                statuses[job_id] = JobStatus(JobState.RUNNING, None)
            elif job_id in self._cancelled:
                statuses[job_id] = JobStatus(JobState.CANCELLED, code)
            else:
                statuses[job_id] = JobStatus(JobState.COMPLETED if code == 0 else JobState.FAILED, code)
        return statuses

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Sends SIGTERM to each job's process group, then SIGKILL to those still alive after the grace."""
        alive = []
        for job_id in job_ids:
            process = self._processes.get(job_id)
            if process is None or process.poll() is not None:
                continue
            self._cancelled.add(job_id)
            _signal_group(process, signal.SIGTERM)
            alive.append(process)
        for process in alive:
            try:
                process.wait(timeout=self._kill_grace)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=self._kill_grace)


# A server rank started by mpirun or srun carries its MPI launcher's variables; a solver that
# inherited them would believe it is that rank and fail to start its own MPI (or hang).
_LAUNCHER_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "SLURM_STEP_", "HYDRA_", "MPI_LOCAL")
_USER_SETTINGS = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")  # a user's, kept for the solver


def job_environment() -> dict[str, str]:
    """The launcher's environment minus the MPI launcher's variables of the server rank itself."""
    return {k: v for k, v in os.environ.items() if k in _USER_SETTINGS or not k.startswith(_LAUNCHER_PREFIXES)}


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
