"""The ensemble launcher: keeps at most m simulations running, retries failures, cancels on exit.

It runs in a thread of the server's rank-0 process, so the simulation table it
drives is the one the receiver and Breed see. A failed attempt is resubmitted
with the same parameters up to ``max_attempts`` times; a job that exits with 0
but whose FINISH message never arrives counts as a failed attempt too.
See docs/architecture.md, section "Launcher".
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from jaxsurro.launcher.scheduler import JobSpec, JobState, Scheduler
from jaxsurro.table import SimState, SimulationTable

log = logging.getLogger("jaxsurro.launcher")


class Launcher:
    """Drives a :class:`SimulationTable` through a :class:`Scheduler` from a background thread."""

    def __init__(
        self,
        table: SimulationTable,
        scheduler: Scheduler,
        job_for: Callable[[int, int], JobSpec],
        *,
        max_concurrent: int,
        max_attempts: int,
        poll_interval: float = 0.2,
        finish_grace: float = 30.0,
        output_tail_lines: int = 20,
        on_done: Callable[[], None] | None = None,
    ):
        self.table = table
        self.scheduler = scheduler
        self._job_for = job_for  # (sim_id, attempt) -> JobSpec
        self._max_concurrent = max_concurrent
        self._max_attempts = max_attempts
        # A cluster scheduler asks not to be polled more often than every few seconds.
        self._poll_interval = max(poll_interval, scheduler.min_poll_interval)
        self._finish_grace = finish_grace
        self._tail_lines = output_tail_lines
        self._on_done = on_done  # called from the launcher thread once every simulation has ended
        self._stop = threading.Event()
        self.done = threading.Event()  # set once every simulation is terminal
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="launcher", daemon=True)
        self._logs: dict[int, Path] = {}

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the loop and cancels every job still queued or running."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("launcher thread did not stop within %.0f s; cancelling its jobs anyway", timeout)
        self.cancel_all()

    def cancel_all(self) -> None:
        with self.table.lock:
            active = [r for r in self.table if r.state == SimState.SUBMITTED]
            job_ids = [r.job_id for r in active]
        if job_ids:
            log.info("cancelling %d simulation job(s)", len(job_ids))
            self.scheduler.cancel(job_ids)
        now = time.time()
        with self.table.lock:
            for record in active:
                if record.state == SimState.SUBMITTED:
                    record.state, record.ended_at = SimState.CANCELLED, now
            self.table.changed.notify_all()

    def check(self) -> None:
        """Re-raises, in the caller's thread, an error that stopped the launcher thread."""
        if self.error is not None:
            raise RuntimeError(f"the launcher stopped: {self.error}") from self.error

    # -- the loop ----------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.step()
                if self.table.all_terminal():
                    if self._on_done is not None:
                        self._on_done()
                    self.done.set()
                    return
                self._stop.wait(self._poll_interval)
        except BaseException as exc:  # surfaced by check() in the main thread
            log.exception("launcher failed")
            self.error = exc
            self.done.set()

    def step(self) -> None:
        """One round: poll active jobs, settle the ended ones, submit up to the concurrency limit.

        Called by the launcher's own thread only; it is not meant to run concurrently with itself.
        """
        with self.table.lock:
            active = {r.job_id: r.sim_id for r in self.table if r.state == SimState.SUBMITTED}
        statuses = self.scheduler.poll(list(active)) if active else {}
        now = time.time()
        for job_id, status in statuses.items():
            sim_id = active[job_id]
            with self.table.lock:
                record = self.table[sim_id]
                if record.state != SimState.SUBMITTED or record.job_id != job_id:
                    continue
                if status.state == JobState.RUNNING and record.started_at is None:
                    record.started_at = now
                if not status.state.is_terminal:
                    continue
                record.ended_at, record.exit_code = now, status.exit_code
                if status.state == JobState.COMPLETED:
                    if record.steps_finished is not None:
                        record.state = SimState.COMPLETED
                    else:
                        record.state, record.exited_at = SimState.EXITED, time.monotonic()
                    continue
            self._attempt_failed(sim_id, f"{status.state.value} with exit code {status.exit_code}")
        self._expire_missing_finish()
        self._submit_pending()
        with self.table.lock:
            self.table.changed.notify_all()

    def _expire_missing_finish(self) -> None:
        deadline = time.monotonic() - self._finish_grace
        with self.table.lock:
            late = [r.sim_id for r in self.table if r.state == SimState.EXITED and r.exited_at < deadline]
        for sim_id in late:
            self._attempt_failed(
                sim_id,
                f"exited with 0 but its FINISH message did not arrive within "
                f"{self._finish_grace:.0f} s (did the solver leave the client's "
                f"context manager normally?)",
            )

    def _attempt_failed(self, sim_id: int, what: str) -> None:
        with self.table.lock:
            record = self.table[sim_id]
            attempt = record.attempts
            retry = attempt < self._max_attempts
            record.error = what
            record.state = SimState.PENDING if retry else SimState.FAILED
        tail = self._tail(sim_id)
        log.warning(
            "simulation %d attempt %d/%d %s; %s%s",
            sim_id,
            attempt,
            self._max_attempts,
            what,
            "retrying with the same parameters" if retry else "giving up",
            f"\n--- last lines of {self._logs.get(sim_id)} ---\n{tail}" if tail else "",
        )

    def _submit_pending(self) -> None:
        with self.table.lock:
            running = sum(1 for r in self.table if r.state in (SimState.SUBMITTED, SimState.EXITED))
            free = self._max_concurrent - running
            if free <= 0:
                return
            # Retries first (lowest id), then new simulations in order.
            pending = [r for r in self.table if r.state == SimState.PENDING]
            pending.sort(key=lambda r: (r.attempts == 0, r.sim_id))
            chosen = pending[:free]
            for record in chosen:
                record.attempts += 1
                record.state = SimState.SUBMITTED  # parameters are frozen from here on
                record.started_at = record.ended_at = record.exit_code = record.steps_finished = None
        for record in chosen:
            job = self._job_for(record.sim_id, record.attempts)
            self._logs[record.sim_id] = job.log_path
            try:
                job_id = self.scheduler.submit(job)
            except Exception as exc:
                with self.table.lock:
                    record.job_id = ""
                self._attempt_failed(record.sim_id, f"could not be submitted: {exc}")
                continue
            with self.table.lock:
                record.job_id, record.submitted_at = job_id, time.time()

    def _tail(self, sim_id: int) -> str:
        path = self._logs.get(sim_id)
        if path is None or self._tail_lines == 0 or not path.exists():
            return ""
        with open(path, errors="replace") as handle:
            return "".join(collections.deque(handle, maxlen=self._tail_lines)).rstrip()
