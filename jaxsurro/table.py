"""The simulation table: every simulation's parameters, state, attempts, job and times.

Shared by the launcher thread (submits, polls) and the receiver thread (marks a
simulation finished when its FINISH message arrives); one lock guards it.

Supervision (docs/architecture.md, "Launcher"): the receiver writes, without the lock, when it
last heard from each simulation (:attr:`SimulationTable.heard`, one float64 per simulation, the
per-message hot path), and passes the facts of each FINISH to :meth:`SimulationTable.mark_finished`,
which tells a complete attempt from an incomplete one. A simulation whose attempts are exhausted may
be given new parameters (:meth:`SimulationTable.request_redraw`, launcher thread); the receiver
applies the new parameters between two messages (:meth:`SimulationTable.apply_redraws`), so that no
time step is ever labelled with parameters other than those of the process that computed it.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("jaxsurro.table")


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
    # -- supervision (written by the launcher and the receiver, under the table's lock) --
    draw_attempts: int = 0  # attempts with the current parameters (``attempts`` counts every draw's)
    incomplete_finish: str = ""  # why this attempt's FINISH does not complete it, if it does not
    attempt_clients: set[int] = dataclasses.field(default_factory=set)  # client ids welcomed this attempt
    draw_clients: set[int] = dataclasses.field(default_factory=set)  # ... with the current parameters
    redraws: int = 0  # times the parameters were drawn anew after every attempt failed
    redraw_reason: str = ""  # why the last redraw happened
    previous_parameters: list[np.ndarray] = dataclasses.field(default_factory=list)  # the abandoned draws
    next_parameters: np.ndarray | None = None  # a redraw the receiver has not applied yet
    abandoned_steps: int = 0  # time steps stored from abandoned draws (labelled with their own parameters)


# A simulation's history, in simulations.csv and in checkpoints.
_HISTORY = ("steps_finished", "generation", "bred", "parent", "score", "error", "redraws", "redraw_reason")


class SimulationTable:
    """Thread-safe table of simulations; iterate, or read several fields of a record, under ``table.lock``."""

    def __init__(self, parameters: np.ndarray):
        parameters = np.asarray(parameters, dtype=np.float64)
        if parameters.ndim != 2:
            raise ValueError(f"parameters must be [n_simulations, n_parameters], got shape {parameters.shape}")
        self._records = [SimulationRecord(i, row.copy()) for i, row in enumerate(parameters)]
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        # time.monotonic() when this rank last read a message of each simulation (-inf: never). Written
        # by the receiver thread without the lock (one float per message), read by the launcher.
        self.heard = np.full(len(self._records), -np.inf)
        # True once a launcher drives this table (rank 0): an incomplete FINISH is then a failed attempt,
        # retried. A rank without a launcher cannot retry: it accepts a FINISH that reports every step.
        self.supervised = False
        # Set by the launcher every round: simulations whose job runs now, and when the latest one
        # started (time.monotonic()); the receive-timeout check counts only while one runs.
        self.running = 0
        self.last_start = -np.inf
        self.redraws_requested: list[int] = []  # simulations given new parameters, not applied yet
        self.retired: set[tuple[int, int]] = set()  # (sim_id, client_id) of abandoned draws' processes
        # Persistent clients (launcher.persistent_clients > 0): a simulation starts when a client asking
        # for any simulation is handed it (hand_out, receiver thread), not as a job of its own; a complete
        # FINISH then completes it. ``worker_jobs``: the launcher's persistent clients, client id -> job id.
        self.persistent = False
        self.worker_jobs: dict[int, str] = {}

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

    def next_to_run(self) -> list[SimulationRecord]:
        """Pending simulations in the order they start: retries first (lowest id), then new ones in order.

        A redrawn simulation waits until the receiver has applied its new parameters. Call under the lock.
        """
        pending = [r for r in self._records if r.state == SimState.PENDING and r.next_parameters is None]
        pending.sort(key=lambda r: (r.attempts == 0, r.sim_id))
        return pending

    @staticmethod
    def start_attempt(record: SimulationRecord) -> None:
        """A new attempt of ``record``: submitted, its parameters frozen from here on. Call under the lock."""
        record.attempts += 1
        record.draw_attempts += 1
        record.state = SimState.SUBMITTED
        record.started_at = record.ended_at = record.exit_code = record.steps_finished = None
        record.incomplete_finish = ""
        record.attempt_clients = set()

    def hand_out(self, client_id: int) -> int | None:
        """Receiver thread, on a HELLO for any simulation: starts the next simulation to run on that client.

        None when none is waiting, or when simulations are not handed out in this run (no persistent
        clients: each runs as a job of its own). The job of the simulation is the client's, when the
        launcher started that client.
        """
        with self.lock:
            waiting = self.next_to_run() if self.persistent else []
            if not waiting:
                return None
            record = waiting[0]
            self.start_attempt(record)
            record.job_id = self.worker_jobs.get(client_id, f"client-{client_id}")
            record.submitted_at = time.time()
            self.changed.notify_all()
            return record.sim_id

    def welcome(self, sim_id: int, client_id: int) -> np.ndarray:
        """Called on a HELLO that is answered with WELCOME: records the client; returns the parameters."""
        with self.lock:
            record = self._records[sim_id]
            record.attempt_clients.add(client_id)
            record.draw_clients.add(client_id)
            self.heard[sim_id] = time.monotonic()
            return record.parameters.copy()

    def mark_finished(
        self,
        sim_id: int,
        steps: int,
        *,
        expected: int | None = None,
        missing: int = 0,
        client_id: int | None = None,
        other_ranks: bool = False,
    ) -> None:
        """Called on a FINISH message: ``steps`` the count it reports, ``expected`` the experiment's step
        count, ``missing`` how many of the steps routed to this rank were not stored when it arrived,
        ``other_ranks`` whether other server ranks hold the rest of the simulation's steps.

        Complete (``steps >= expected`` and nothing missing): ``steps_finished`` is set, and the
        simulation is ``completed`` once its job has exited. Incomplete: ``incomplete_finish`` says
        why, and the launcher counts the attempt as failed; ``steps_finished`` records the count too,
        except in a server of several ranks, where it means "every step of this rank's share is here"
        (the end of reception waits on it, :mod:`jaxsurro.server.online`) and a retry's steps may still
        be on their way. A rank without a launcher (``supervised`` False) cannot retry: it accepts a
        FINISH that reports every step even when some of its share is missing, and logs an error. On a
        supervised table, a FINISH from a client not welcomed during the current attempt (a late
        message of an attempt already given up) is ignored.
        """
        with self.lock:
            record = self._records[sim_id]
            if self.supervised and client_id is not None and client_id not in record.attempt_clients:
                log.info("ignored a FINISH of simulation %d from a process of an earlier attempt", sim_id)
                return
            why = ""
            if expected is not None and steps < expected:
                why = f"its FINISH reported {steps} of the {expected} time steps"
            elif missing and self.supervised:
                why = (
                    f"{missing} of the time steps it reported were missing when its FINISH arrived "
                    "(see the rejected messages in metrics.jsonl)"
                )
            elif missing:
                log.error(
                    "simulation %d: %d of the time steps routed to this rank were missing when its FINISH arrived; "
                    "only rank 0 can retry a simulation, so it counts as finished without them",
                    sim_id,
                    missing,
                )
            record.incomplete_finish = why
            if not (why and other_ranks):
                record.steps_finished = steps
            # A job of its own completes once it also exited; a persistent client goes on to its next one.
            if not why and (
                record.state == SimState.EXITED or (self.persistent and record.state == SimState.SUBMITTED)
            ):
                record.state, record.ended_at = SimState.COMPLETED, time.time()
            self.changed.notify_all()

    def request_redraw(self, sim_id: int, parameters: np.ndarray, reason: str) -> None:
        """Launcher: every attempt failed; the simulation is to run again, with ``parameters``.

        It stays ``pending`` and is not submitted until the receiver has applied the new parameters
        (:meth:`apply_redraws`): until then, data of the abandoned draw may still be in flight.
        """
        with self.lock:
            record = self._records[sim_id]
            record.next_parameters = np.asarray(parameters, dtype=np.float64).reshape(record.parameters.shape).copy()
            record.redraw_reason = reason
            record.state = SimState.PENDING
            self.redraws_requested.append(sim_id)

    def apply_redraws(self, stored: np.ndarray | None = None) -> list[int]:
        """Receiver thread, between two messages: switches redrawn simulations to their new parameters.

        The processes of the abandoned draw are retired (their late messages are dropped), and the
        simulation's row of ``stored`` (the receiver's [simulation, step] record of stored steps) is
        cleared, so that the new draw's steps are all received instead of being taken for duplicates.
        The steps already stored stay where they are, labelled with the abandoned parameters (valid
        samples of those); they are counted in ``abandoned_steps``. Returns the simulations switched.
        """
        with self.lock:
            applied, self.redraws_requested = self.redraws_requested, []
            for sim_id in applied:
                record = self._records[sim_id]
                if stored is not None:
                    record.abandoned_steps += int(stored[sim_id].sum())
                    stored[sim_id] = False
                self.retired.update((sim_id, client) for client in record.draw_clients)
                record.draw_clients = set()
                record.previous_parameters.append(record.parameters)
                record.parameters, record.next_parameters = record.next_parameters, None
                record.redraws += 1
                record.draw_attempts = 0
            self.changed.notify_all()
            return applied

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

    # What a checkpoint keeps of each record; the rest (job ids, clients, times) belongs to the run that ended.
    _KEPT = ("state", "attempts", *_HISTORY, "draw_attempts", "abandoned_steps")

    def to_records(self) -> list[dict]:
        """Every simulation's parameters and history, JSON-ready, for a checkpoint."""
        with self.lock:
            return [
                {
                    "parameters": r.parameters.tolist(),
                    "previous_parameters": [p.tolist() for p in r.previous_parameters],
                    **{name: (getattr(r, name).value if name == "state" else getattr(r, name)) for name in self._KEPT},
                }
                for r in self._records
            ]

    @classmethod
    def from_records(cls, records: list[dict]) -> SimulationTable:
        """The table of a resumed run: completed and failed simulations stay so; the ones that were running
        (submitted, or exited before their FINISH) are pending again, to be run anew from step 0."""
        table = cls(np.asarray([r["parameters"] for r in records], dtype=np.float64))
        for record, saved in zip(table._records, records, strict=True):
            for name in cls._KEPT:
                setattr(record, name, SimState(saved[name]) if name == "state" else saved[name])
            record.previous_parameters = [np.asarray(p, np.float64) for p in saved["previous_parameters"]]
            if record.state in (SimState.SUBMITTED, SimState.EXITED):
                record.state, record.steps_finished = SimState.PENDING, None
            elif record.state == SimState.CANCELLED:
                record.state = SimState.PENDING
        return table

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
            *_HISTORY,
            "previous_parameters",
            "abandoned_steps",
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
                        r.redraws,
                        r.redraw_reason,
                        "; ".join(" ".join(repr(float(v)) for v in p) for p in r.previous_parameters),
                        r.abandoned_steps,
                    ]
                )


def _stamp(seconds: float | None) -> str:
    return (
        ""
        if seconds is None
        else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds)) + f".{int((seconds % 1) * 1000):03d}"
    )
