"""The scheduler interface every launcher backend implements: submit, poll many, cancel.

A backend turns a :class:`JobSpec` into a running job and reports job states in
the common :class:`JobState` vocabulary, so the ensemble logic does not depend on
where the jobs run (local subprocesses, Slurm, OAR). See docs/architecture.md, section "Launcher".
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol


class JobState(enum.Enum):
    """The common job states; each backend maps its own onto these."""

    PENDING = "pending"  # queued, not started
    RUNNING = "running"
    COMPLETED = "completed"  # ended with exit code 0
    FAILED = "failed"  # ended with a non-zero exit code
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"  # killed for its time limit
    NODE_FAIL = "node_fail"  # lost with its node
    UNKNOWN = "unknown"  # the scheduler no longer knows the job

    @property
    def is_terminal(self) -> bool:
        return self not in (JobState.PENDING, JobState.RUNNING)


class JobStatus(NamedTuple):
    state: JobState
    exit_code: int | None  # None while running or when the scheduler does not say


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One job: what to run, with which environment, where its output goes."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]  # added to the launcher's environment
    log_path: Path  # stdout and stderr together
    cwd: Path


class Scheduler(Protocol):
    """What a launcher backend does."""

    @property
    def min_poll_interval(self) -> float:
        """Seconds: the launcher polls no more often than this (0 for local processes).

        A cluster scheduler should not be polled more often: every poll is a request to its controller.
        """

    def submit(self, job: JobSpec) -> str:
        """Starts or queues a job; returns its id."""

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """The status of many jobs, in one call to the scheduler."""

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancels jobs; ids that already ended are ignored."""
