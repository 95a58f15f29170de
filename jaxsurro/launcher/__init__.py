"""Runs the ensemble of simulations through a scheduler backend (docs/architecture.md, section "Launcher").

The simulation table the launcher drives lives in :mod:`jaxsurro.table`.
"""

from collections.abc import Sequence

from jaxsurro.launcher.local import LocalScheduler
from jaxsurro.launcher.scheduler import JobSpec, JobState, JobStatus, Scheduler
from jaxsurro.launcher.supervisor import Launcher

__all__ = ["JobSpec", "JobState", "JobStatus", "Launcher", "LocalScheduler", "Scheduler", "make_scheduler"]


def make_scheduler(name: str, options: Sequence[str] = (), slurm_mode: str = "jobs") -> Scheduler:
    """The backend called ``name`` in ``launcher.scheduler``, with the clients' scheduler options."""
    if name == "local":
        return LocalScheduler()
    if name == "slurm":
        from jaxsurro.launcher.slurm import SlurmScheduler, SlurmStepScheduler

        return SlurmStepScheduler(options) if slurm_mode == "steps" else SlurmScheduler(options)
    if name == "oar":
        from jaxsurro.launcher.oar import OarScheduler

        return OarScheduler(options)
    raise ValueError(f"unknown scheduler {name!r}; available: local, slurm, oar")
