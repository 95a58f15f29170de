"""``python -m jaxsurro.plot RUN_DIR``: PNG figures of a run's losses, throughput, buffer, sample reuse and predictions.

Reads ``metrics.jsonl`` and ``summary.json`` from a run directory written by ``python -m jaxsurro.run``
and writes ``loss.png``, ``throughput.png``, ``buffer.png`` and ``repetitions.png`` into it (or ``--out``).
Once the run has saved its surrogate, ``prediction_<field>.png`` shows, for a few validation
simulations, the solver's field, the surrogate's prediction and their difference side by side.
A run still in progress has no ``summary.json`` yet: its other figures are drawn from what exists.
Figures are built on ``matplotlib.figure.Figure`` and rendered by Agg, without pyplot, so no display is needed
and the backend of a caller's session (a notebook, say) is left alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxsurro import rundir

log = logging.getLogger(__name__)

METRICS_FILE = rundir.METRICS
SUMMARY_FILE = rundir.SUMMARY
PREDICTED_SIMULATIONS = 3  # validation simulations shown in the prediction figures
FIGURE_SIZE = (8.0, 5.0)  # inches; at DPI this gives 800 x 500 pixels
DPI = 100
SMOOTHING_INTERVALS = 40  # the throughput figure averages rates over 1/40 of the run's duration
RECORD_FIELDS = (
    "time",
    "batch",
    "train_loss",
    "received_per_s",
    "trained_per_s",
    "buffer_population",
    "buffer_capacity",
)


class PlotInputError(ValueError):
    """A run directory, or a file in it, is missing or does not hold what ``jaxsurro.run`` writes."""


class Metrics(NamedTuple):
    """Columns of ``metrics.jsonl``: one row per train or validation record, in file order."""

    time: np.ndarray  # float64 [n], s since training start
    batch: np.ndarray  # float64 [n], batches trained so far
    train_loss: np.ndarray  # float64 [n], mean loss since the previous record; NaN before the first batch
    received_per_s: np.ndarray  # float64 [n], unique samples received per s since the previous record
    trained_per_s: np.ndarray  # float64 [n], samples trained per s since the previous record
    buffer_population: np.ndarray  # float64 [n], samples held in the buffer
    buffer_capacity: np.ndarray  # float64 [n]
    validation_batch: np.ndarray  # float64 [v], batch of each validation record
    val_mse: np.ndarray  # float64 [v], validation MSE in normalized field units


class Summary(NamedTuple):
    """What the figures need from ``summary.json``."""

    repetition_histogram: dict[int, int]  # times used -> number of samples used exactly that often
    mean_field_mse: float | None  # the mean-field baseline, when the run recorded it


def _number(record: dict[str, Any], key: str, where: str) -> float:
    """``record[key]`` as a float, or an error naming the place, the key and what was found."""
    if key not in record:
        raise PlotInputError(
            f"{where} has no {key!r} field; expected a record written by jaxsurro.run "
            f"with the fields {', '.join(RECORD_FIELDS)}"
        )
    value = record[key]
    if value is None:  # undefined when written (a loss before the first batch): strict JSON's null
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlotInputError(f"{where} field {key!r} should be a number, got {value!r}")
    return float(value)


def parse_metrics(text: str, source: str) -> Metrics:
    """Columns of the train and validation records in ``text`` (the contents of ``source``, named in errors).

    Blank lines and records of other kinds are skipped. An unterminated last line that is not JSON is taken
    for a record the trainer is still writing and skipped too.
    """
    lines = text.split("\n")
    rows: list[list[float]] = []
    validations: list[tuple[float, float]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: still being written
                continue
            raise PlotInputError(f"{where} is not JSON: {exc}; each line should be one JSON object") from None
        if not isinstance(record, dict):
            raise PlotInputError(f"{where} should be a JSON object, got {type(record).__name__}: {line[:80]}")
        kind = record.get("kind")
        if kind not in ("train", "validation"):
            continue
        row = [_number(record, key, where) for key in RECORD_FIELDS]
        rows.append(row)
        if kind == "validation":
            validations.append((row[1], _number(record, "val_mse", where)))
    if not rows:
        raise PlotInputError(
            f"{source} holds no train or validation records yet; the trainer writes one every "
            f"few batches, so plot again once training has started"
        )
    columns = np.asarray(rows, dtype=np.float64).T
    validation = np.asarray(validations, dtype=np.float64).reshape(-1, 2).T
    return Metrics(*columns, validation_batch=validation[0], val_mse=validation[1])


def parse_summary(text: str, source: str) -> Summary:
    """The repetition histogram and mean-field baseline from the JSON ``text`` of ``source``."""
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlotInputError(f"{source} is not JSON: {exc}") from None
    if not isinstance(summary, dict):
        raise PlotInputError(f"{source} should hold a JSON object, got {type(summary).__name__}")
    histogram = summary.get("repetition_histogram")
    if not isinstance(histogram, dict):
        raise PlotInputError(
            f"{source} field 'repetition_histogram' should be an object mapping times used to "
            f'a number of samples, like {{"1": 340, "2": 54}}; got {histogram!r}'
        )
    repetitions: dict[int, int] = {}
    for times_used, count in histogram.items():
        if not times_used.isdigit() or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise PlotInputError(
                f"{source} 'repetition_histogram' entry {times_used!r}: {count!r} should map "
                f"a non-negative integer to a non-negative integer count"
            )
        repetitions[int(times_used)] = count
    baseline = summary.get("mean_field_validation_mse")
    if baseline is not None:
        baseline = _number(summary, "mean_field_validation_mse", source)
    return Summary(dict(sorted(repetitions.items())), baseline)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PlotInputError(f"{path} is not UTF-8 text: {exc}") from None


def load_run(run_dir: Path) -> tuple[Metrics, Summary | None]:
    """The metrics of ``run_dir``, and its summary when the run has finished (``None`` before)."""
    if not run_dir.is_dir():
        state = "is not a directory" if run_dir.exists() else "does not exist"
        raise PlotInputError(
            f"run directory {run_dir} {state}; pass the directory that "
            f"`python -m jaxsurro.run` printed as 'run directory: ...'"
        )
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise PlotInputError(
            f"{metrics_path} not found; is {run_dir} a run directory written by "
            f"`python -m jaxsurro.run`? (it writes {METRICS_FILE} once training starts)"
        )
    metrics = parse_metrics(_read_text(metrics_path), str(metrics_path))
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.exists():
        return metrics, None
    return metrics, parse_summary(_read_text(summary_path), str(summary_path))


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def loss_figure(metrics: Metrics, mean_field_mse: float | None, run_name: str) -> Figure:
    """Training loss and validation MSE against batches, log scale, with the mean-field baseline."""
    figure, axes = _new_axes(f"Loss — {run_name}", "batch (training steps)", "MSE (normalized field units)")
    trained = np.isfinite(metrics.train_loss)
    axes.plot(
        metrics.batch[trained],
        metrics.train_loss[trained],
        marker=".",
        label="training loss (mean since previous record)",
    )
    axes.plot(metrics.validation_batch, metrics.val_mse, marker="o", label="validation MSE")
    if mean_field_mse is not None:
        axes.axhline(mean_field_mse, color="gray", linestyle="--", label="mean-field baseline (predict the mean field)")
    values = np.concatenate([metrics.train_loss, metrics.val_mse, [mean_field_mse or math.nan]])
    if np.any(values > 0):  # a log axis with nothing positive on it warns and shows nothing
        axes.set_yscale("log")
    axes.legend()
    return figure


def trailing_mean_rate(time: np.ndarray, rate: np.ndarray, window: float) -> np.ndarray:
    """Mean of per-interval ``rate`` over the ``window`` seconds before each record (at least its own interval).

    Record i's rate covers (time[i-1], time[i]], the first one (0, time[0]]. Reception is bursty at the
    scale of one record, so the mean over a longer window is what a reader can follow.
    """
    edges = np.concatenate([[0.0], time])
    counts = np.concatenate([[0.0], np.cumsum(rate * np.diff(edges))])
    ends = np.arange(1, len(edges))
    starts = np.searchsorted(edges, edges[1:] - window, side="right") - 1
    starts = np.clip(starts, 0, ends - 1)
    return (counts[ends] - counts[starts]) / np.maximum(edges[ends] - edges[starts], 1e-9)


def throughput_figure(metrics: Metrics, run_name: str) -> Figure:
    """Samples received and trained per second against time: per record (faint) and over a trailing window."""
    figure, axes = _new_axes(f"Throughput — {run_name}", "time since training start (s)", "samples/s")
    window = float(metrics.time[-1]) / SMOOTHING_INTERVALS
    for rate, label in ((metrics.received_per_s, "received (unique samples)"), (metrics.trained_per_s, "trained")):
        (line,) = axes.plot(
            metrics.time,
            trailing_mean_rate(metrics.time, rate, window),
            marker=".",
            markersize=3,
            label=f"{label}, mean over {window:.2g} s",
        )
        axes.plot(metrics.time, rate, drawstyle="steps-pre", color=line.get_color(), alpha=0.25, linewidth=0.8)
    # Training reuses samples, so the two rates can differ by orders of magnitude; symlog keeps both
    # readable and still shows the zero rates at the end of a run.
    axes.set_yscale("symlog", linthresh=1.0)
    axes.set_ylim(bottom=0)
    axes.legend(title="faint: mean since the previous record")
    return figure


def buffer_figure(metrics: Metrics, run_name: str) -> Figure:
    """Samples held in the buffer against time, with its capacity."""
    figure, axes = _new_axes(f"Buffer population — {run_name}", "time since training start (s)", "samples in buffer")
    axes.plot(metrics.time, metrics.buffer_population, marker=".", label="population")
    axes.plot(metrics.time, metrics.buffer_capacity, color="gray", linestyle="--", label="capacity")
    axes.set_ylim(bottom=0)
    axes.legend()
    return figure


def repetitions_figure(repetition_histogram: dict[int, int], run_name: str) -> Figure:
    """Bar chart of how many samples were used in training exactly k times, for each k."""
    times_used = np.asarray(list(repetition_histogram), dtype=np.int64)
    counts = np.asarray(list(repetition_histogram.values()), dtype=np.int64)
    total = int(counts.sum())
    mean = f"mean {np.dot(times_used, counts) / total:.2f} uses per sample" if total else "no samples"
    figure, axes = _new_axes(f"Sample reuse: {mean} — {run_name}", "times used in training", "number of samples")
    axes.bar(times_used, counts, width=0.8, label=f"{total} samples")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    return figure


def prediction_figures(run_dir: Path, count: int = PREDICTED_SIMULATIONS) -> dict[str, Figure]:
    """``prediction_<field>.png`` figures: solver, surrogate and difference for ``count`` validation simulations.

    Each row is one validation simulation at its last time step (a scalar field: over every step);
    1-D fields are drawn as curves, 2-D as images, higher ranks as their middle 2-D slice. Empty when
    the run has not saved its surrogate or its validation set is no longer cached.
    """
    from jaxsurro import surrogate  # JAX loads only for these figures
    from jaxsurro.config import ConfigError, load_config
    from jaxsurro.core.fields import split_fields
    from jaxsurro.server import validation as validation_cache

    try:
        model = surrogate.load(run_dir)
        config = load_config(run_dir / rundir.CONFIG)
    except (FileNotFoundError, ValueError, ConfigError) as exc:
        log.warning("no prediction figures: %s", exc)
        return {}
    validation = validation_cache.load_cached(config)
    if validation is None:
        log.warning(
            "no prediction figures: the validation set of %s is no longer in %s",
            run_dir,
            validation_cache.cache_path(config),
        )
        return {}
    chosen = range(min(count, len(validation.parameters)))
    times = model.step_times()
    predicted = model.predict(validation.parameters[list(chosen)], times)
    solver = split_fields(validation.samples[list(chosen)], model.fields)
    figures = {}
    for spec in model.fields:
        figure = Figure(figsize=(12.0, 3.2 * len(chosen)), dpi=DPI, layout="constrained")
        axes = figure.subplots(len(chosen), 3, squeeze=False)
        for row, index in enumerate(chosen):
            label = ", ".join(
                f"{n}={v:.3g}" for n, v in zip(model.parameter_names, validation.parameters[index], strict=True)
            )
            truth, guess = solver[spec.name][row], predicted[spec.name][row]
            if spec.shape:  # the last step over the field's points
                truth, guess, x, when = truth[-1], guess[-1], None, f"t = {times[-1]:.3g}"
            else:  # a scalar over time
                x, when = times, "over time"
            _draw_field(axes[row], truth, guess, x, f"{spec.name}, {label}, {when}")
        figures[f"prediction_{spec.name}.png"] = figure
    return figures


def _draw_field(axes: Any, truth: np.ndarray, guess: np.ndarray, x: np.ndarray | None, title: str) -> None:
    """One row: solver | surrogate | surrogate − solver, as curves over ``x`` (default: the points) or images."""
    while truth.ndim > 2:  # the middle slice of higher ranks
        truth, guess = truth[truth.shape[0] // 2], guess[guess.shape[0] // 2]
    panels = (("solver", truth), ("surrogate", guess), ("surrogate − solver", guess - truth))
    if truth.ndim == 2:
        low, high = float(min(truth.min(), guess.min())), float(max(truth.max(), guess.max()))
        for ax, (name, values) in zip(axes, panels, strict=True):
            limits = {} if name.endswith("solver") and name != "solver" else {"vmin": low, "vmax": high}
            image = ax.imshow(values, origin="lower", cmap="RdBu_r" if "−" in name else "viridis", **limits)
            ax.figure.colorbar(image, ax=ax, shrink=0.8)
            ax.set_title(f"{name}\n{title}" if name == "solver" else name, fontsize=8)
        return
    x = np.arange(truth.size) if x is None else x
    for ax, (name, values) in zip(axes, panels, strict=True):
        ax.plot(x, np.atleast_1d(values))
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{name}\n{title}" if name == "solver" else name, fontsize=8)


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Writes the run's figures as PNG files into ``out_dir`` (default ``run_dir``); returns their paths."""
    run_dir, out_dir = Path(run_dir), Path(out_dir or run_dir)
    metrics, summary = load_run(run_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PlotInputError(f"output path {out_dir} exists and is not a directory; pass a directory to --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run_dir.resolve().name
    figures = {
        "loss.png": loss_figure(metrics, summary.mean_field_mse if summary else None, name),
        "throughput.png": throughput_figure(metrics, name),
        "buffer.png": buffer_figure(metrics, name),
    }
    if summary is None:
        log.warning("%s not found (is the run still going?): repetitions.png not written", run_dir / SUMMARY_FILE)
    else:
        figures["repetitions.png"] = repetitions_figure(summary.repetition_histogram, name)
        figures.update(prediction_figures(run_dir))
    paths = []
    for filename, figure in figures.items():
        path = out_dir / filename
        figure.savefig(path, format="png")
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: plots a run directory; exit code 2 when its files are missing or malformed."""
    parser = argparse.ArgumentParser(prog="python -m jaxsurro.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory written by `python -m jaxsurro.run`")
    parser.add_argument("--out", type=Path, help="write the PNG files here instead of into RUN_DIR")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except PlotInputError as exc:
        print(f"[jaxsurro] error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
