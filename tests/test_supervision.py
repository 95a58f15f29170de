"""Client supervision with real solver processes: hung clients, short FINISHes, redraws, stall timers.

The solver stand-in is tests/solvers/faulty_heat.py. Most tests run an :class:`Ensemble` (the real
receiver and launcher, no training) into a :class:`ValidationSink`, whose dense array shows every
time step each simulation delivered; the last one runs a whole study with every fault at once.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from waiting import wait_until

from jaxsurro import protocol
from jaxsurro.config import ConfigError, load_config
from jaxsurro.core.sampling import BoxSampler, derive_seed
from jaxsurro.launcher import JobState, JobStatus, Launcher, LocalScheduler
from jaxsurro.launcher.supervisor import MIN_GAPS, MIN_SILENCE_S, MIN_STARTUPS, SilenceLimit
from jaxsurro.run import job_factory, launch_factory, plan_simulations, run
from jaxsurro.server.ensemble import Ensemble, StallError
from jaxsurro.server.receiver import Receiver, ValidationSink
from jaxsurro.table import SimState, SimulationTable

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun") or "mpirun (missing: run scripts/setup.sh, which installs OpenMPI)"
N_STEPS = 10
SLACK = 0.5  # seconds: a cancelled process's exit, the next job's start, a loaded machine's scheduling

spec = importlib.util.spec_from_file_location("heat", ROOT / "solvers" / "heat.py")
heat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heat)


def tiny(tmp_path: Path, n_sims: int, *extra: str) -> list[str]:
    """Overrides that shrink the default experiment to a few seconds (as tests/test_end_to_end.py's)."""
    return [
        f"study.n_simulations={n_sims}",
        f"solver.n_steps={N_STEPS}",
        "solver.grid_size=8",
        "train.n_validation=2",
        "train.batch_size=16",
        "train.validation_every=20",
        "buffer.capacity=40",
        "buffer.watermark=10",
        "model.hidden=32",
        f"study.output_dir='{tmp_path / 'runs'}'",
        f"study.cache_dir='{tmp_path / 'cache'}'",
        "server.receive_timeout=60.0",
        "train.batch_timeout=60.0",
        *extra,
    ]


def faulty(*flags: str) -> str:
    """The solver.command override that runs tests/solvers/faulty_heat.py with ``flags``."""
    argv = ["{python}", str(ROOT / "tests/solvers/faulty_heat.py"), "{grid_size}", "{n_steps}", *flags]
    return f"solver.command={json.dumps(argv)}"


def config_for(tmp_path: Path, n_sims: int, *extra: str):
    return load_config(ROOT / "experiments/heat.toml", tiny(tmp_path, n_sims, *extra))


def run_ensemble(config, tmp_path: Path, launch=None, timeout: float = 60.0):
    """Runs the study's simulations through a real launcher and receiver into a ValidationSink."""
    table = plan_simulations(config)
    sink = ValidationSink(len(table), config.solver.n_steps, config.solver.sample_size)
    ensemble = Ensemble(config, table, sink, "sim", launch or launch_factory(config, tmp_path / "logs"))
    deadline = time.monotonic() + timeout
    with ensemble:
        while not ensemble.launcher.done.wait(0.05):
            ensemble.poll()
            assert time.monotonic() < deadline, f"the ensemble did not end within {timeout} s: {table.counts()}"
        ensemble.poll()
    return table, ensemble.receiver.counters(), sink


def trajectory(parameters: np.ndarray, config) -> np.ndarray:
    """What the solver sends for these parameters, as the sink holds it: [n_steps, field size] float32."""
    fields = heat.simulate(parameters, config.solver.grid_size, config.solver.n_steps)
    return np.stack([np.asarray(f, dtype=np.float32).reshape(-1) for f in fields])


def assert_every_trajectory_is_its_parameters(table: SimulationTable, sink: ValidationSink, config) -> None:
    for record in table:
        np.testing.assert_array_equal(sink.samples[record.sim_id], trajectory(record.parameters, config))


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


# -- a hung client ------------------------------------------------------------------------------------
def test_a_hung_client_is_cancelled_and_retried_within_the_silence_limit(tmp_path):
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    silence, poll = 4.0, 0.2
    config = config_for(
        tmp_path,
        3,
        faulty("--hang", "1", "--stamps", str(stamps)),
        f"launcher.silence_timeout={silence}",
        f"launcher.poll_interval={poll}",
        "launcher.max_concurrent=3",
    )
    table, counters, sink = run_ensemble(config, tmp_path)

    assert [r.state for r in table] == [SimState.COMPLETED] * 3
    assert [r.attempts for r in table] == [1, 2, 1]
    hung = table[1]
    assert "cancelled as hung" in hung.error and "launcher.silence_timeout" in hung.error
    pid, last_send = (stamps / "hung-1-1").read_text().split()
    # From its last message to the retry's submission: the silence limit, plus at most one launcher round.
    delay = hung.submitted_at - float(last_send)
    assert silence <= delay <= silence + poll + SLACK, delay
    assert not alive(int(pid)), "the hung process outlived its cancellation"
    # The retry resent steps 0-2: stored once; every simulation's data are its own parameters' trajectory.
    assert (counters.unique_received, counters.duplicates) == (3 * N_STEPS, 3)
    assert_every_trajectory_is_its_parameters(table, sink, config)


# -- a FINISH that reports fewer steps ------------------------------------------------------------------
def test_a_short_finish_is_a_failed_attempt_and_is_retried(tmp_path):
    config = config_for(tmp_path, 2, faulty("--short", "0"))
    table, counters, sink = run_ensemble(config, tmp_path)

    assert [r.state for r in table] == [SimState.COMPLETED] * 2
    assert [r.attempts for r in table] == [2, 1]
    assert table[0].error == f"exited with 0 but its FINISH reported 5 of the {N_STEPS} time steps"
    assert table[0].steps_finished == N_STEPS  # the retry's FINISH
    assert counters.incomplete == {}  # the retry completed it: no longer reported as incomplete
    assert (counters.unique_received, counters.duplicates, counters.finishes) == (2 * N_STEPS, 5, 3)
    assert_every_trajectory_is_its_parameters(table, sink, config)


# -- redraw --------------------------------------------------------------------------------------------
def test_an_exhausted_simulation_is_redrawn_and_its_draws_are_not_mixed(tmp_path):
    # Simulation 0 (T0 = 487) sends two steps and diverges, every attempt; simulation 1 (T0 = 287) runs.
    config = config_for(
        tmp_path, 2, faulty("--refuse-above", "450", "--refuse-after", "2"), "launcher.on_exhausted=redraw"
    )
    planned = plan_simulations(config)[0].parameters
    table, counters, sink = run_ensemble(config, tmp_path)

    redrawn = table[0]
    assert redrawn.state == SimState.COMPLETED and table[1].attempts == 1
    assert (redrawn.attempts, redrawn.draw_attempts, redrawn.redraws) == (3, 1, 1)
    np.testing.assert_array_equal(redrawn.previous_parameters[0], planned)
    # The new parameters continue the plan's own sampler stream.
    sampler = BoxSampler("halton", config.solver.low, config.solver.high, derive_seed(config.study.seed, "sampler"))
    np.testing.assert_array_equal(redrawn.parameters, sampler.draw(3)[2])
    assert redrawn.parameters[0] <= 450
    assert "2 attempt(s) with parameters [487.285" in redrawn.redraw_reason
    assert "failed with exit code 4" in redrawn.redraw_reason
    # Steps 0 and 1 of the abandoned draw were stored, then the new draw's were all received anew:
    # the sink holds the new parameters' trajectory at every step, nothing of the old one.
    assert redrawn.abandoned_steps == 2
    assert counters.unique_received == 2 * N_STEPS + redrawn.abandoned_steps
    assert_every_trajectory_is_its_parameters(table, sink, config)


# -- the stall timer counts only while a simulation runs -------------------------------------------------
class QueuedScheduler(LocalScheduler):
    """The local backend behind a queue: each job waits ``queued`` seconds before it starts (a busy cluster)."""

    def __init__(self, queued: float):
        super().__init__(kill_grace=2.0)
        self.queued = queued
        self._queue: dict[str, tuple[float, object]] = {}
        self._started: dict[str, str] = {}

    def submit(self, job) -> str:
        job_id = f"queued-{len(self._queue)}"
        self._queue[job_id] = (time.monotonic() + self.queued, job)
        return job_id

    def poll(self, job_ids):
        out = {}
        for job_id in job_ids:
            release, job = self._queue[job_id]
            if job_id not in self._started:
                if time.monotonic() < release:
                    out[job_id] = JobStatus(JobState.PENDING, None)
                    continue
                self._started[job_id] = super().submit(job)
            local = self._started[job_id]
            out[job_id] = super().poll([local])[local]
        return out

    def cancel(self, job_ids) -> None:
        super().cancel([self._started[j] for j in job_ids if j in self._started])


def queued_launch(config, tmp_path: Path, queued: float):
    def launch(table, access, label):
        return Launcher(
            table,
            QueuedScheduler(queued),
            job_factory(config, access, tmp_path / "logs", label),
            max_concurrent=2,
            max_attempts=1,
            poll_interval=0.05,
            finish_grace=config.server.client_timeout,
            silence_timeout=config.launcher.silence_timeout,
        )

    return launch


def test_clients_queued_longer_than_the_receive_timeout_are_not_a_stall(tmp_path):
    config = config_for(tmp_path, 2, "server.receive_timeout=2.0", "launcher.silence_timeout=30.0")
    started = time.monotonic()
    table, counters, _ = run_ensemble(config, tmp_path, queued_launch(config, tmp_path, queued=3.0))
    assert time.monotonic() - started > 3.0  # queued for longer than server.receive_timeout, without a StallError
    assert [r.state for r in table] == [SimState.COMPLETED] * 2 and counters.unique_received == 2 * N_STEPS


def test_a_running_simulation_that_sends_nothing_is_a_stall_counted_from_its_start(tmp_path):
    silent = 'solver.command=["{python}", "-c", "import time; time.sleep(60)"]'
    # The launcher's own silence limit is long here, so that the server's receive timeout is what trips.
    config = config_for(tmp_path, 1, silent, "server.receive_timeout=1.0", "launcher.silence_timeout=100.0")
    started = time.monotonic()
    with pytest.raises(StallError, match="while simulations run"):
        run_ensemble(config, tmp_path, queued_launch(config, tmp_path, queued=1.5))
    assert time.monotonic() - started >= 1.5 + 1.0  # counted from the start, not from the server's


class SilentQueuedScheduler(QueuedScheduler):
    """A queued backend whose jobs never send anything once started; it notes when each one started."""

    def __init__(self, queued: float):
        super().__init__(queued)
        self.started_at: list[float] = []

    def submit(self, job) -> str:
        return super().submit(dataclasses.replace(job, argv=(sys.executable, "-c", "import time; time.sleep(60)")))

    def poll(self, job_ids):
        before = len(self._started)
        statuses = super().poll(job_ids)
        self.started_at += [time.monotonic()] * (len(self._started) - before)
        return statuses


def test_no_batch_for_the_batch_timeout_is_a_stall_only_once_a_simulation_runs(tmp_path, monkeypatch):
    # Rank 0 decides for every rank, from the latest simulation start: queued clients are not a stall.
    config = config_for(tmp_path, 1, "train.batch_timeout=1.0", "launcher.silence_timeout=100.0")
    scheduler = SilentQueuedScheduler(queued=2.0)
    real_factory = launch_factory

    def queued_simulations(config, log_dir):
        validation = real_factory(config, log_dir)  # the validation set comes from the real solver

        def launch(table, access, label):
            if label != "sim":
                return validation(table, access, label)
            job_for = job_factory(config, access, log_dir, label)
            return Launcher(table, scheduler, job_for, max_concurrent=1, max_attempts=1, poll_interval=0.05)

        return launch

    monkeypatch.setattr("jaxsurro.run.launch_factory", queued_simulations)
    with pytest.raises(StallError, match=r"no rank had a batch for 1 s while simulations run \(train.batch_timeout\)"):
        run(config, show_progress=False)
    assert scheduler.started_at, "a stall was reported while the simulation was queued"
    assert time.monotonic() - scheduler.started_at[0] >= 1.0  # counted from its start


# -- the derived silence limit ----------------------------------------------------------------------------
def test_the_silence_limit_is_derived_from_the_observed_pace_unless_given():
    limit = SilenceLimit(None, backpressure=60.0)
    assert limit.limit(heard=True) == limit.limit(heard=False) == math.inf  # no verdict before the pace is known
    for _ in range(MIN_GAPS - 1):
        limit.observe_gap(2.0)
    assert limit.limit(heard=True) == math.inf
    limit.observe_gap(2.0)
    assert limit.limit(heard=True) == pytest.approx(60.0 + 10 * 2.0)  # client_timeout + 10 × p95
    for _ in range(MIN_GAPS * 100):  # a fast solver: the floor
        limit.observe_gap(0.01)
    assert limit.limit(heard=True) == pytest.approx(max(MIN_SILENCE_S, 60.0 + 0.1))
    for _ in range(MIN_STARTUPS):  # before a first message: its own statistics, without backpressure
        limit.observe_startup(0.5)
    assert limit.limit(heard=False) == MIN_SILENCE_S
    for _ in range(MIN_STARTUPS):
        limit.observe_startup(40.0)
    assert limit.limit(heard=False) == pytest.approx(400.0)
    assert "derived from" in limit.describe(heard=False)
    fixed = SilenceLimit(5.0, fallback=600.0)
    assert fixed.limit(heard=True) == fixed.limit(heard=False) == 5.0
    assert fixed.describe(heard=True) == "launcher.silence_timeout"


def test_supervision_settings_are_checked(tmp_path):
    config = config_for(tmp_path, 2)
    assert (config.launcher.silence_timeout, config.launcher.on_exhausted) == (None, "fail")
    assert config_for(tmp_path, 2, "launcher.silence_timeout=12").launcher.silence_timeout == 12.0
    for override, message in [
        ("launcher.silence_timeout=0", "launcher.silence_timeout"),
        ("launcher.on_exhausted=retry", "launcher.on_exhausted"),
        ("launcher.max_redraws=0", "launcher.max_redraws"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_for(tmp_path, 2, override)
    with pytest.raises(ConfigError, match="needs a single server rank"):
        config_for(tmp_path, 2, "launcher.on_exhausted=redraw", "launcher.server_ranks=2")


# -- several server ranks: each rank checks its own share at FINISH -----------------------------------------
def rank_receiver(table: SimulationTable, rank: int, n_ranks: int, n_steps: int) -> Receiver:
    sink = ValidationSink(len(table), n_steps, 4)
    return Receiver(
        table=table,
        sink=sink,
        token=protocol.new_token(),
        secret=protocol.new_secret(),
        fields={"u": (2, 2)},
        wire_dtype="float32",
        n_steps=n_steps,
        host="127.0.0.1",
        rank=rank,
        n_ranks=n_ranks,
        known_simulations=lambda sim_id: 0 <= sim_id < len(table),
    )


def send(receiver: Receiver, sim_id: int, steps, finish: int, client_id: int = 7) -> None:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 2000)
    socket.connect(receiver.data_address)
    try:
        credential = receiver.credentials.make(sim_id, 1)  # attempt 1's, as its WELCOME gave it
        for t in steps:
            socket.send_multipart(
                protocol.encode_data(credential, sim_id, t, client_id, b"u", np.ones((2, 2), np.float32))
            )
        socket.send_multipart(protocol.encode_finish(credential, sim_id, client_id, finish))
    finally:
        socket.close()


def test_a_rank_of_several_checks_its_share_and_waits_for_a_complete_finish(tmp_path, caplog):
    # Rank 1 of 2, no launcher: simulation j's steps t with (j + t) mod 2 == 1 are its share.
    table = SimulationTable(np.zeros((3, 1)))
    receiver = rank_receiver(table, rank=1, n_ranks=2, n_steps=4)
    receiver.start()
    try:
        send(receiver, 0, [1, 3], finish=4)  # its whole share, every step reported: complete
        send(receiver, 1, [0], finish=2)  # a short FINISH: a retry's data may still be on their way here
        send(receiver, 2, [1], finish=4)  # step 3 never came: this rank cannot retry, it says so
        wait_until(lambda: receiver.counters().finishes == 3, 10, "the three FINISH messages")
    finally:
        receiver.stop()
    assert table[0].steps_finished == 4 and table[0].incomplete_finish == ""
    assert table[1].steps_finished is None and "reported 2 of the 4" in table[1].incomplete_finish
    assert table[2].steps_finished == 4
    assert "simulation 2: 1 of the time steps routed to this rank were missing" in caplog.text


def test_rank_zero_retries_a_simulation_whose_share_is_missing_at_finish(tmp_path):
    table = SimulationTable(np.zeros((2, 1)))
    table.supervised = True  # as when a launcher drives it
    for record in table:
        record.attempts, record.state = 1, SimState.SUBMITTED
        table.welcome(record.sim_id, 7)
    receiver = rank_receiver(table, rank=0, n_ranks=2, n_steps=4)
    receiver.start()
    try:
        send(receiver, 0, [0], finish=4)  # step 2 (its share: 0 and 2) is missing
        send(receiver, 1, [1, 3], finish=4, client_id=99)  # from a process not welcomed in this attempt
        wait_until(lambda: receiver.counters().finishes == 2, 10, "the FINISH messages")
    finally:
        receiver.stop()
    assert table[0].steps_finished is None
    assert table[0].incomplete_finish.startswith("1 of the time steps it reported were missing")
    assert table[1].steps_finished is None and table[1].incomplete_finish == ""  # ignored
    assert table.heard[0] > -np.inf and table.heard[1] > -np.inf


# -- a whole study with every fault ------------------------------------------------------------------------
def test_a_study_with_hung_short_and_diverging_simulations_accounts_for_every_step(tmp_path):
    # Plan (seed 0): T0 = 487, 287, 387, 187, 437, 237. Simulation 0 diverges at every attempt (T0 > 450)
    # and is redrawn; 3 hangs on its first attempt; 2 stops after 5 steps on its first attempt. The
    # validation simulations (ids 0 and 1, T0 = 402 and 202) are not affected.
    n_sims = 6
    config = config_for(
        tmp_path,
        n_sims,
        faulty("--hang", "3", "--short", "2", "--refuse-above", "450"),
        "buffer.kind=fifo",
        "launcher.silence_timeout=6.0",
        "launcher.max_attempts=3",
        "launcher.on_exhausted=redraw",
    )
    run_dir, summary = run(config, show_progress=False)

    assert summary["simulations_planned"] == summary["simulations_finished"] == n_sims
    assert summary["simulations_failed"] == 0
    assert summary["unique_samples_received"] == n_sims * N_STEPS
    assert summary["samples_trained"] == n_sims * N_STEPS  # FIFO: each stored step trained once
    assert summary["incomplete_simulations"] == {}
    with open(run_dir / "simulations.csv", newline="") as handle:
        rows = {int(r["sim_id"]): r for r in csv.DictReader(handle)}
    assert {r["state"] for r in rows.values()} == {"completed"}
    assert [int(rows[i]["attempts"]) for i in range(n_sims)] == [4, 1, 2, 2, 1, 1]
    assert (rows[0]["redraws"], rows[0]["abandoned_steps"]) == ("1", "0")
    assert rows[0]["previous_parameters"].startswith("487.285")
    assert float(rows[0]["T0"]) <= 450
    assert "3 attempt(s) with parameters [487.285" in rows[0]["redraw_reason"]
    assert "failed with exit code 4" in rows[0]["redraw_reason"]
    assert "cancelled as hung" in rows[3]["error"]
    assert "its FINISH reported 5 of the 10 time steps" in rows[2]["error"]
    assert all(rows[i]["redraws"] == "0" and rows[i]["previous_parameters"] == "" for i in range(1, n_sims))
    server_log = (run_dir / "server.log").read_text()
    assert "diverged at step 0" in server_log  # the solver's own words, in the failure report
    assert "every attempt failed: drawing new parameters" in server_log


def test_two_server_ranks_retry_hung_and_short_simulations_and_count_every_step_once(tmp_path):
    # Rank 0 decides (it sees every FINISH, and its share of the steps); rank 1 waits at the end for a
    # complete FINISH of each completed simulation, which a short first attempt's FINISH is not.
    run_dir = tmp_path / "run"
    settings = tiny(
        tmp_path,
        6,
        faulty("--hang", "3", "--short", "2,5"),
        "buffer.kind=fifo",
        "launcher.silence_timeout=6.0",
        "launcher.max_attempts=3",
    )
    env = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    command = [MPIRUN, "-n", "2", sys.executable, "-m", "jaxsurro.run", str(ROOT / "experiments/heat.toml")]
    command += ["--no-progress", "--run-dir", str(run_dir), *[arg for o in settings for arg in ("--set", o)]]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["server_ranks"] == 2
    assert summary["simulations_finished"] == summary["simulations_planned"] == 6
    assert summary["unique_samples_received"] == 6 * N_STEPS
    assert [r["unique_samples_received"] for r in summary["ranks"]] == [3 * N_STEPS] * 2
    assert summary["samples_trained"] == 6 * N_STEPS and summary["rejected"] == {}
    assert summary["incomplete_simulations"] == {}
    with open(run_dir / "simulations.csv", newline="") as handle:
        attempts = [int(r["attempts"]) for r in csv.DictReader(handle)]
    assert attempts == [1, 1, 2, 2, 1, 2]
