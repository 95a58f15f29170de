"""Offline training (``study.mode = "offline"``, the SC23 paper's baseline): the ensemble to disk, then epochs.

The same launcher, clients and receiver as online mode run the ensemble, but the receiver's sink is
a :class:`~jaxsurro.server.dataset.DatasetWriter`: one file per simulation under ``<run_dir>/dataset/``.
Once every simulation has ended, the same model and trainer take ``study.epochs`` passes over the
complete simulations, each sample once per pass in an order reshuffled every pass, while the prefetch
thread reads the next batch from disk. Validation, the metrics lines and the summary are online
mode's. One server rank; no checkpoints (a stopped offline run starts again)
(docs/architecture.md, "Offline mode").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxsurro import rundir
from jaxsurro.config import Config
from jaxsurro.core.model import Scaling
from jaxsurro.server import metrics
from jaxsurro.server.buffers import BufferStats
from jaxsurro.server.dataset import Dataset, DatasetWriter, EpochBatches, batches_per_epoch
from jaxsurro.server.distributed import World
from jaxsurro.server.ensemble import Ensemble, LaunchFactory, StallError
from jaxsurro.server.metrics import MetricsLog, RankCounters
from jaxsurro.server.online import TrainingResult, TrainingStopped
from jaxsurro.server.prefetch import Prefetcher, Ready
from jaxsurro.server.progress import Progress
from jaxsurro.server.trainer import Trainer
from jaxsurro.server.training_log import TrainingLog
from jaxsurro.server.validation import ValidationSet
from jaxsurro.table import SimState, SimulationTable

log = logging.getLogger("jaxsurro.server.offline")

RECEPTION_WAIT = 0.5  # seconds between checks on the receiver and the launcher while the ensemble runs


def check_single_rank(world: World) -> None:
    """Offline mode runs on one server rank: its dataset is written and read by a single process."""
    if world.size > 1:
        raise RuntimeError(
            f'study.mode = "offline" runs on one server rank, not {world.size}: start it without '
            "mpirun/srun (its dataset is written and read by a single process)"
        )


def train_offline(
    config: Config,
    table: SimulationTable,
    validation: ValidationSet,
    scaling: Scaling,
    run_dir: Path,
    progress: Progress,
    launch: LaunchFactory,
    world: World | None = None,
    log_interval: float = 0.5,
) -> TrainingResult:
    """Runs the study's ensemble into ``<run_dir>/dataset/``, then trains ``study.epochs`` passes over it."""
    world = world or World()
    check_single_rank(world)
    tensorboard_dir = run_dir / rundir.TENSORBOARD if config.log.tensorboard else None
    metrics_log = MetricsLog(run_dir / rundir.METRICS, tensorboard_dir)
    try:
        training = OfflineTraining(
            config, table, validation, scaling, progress, launch, world, log_interval, metrics_log, run_dir
        )
        try:
            return training.run()
        except BaseException as exc:
            raise TrainingStopped(training.trainer, training.steps) from exc
    finally:
        metrics_log.close()


class OfflineTraining:
    """The two phases of an offline run on its one rank: reception to disk, then epochs over the dataset."""

    def __init__(
        self,
        config: Config,
        table: SimulationTable,
        validation: ValidationSet,
        scaling: Scaling,
        progress: Progress,
        launch: LaunchFactory,
        world: World,
        log_interval: float,
        metrics_log: MetricsLog,
        run_dir: Path,
    ):
        solver = config.solver
        self.config, self.table = config, table
        self.log = TrainingLog(config, metrics_log, progress, log_interval)
        self.val_inputs, self.val_targets = validation.inputs(solver.dt), validation.targets()
        n_inputs, n_field = len(solver.parameters) + 1, solver.sample_size
        self.trainer = Trainer.from_config(config, scaling)
        self.compile_seconds = self.trainer.compile(n_inputs, n_field, evaluate=True)
        log.info("train step and evaluation compiled in %.2f s", self.compile_seconds)
        self.steps = 0
        self.samples_trained = 0
        self.dataset_dir = run_dir / rundir.DATASET
        self.source: EpochBatches | None = None  # the training phase's batches, once reception is over
        self.reception_seconds = 0.0
        self.writer = DatasetWriter.from_config(config, table, self.dataset_dir)
        self.ensemble = Ensemble(config, table, self.writer, "sim", launch, world=world)

    def run(self) -> TrainingResult:
        try:
            with self.ensemble:
                self._receive()
        finally:
            self.writer.close()
        self.reception_seconds = time.monotonic() - self.log.start
        self._check_dataset()
        with Dataset(self.dataset_dir) as dataset:
            self.source = EpochBatches(dataset, self.config.study.epochs, self.config.study.seed)
            log.info(
                "reception over in %.1f s: %d simulations, %d samples on disk; training %d epoch(s) of %d batches",
                self.reception_seconds,
                len(dataset.sim_ids),
                len(dataset),
                self.config.study.epochs,
                batches_per_epoch(len(dataset), self.config.train.batch_size),
            )
            with Prefetcher(self.source, self.trainer.prefetch, self.config.train.batch_size) as prefetcher:
                self._train_epochs(prefetcher)
        wall = time.monotonic() - self.log.start
        self._validate()
        ranks = self._record("validation", final=True)
        return TrainingResult(self.trainer, self._summary(ranks, wall), "completed")

    # -- reception -----------------------------------------------------------------------------
    def _receive(self) -> None:
        """Until every simulation has ended: the receiver writes each time step to its file."""
        while not self.ensemble.launcher.done.wait(RECEPTION_WAIT):
            self.ensemble.poll()
            if self.log.due(time.monotonic()):
                self._record("train")
        self.ensemble.poll()

    def _check_dataset(self) -> None:
        """Every completed simulation has its whole file (its FINISH came after all of its steps)."""
        on_disk = set(self.writer.completed())
        completed = [r.sim_id for r in self.table if r.state == SimState.COMPLETED]
        missing = [sim_id for sim_id in completed if sim_id not in on_disk]
        if missing:
            raise RuntimeError(
                f"{len(missing)} completed simulation(s) have no complete file in {self.dataset_dir} "
                f"(first: {missing[:5]}): their time steps did not all arrive"
            )
        if not on_disk:
            raise RuntimeError(f"no simulation completed: {self.dataset_dir} holds nothing to train on")

    # -- training ------------------------------------------------------------------------------
    def _train_epochs(self, prefetcher: Prefetcher) -> None:
        timeout = self.config.train.batch_timeout
        while True:
            try:
                ready = prefetcher.get(timeout=timeout)
            except TimeoutError:
                raise StallError(
                    f"no batch was read from {self.dataset_dir} within train.batch_timeout ({timeout:.0f} s)"
                ) from None
            if ready is None:
                return
            self.log.batch_ready(ready.drawn_at)
            self._train(ready)
            if self.log.due(time.monotonic()):
                self._record("train")

    def _train(self, batch: Ready) -> None:
        self.log.wait_for_room()
        step_metrics, _ = self.trainer.step_on_device(self.trainer.put(batch.prepared))
        self.log.dispatched(step_metrics)
        self.steps += 1
        self.samples_trained += len(batch.host.sample_ids)
        if self.steps % self.config.train.validation_every == 0:
            self._validate()
            self._record("validation")

    def _validate(self) -> None:
        self.log.validated(self.trainer.evaluate(self.val_inputs, self.val_targets))

    # -- metrics -------------------------------------------------------------------------------
    def _dataset_samples(self) -> int:
        return self.writer.completed_count * self.config.solver.n_steps

    def _repetition_histogram(self, received: int) -> np.ndarray:
        """Samples by uses: the dataset's by its epochs' draws; steps of simulations left incomplete at 0."""
        uses = self.source.uses if self.source is not None else np.zeros(0, np.int32)
        histogram = np.bincount(uses, minlength=1).astype(np.int64)
        histogram[0] += max(received - len(uses), 0)
        return histogram

    def _record(self, kind: str, final: bool = False) -> list[RankCounters]:
        """One metrics line (the online lines' keys; the buffer's population is the samples on disk)."""
        self.log.fetch()
        receiver = self.ensemble.receiver.counters()
        on_disk = self._dataset_samples()
        stats = BufferStats(on_disk, on_disk, on_disk, 0, 0, self.samples_trained, self.source is not None)
        ranks = [
            metrics.rank_counters(
                receiver,
                stats,
                self.samples_trained,
                repetition_histogram=self._repetition_histogram(receiver.unique_received).tolist() if final else None,
                parameter_digest=metrics.parameter_digest(self.trainer.host_params()) if final else None,
            )
        ]
        self.log.write(
            kind,
            ranks,
            steps=self.steps,
            buffer_capacity=self.config.study.n_simulations * self.config.solver.n_steps,
            simulations=self.ensemble.status(),
            final=final,
        )
        return ranks

    def _summary(self, ranks: list[RankCounters], wall: float) -> dict[str, Any]:
        counts = self.table.counts()
        n_samples = len(self.source.uses)
        return self.log.summary(
            ranks,
            compile_seconds=self.compile_seconds,
            steps=self.steps,
            wall=wall,
            simulations_planned=self.config.study.n_simulations,
            simulations_finished=counts["completed"],
            simulations_failed=counts["failed"],
            time_steps_per_simulation=self.config.solver.n_steps,
            buffer_kind="dataset",
            devices_per_rank=int(self.trainer.mesh.devices.size),
        ) | {
            "mode": "offline",
            "epochs": self.config.study.epochs,
            "dataset_samples": n_samples,
            "batches_per_epoch": batches_per_epoch(n_samples, self.config.train.batch_size),
            "reception_phase_s": self.reception_seconds,
            "training_phase_s": wall - self.reception_seconds,
            "dataset_dir": str(self.dataset_dir),
        }
