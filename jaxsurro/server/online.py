"""Online training on the server's ranks: the buffers fill from the stream while the ranks train in lockstep.

Every iteration each rank draws a batch from its own buffer (or has none), then the
ranks exchange a small control vector: who has data, who is drained, who failed, and
rank 0's decisions (log now, every simulation ended). If any rank has data they all
run the jitted step, whose gradient sums are reduced across ranks weighted by each
rank's sample count, so an empty rank contributes nothing and nobody waits for it.
Training ends when every rank's buffer is drained after reception is over, which all
ranks learn in the same iteration. With one rank the same loop runs without MPI.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxsurro.server.buffers import SampleBatch, make_buffer
from jaxsurro.config import Config
from jaxsurro.core.sampling import derive_seed
from jaxsurro.server.distributed import World, gradient_allreduce
from jaxsurro.table import SimState, SimulationTable
from jaxsurro.server.progress import Progress
from jaxsurro.server.receiver import BufferSink
from jaxsurro.server.ensemble import Ensemble, LaunchFactory, StallError
from jaxsurro.server.steering import Steering
from jaxsurro.server.trainer import Trainer
from jaxsurro.server.validation import ValidationSet

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


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self._handle = open(path, "w", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._handle.close()


def train_online(config: Config, table: SimulationTable, validation: ValidationSet | None, run_dir: Path,
                 progress: Progress, launch: LaunchFactory, world: World | None = None,
                 log_interval: float = 0.5) -> TrainingResult:
    """Runs the study on this rank: its share of the stream goes into its buffer while the ranks train.

    ``validation`` is needed on rank 0 only, which validates for everyone.
    """
    world = world or World()
    metrics_log = MetricsLog(run_dir / "metrics.jsonl") if world.is_root else None
    try:
        return OnlineTraining(config, table, validation, run_dir, progress, launch, world, log_interval,
                              metrics_log).run()
    finally:
        if metrics_log is not None:
            metrics_log.close()


class OnlineTraining:
    """One rank's part of a study: its receiver and buffer, and its place in the lockstep training loop."""

    def __init__(self, config: Config, table: SimulationTable, validation: ValidationSet | None, run_dir: Path,
                 progress: Progress, launch: LaunchFactory, world: World, log_interval: float,
                 metrics_log: MetricsLog | None):
        solver = config.solver
        self.config, self.table, self.world = config, table, world
        self.run_dir, self.progress, self.metrics_log = run_dir, progress, metrics_log
        self.log_interval = log_interval
        self.launch = launch
        self.buffer = make_buffer(config.buffer.kind, capacity=config.buffer.capacity,
                                  watermark=config.buffer.watermark, input_dim=len(solver.parameters) + 1,
                                  field_size=int(np.prod(solver.field_shape)), seed=derive_seed(config.study.seed, "buffer", world.rank))
        self.trainer = Trainer(config, reduce_fn=gradient_allreduce(world))
        self.steering = Steering(config, world, table, self.trainer.mesh) if config.sampler.kind == "breed" else None
        if world.is_root:
            if validation is None:
                raise ValueError("rank 0 validates for every rank: it needs the validation set")
            self.val_inputs, self.val_targets = validation.inputs(solver.dt), validation.targets()
        self.batch_wait = MULTI_RANK_WAIT if world.distributed else SINGLE_RANK_WAIT
        self.collective_timeout = config.train.batch_timeout + 60.0
        n_inputs, n_field = len(solver.parameters) + 1, int(np.prod(solver.field_shape))
        self._empty = SampleBatch(np.zeros((0, n_inputs), np.float32), np.zeros((0, n_field), np.float32),
                                  np.zeros(0, np.int64))
        self.steps = 0  # global steps (identical on every rank)
        self.samples_trained = 0  # by this rank
        self.val_mse = float("nan")
        self.last_loss = float("nan")
        self._pending_metrics: list[dict[str, jax.Array]] = []
        self._awaiting: list[int] | None = None  # completed simulations whose FINISH this rank must see
        self._awaiting_deadline = 0.0
        self._reception_ended = False
        self._start = time.monotonic()
        self._last_record = {"time": self._start, "received": 0, "trained": 0}

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainingResult:
        sink = BufferSink(self.buffer, self.table, self.config.solver.n_steps, self.config.solver.dt)
        with Ensemble(self.config, self.table, sink, "sim", self.launch, world=self.world) as ensemble:
            self.ensemble = ensemble
            try:
                self._loop()
            finally:
                self.buffer.close()
        self.wall = time.monotonic() - self._start
        if self.world.is_root:
            self.val_mse = self.trainer.evaluate(self.val_inputs, self.val_targets)
        self._record("validation", final=True)
        return TrainingResult(self.trainer, self._summary())

    def _loop(self) -> None:
        last_progress = time.monotonic()
        while True:
            control = np.zeros(len(_Control), dtype=np.int64)
            failure: BaseException | None = None
            batch = None
            try:
                self.ensemble.poll()
                self._end_reception_when_finished()
                batch = self.buffer.get_batch(self.config.train.batch_size, timeout=self.batch_wait)
                control[_Control.DRAINED] = batch is None
            except TimeoutError:
                pass  # nothing yet on this rank
            except Exception as exc:  # noqa: BLE001 -- every rank must learn of it before anyone stops
                failure = exc
                control[_Control.FAILED] = 1
            control[_Control.HAVE_BATCH] = batch is not None
            if self.world.is_root:
                now = time.monotonic()
                control[_Control.LOG_NOW] = now - self._last_record["time"] >= self.log_interval
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
                raise StallError(f"no rank had a batch for {self.config.train.batch_timeout:.0f} s "
                                 f"(train.batch_timeout); this rank's buffer: {self.buffer.stats()}; "
                                 f"simulations: {self.table.counts()}")
            if totals[_Control.LOG_NOW]:
                self._record("train")

    def _train(self, batch: SampleBatch) -> None:
        metrics, per_sample_loss = self.trainer.step(batch)
        self._pending_metrics.append(metrics)
        self.steps += 1
        self.samples_trained += len(batch.sample_ids)
        if self.steering is not None:
            self.steering.observe(per_sample_loss, batch.sample_ids)
            if self.steering.due(self.steps):
                self.steering.resample()
        if self.steps % self.config.train.validation_every == 0:
            if self.world.is_root:
                self.val_mse = self.trainer.evaluate(self.val_inputs, self.val_targets)
            self._record("validation")

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
            raise RuntimeError(f"rank {self.world.rank}: the FINISH of {len(missing)} completed simulation(s) "
                               f"never arrived (first: {missing[:5]}) within server.client_timeout")

    # -- metrics -------------------------------------------------------------------------------
    def _local_stats(self) -> dict[str, Any]:
        receiver, stats = self.ensemble.receiver, self.buffer.stats()
        span = (receiver.last_data_at or 0.0) - (receiver.first_data_at or 0.0)
        return {"received": receiver.unique_received, "duplicates": receiver.duplicates,
                "rejected": dict(receiver.rejected), "buffer_population": stats.population,
                "samples_trained": self.samples_trained, "reception_seconds": span}

    def _record(self, kind: str, final: bool = False) -> None:
        """A collective: every rank sends its counters to rank 0, which writes one metrics line."""
        if self._pending_metrics:
            fetched = jax.device_get(self._pending_metrics)  # also bounds the queue of dispatched steps
            self.last_loss = float(np.mean([m["loss"] for m in fetched]))
            self.learning_rate = float(fetched[-1]["learning_rate"])
            self._pending_metrics.clear()
        local = self._local_stats()
        if final:
            local["repetition_histogram"] = self.buffer.repetition_histogram().tolist()
            local["parameter_digest"] = parameter_digest(self.trainer.host_params())
        ranks = self.world.gather(local, self.collective_timeout, "a metrics record")
        if not self.world.is_root:
            return
        self.per_rank = ranks
        now = time.monotonic()
        received = sum(r["received"] for r in ranks)
        trained = sum(r["samples_trained"] for r in ranks)
        span = max(now - self._last_record["time"], 1e-9)
        rejected: dict[str, int] = {}
        for r in ranks:
            for reason, count in r["rejected"].items():
                rejected[reason] = rejected.get(reason, 0) + count
        entry = {"kind": kind, "time": round(now - self._start, 4), "batch": self.steps,
                 "samples_trained": trained, "train_loss": self.last_loss,
                 "learning_rate": getattr(self, "learning_rate", self.config.train.learning_rate),
                 "received": received, "received_per_s": (received - self._last_record["received"]) / span,
                 "trained_per_s": (trained - self._last_record["trained"]) / span,
                 "buffer_population": sum(r["buffer_population"] for r in ranks),
                 "buffer_capacity": self.config.buffer.capacity * self.world.size,
                 "duplicates": sum(r["duplicates"] for r in ranks), "rejected": rejected,
                 "simulations": self.ensemble.status()}
        if self.world.distributed:
            entry["buffer_population_per_rank"] = [r["buffer_population"] for r in ranks]
            entry["received_per_rank"] = [r["received"] for r in ranks]
        if kind == "validation":
            entry["val_mse"] = self.val_mse
        self._last_record.update(time=now, received=received, trained=trained)
        self.metrics_log.write(entry)
        status = entry["simulations"]
        self.progress.update(received, {
            "sims": f"{status['running']} running, {status['done']}/{self.config.study.n_simulations} done",
            "buffer": f"{entry['buffer_population']}/{entry['buffer_capacity']}",
            "samples/s": f"{entry['trained_per_s']:.0f}", "loss": f"{self.last_loss:.3g}",
            "val": f"{self.val_mse:.3g}"}, force=final)
        self._entry = entry

    def _summary(self) -> dict[str, Any] | None:
        if not self.world.is_root:
            return None
        ranks, solver = self.per_rank, self.config.solver
        width = max(len(r["repetition_histogram"]) for r in ranks)
        histogram = np.zeros(width, dtype=np.int64)
        for r in ranks:
            histogram[:len(r["repetition_histogram"])] += r["repetition_histogram"]
        finished = sum(1 for r in self.table if r.state == SimState.COMPLETED)
        received = self._entry["received"]
        trained = self._entry["samples_trained"]
        summary = {
            "simulations_planned": self.config.study.n_simulations,
            "simulations_finished": finished,
            "simulations_failed": sum(1 for r in self.table if r.state == SimState.FAILED),
            "time_steps_per_simulation": solver.n_steps,
            "unique_samples_received": received,
            "expected_samples": finished * solver.n_steps,
            "duplicates": self._entry["duplicates"],
            "rejected": self._entry["rejected"],
            "batches": self.steps,
            "samples_trained": trained,
            "repetition_histogram": {str(k): int(v) for k, v in enumerate(histogram) if v},
            "mean_repetitions": float(np.dot(np.arange(width), histogram) / max(histogram.sum(), 1)),
            "final_validation_mse": self.val_mse,
            "received_samples_per_s": received / max(max(r["reception_seconds"] for r in ranks), 1e-9),
            "trained_samples_per_s": trained / max(self.wall, 1e-9),
            "training_wall_time_s": self.wall,
            "buffer": self.config.buffer.kind,
            "server_ranks": self.world.size,
            "devices_per_rank": int(self.trainer.mesh.devices.size),
        }
        if self.world.distributed:
            summary["ranks"] = [{"rank": i, "unique_samples_received": r["received"], "duplicates": r["duplicates"],
                                 "samples_trained": r["samples_trained"], "parameter_digest": r["parameter_digest"]}
                                for i, r in enumerate(ranks)]
        summary["parameter_digest"] = ranks[0]["parameter_digest"]
        if self.steering is not None:
            summary["breed_rounds"] = self.steering.history
            summary["simulations_bred"] = sum(1 for r in self.table if r.bred)
        return summary


def parameter_digest(params: Any) -> str:
    """SHA-256 of the parameters' bytes: equal digests mean bitwise identical parameters."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()
