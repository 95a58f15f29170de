"""What a run reports: one metrics line per log point (``metrics.jsonl``) and the run's summary.

Every rank takes a snapshot of its counters (:class:`RankCounters`); rank 0 gathers them,
:func:`aggregate` sums them, :func:`record` builds the metrics line and, at the end,
:func:`summary` builds ``summary.json``'s totals. Apart from :class:`MetricsLog`, which
appends the lines to the file, everything here is a function of its arguments, so the
keys that ``jaxsurro.plot`` and the tests read are written in one place
(docs/architecture.md, "Run directory" and "MPI lockstep").
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxsurro.server.buffers import BufferStats
from jaxsurro.server.receiver import ReceiverCounters

log = logging.getLogger("jaxsurro.server.metrics")


class RankCounters(NamedTuple):
    """One rank's counters at a log point, as it sends them to rank 0."""

    received: int  # unique time steps this rank stored
    duplicates: int  # time steps it dropped because they were already stored
    rejected: dict[str, int]  # messages it dropped, by reason
    buffer_population: int  # samples in its buffer now
    samples_trained: int  # rows of its batches that went into training steps
    reception_seconds: float  # from its first stored time step to its last (0 before two arrived)
    repetition_histogram: tuple[int, ...] | None = None  # final record only: [k] = samples used k times
    parameter_digest: str | None = None  # final record only: SHA-256 of its parameters
    incomplete: tuple[tuple[int, int, int], ...] = ()  # (sim_id, steps its FINISH reported, steps expected)


class Totals(NamedTuple):
    """The ranks' counters, summed."""

    received: int
    duplicates: int
    rejected: dict[str, int]  # summed by reason
    buffer_population: int
    samples_trained: int


class RatePoint(NamedTuple):
    """Where the previous metrics line stood, for the rates of the next one."""

    time: float  # time.monotonic()
    received: int
    trained: int


def rank_counters(
    receiver: ReceiverCounters,
    buffer: BufferStats,
    samples_trained: int,
    *,
    repetition_histogram: Sequence[int] | None = None,
    parameter_digest: str | None = None,
) -> RankCounters:
    """This rank's counters from snapshots of its receiver and its buffer."""
    span = (receiver.last_data_at or 0.0) - (receiver.first_data_at or 0.0)
    return RankCounters(
        received=receiver.unique_received,
        duplicates=receiver.duplicates,
        rejected=dict(receiver.rejected),
        buffer_population=buffer.population,
        samples_trained=samples_trained,
        reception_seconds=span,
        incomplete=tuple((sim_id, *counts) for sim_id, counts in sorted(receiver.incomplete.items())),
        repetition_histogram=None if repetition_histogram is None else tuple(int(v) for v in repetition_histogram),
        parameter_digest=parameter_digest,
    )


def aggregate(ranks: Sequence[RankCounters]) -> Totals:
    """The counters of every rank, summed (rejections by reason)."""
    rejected: dict[str, int] = {}
    for rank in ranks:
        for reason, count in rank.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + count
    return Totals(
        received=sum(r.received for r in ranks),
        duplicates=sum(r.duplicates for r in ranks),
        rejected=rejected,
        buffer_population=sum(r.buffer_population for r in ranks),
        samples_trained=sum(r.samples_trained for r in ranks),
    )


def record(
    kind: str,
    ranks: Sequence[RankCounters],
    *,
    now: float,
    start: float,
    since: RatePoint,
    steps: int,
    train_loss: float,
    learning_rate: float,
    buffer_capacity: int,
    simulations: Mapping[str, int],
    val_mse: float | None = None,
    train_field_loss: Mapping[str, float] | None = None,
    val_field_mse: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One line of ``metrics.jsonl``.

    ``kind`` is ``"train"`` or ``"validation"`` (which adds ``val_mse`` and, with several fields,
    ``val_field_mse``); ``train_field_loss`` is each field's training loss. The rates are over the
    time since the previous line (``since``); ``buffer_capacity`` is every rank's together. With
    more than one rank the line also holds each rank's buffer population and received count.
    """
    totals = aggregate(ranks)
    span = max(now - since.time, 1e-9)
    entry = {
        "kind": kind,
        "time": round(now - start, 4),
        "batch": steps,
        "samples_trained": totals.samples_trained,
        "train_loss": train_loss,
        "learning_rate": learning_rate,
        "received": totals.received,
        "received_per_s": (totals.received - since.received) / span,
        "trained_per_s": (totals.samples_trained - since.trained) / span,
        "buffer_population": totals.buffer_population,
        "buffer_capacity": buffer_capacity,
        "duplicates": totals.duplicates,
        "rejected": totals.rejected,
        "simulations": dict(simulations),
    }
    if len(ranks) > 1:
        entry["buffer_population_per_rank"] = [r.buffer_population for r in ranks]
        entry["received_per_rank"] = [r.received for r in ranks]
    if train_field_loss is not None and len(train_field_loss) > 1:
        entry["train_field_loss"] = dict(train_field_loss)
    if kind == "validation":
        entry["val_mse"] = val_mse
        if val_field_mse is not None and len(val_field_mse) > 1:
            entry["val_field_mse"] = dict(val_field_mse)
    return entry


def rate_point(entry: Mapping[str, Any], now: float) -> RatePoint:
    """Where a metrics line leaves the rates, for the next line's ``since``."""
    return RatePoint(now, entry["received"], entry["samples_trained"])


def progress_status(entry: Mapping[str, Any], n_simulations: int, val_mse: float) -> dict[str, str]:
    """The short status shown next to the received count: it fits an 80-column terminal with the bar.

    ``sims`` running/done/planned, ``in/s`` samples received per second, ``train/s`` samples trained
    per second, ``buf`` the buffer's population, ``val`` the validation MSE, ``rej`` the rejected
    messages (only when there are any).
    """
    simulations = entry["simulations"]
    status = {
        "sims": f"{simulations['running']}r {simulations['done']}/{n_simulations}",
        "in/s": _short(entry["received_per_s"]),
        "train/s": _short(entry["trained_per_s"]),
        "buf": f"{entry['buffer_population']}",
        "val": f"{val_mse:.2g}",
    }
    rejected = sum(entry["rejected"].values())
    if rejected:
        status["rej"] = _short(rejected)
    return status


def _short(value: float) -> str:
    """A count or rate in at most 4 characters: 950, 12k, 3.4M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            scaled = value / scale
            return f"{scaled:.1f}{suffix}" if scaled < 10 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


MIN_MESSAGES_FOR_STOP = 100  # the rejection rate stops a run only once this many messages arrived


class RejectionAlarm(RuntimeError):
    """Too many messages of one reason were rejected: the run stops with a non-zero status."""


def check_rejection_rate(entry: Mapping[str, Any], alarm: float, stop: float) -> None:
    """Rank 0, at each metrics line: logs a warning for each reason above ``alarm`` and raises
    :class:`RejectionAlarm` past ``stop`` (server.alarm_rejection_fraction, server.stop_rejection_fraction)."""
    warnings, reason = rejection_alarm(entry, alarm, stop, MIN_MESSAGES_FOR_STOP)
    for warning in warnings:
        log.warning("%s", warning)
    if reason is not None:
        raise RejectionAlarm(reason)


def rejection_alarm(entry: Mapping[str, Any], alarm: float, stop: float, minimum: int) -> tuple[list[str], str | None]:
    """Each rejection reason's share of all messages in a metrics line: warnings above ``alarm``, and the
    reason to stop the run above ``stop`` (only once ``minimum`` messages arrived), else None."""
    total = entry["received"] + entry["duplicates"] + sum(entry["rejected"].values())
    warnings = []
    for reason, count in sorted(entry["rejected"].items()):
        share = count / max(total, 1)
        if share > stop and total >= minimum:
            return warnings, (
                f"{count} of {total} messages ({share:.0%}) were rejected as {reason}, above "
                f"server.stop_rejection_fraction ({stop:.0%}): the run stops rather than train on what is left; "
                "the first rejection is described in server.log"
            )
        if share > alarm:
            warnings.append(
                f"{count} of {total} messages ({share:.1%}) rejected as {reason}: above "
                f"server.alarm_rejection_fraction ({alarm:.1%})"
            )
    return warnings, None


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that ``json.dumps`` writes strict JSON."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON (``null`` for undefined values such as a loss before the first step)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def summary(
    ranks: Sequence[RankCounters],
    *,
    steps: int,
    val_mse: float,
    wall: float,
    simulations_planned: int,
    simulations_finished: int,
    simulations_failed: int,
    time_steps_per_simulation: int,
    buffer_kind: str,
    devices_per_rank: int,
    breed_rounds: list[dict[str, Any]] | None = None,
    simulations_bred: int | None = None,
) -> dict[str, Any]:
    """The run's totals (``summary.json``) from the final record's counters of every rank.

    ``ranks`` must carry the repetition histograms and parameter digests; ``wall`` is the
    training loop's wall time. The breed keys are added when ``breed_rounds`` is given.
    """
    totals = aggregate(ranks)
    histogram = merged_histogram([r.repetition_histogram for r in ranks])
    width = len(histogram)
    result = {
        "simulations_planned": simulations_planned,
        "simulations_finished": simulations_finished,
        "simulations_failed": simulations_failed,
        "time_steps_per_simulation": time_steps_per_simulation,
        "unique_samples_received": totals.received,
        "expected_samples": simulations_finished * time_steps_per_simulation,
        "duplicates": totals.duplicates,
        "rejected": totals.rejected,
        "batches": steps,
        "samples_trained": totals.samples_trained,
        "repetition_histogram": {str(k): int(v) for k, v in enumerate(histogram) if v},
        "mean_repetitions": float(np.dot(np.arange(width), histogram) / max(histogram.sum(), 1)),
        "final_validation_mse": val_mse,
        "incomplete_simulations": {
            str(sim_id): {"finish_reported": reported, "expected": expected}
            for r in ranks
            for sim_id, reported, expected in r.incomplete
        },
        "received_samples_per_s": totals.received / max(max(r.reception_seconds for r in ranks), 1e-9),
        "trained_samples_per_s": totals.samples_trained / max(wall, 1e-9),
        "training_wall_time_s": wall,
        "buffer": buffer_kind,
        "server_ranks": len(ranks),
        "devices_per_rank": devices_per_rank,
    }
    if len(ranks) > 1:
        result["ranks"] = [
            {
                "rank": i,
                "unique_samples_received": r.received,
                "duplicates": r.duplicates,
                "samples_trained": r.samples_trained,
                "parameter_digest": r.parameter_digest,
            }
            for i, r in enumerate(ranks)
        ]
    result["parameter_digest"] = ranks[0].parameter_digest
    if breed_rounds is not None:
        result["breed_rounds"] = breed_rounds
        result["simulations_bred"] = simulations_bred
    return result


def merged_histogram(histograms: Sequence[Sequence[int] | None]) -> np.ndarray:
    """The ranks' repetition histograms summed, as long as the longest (int64)."""
    present = [h for h in histograms if h is not None]
    if len(present) != len(histograms):
        raise ValueError("every rank's final counters must carry its repetition histogram")
    merged = np.zeros(max(len(h) for h in present), dtype=np.int64)
    for h in present:
        merged[: len(h)] += np.asarray(h, dtype=np.int64)
    return merged


def parameter_digest(params: Any) -> str:
    """SHA-256 of the parameters' bytes: equal digests mean bitwise identical parameters."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


# metrics.jsonl keys written as TensorBoard scalars, under these tags.
TENSORBOARD_SCALARS = {
    "train_loss": "loss/train",
    "val_mse": "loss/validation",
    "learning_rate": "learning_rate",
    "received_per_s": "throughput/received_per_s",
    "trained_per_s": "throughput/trained_per_s",
    "buffer_population": "buffer/population",
    "duplicates": "messages/duplicates",
}


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (line-buffered, so a reader sees each line).

    With ``tensorboard_dir`` the same records also go to TensorBoard event files (tensorboardX's
    writer), one scalar per key of :data:`TENSORBOARD_SCALARS` and per field, at the record's batch.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, append: bool = False):
        """``append``: a resumed run continues the file of the run it resumes."""
        self._handle = open(path, "a" if append else "w", buffering=1)
        self._writer = None
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter  # loaded only when asked for

            self._writer = SummaryWriter(str(tensorboard_dir))

    def write(self, entry: Mapping[str, Any]) -> None:
        self._handle.write(dumps(entry) + "\n")
        if self._writer is not None:
            self._write_scalars(entry)

    def _write_scalars(self, entry: Mapping[str, Any]) -> None:
        step = entry["batch"]
        scalars = {tag: entry[key] for key, tag in TENSORBOARD_SCALARS.items() if key in entry}
        scalars |= {f"loss/train_{name}": value for name, value in entry.get("train_field_loss", {}).items()}
        scalars |= {f"loss/validation_{name}": value for name, value in entry.get("val_field_mse", {}).items()}
        scalars["messages/rejected"] = sum(entry["rejected"].values())
        for tag, value in scalars.items():
            if value is not None and np.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._handle.close()
        if self._writer is not None:
            self._writer.close()
