"""The simulation table: every simulation's parameters, state, attempts, job and times.

Shared by the launcher thread (submits, polls) and the receiver thread (marks a
simulation finished when its FINISH message arrives); one lock guards it.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np


class SimState(enum.Enum):
    PENDING = "pending"  # not submitted yet; its parameters may still change (Breed)
    SUBMITTED = "submitted"  # handed to the scheduler, queued or running
    EXITED = "exited"  # the job ended with exit code 0, its FINISH not yet seen
    COMPLETED = "completed"  # the job ended well and the server saw its FINISH
    FAILED = "failed"  # every attempt failed
    CANCELLED = "cancelled"  # stopped by the launcher at shutdown

    @property
    def is_terminal(self) -> bool:
        return self in (SimState.COMPLETED, SimState.FAILED, SimState.CANCELLED)


@dataclasses.dataclass
class SimulationRecord:
    sim_id: int
    parameters: np.ndarray  # [d] float64
    state: SimState = SimState.PENDING
    attempts: int = 0
    job_id: str = ""
    submitted_at: float | None = None  # wall-clock seconds (time.time)
    started_at: float | None = None
    ended_at: float | None = None
    exited_at: float | None = None  # monotonic time the job exited, to time out a missing FINISH
    exit_code: int | None = None
    steps_finished: int | None = None  # the step count the client's FINISH reported
    generation: int = 0  # Breed resampling round that produced the parameters
    bred: bool = False
    parent: int = -1  # the simulation whose parameters were the parent, -1 if none
    score: float | None = None  # Breed's Q: mean loss deviation over the simulation's time steps
    error: str = ""


class SimulationTable:
    """Thread-safe table of simulations; iterate, or read several fields of a record, under ``table.lock``."""

    def __init__(self, parameters: np.ndarray):
        parameters = np.asarray(parameters, dtype=np.float64)
        if parameters.ndim != 2:
            raise ValueError(f"parameters must be [n_simulations, n_parameters], got shape {parameters.shape}")
        self._records = [SimulationRecord(i, row.copy()) for i, row in enumerate(parameters)]
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, sim_id: int) -> SimulationRecord:
        return self._records[sim_id]

    def __iter__(self) -> Iterator[SimulationRecord]:
        return iter(self._records)

    def pending_ids(self) -> list[int]:
        """Simulations never submitted: the ones whose parameters Breed may still replace."""
        with self.lock:
            return [r.sim_id for r in self._records if r.state == SimState.PENDING and r.attempts == 0]

    def parameters_of(self, sim_id: int) -> np.ndarray:
        with self.lock:
            return self._records[sim_id].parameters.copy()

    def is_known(self, sim_id: int) -> bool:
        """Whether data for ``sim_id`` may arrive: it exists and was submitted at least once."""
        return 0 <= sim_id < len(self._records) and self._records[sim_id].attempts > 0

    def mark_finished(self, sim_id: int, steps: int) -> None:
        """Called on a FINISH message: the simulation's data up to here have all been received."""
        with self.lock:
            record = self._records[sim_id]
            record.steps_finished = steps
            if record.state == SimState.EXITED:
                record.state = SimState.COMPLETED
            self.changed.notify_all()

    def counts(self) -> dict[str, int]:
        with self.lock:
            out = {state.value: 0 for state in SimState}
            for record in self._records:
                out[record.state.value] += 1
            return out

    def all_terminal(self) -> bool:
        with self.lock:
            return all(record.state.is_terminal for record in self._records)

    def replace_pending(self, sim_ids: Sequence[int], parameters: np.ndarray, **fields) -> int:
        """Atomically replaces the parameters of simulations never submitted; returns how many changed.

        A simulation being retried keeps its parameters, so a restart reproduces its first attempt.
        """
        changed = 0
        with self.lock:
            for i, sim_id in enumerate(sim_ids):
                record = self._records[sim_id]
                if record.state != SimState.PENDING or record.attempts > 0:
                    continue
                record.parameters = np.asarray(parameters[i], dtype=np.float64).copy()
                for name, values in fields.items():
                    setattr(record, name, values[i])
                changed += 1
        return changed

    def write_csv(self, path: Path, parameter_names: Sequence[str]) -> None:
        """Writes one row per simulation, parameters as named columns."""
        columns = [
            "sim_id",
            *parameter_names,
            "state",
            "attempts",
            "job_id",
            "submitted_at",
            "started_at",
            "ended_at",
            "exit_code",
            "steps_finished",
            "generation",
            "bred",
            "parent",
            "score",
            "error",
        ]
        with self.lock, open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for r in self._records:
                writer.writerow(
                    [
                        r.sim_id,
                        *(repr(float(v)) for v in r.parameters),
                        r.state.value,
                        r.attempts,
                        r.job_id,
                        _stamp(r.submitted_at),
                        _stamp(r.started_at),
                        _stamp(r.ended_at),
                        "" if r.exit_code is None else r.exit_code,
                        "" if r.steps_finished is None else r.steps_finished,
                        r.generation,
                        int(r.bred),
                        r.parent,
                        "" if r.score is None else repr(float(r.score)),
                        r.error,
                    ]
                )


def _stamp(seconds: float | None) -> str:
    return (
        ""
        if seconds is None
        else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds)) + f".{int((seconds % 1) * 1000):03d}"
    )
