"""Online training on the server's ranks: the buffers fill from the stream while the ranks train in lockstep.

Every iteration each rank draws a batch from its own buffer (or has none), then the
ranks exchange a small control vector: who has data, who is drained, who failed, and
rank 0's decisions (log now, every simulation ended). If any rank has data they all
run the jitted step, whose gradient sums are reduced across ranks weighted by each
rank's sample count, so an empty rank contributes nothing and nobody waits for it.
Training ends when every rank's buffer is drained after reception is over, which all
ranks learn in the same iteration. With one rank the same loop runs without MPI
(docs/architecture.md, "MPI lockstep").
"""

from __future__ import annotations

import enum
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxsurro import rundir
from jaxsurro.config import Config
from jaxsurro.core.model import Scaling
from jaxsurro.core.sampling import derive_seed
from jaxsurro.server import metrics
from jaxsurro.server.buffers import SampleBatch, make_buffer
from jaxsurro.server.distributed import World, gradient_allreduce
from jaxsurro.server.ensemble import Ensemble, LaunchFactory, StallError
from jaxsurro.server.metrics import MetricsLog, RankCounters
from jaxsurro.server.prefetch import Prefetcher, Ready
from jaxsurro.server.progress import Progress
from jaxsurro.server.receiver import BufferSink
from jaxsurro.server.steering import Steering
from jaxsurro.server.trainer import Trainer
from jaxsurro.server.validation import ValidationSet
from jaxsurro.table import SimState, SimulationTable

log = logging.getLogger("jaxsurro.server.online")

SINGLE_RANK_WAIT = 0.5  # seconds a lone rank waits for a batch before checking on its threads
MULTI_RANK_WAIT = 0.02  # seconds a rank waits for a batch before training without one (peers are waiting)


class _Control(enum.IntEnum):
    """Slots of the control vector summed over the ranks every iteration."""

    HAVE_BATCH = 0  # ranks with a non-empty batch
    DRAINED = 1  # ranks whose buffer is drained after the end of reception
    FAILED = 2  # ranks that hit an error this iteration
    LOG_NOW = 3  # set by rank 0: write a metrics record
    ALL_ENDED = 4  # set by rank 0: every simulation has ended


class PeerFailed(RuntimeError):
    """Another rank failed; this one stops with it."""


class TrainingResult(NamedTuple):
    trainer: Trainer
    summary: dict[str, Any] | None  # on rank 0; None on the other ranks


def train_online(
    config: Config,
    table: SimulationTable,
    validation: ValidationSet | None,
    scaling: Scaling,
    run_dir: Path,
    progress: Progress,
    launch: LaunchFactory,
    world: World | None = None,
    log_interval: float = 0.5,
) -> TrainingResult:
    """Runs the study on this rank: its share of the stream goes into its buffer while the ranks train.

    ``validation`` is needed on rank 0 only, which validates for everyone.
    """
    world = world or World()
    tensorboard_dir = run_dir / rundir.TENSORBOARD if config.log.tensorboard else None
    metrics_log = MetricsLog(run_dir / rundir.METRICS, tensorboard_dir) if world.is_root else None
    try:
        return OnlineTraining(
            config, table, validation, scaling, progress, launch, world, log_interval, metrics_log
        ).run()
    finally:
        if metrics_log is not None:
            metrics_log.close()


class OnlineTraining:
    """One rank's part of a study: its receiver and buffer, and its place in the lockstep training loop.

    The metrics lines and the summary are built by :mod:`jaxsurro.server.metrics`; this class
    only runs the loop and takes its counters' snapshots.
    """

    def __init__(
        self,
        config: Config,
        table: SimulationTable,
        validation: ValidationSet | None,
        scaling: Scaling,
        progress: Progress,
        launch: LaunchFactory,
        world: World,
        log_interval: float,
        metrics_log: MetricsLog | None,
    ):
        solver = config.solver
        self.config, self.table, self.world = config, table, world
        self.progress, self.metrics_log = progress, metrics_log
        self.log_interval = log_interval
        self.val_inputs: np.ndarray | None = None  # rank 0 only
        self.val_targets: np.ndarray | None = None
        if world.is_root:
            if validation is None:
                raise ValueError("rank 0 validates for every rank: it needs the validation set")
            self.val_inputs, self.val_targets = validation.inputs(solver.dt), validation.targets()
        n_inputs, n_field = len(solver.parameters) + 1, solver.sample_size
        self.buffer = make_buffer(
            config.buffer.kind,
            capacity=config.buffer.capacity,
            watermark=config.buffer.watermark,
            input_dim=n_inputs,
            field_size=n_field,
            seed=derive_seed(config.study.seed, "buffer", world.rank),
        )
        self.trainer = Trainer.from_config(config, scaling, reduce_fn=gradient_allreduce(world))
        # Compiled now, before any client is launched, so that training starts as soon as the watermark is met.
        self.compile_seconds = self.trainer.compile(n_inputs, n_field, evaluate=world.is_root)
        log.info("train step%s compiled in %.2f s", " and evaluation" if world.is_root else "", self.compile_seconds)
        self.steering = Steering(config, world, table, self.trainer.mesh) if config.sampler.kind == "breed" else None
        self.batch_wait = MULTI_RANK_WAIT if world.distributed else SINGLE_RANK_WAIT
        self.collective_timeout = config.train.batch_timeout + 60.0
        empty = SampleBatch(
            np.zeros((0, n_inputs), np.float32), np.zeros((0, n_field), np.float32), np.zeros(0, np.int64)
        )
        self._empty = Ready(empty, self.trainer.to_device(empty), 0.0)  # this rank's share when it has no batch
        self.steps = 0  # global steps (identical on every rank)
        self.samples_trained = 0  # by this rank
        self.field_names = tuple(solver.field_shapes)
        self.val_mse = float("nan")
        self.val_field_mse: dict[str, float] = {}
        self.min_val_mse = float("nan")
        self.last_loss = float("nan")
        self.last_field_loss: dict[str, float] = {}
        self.learning_rate = config.train.learning_rate  # as of the last fetched step
        # From the first batch this rank could draw (its buffer reached the watermark) to the end of the first step.
        self.first_batch_at: float | None = None
        self.first_step_delay: float | None = None
        self._pending_metrics: list[dict[str, jax.Array]] = []
        self._awaiting: list[int] | None = None  # completed simulations whose FINISH this rank must see
        self._awaiting_deadline = 0.0
        self._reception_ended = False
        self._start = time.monotonic()
        self._since = metrics.RatePoint(self._start, 0, 0)  # rank 0: the last metrics line, for the rates
        # Last: a collective (the run token, the ranks' addresses) that binds this rank's sockets.
        sink = BufferSink(self.buffer, table, solver.n_steps, solver.dt)
        self.ensemble = Ensemble(config, table, sink, "sim", launch, world=world)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainingResult:
        with self.ensemble:
            try:
                with Prefetcher(self.buffer, self.trainer.to_device, self.config.train.batch_size) as prefetcher:
                    self._loop(prefetcher)
            finally:
                self.buffer.close()
        wall = time.monotonic() - self._start
        if self.world.is_root:
            self._validate()
        ranks = self._record("validation", final=True)
        return TrainingResult(self.trainer, self._summary(ranks, wall) if ranks is not None else None)

    def _loop(self, prefetcher: Prefetcher) -> None:
        last_progress = time.monotonic()
        while True:
            control = np.zeros(len(_Control), dtype=np.int64)
            failure: BaseException | None = None
            batch = None
            try:
                self.ensemble.poll()
                self._end_reception_when_finished()
                batch = prefetcher.get(timeout=self.batch_wait)
                control[_Control.DRAINED] = batch is None
                if batch is not None and self.first_batch_at is None:
                    self.first_batch_at = batch.drawn_at
            except TimeoutError:
                pass  # nothing yet on this rank
            except Exception as exc:
                failure = exc
                control[_Control.FAILED] = 1
            control[_Control.HAVE_BATCH] = batch is not None
            if self.world.is_root:
                now = time.monotonic()
                control[_Control.LOG_NOW] = now - self._since.time >= self.log_interval
                control[_Control.ALL_ENDED] = self.ensemble.done
            totals = self.world.sum(control, self.collective_timeout, "the next training step")
            if totals[_Control.FAILED]:
                if failure is not None:
                    raise failure
                raise PeerFailed(f"rank {self.world.rank} stops: another server rank failed (see its log)")
            if totals[_Control.ALL_ENDED] and self._awaiting is None:
                self._learn_completed_simulations()
            if totals[_Control.HAVE_BATCH]:
                self._train(batch if batch is not None else self._empty)
                last_progress = time.monotonic()
            elif totals[_Control.DRAINED] == self.world.size:
                return
            elif time.monotonic() - last_progress > self.config.train.batch_timeout:
                raise StallError(
                    f"no rank had a batch for {self.config.train.batch_timeout:.0f} s "
                    f"(train.batch_timeout); this rank's buffer: {self.buffer.stats()}; "
                    f"simulations: {self.table.counts()}"
                )
            if totals[_Control.LOG_NOW]:
                self._record("train")

    def _train(self, batch: Ready) -> None:
        step_metrics, per_sample_loss = self.trainer.step_on_device(batch.device)
        if self.first_step_delay is None and self.first_batch_at is not None:
            jax.block_until_ready(step_metrics)  # once: when the first step really ended
            self.first_step_delay = time.monotonic() - self.first_batch_at
            log.info("first training step done %.3f s after the first batch was ready", self.first_step_delay)
        self._pending_metrics.append(step_metrics)
        self.steps += 1
        self.samples_trained += len(batch.host.sample_ids)
        if self.steering is not None:
            self.steering.observe(per_sample_loss, batch.host.sample_ids)
            if self.steering.due(self.steps):
                self.steering.resample()
        if self.steps % self.config.train.validation_every == 0:
            if self.world.is_root:
                self._validate()
            self._record("validation")

    def _validate(self) -> None:
        """Rank 0: the validation MSE now, overall and per field, and the lowest so far."""
        evaluation = self.trainer.evaluate(self.val_inputs, self.val_targets)
        self.val_mse = evaluation.mse
        self.val_field_mse = dict(zip(self.field_names, evaluation.field_mse, strict=True))
        self.min_val_mse = evaluation.mse if not self.min_val_mse <= evaluation.mse else self.min_val_mse

    # -- the end of reception ------------------------------------------------------------------
    def _learn_completed_simulations(self) -> None:
        """Every simulation has ended (rank 0 knows): each rank now waits for the FINISH of the completed ones."""
        completed = None
        if self.world.is_root:
            completed = [r.sim_id for r in self.table if r.state == SimState.COMPLETED]
        self._awaiting = self.world.broadcast(completed, self.collective_timeout, "the completed simulations")
        self._awaiting_deadline = time.monotonic() + self.config.server.client_timeout

    def _end_reception_when_finished(self) -> None:
        """Ends this rank's reception once every completed simulation's data to this rank have arrived."""
        if self._awaiting is None or self._reception_ended:
            return
        missing = [sim_id for sim_id in self._awaiting if self.table[sim_id].steps_finished is None]
        if not missing:
            self.buffer.end_reception()
            self._reception_ended = True
            return
        if time.monotonic() > self._awaiting_deadline:
            raise RuntimeError(
                f"rank {self.world.rank}: the FINISH of {len(missing)} completed simulation(s) "
                f"never arrived (first: {missing[:5]}) within server.client_timeout"
            )

    # -- metrics -------------------------------------------------------------------------------
    def _record(self, kind: str, final: bool = False) -> list[RankCounters] | None:
        """A collective: every rank sends its counters to rank 0, which writes one metrics line.

        Returns the ranks' counters on rank 0 (with histograms and digests when ``final``), None elsewhere.
        """
        if self._pending_metrics:
            fetched = jax.device_get(self._pending_metrics)  # also bounds the queue of dispatched steps
            self.last_loss = float(np.mean([m["loss"] for m in fetched]))
            field_loss = np.mean([m["field_loss"] for m in fetched], axis=0)
            self.last_field_loss = dict(zip(self.field_names, field_loss.tolist(), strict=True))
            self.learning_rate = float(fetched[-1]["learning_rate"])
            self._pending_metrics.clear()
        local = metrics.rank_counters(
            self.ensemble.receiver.counters(),
            self.buffer.stats(),
            self.samples_trained,
            repetition_histogram=self.buffer.repetition_histogram().tolist() if final else None,
            parameter_digest=metrics.parameter_digest(self.trainer.host_params()) if final else None,
        )
        ranks = self.world.gather(local, self.collective_timeout, "a metrics record")
        if not self.world.is_root:
            return None
        now = time.monotonic()
        entry = metrics.record(
            kind,
            ranks,
            now=now,
            start=self._start,
            since=self._since,
            steps=self.steps,
            train_loss=self.last_loss,
            learning_rate=self.learning_rate,
            buffer_capacity=self.config.buffer.capacity * self.world.size,
            simulations=self.ensemble.status(),
            val_mse=self.val_mse,
            train_field_loss=self.last_field_loss,
            val_field_mse=self.val_field_mse,
        )
        self._since = metrics.rate_point(entry, now)
        self.metrics_log.write(entry)
        self.progress.update(
            entry["received"],
            metrics.progress_status(entry, self.config.study.n_simulations, self.val_mse),
            force=final,
        )
        return ranks

    def _summary(self, ranks: list[RankCounters], wall: float) -> dict[str, Any]:
        counts = self.table.counts()
        breed_rounds = simulations_bred = None
        if self.steering is not None:
            breed_rounds = self.steering.history
            simulations_bred = sum(1 for r in self.table if r.bred)
        return metrics.summary(
            ranks,
            steps=self.steps,
            val_mse=self.val_mse,
            wall=wall,
            simulations_planned=self.config.study.n_simulations,
            simulations_finished=counts["completed"],
            simulations_failed=counts["failed"],
            time_steps_per_simulation=self.config.solver.n_steps,
            buffer_kind=self.config.buffer.kind,
            devices_per_rank=int(self.trainer.mesh.devices.size),
            breed_rounds=breed_rounds,
            simulations_bred=simulations_bred,
        ) | {
            "min_validation_mse": self.min_val_mse,
            "final_validation_field_mse": self.val_field_mse,
            "compile_s": self.compile_seconds,
            "first_step_delay_s": self.first_step_delay,
        }
