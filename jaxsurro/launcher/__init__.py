"""Runs the ensemble of simulations through a scheduler backend."""

from jaxsurro.launcher.ensemble import Launcher
from jaxsurro.launcher.local import LocalScheduler
from jaxsurro.launcher.scheduler import JobSpec, JobState, JobStatus, Scheduler
from jaxsurro.launcher.table import SimState, SimulationRecord, SimulationTable

__all__ = ["JobSpec", "JobState", "JobStatus", "Launcher", "LocalScheduler", "Scheduler", "SimState",
           "SimulationRecord", "SimulationTable", "make_scheduler"]


def make_scheduler(name: str) -> Scheduler:
    """The backend called ``name`` in ``launcher.scheduler``."""
    if name == "local":
        return LocalScheduler()
    raise ValueError(f"unknown scheduler {name!r}; available: local")
