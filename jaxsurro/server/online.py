"""Online training on the server's ranks: the buffers fill from the stream while the ranks train in lockstep.

Every iteration each rank draws a batch from its own buffer (or has none), then the
ranks exchange a small control vector: who has data, who is drained, who failed, and
rank 0's decisions (log now, every simulation ended). If any rank has data they all
run the jitted step, whose gradient sums are reduced across ranks weighted by each
rank's sample count, so an empty rank contributes nothing and nobody waits for it.
Training ends when every rank's buffer is drained after reception is over, which all
ranks learn in the same iteration; with ``train.after_reception = N`` they then train N more
batches drawn from copies of their final buffers (:mod:`jaxsurro.server.after_reception`). With
one rank the same loop runs without MPI (docs/architecture.md, "MPI lockstep").
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxsurro import rundir
from jaxsurro.config import Config
from jaxsurro.core.model import Scaling
from jaxsurro.core.sampling import derive_seed
from jaxsurro.server import checkpoint, metrics
from jaxsurro.server.after_reception import FinalBuffer, repetition_histogram
from jaxsurro.server.buffers import BufferSnapshot, SampleBatch, make_buffer
from jaxsurro.server.distributed import World, gradient_allreduce
from jaxsurro.server.ensemble import Ensemble, LaunchFactory, StallError
from jaxsurro.server.metrics import MetricsLog, RankCounters
from jaxsurro.server.prefetch import Prefetcher, Ready
from jaxsurro.server.progress import Progress
from jaxsurro.server.receiver import BufferSink
from jaxsurro.server.steering import Steering
from jaxsurro.server.trainer import Trainer
from jaxsurro.server.training_log import TrainingLog
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
    CHECKPOINT = 5  # set by rank 0: every rank copies its state and starts writing a checkpoint
    WRITING = 6  # ranks still writing their part of the last checkpoint
    STOP = 7  # set by rank 0: a stop was asked for (SIGTERM, SIGINT): checkpoint, then end the loop
    STALLED = 8  # set by rank 0: no rank had a batch for train.batch_timeout (see OnlineTraining._stalled)


CONTROL_SIZE = len(_Control)  # int64 slots of the control vector (World.sum over the ranks every iteration)


class Requests:
    """What the process was asked from outside (by signals, see jaxsurro.run): a checkpoint, or to stop."""

    def __init__(self) -> None:
        self.checkpoint = threading.Event()  # SIGUSR1: write a checkpoint and go on
        self.stop = threading.Event()  # SIGTERM, SIGINT: write a checkpoint and end with status "interrupted"
        self.active = False  # the training loop runs and watches these (before it, a signal stops at once)


class TrainingStopped(Exception):
    """The training loop ended by an exception (its ``__cause__``); the trainer holds the latest parameters."""

    def __init__(self, trainer: Trainer, steps: int):
        super().__init__(f"training stopped after {steps} batches")
        self.trainer, self.steps = trainer, steps


class PeerFailed(RuntimeError):
    """Another rank failed; this one stops with it."""


class TrainingResult(NamedTuple):
    trainer: Trainer
    summary: dict[str, Any] | None  # on rank 0; None on the other ranks
    status: str  # "completed", or "interrupted" when a stop was asked for


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
    requests: Requests | None = None,
    resume_from: Path | None = None,
) -> TrainingResult:
    """Runs the study on this rank: its share of the stream goes into its buffer while the ranks train.

    ``validation`` is needed on rank 0 only, which validates for everyone. ``resume_from``, a
    complete checkpoint directory, continues the run it was written by (same number of ranks).
    """
    world = world or World()
    tensorboard_dir = run_dir / rundir.TENSORBOARD if config.log.tensorboard else None
    metrics_log = None
    if world.is_root:
        metrics_log = MetricsLog(run_dir / rundir.METRICS, tensorboard_dir, append=resume_from is not None)
    requests = requests or Requests()
    try:
        training = OnlineTraining(
            config,
            table,
            validation,
            scaling,
            progress,
            launch,
            world,
            log_interval,
            metrics_log,
            requests,
            run_dir / rundir.CHECKPOINTS,
        )
        if resume_from is not None:
            training.restore(resume_from)
        requests.active = True
        try:
            return training.run()
        except BaseException as exc:
            raise TrainingStopped(training.trainer, training.steps) from exc
    finally:
        requests.active = False
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
        requests: Requests,
        checkpoints: Path,
    ):
        solver = config.solver
        self.config, self.table, self.world = config, table, world
        self.log = TrainingLog(config, metrics_log, progress, log_interval)  # writes on rank 0 only
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
        self.steering = None
        if config.sampler.kind == "breed":  # its statistics are the trainer's, updated inside the train step
            self.steering = Steering(config, world, table, self.trainer.mesh, self.trainer)
        # Compiled now, before any client is launched, so that training starts as soon as the watermark is met.
        self.compile_seconds = self.trainer.compile(n_inputs, n_field, evaluate=world.is_root)
        breed_seconds = self.steering.compile() if self.steering is not None else 0.0
        log.info(
            "train step%s compiled in %.2f s%s",
            " and evaluation" if world.is_root else "",
            self.compile_seconds,
            f"; Breed's resampling in {breed_seconds:.2f} s" if breed_seconds else "",
        )
        self.compile_seconds += breed_seconds
        self.batch_wait = MULTI_RANK_WAIT if world.distributed else SINGLE_RANK_WAIT
        self.collective_timeout = config.train.batch_timeout + 60.0
        empty = SampleBatch(
            np.zeros((0, n_inputs), np.float32), np.zeros((0, n_field), np.float32), np.zeros(0, np.int64)
        )
        self._empty = Ready(empty, self.trainer.prepare(empty), 0.0)  # this rank's share when it has no batch
        self.steps = 0  # global steps (identical on every rank)
        self.samples_trained = 0  # by this rank
        # From the first batch this rank could draw (its buffer reached the watermark) to the end of the first step.
        self._awaiting: list[int] | None = None  # completed simulations whose FINISH this rank must see
        self._awaiting_deadline = 0.0
        self._reception_ended = False
        # train.after_reception = N: the final buffer's copy, taken when reception ends; drawn from once drained.
        after = config.train.after_reception
        self.extra_batches = after if isinstance(after, int) else 0
        self._final_copy: BufferSnapshot | None = None
        self.final_buffer: FinalBuffer | None = None
        self.requests = requests
        self.checkpoints = checkpoints
        self.status = "completed"
        self.earlier_wall = 0.0  # training wall time of the runs this one resumes
        self._writer = checkpoint.BackgroundWriter()
        self.prefetcher = Prefetcher(self.buffer, self.trainer.prefetch, config.train.batch_size)
        self._writing_step: int | None = None  # the checkpoint whose parts are being written
        self._last_checkpoint = time.monotonic()
        # Last: a collective (the run token, the ranks' addresses) that binds this rank's sockets.
        sink = BufferSink(self.buffer, table, solver.n_steps, solver.dt)
        self.ensemble = Ensemble(config, table, sink, "sim", launch, world=world)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainingResult:
        with self.ensemble:
            try:
                with self.prefetcher:
                    self._loop(self.prefetcher)
                self._complete_checkpoint_in_flight()
            finally:
                self.buffer.close()
        wall = self.earlier_wall + time.monotonic() - self.log.start
        if self.world.is_root:
            self._validate()
        ranks = self._record("validation", final=True)
        return TrainingResult(self.trainer, self._summary(ranks, wall) if ranks is not None else None, self.status)

    def _loop(self, prefetcher: Prefetcher) -> None:
        last_progress = time.monotonic()
        while True:
            control = np.zeros(CONTROL_SIZE, dtype=np.int64)
            failure: BaseException | None = None
            batch = None
            try:
                self.ensemble.poll()
                self._writer.check()
                self._end_reception_when_finished()
                if self.final_buffer is not None:  # the extra batches: this rank's draw, or None if its copy is empty
                    batch = self._draw_from_final_buffer()
                else:
                    batch = prefetcher.get(timeout=self.batch_wait)
                control[_Control.DRAINED] = batch is None
                if batch is not None:
                    self.log.batch_ready(batch.drawn_at)
            except TimeoutError:
                pass  # nothing yet on this rank
            except Exception as exc:
                failure = exc
                control[_Control.FAILED] = 1
            control[_Control.HAVE_BATCH] = batch is not None
            if self.world.is_root:
                now = time.monotonic()
                control[_Control.LOG_NOW] = self.log.due(now)
                control[_Control.ALL_ENDED] = self.ensemble.done
                control[_Control.STOP] = self.requests.stop.is_set()
                control[_Control.STALLED] = self._stalled(now, last_progress)
                control[_Control.CHECKPOINT] = (
                    self.requests.checkpoint.is_set()
                    or now - self._last_checkpoint >= self.config.checkpoint.every_seconds
                )
            control[_Control.WRITING] = not self._writer.idle
            totals = self.world.sum(control, self.collective_timeout, "the next training step")
            if totals[_Control.FAILED]:
                if failure is not None:
                    raise failure
                raise PeerFailed(f"rank {self.world.rank} stops: another server rank failed (see its log)")
            if totals[_Control.STOP]:
                self._checkpoint_and_stop()
                return
            self._advance_checkpoint(bool(totals[_Control.CHECKPOINT]), int(totals[_Control.WRITING]))
            if totals[_Control.ALL_ENDED] and self._awaiting is None:
                self._learn_completed_simulations()
            if totals[_Control.HAVE_BATCH]:
                self._train(batch if batch is not None else self._empty)
                last_progress = time.monotonic()
                if self.final_buffer is not None:
                    self.final_buffer.steps += 1
                    if self.final_buffer.steps >= self.extra_batches:
                        return
            elif totals[_Control.DRAINED] == self.world.size:
                if not self._start_extra_batches():
                    return
            elif totals[_Control.STALLED]:
                raise StallError(
                    f"no rank had a batch for {self.config.train.batch_timeout:.0f} s while simulations run "
                    f"(train.batch_timeout); this rank's buffer: {self.buffer.stats()}; "
                    f"simulations: {self.table.counts()}"
                )
            if totals[_Control.LOG_NOW]:
                self._record("train")

    def _stalled(self, now: float, last_progress: float) -> bool:
        """Rank 0, for every rank: no batch anywhere for ``train.batch_timeout`` since the later of the last step and
        the latest simulation start, counted only while a simulation runs or once all ended (clients queued for long
        on a busy cluster are not a stall). Rank 0 alone knows the starts; the control vector tells the others."""
        if not (self.table.running or self.ensemble.done):
            return False
        return now - max(last_progress, self.table.last_start) > self.config.train.batch_timeout

    def _train(self, batch: Ready) -> None:
        self.log.wait_for_room()
        step_metrics, _ = self.trainer.step_on_device(self.trainer.put(batch.prepared))  # Breed's statistics too
        self.log.dispatched(step_metrics)
        self.steps += 1
        self.samples_trained += len(batch.host.sample_ids)
        if self.steering is not None and self.steering.due(self.steps):
            self.steering.resample()
        if self.steps % self.config.train.validation_every == 0:
            if self.world.is_root:
                self._validate()
            self._record("validation")

    def _start_extra_batches(self) -> bool:
        """Every rank is drained: whether N extra batches from the final buffers begin now (every rank alike)."""
        if self.final_buffer is not None or self.extra_batches == 0 or self._final_copy is None:
            return False
        seed = derive_seed(self.config.study.seed, "after-reception", self.world.rank)
        self.final_buffer = FinalBuffer.from_snapshot(self._final_copy, seed)
        self._final_copy = None
        log.info(
            "buffers drained after %d batches; %d more from the final buffer (%d samples on this rank)",
            self.steps,
            self.extra_batches,
            len(self.final_buffer),
        )
        self._record("train")  # a collective: every rank starts in the same iteration
        return True

    def _draw_from_final_buffer(self) -> Ready | None:
        host = self.final_buffer.draw(self.config.train.batch_size)
        if host is None:
            return None
        return Ready(host, self.trainer.prepare(host), time.monotonic())

    def _validate(self) -> None:
        """Rank 0: the validation MSE now, overall and per field, and the lowest so far."""
        self.log.validated(self.trainer.evaluate(self.val_inputs, self.val_targets))

    # -- checkpoints ---------------------------------------------------------------------------
    def _advance_checkpoint(self, wanted: bool, ranks_writing: int) -> None:
        """Starts a checkpoint when rank 0 asks and none is in flight; rank 0 completes it once all are written."""
        if self._writing_step is not None and ranks_writing == 0:
            if self.world.is_root:
                final = checkpoint.finalize(self.checkpoints, self._writing_step, self.config.checkpoint.keep)
                log.info("checkpoint %s written", final)
            self._writing_step = None
        if wanted and self._writing_step is None:
            self.requests.checkpoint.clear()
            self._last_checkpoint = time.monotonic()
            self._writing_step = self.steps
            self._writer.start(self._copy_for_checkpoint(self.steps))

    def _checkpoint_and_stop(self) -> None:
        """Asked to stop: every rank writes a last checkpoint and waits for it, then the loop ends."""
        self._complete_checkpoint_in_flight()  # a checkpoint in flight ends first
        self._copy_for_checkpoint(self.steps)()
        self.world.sum(np.zeros(1, np.int64), self.collective_timeout, "the last checkpoint")
        if self.world.is_root:
            final = checkpoint.finalize(self.checkpoints, self.steps, self.config.checkpoint.keep)
            log.info("stopped on request; checkpoint %s written", final)
        self.status = "interrupted"

    def _complete_checkpoint_in_flight(self) -> None:
        """The loop ended with a checkpoint being written: let it finish, so no partial one is left behind."""
        if self._writing_step is None:
            return
        self._writer.wait(self.collective_timeout)
        self.world.sum(np.zeros(1, np.int64), self.collective_timeout, "the checkpoint in flight")
        if self.world.is_root:
            checkpoint.finalize(self.checkpoints, self._writing_step, self.config.checkpoint.keep)
        self._writing_step = None

    def _copy_for_checkpoint(self, step: int):
        """Copies this rank's state now (milliseconds) and returns the function that writes the copy."""
        receiver = self.ensemble.receiver
        # Nothing is drawn nor stored meanwhile: the buffer, the batches drawn but not trained on and
        # the deduplication record agree, so no time step is lost or counted twice by a resumed run.
        with self.prefetcher.paused(), receiver.paused():
            buffer = self.buffer.snapshot()
            stored, counters = receiver.state()
            pending = self.prefetcher.pending()
        part = checkpoint.RankState(
            buffer=checkpoint.with_pending(buffer, pending),
            stored=stored,
            receiver=counters,
            samples_trained=self.samples_trained,
            breed=self.steering.local_state() if self.steering is not None else None,
            final_buffer=self.final_buffer.state() if self.final_buffer is not None else None,
        )
        train_state = meta = None
        if self.world.is_root:
            train_state = self.trainer.host_state()
            meta = {
                "step": step,
                "ranks": self.world.size,
                "val_mse": self.log.val_mse,
                "min_val_mse": self.log.min_val_mse,
                "wall_seconds": self.earlier_wall + time.monotonic() - self.log.start,
                "table": self.table.to_records(),
                "breed": self.steering.root_state() if self.steering is not None else None,
            }
        directory = checkpoint.partial_for(self.checkpoints, step)
        rank = self.world.rank

        def write() -> None:
            checkpoint.write_rank(directory, rank, part)
            if train_state is not None:
                checkpoint.write_train_state(directory, train_state)
                checkpoint.write_meta(directory, metrics.strict_json(meta))

        return write

    def restore(self, directory: Path) -> None:
        """Continues from a complete checkpoint: train state, buffer, deduplication record, counters, Breed."""
        meta = checkpoint.read_meta(directory)
        if meta["ranks"] != self.world.size:
            raise ValueError(
                f"{directory} was written by {meta['ranks']} server rank(s); resume it with as many "
                f"(this run has {self.world.size})"
            )
        part = checkpoint.read_rank(directory, self.world.rank)
        self.buffer.restore(part.buffer)
        if part.final_buffer is not None:  # the extra batches after reception had begun
            self.final_buffer = FinalBuffer(part.final_buffer)
        self.ensemble.receiver.restore(part.stored, part.receiver)
        self.trainer.load_state(checkpoint.read_train_state(directory, self.trainer.host_state()))
        if self.steering is not None:
            self.steering.restore(part.breed, meta.get("breed") if self.world.is_root else None)
        self.steps = int(meta["step"])
        self.samples_trained = part.samples_trained
        self.log.val_mse = float("nan") if meta["val_mse"] is None else meta["val_mse"]
        self.log.min_val_mse = float("nan") if meta["min_val_mse"] is None else meta["min_val_mse"]
        self.earlier_wall = float(meta["wall_seconds"])
        log.info("resumed from %s at step %d", directory, self.steps)

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
            if self.extra_batches and self.final_buffer is None:
                with self.prefetcher.paused():  # the copy holds what the drain will train on, nothing else
                    self.buffer.end_reception()
                    pending = self.prefetcher.pending()
                    self._final_copy = checkpoint.with_pending(self.buffer.snapshot(), pending)
            else:
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
        self.log.fetch()
        local = metrics.rank_counters(
            self.ensemble.receiver.counters(),
            self.buffer.stats(),
            self.samples_trained,
            repetition_histogram=self._repetition_histogram().tolist() if final else None,
            parameter_digest=metrics.parameter_digest(self.trainer.host_params()) if final else None,
        )
        ranks = self.world.gather(local, self.collective_timeout, "a metrics record")
        if not self.world.is_root:
            return None
        self.log.write(
            kind,
            ranks,
            steps=self.steps,
            buffer_capacity=self.config.buffer.capacity * self.world.size,
            simulations=self.ensemble.status(),
            final=final,
        )
        return ranks

    def _repetition_histogram(self) -> np.ndarray:
        """This rank's samples by number of uses: the buffer's, with the extra batches' draws."""
        histogram = self.buffer.repetition_histogram()
        if self.final_buffer is None:
            return histogram
        return repetition_histogram(histogram, self.final_buffer.drained_uses, self.final_buffer.extra_uses)

    def _summary(self, ranks: list[RankCounters], wall: float) -> dict[str, Any]:
        counts = self.table.counts()
        breed_rounds = simulations_bred = None
        if self.steering is not None:
            breed_rounds = self.steering.history
            simulations_bred = sum(1 for r in self.table if r.bred)
        return self.log.summary(
            ranks,
            compile_seconds=self.compile_seconds,
            steps=self.steps,
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
            "mode": "online",
            "after_reception": self.config.train.after_reception,
            "after_reception_batches": self.final_buffer.steps if self.final_buffer is not None else 0,
        }
