"""What a training loop reports: its dispatched steps' metrics, its last validation, its metrics lines.

Online training (every rank keeps one; rank 0 writes the lines) and offline training keep the same
numbers, write the same lines and end with the same summary through a :class:`TrainingLog`. Step
metrics stay on the devices until a line is due and are then fetched at once (one ``device_get``),
at most :data:`STEPS_IN_FLIGHT` steps run ahead of the host, each line updates the rates, the
rejection alarm and the progress bar, and the delay from the first batch to the end of the first
step is measured once (docs/architecture.md, "Training").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxsurro.config import Config
from jaxsurro.server import metrics
from jaxsurro.server.evaluation import Evaluation
from jaxsurro.server.metrics import MetricsLog, RankCounters
from jaxsurro.server.progress import Progress

__all__ = ["STEPS_IN_FLIGHT", "TrainingLog"]

log = logging.getLogger("jaxsurro.server.training_log")

# Steps dispatched but not finished at most: the host prepares the next step while the devices run
# this one, and the queue of asynchronous work stays bounded (XLA's CPU collectives across several
# local devices were seen to stall with hundreds of steps in flight).
STEPS_IN_FLIGHT = 2


class TrainingLog:
    """The loop's training and validation figures, and the metrics lines written from them."""

    def __init__(
        self,
        config: Config,
        metrics_log: MetricsLog | None,
        progress: Progress,
        interval: float,
    ):
        """``metrics_log``: where lines go (None on a rank that writes none); ``interval``: seconds between lines."""
        self.config = config
        self.field_names = tuple(config.solver.field_shapes)
        self.metrics_log = metrics_log
        self.progress = progress
        self.interval = interval
        self.val_mse = float("nan")
        self.val_field_mse: dict[str, float] = {}
        self.min_val_mse = float("nan")
        self.train_loss = float("nan")  # mean over the steps fetched for the last line
        self.train_field_loss: dict[str, float] = {}
        self.learning_rate = config.train.learning_rate  # as of the last fetched step
        self.start = time.monotonic()
        self.since = metrics.RatePoint(self.start, 0, 0)  # the last line, for the rates
        # From the first batch the loop could draw to the end of the first step (summary.json).
        self.first_batch_at: float | None = None
        self.first_step_delay: float | None = None
        self._dispatched: list[dict[str, jax.Array]] = []

    def batch_ready(self, drawn_at: float) -> None:
        """A batch was drawn at ``drawn_at`` (time.monotonic()); the first one starts the first-step clock."""
        if self.first_batch_at is None:
            self.first_batch_at = drawn_at

    def dispatched(self, step_metrics: dict[str, jax.Array]) -> None:
        """Keeps a step's metrics (still on the devices) for the next line; after the first step, once,
        waits for it to end and measures the first-step delay."""
        if self.first_step_delay is None and self.first_batch_at is not None:
            jax.block_until_ready(step_metrics)
            self.first_step_delay = time.monotonic() - self.first_batch_at
            log.info("first training step done %.3f s after the first batch was ready", self.first_step_delay)
        self._dispatched.append(step_metrics)

    def wait_for_room(self) -> None:
        """Before dispatching a step: blocks until at most STEPS_IN_FLIGHT - 1 dispatched steps are unfinished."""
        if len(self._dispatched) >= STEPS_IN_FLIGHT:
            jax.block_until_ready(self._dispatched[-STEPS_IN_FLIGHT])

    def validated(self, evaluation: Evaluation) -> None:
        """The validation MSE now, overall and per field, and the lowest so far."""
        self.val_mse = evaluation.mse
        self.val_field_mse = dict(zip(self.field_names, evaluation.field_mse, strict=True))
        self.min_val_mse = evaluation.mse if not self.min_val_mse <= evaluation.mse else self.min_val_mse

    def due(self, now: float) -> bool:
        """Whether ``interval`` seconds have passed since the last line."""
        return now - self.since.time >= self.interval

    def fetch(self) -> None:
        """Brings the dispatched steps' metrics to the host: their mean loss, per field, and the last learning rate."""
        if not self._dispatched:
            return
        fetched = jax.device_get(self._dispatched)  # also waits for every dispatched step
        self.train_loss = float(np.mean([m["loss"] for m in fetched]))
        field_loss = np.mean([m["field_loss"] for m in fetched], axis=0)
        self.train_field_loss = dict(zip(self.field_names, field_loss.tolist(), strict=True))
        self.learning_rate = float(fetched[-1]["learning_rate"])
        self._dispatched.clear()

    def write(
        self,
        kind: str,
        ranks: Sequence[RankCounters],
        *,
        steps: int,
        buffer_capacity: int,
        simulations: dict[str, int],
        final: bool = False,
    ) -> dict[str, Any]:
        """One metrics line of ``kind`` from the ranks' counters (call :meth:`fetch` first); returns it.

        Raises what :func:`metrics.check_rejection_rate` raises when rejections pass the stop fraction.
        """
        now = time.monotonic()
        entry = metrics.record(
            kind,
            ranks,
            now=now,
            start=self.start,
            since=self.since,
            steps=steps,
            train_loss=self.train_loss,
            learning_rate=self.learning_rate,
            buffer_capacity=buffer_capacity,
            simulations=simulations,
            val_mse=self.val_mse,
            train_field_loss=self.train_field_loss,
            val_field_mse=self.val_field_mse,
        )
        self.since = metrics.rate_point(entry, now)
        server = self.config.server
        metrics.check_rejection_rate(entry, server.alarm_rejection_fraction, server.stop_rejection_fraction)
        if self.metrics_log is not None:
            self.metrics_log.write(entry)
        self.progress.update(
            entry["received"],
            metrics.progress_status(entry, self.config.study.n_simulations, self.val_mse),
            force=final,
        )
        return entry

    def summary(self, ranks: Sequence[RankCounters], *, compile_seconds: float, **totals: Any) -> dict[str, Any]:
        """``summary.json``: :func:`metrics.summary` of the ranks' final counters and ``totals`` (its keyword
        arguments but ``val_mse``), with this log's validation figures and timings."""
        return metrics.summary(ranks, val_mse=self.val_mse, **totals) | {
            "min_validation_mse": self.min_val_mse,
            "final_validation_field_mse": self.val_field_mse,
            "compile_s": compile_seconds,
            "first_step_delay_s": self.first_step_delay,
        }
