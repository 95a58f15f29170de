"""The training server: an ensemble streaming into a buffer while the trainer consumes it.

:class:`Ensemble` couples a launcher (which runs the simulations) with a receiver
(which takes their messages into a sink). :func:`produce_validation_set` uses one to
collect whole trajectories; :func:`train_online` uses one to feed the host buffer
while the main thread draws batches, runs the jitted step and validates.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxsurro import client, protocol
from jaxsurro.buffers import make_buffer
from jaxsurro.config import Config
from jaxsurro.launcher import JobSpec, Launcher, SimState, SimulationTable, make_scheduler
from jaxsurro.progress import Progress
from jaxsurro.receiver import BufferSink, Receiver, Sink, ValidationSink
from jaxsurro.sampling import BoxSampler
from jaxsurro.trainer import Trainer
from jaxsurro.validation import ValidationSet, validation_parameters

log = logging.getLogger("jaxsurro.server")

ENV_ATTEMPT = "JAXSURRO_ATTEMPT"  # 1 for a simulation's first run, 2 for its first restart...
WAIT_SLICE = 0.5  # seconds between liveness checks while waiting for data


class StallError(RuntimeError):
    """Nothing arrived for longer than the configured timeout."""


def job_factory(config: Config, token: bytes, control_address: str, log_dir: Path,
                label: str) -> Callable[[int, int], JobSpec]:
    """Builds the job of one simulation attempt: the solver command with the client's settings."""
    argv = tuple(config.solver.argv())
    base_env = {
        client.ENV_SERVER: control_address,
        client.ENV_TOKEN: token.hex(),
        client.ENV_TIMEOUT: repr(config.server.client_timeout),
        client.ENV_WIRE_DTYPE: config.solver.wire_dtype,
    }

    def job_for(sim_id: int, attempt: int) -> JobSpec:
        return JobSpec(name=f"{config.study.name}-{label}-{sim_id}", argv=argv,
                       env={**base_env, client.ENV_SIM_ID: str(sim_id), ENV_ATTEMPT: str(attempt)},
                       log_path=log_dir / f"{label}-{sim_id:05d}.log", cwd=Path.cwd())

    return job_for


class Ensemble:
    """A launcher running a table of simulations and a receiver taking their data into a sink."""

    def __init__(self, config: Config, table: SimulationTable, sink: Sink, log_dir: Path, label: str,
                 on_done: Callable[[], None] | None = None):
        self.config = config
        self.table = table
        self.token = protocol.new_token()  # one credential per ensemble: stale clients cannot mix in
        self.receiver = Receiver(table=table, sink=sink, token=self.token, field=config.solver.field,
                                 field_shape=config.solver.field_shape, wire_dtype=config.solver.wire_dtype,
                                 n_steps=config.solver.n_steps, host=config.server.host)
        self.launcher = Launcher(
            table, make_scheduler(config.launcher.scheduler),
            job_factory(config, self.token, self.receiver.control_address, log_dir, label),
            max_concurrent=config.launcher.max_concurrent, max_attempts=config.launcher.max_attempts,
            poll_interval=config.launcher.poll_interval, output_tail_lines=config.launcher.output_tail_lines,
            finish_grace=config.server.client_timeout, on_done=on_done)

    def __enter__(self) -> Ensemble:
        self.receiver.start()
        self.launcher.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.launcher.shutdown()
        self.receiver.stop()

    def poll(self) -> bool:
        """Raises what stopped a thread or a stalled reception; True once every simulation has ended."""
        self.launcher.check()
        self.receiver.check()
        if self.launcher.done.is_set():
            return True
        quiet = time.monotonic() - self.receiver.last_message_at
        if quiet > self.config.server.receive_timeout:
            raise StallError(f"no message from any client for {quiet:.0f} s (server.receive_timeout = "
                             f"{self.config.server.receive_timeout:.0f} s); simulations: {self.table.counts()}; "
                             "see the simulation logs in the run directory")
        return False

    def status(self) -> dict[str, int]:
        counts = self.table.counts()
        running = counts["submitted"] + counts["exited"]
        return {"running": running, "done": counts["completed"], "failed": counts["failed"]}


def produce_validation_set(config: Config, log_dir: Path, progress: Progress) -> ValidationSet:
    """Runs the validation simulations through the same solver and client path and collects them."""
    parameters = validation_parameters(config)
    table = SimulationTable(parameters)
    sink = ValidationSink(len(table), config.solver.n_steps, config.solver.field_shape)
    with Ensemble(config, table, sink, log_dir, "validation") as ensemble:
        while not ensemble.launcher.done.wait(WAIT_SLICE):
            ensemble.poll()
            progress.update(ensemble.receiver.unique_received,
                            {"validation sims done": f"{ensemble.status()['done']}/{len(table)}"})
        ensemble.poll()
    failed = [r for r in table if r.state != SimState.COMPLETED]
    if failed:
        first = failed[0]
        raise RuntimeError(f"{len(failed)} validation simulation(s) did not complete (simulation {first.sim_id}: "
                           f"{first.state.value}, {first.error or 'no error recorded'}); see {log_dir}")
    missing = ensemble.receiver.stored.size - int(ensemble.receiver.stored.sum())
    if missing:
        raise RuntimeError(f"the validation simulations completed but {missing} time steps never arrived")
    return ValidationSet(parameters, sink.fields)


class TrainingResult(NamedTuple):
    trainer: Trainer
    table: SimulationTable
    summary: dict[str, Any]


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self._handle = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._handle.close()


def plan_simulations(config: Config) -> SimulationTable:
    """The study's simulation table, parameters drawn by the configured sampler."""
    solver = config.solver
    sampler = BoxSampler(config.sampler.kind, solver.low, solver.high, config.sampler_seed)
    return SimulationTable(sampler.draw(config.study.n_simulations))


def train_online(config: Config, table: SimulationTable, validation: ValidationSet, run_dir: Path,
                 progress: Progress, log_interval: float = 0.5) -> TrainingResult:
    """Runs the study: the ensemble streams into the buffer while the trainer learns from it."""
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    try:
        return _train_online(config, table, validation, run_dir, progress, log_interval, metrics_log)
    finally:
        metrics_log.close()


def _train_online(config: Config, table: SimulationTable, validation: ValidationSet, run_dir: Path,
                  progress: Progress, log_interval: float, metrics_log: MetricsLog) -> TrainingResult:
    solver = config.solver
    n_samples_total = config.study.n_simulations * solver.n_steps
    buffer = make_buffer(config.buffer.kind, capacity=config.buffer.capacity, watermark=config.buffer.watermark,
                         input_dim=len(solver.parameters) + 1, field_size=int(np.prod(solver.field_shape)),
                         seed=config.study.seed)
    trainer = Trainer(config)
    val_inputs, val_targets = validation.inputs(solver.dt), validation.targets()
    sink = BufferSink(buffer, table, solver.n_steps, solver.dt)
    start = time.monotonic()
    batches = samples_trained = 0
    pending_metrics: list[dict[str, jax.Array]] = []
    last = {"time": start, "received": 0, "trained": 0}
    last_loss = float("nan")
    val_mse = float("nan")
    waited = 0.0

    def record(kind: str, **extra: Any) -> dict[str, Any]:
        nonlocal last_loss
        now = time.monotonic()
        stats = buffer.stats()
        received = ensemble.receiver.unique_received
        if pending_metrics:
            fetched = jax.device_get(pending_metrics)
            last_loss = float(np.mean([m["loss"] for m in fetched]))
            extra.setdefault("learning_rate", float(fetched[-1]["learning_rate"]))
            pending_metrics.clear()
        span = max(now - last["time"], 1e-9)
        entry = {"kind": kind, "time": round(now - start, 4), "batch": batches, "samples_trained": samples_trained,
                 "train_loss": last_loss, "received": received,
                 "received_per_s": (received - last["received"]) / span,
                 "trained_per_s": (samples_trained - last["trained"]) / span,
                 "buffer_population": stats.population, "buffer_capacity": stats.capacity,
                 "duplicates": ensemble.receiver.duplicates, "rejected": dict(ensemble.receiver.rejected),
                 "simulations": ensemble.status(), **extra}
        last.update(time=now, received=received, trained=samples_trained)
        metrics_log.write(entry)
        return entry

    def show(entry: dict[str, Any] | None = None, force: bool = False) -> None:
        status = ensemble.status()
        stats = buffer.stats()
        line = {"sims": f"{status['running']} running, {status['done']}/{config.study.n_simulations} done",
                "buffer": f"{stats.population}/{stats.capacity}", "loss": f"{last_loss:.3g}",
                "val": f"{val_mse:.3g}"}
        if entry is not None:
            line["samples/s"] = f"{entry['trained_per_s']:.0f}"
        progress.update(ensemble.receiver.unique_received, line, force=force)

    with Ensemble(config, table, sink, run_dir / "logs", "sim", on_done=buffer.end_reception) as ensemble:
        try:
            while True:
                try:
                    batch = buffer.get_batch(config.train.batch_size, timeout=WAIT_SLICE)
                except TimeoutError:
                    waited += WAIT_SLICE
                    ensemble.poll()
                    show()
                    if waited > config.train.batch_timeout:
                        raise StallError(f"no batch for {waited:.0f} s (train.batch_timeout); buffer: "
                                         f"{buffer.stats()}; simulations: {table.counts()}") from None
                    continue
                waited = 0.0
                if batch is None:
                    break
                metrics, _ = trainer.step(batch)
                pending_metrics.append(metrics)
                batches += 1
                samples_trained += len(batch.sample_ids)
                due = time.monotonic() - last["time"] >= log_interval
                if due:
                    ensemble.poll()
                if batches % config.train.validation_every == 0:
                    val_mse = trainer.evaluate(val_inputs, val_targets)
                    show(record("validation", val_mse=val_mse))
                elif due:
                    show(record("train"))
            ensemble.poll()
        finally:
            buffer.close()
    wall = time.monotonic() - start
    val_mse = trainer.evaluate(val_inputs, val_targets)
    final = record("validation", val_mse=val_mse)
    show(final, force=True)
    receiver = ensemble.receiver
    finished = sum(1 for r in table if r.state == SimState.COMPLETED)
    reception = (receiver.last_data_at or start) - (receiver.first_data_at or start)
    histogram = buffer.repetition_histogram()
    summary = {
        "simulations_planned": config.study.n_simulations,
        "simulations_finished": finished,
        "simulations_failed": sum(1 for r in table if r.state == SimState.FAILED),
        "time_steps_per_simulation": solver.n_steps,
        "unique_samples_received": receiver.unique_received,
        "expected_samples": finished * solver.n_steps,
        "samples_total_planned": n_samples_total,
        "duplicates": receiver.duplicates,
        "rejected": dict(receiver.rejected),
        "batches": batches,
        "samples_trained": samples_trained,
        "repetition_histogram": {str(k): int(v) for k, v in enumerate(histogram) if v},
        "mean_repetitions": float(np.dot(np.arange(len(histogram)), histogram) / max(histogram.sum(), 1)),
        "final_validation_mse": val_mse,
        "mean_field_validation_mse": None,  # filled in by the caller, who knows the baseline
        "received_samples_per_s": receiver.unique_received / max(reception, 1e-9),
        "trained_samples_per_s": samples_trained / max(wall, 1e-9),
        "training_wall_time_s": wall,
        "buffer": config.buffer.kind,
    }
    return TrainingResult(trainer, table, summary)
