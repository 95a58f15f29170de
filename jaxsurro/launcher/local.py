"""The ``local`` backend: every job is a subprocess of the launcher on this machine.

See docs/architecture.md, section "Launcher".
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxsurro.launcher.process import ProcessGroups, job_environment
from jaxsurro.launcher.scheduler import JobSpec, JobStatus


class LocalScheduler:
    """Runs jobs as subprocesses, each in its own process group so that cancel reaches its children."""

    min_poll_interval = 0.0  # seconds; polling looks at local processes only

    def __init__(self, kill_grace: float = 5.0):
        self._jobs = ProcessGroups("local", kill_grace)

    def submit(self, job: JobSpec) -> str:
        try:
            return self._jobs.start(job.argv, job.cwd, {**job_environment(), **job.env}, job.log_path)
        except OSError as exc:
            raise RuntimeError(f"cannot start job {job.name!r}: {exc} (command: {list(job.argv)})") from exc

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        return self._jobs.poll(job_ids)

    def cancel(self, job_ids: Sequence[str]) -> None:
        self._jobs.cancel(job_ids)
