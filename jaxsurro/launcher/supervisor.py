"""The ensemble launcher: keeps at most m simulations running, retries failures, cancels on exit.

It runs in a thread of the server's rank-0 process, so the simulation table it
drives is the one the receiver and Breed see. A failed attempt is resubmitted
with the same parameters up to ``max_attempts`` times. Failed attempts are: a job that
ends with a non-zero code or is lost; one that exits with 0 but whose FINISH message never
arrives, or whose FINISH reports fewer steps than the experiment's or arrives while some of
the steps it sent are missing; and a *silent* one, which has sent no message for the silence
limit while running (a hung solver), which is cancelled. Once a simulation's attempts are
exhausted it fails, or (``redraw``) runs again with new parameters from the sampler, keeping
its id. See docs/architecture.md, section "Launcher".

The silence limit (:class:`SilenceLimit`) is ``launcher.silence_timeout`` when given; else it
is derived from the pace the launcher observes, by sampling the receiver's per-simulation
"last heard" times each round: ``max(30 s, client_timeout + 10 × p95 of the gaps between a
simulation's messages)`` (``client_timeout`` because a healthy client blocked by a full
server buffer waits that long in its send before it fails on its own), and before a
simulation's first message ``max(30 s, 10 × p95 of the times from start to first message)``.
Until enough of either was seen there is no limit: a slow solver is never cancelled before its
pace is known (the server's ``server.receive_timeout`` still stops a run where nobody talks).

Persistent clients (``launcher.persistent_clients`` = k > 0): instead of a job per simulation the
launcher keeps min(k, simulations waiting) client jobs alive, each running simulations one after
another as the receiver hands them out (:meth:`SimulationTable.hand_out`); the simulation a client
runs has that client's job, so a client that dies or hangs fails that simulation's attempt exactly as
a job of its own would, and a new client is started while simulations wait.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxsurro.launcher.scheduler import JobSpec, JobState, Scheduler
from jaxsurro.table import SimState, SimulationTable

log = logging.getLogger("jaxsurro.launcher")

MIN_SILENCE_S = 30.0  # a derived silence limit is never shorter
PACE_FACTOR = 10.0  # derived limit: this many times the 95th percentile of the observed gaps
PACE_QUANTILE = 95.0
MIN_GAPS = 20  # gaps observed before the limit between messages is derived from them
MIN_STARTUPS = 3  # first messages observed before the limit before a first message is derived
PACE_WINDOW = 2000  # the most recent observations kept


class SilenceLimit:
    """How long a running simulation may send nothing before it is taken for hung (seconds).

    ``fixed``: ``launcher.silence_timeout``, used as it is. Otherwise derived from observations
    (module docstring); ``fallback`` until enough were seen (default: no limit); ``backpressure`` is
    the longest a healthy client may be blocked sending (the client's timeout).
    """

    def __init__(self, fixed: float | None, *, fallback: float = math.inf, backpressure: float = 0.0):
        self.fixed = fixed
        self.fallback = fallback
        self.backpressure = backpressure
        self.gaps: collections.deque[float] = collections.deque(maxlen=PACE_WINDOW)
        self.startups: collections.deque[float] = collections.deque(maxlen=PACE_WINDOW)
        self._cache: dict[bool, float] = {}

    def observe_gap(self, seconds: float) -> None:
        self.gaps.append(seconds)
        self._cache.pop(True, None)

    def observe_startup(self, seconds: float) -> None:
        self.startups.append(max(seconds, 0.0))
        self._cache.pop(False, None)

    def limit(self, heard: bool) -> float:
        """The limit between two messages (``heard``: this attempt has sent one), or before its first."""
        if self.fixed is not None:
            return self.fixed
        if heard not in self._cache:
            samples, needed, extra = (
                (self.gaps, MIN_GAPS, self.backpressure) if heard else (self.startups, MIN_STARTUPS, 0.0)
            )
            if len(samples) < needed:
                self._cache[heard] = self.fallback
            else:
                pace = float(np.percentile(np.fromiter(samples, float), PACE_QUANTILE))
                self._cache[heard] = max(MIN_SILENCE_S, extra + PACE_FACTOR * pace)
        return self._cache[heard]

    def describe(self, heard: bool) -> str:
        if self.fixed is not None:
            return "launcher.silence_timeout"
        samples, needed = (self.gaps, MIN_GAPS) if heard else (self.startups, MIN_STARTUPS)
        if len(samples) < needed:
            return "until the solver's pace is known"
        what = "gaps between a simulation's messages" if heard else "times from start to first message"
        return f"derived from {len(samples)} observed {what}"


@dataclasses.dataclass
class _Watch:
    """A running attempt: when it started and when it was last heard from (time.monotonic())."""

    submitted: float
    started: float
    last: float = -np.inf  # the last message of this attempt seen; -inf: none yet


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
        silence_timeout: float | None = None,
        silence_fallback: float = math.inf,
        redraw: Callable[[], np.ndarray] | None = None,
        max_redraws: int = 3,
        persistent_clients: int = 0,
        client_job: Callable[[int], JobSpec] | None = None,
    ):
        """``silence_timeout``: a fixed silence limit, or None to derive it (:class:`SilenceLimit`, with
        ``finish_grace``, the clients' timeout, as its backpressure allowance and ``silence_fallback``
        as the limit until the pace is known, by default none). ``redraw``: new parameters for a
        simulation whose attempts are exhausted, at most ``max_redraws`` times each; None: it fails.
        ``persistent_clients`` > 0: that many persistent clients at most, ``client_job(client_id)`` the job
        of one (module docstring); ``max_concurrent`` then does not apply.
        """
        if persistent_clients and client_job is None:
            raise ValueError("persistent clients need client_job, the job of one client")
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
        self.silence = SilenceLimit(silence_timeout, fallback=silence_fallback, backpressure=finish_grace)
        self._redraw = redraw
        self._max_redraws = max_redraws
        self._submitted: dict[int, float] = {}  # sim_id -> time.monotonic() of its current attempt's submission
        self._watch: dict[int, _Watch] = {}  # the attempts running now, by sim_id
        table.supervised = True  # an incomplete FINISH is now a failed attempt, retried
        self._n_clients = persistent_clients
        self._client_job = client_job
        self._clients: dict[str, int] = {}  # the persistent clients' jobs alive: job id -> client id
        self._client_logs: dict[str, Path] = {}  # job id -> log of every persistent client started
        self._next_client_id = 1
        self._client_failures = 0  # persistent client jobs in a row that could not be submitted
        table.persistent = persistent_clients > 0

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
            job_ids = list(dict.fromkeys([*(r.job_id for r in active), *self._clients]))
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
        """One round: poll active jobs, settle the ended ones, cancel silent ones, submit up to the limit.

        Called by the launcher's own thread only; it is not meant to run concurrently with itself.
        """
        active: dict[str, list[int]] = {}  # job id -> its simulations (a persistent client may hold two a moment)
        with self.table.lock:
            for record in self.table:
                if record.state == SimState.SUBMITTED:
                    active.setdefault(record.job_id, []).append(record.sim_id)
        # Persistent clients: their jobs (a simulation handed to a client the launcher did not start has
        # no job to poll; its FINISH and its silence still count).
        polled = list(self._clients) if self.table.persistent else list(active)
        statuses = self.scheduler.poll(polled) if polled else {}
        now, monotonic = time.time(), time.monotonic()
        for job_id, status in statuses.items():
            if job_id in self._clients and status.state.is_terminal:
                self._client_ended(job_id, status)
            for sim_id in active.get(job_id, ()):
                self._settle(sim_id, job_id, status, now, monotonic)
        self._expire_missing_finish()
        self._cancel_silent(time.monotonic())
        self._submit_pending()
        with self.table.lock:
            self.table.running = len(self._watch)
            self.table.changed.notify_all()

    def _settle(self, sim_id: int, job_id: str, status, now: float, monotonic: float) -> None:
        """What the status of its job means for a submitted simulation: started, completed or failed."""
        failure = ""
        with self.table.lock:
            record = self.table[sim_id]
            if record.state != SimState.SUBMITTED or record.job_id != job_id:
                return
            if status.state == JobState.RUNNING and record.started_at is None:
                record.started_at = now
                self._watch[sim_id] = _Watch(self._submitted.get(sim_id, monotonic), monotonic)
                self.table.last_start = monotonic
            if not status.state.is_terminal:
                return
            self._watch.pop(sim_id, None)
            record.ended_at, record.exit_code = now, status.exit_code
            if status.state != JobState.COMPLETED:
                failure = f"{status.state.value} with exit code {status.exit_code}"
                if record.incomplete_finish:
                    failure += f" ({record.incomplete_finish})"
            elif record.incomplete_finish:
                failure = f"exited with 0 but {record.incomplete_finish}"
            elif record.steps_finished is not None:
                record.state = SimState.COMPLETED
            else:
                record.state, record.exited_at = SimState.EXITED, time.monotonic()
        if failure:
            self._attempt_failed(sim_id, failure)

    def _client_ended(self, job_id: str, status) -> None:
        """A persistent client's job ended: a new one is started while simulations wait (_start_clients)."""
        client_id = self._clients.pop(job_id)
        with self.table.lock:
            self.table.worker_jobs.pop(client_id, None)
        if status.state != JobState.COMPLETED:
            tail = self._tail_of(self._client_logs.get(job_id))
            log.warning(
                "persistent client %d (job %s) %s with exit code %s%s",
                client_id,
                job_id,
                status.state.value,
                status.exit_code,
                f"\n--- last lines of {self._client_logs.get(job_id)} ---\n{tail}" if tail else "",
            )

    def _expire_missing_finish(self) -> None:
        deadline = time.monotonic() - self._finish_grace
        with self.table.lock:
            exited = [r for r in self.table if r.state == SimState.EXITED]
            incomplete = [(r.sim_id, r.incomplete_finish) for r in exited if r.incomplete_finish]
            late = [r.sim_id for r in exited if not r.incomplete_finish and r.exited_at < deadline]
            # A persistent client's incomplete FINISH: it has gone on to its next simulation.
            handed = [r for r in self.table if self.table.persistent and r.state == SimState.SUBMITTED]
            short = [(r.sim_id, r.incomplete_finish) for r in handed if r.incomplete_finish]
        for sim_id, why in short:
            self._attempt_failed(sim_id, f"its persistent client went on, but {why}")
        for sim_id, why in incomplete:
            self._attempt_failed(sim_id, f"exited with 0 but {why}")
        for sim_id in late:
            self._attempt_failed(
                sim_id,
                f"exited with 0 but its FINISH message did not arrive within "
                f"{self._finish_grace:.0f} s (did the solver leave the client's "
                f"context manager normally?)",
            )

    def _cancel_silent(self, now: float) -> None:
        """Observes the running attempts' pace; cancels those silent for longer than the limit."""
        silent = []
        with self.table.lock:
            for sim_id, watch in self._watch.items():
                record = self.table[sim_id]
                if record.state != SimState.SUBMITTED:
                    continue
                heard = float(self.table.heard[sim_id])  # written by the receiver without the lock
                if heard > watch.last and heard >= watch.submitted:  # new messages of this attempt
                    if watch.last == -np.inf:
                        self.silence.observe_startup(heard - watch.started)
                    else:
                        self.silence.observe_gap(heard - watch.last)
                    watch.last = heard
                has_spoken = watch.last > -np.inf
                quiet = now - max(watch.last, watch.started)
                limit = self.silence.limit(has_spoken)
                if quiet > limit:
                    silent.append((sim_id, record.job_id, quiet, limit, self.silence.describe(has_spoken), has_spoken))
        for sim_id, job_id, quiet, limit, source, has_spoken in silent:
            self.scheduler.cancel([job_id])
            self._attempt_failed(
                sim_id,
                f"sent no message for {quiet:.1f} s {'since its last one' if has_spoken else 'since it started'} "
                f"(silence limit {limit:.1f} s, {source}); cancelled as hung",
            )

    def _attempt_failed(self, sim_id: int, what: str) -> None:
        with self.table.lock:
            record = self.table[sim_id]
            self._watch.pop(sim_id, None)
            attempt = record.draw_attempts
            record.error = what
            if attempt < self._max_attempts:
                outcome = "retrying with the same parameters"
                record.state = SimState.PENDING
            elif self._redraw is not None and record.redraws < self._max_redraws:
                old = record.parameters
                new = np.asarray(self._redraw(), dtype=np.float64)
                self.table.request_redraw(
                    sim_id, new, f"{attempt} attempt(s) with parameters {_vector(old)} failed, the last {what}"
                )
                outcome = (
                    f"every attempt failed: drawing new parameters {_vector(new)} "
                    f"(redraw {record.redraws + 1}/{self._max_redraws})"
                )
            else:
                outcome = "giving up"
                record.state = SimState.FAILED
        tail = self._tail(sim_id)
        log.warning(
            "simulation %d attempt %d/%d %s; %s%s",
            sim_id,
            attempt,
            self._max_attempts,
            what,
            outcome,
            f"\n--- last lines of {self._log_path(sim_id)} ---\n{tail}" if tail else "",
        )

    def _start_clients(self) -> None:
        """Persistent clients: keeps min(persistent_clients, simulations waiting) client jobs alive."""
        with self.table.lock:
            waiting = len(self.table.next_to_run())
        for _ in range(min(self._n_clients, waiting) - len(self._clients)):
            client_id, self._next_client_id = self._next_client_id, self._next_client_id + 1
            job = self._client_job(client_id)
            try:
                job_id = self.scheduler.submit(job)
            except Exception as exc:
                self._client_failures += 1
                if self._client_failures >= self._max_attempts:
                    raise RuntimeError(
                        f"{self._client_failures} persistent client jobs in a row could not be submitted; "
                        f"the last: {exc}"
                    ) from exc
                log.warning("persistent client %d could not be submitted (%s); trying again", client_id, exc)
                return
            self._client_failures = 0
            self._clients[job_id] = client_id
            self._client_logs[job_id] = job.log_path
            with self.table.lock:
                self.table.worker_jobs[client_id] = job_id

    def _submit_pending(self) -> None:
        if self.table.persistent:
            self._start_clients()
            return
        with self.table.lock:
            running = sum(1 for r in self.table if r.state in (SimState.SUBMITTED, SimState.EXITED))
            free = self._max_concurrent - running
            if free <= 0:
                return
            chosen = self.table.next_to_run()[:free]
            submitted = time.monotonic()
            for record in chosen:
                self.table.start_attempt(record)  # parameters are frozen from here on
                self._submitted[record.sim_id] = submitted
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

    def _log_path(self, sim_id: int) -> Path | None:
        """The log of the job that ran ``sim_id``: its own, or its persistent client's."""
        return self._logs.get(sim_id) or self._client_logs.get(self.table[sim_id].job_id)

    def _tail(self, sim_id: int) -> str:
        return self._tail_of(self._log_path(sim_id))

    def _tail_of(self, path: Path | None) -> str:
        if path is None or self._tail_lines == 0 or not path.exists():
            return ""
        with open(path, errors="replace") as handle:
            return "".join(collections.deque(handle, maxlen=self._tail_lines)).rstrip()


def _vector(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"
