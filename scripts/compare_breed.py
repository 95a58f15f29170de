"""Random against Breed on one budget and one seed: validation curves and the Breed paper's Figure 4.

Runs the experiment twice through ``jaxsurro.run.run``, once with ``sampler.kind = "uniform"`` (Random)
and once with ``sampler.kind = "breed"``; nothing else differs (the same file, the same ``--set``
overrides, the same seeds, so both start from the same uniform draws). Then writes into ``--out``:

- ``breed_validation.png``: validation MSE against batches for both runs (log scale), with the
  mean-field baseline dashed;
- ``breed_deviation.png``: the paper's Figure 4, histograms of the per-simulation parameter
  deviation, the standard deviation (ddof = 0) of T0..T4 within one simulation: (a) uniform against
  bred points of the Breed run, (b) every point of the Random run against every point of the Breed
  run, with each mean as a vertical line.

It prints the mean deviations, both final validation MSEs and the baseline. Only simulations that
completed count: they are the points the surrogate was trained on.
Usage: python scripts/compare_breed.py [experiments/heat_breed.toml] [--set SECTION.KEY=VALUE ...]
       [--runs-dir runs/compare-breed] [--out docs] [--from-runs]
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure

from jaxsurro import plot
from jaxsurro.config import ConfigError, add_config_arguments, load_config

DEFAULT_CONFIG = Path("experiments/heat_breed.toml")
DEFAULT_RUNS_DIR = Path("runs/compare-breed")
DEFAULT_OUT = Path("docs")
RUN_KINDS = {"random": "uniform", "breed": "breed"}  # run directory name -> sampler.kind
VALIDATION_FIGURE = "breed_validation.png"
DEVIATION_FIGURE = "breed_deviation.png"
N_BINS = 30
COLORS = {"random": "tab:red", "breed": "tab:blue", "uniform": "tab:orange", "bred": "tab:cyan"}


class CompareInputError(ValueError):
    """A run directory, or a file in it, is missing or does not hold what ``jaxsurro.run`` writes."""


class Simulations(NamedTuple):
    """The completed simulations of one run, from its ``simulations.csv``."""

    parameters: np.ndarray  # float64 [n, d], physical units, in the solver's parameter order
    bred: np.ndarray  # bool [n], drawn around a parent by Breed (False: the base sampler's draw)
    names: tuple[str, ...]  # the d parameter names (T0..T4 for the heat equation)
    n_not_completed: int  # rows left out: failed, cancelled or never run


class RunResult(NamedTuple):
    """What the comparison reads from one run directory."""

    simulations: Simulations
    validation_batch: np.ndarray  # float64 [v], batch of each validation record
    val_mse: np.ndarray  # float64 [v], validation MSE in normalized field units
    final_validation_mse: float
    mean_field_mse: float


class DeviationStats(NamedTuple):
    """Mean per-simulation parameter deviation of each group of points, in the parameters' units."""

    breed_uniform: float  # Breed run, points from the base sampler (bred = 0)
    breed_bred: float  # Breed run, points drawn around a parent (bred = 1); NaN if none
    random_all: float  # every point of the Random run
    breed_all: float  # every point of the Breed run
    n_uniform: int
    n_bred: int


def parameter_deviation(parameters: np.ndarray) -> np.ndarray:
    """Per-simulation deviation: the population standard deviation (ddof = 0) of its parameters, [n]."""
    parameters = np.asarray(parameters, dtype=np.float64)
    if parameters.ndim != 2 or parameters.shape[1] < 2:
        raise ValueError(f"parameters must be [n_simulations, n_parameters >= 2], got shape {parameters.shape}")
    return parameters.std(axis=1, ddof=0)


def deviation_stats(random_run: Simulations, breed_run: Simulations) -> DeviationStats:
    """Mean deviations of the Breed run's uniform and bred points and of each run's points."""
    breed_deviation = parameter_deviation(breed_run.parameters)
    bred = breed_deviation[breed_run.bred]
    uniform = breed_deviation[~breed_run.bred]
    return DeviationStats(
        breed_uniform=float(uniform.mean()) if uniform.size else float("nan"),
        breed_bred=float(bred.mean()) if bred.size else float("nan"),
        random_all=float(parameter_deviation(random_run.parameters).mean()),
        breed_all=float(breed_deviation.mean()),
        n_uniform=int(uniform.size),
        n_bred=int(bred.size),
    )


def read_simulations(path: Path) -> Simulations:
    """The completed simulations of a ``simulations.csv``: parameters (columns between sim_id and state) and bred."""
    if not path.is_file():
        raise CompareInputError(f"{path} not found; it is written by `python -m jaxsurro.run` when a run ends")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise CompareInputError(f"{path} is empty; expected a header row starting with sim_id")
    header = rows[0]
    required = ("sim_id", "state", "bred")
    missing = [c for c in required if c not in header]
    if missing or header[0] != "sim_id" or header.index("state") < 2:
        raise CompareInputError(
            f"{path} header {header} should start with sim_id, then the parameter columns, "
            f"then state, and have a bred column; missing: {missing or 'none'}"
        )
    names = tuple(header[1 : header.index("state")])
    state_column, bred_column = header.index("state"), header.index("bred")
    parameters, bred = [], []
    n_not_completed = 0
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise CompareInputError(f"{path} line {number} has {len(row)} fields, the header has {len(header)}")
        if row[state_column] != "completed":
            n_not_completed += 1
            continue
        try:
            parameters.append([float(row[1 + i]) for i in range(len(names))])
        except ValueError:
            raise CompareInputError(
                f"{path} line {number}: parameters {row[1 : 1 + len(names)]} should be numbers"
            ) from None
        if row[bred_column] not in ("0", "1"):
            raise CompareInputError(f"{path} line {number}: bred is {row[bred_column]!r}, expected 0 or 1")
        bred.append(row[bred_column] == "1")
    if not parameters:
        raise CompareInputError(
            f"{path} has no completed simulation ({n_not_completed} rows in other states); did the run finish?"
        )
    return Simulations(np.asarray(parameters, dtype=np.float64), np.asarray(bred, dtype=bool), names, n_not_completed)


def read_summary(path: Path) -> tuple[float, float]:
    """The final validation MSE and the mean-field baseline from a ``summary.json``."""
    if not path.is_file():
        raise CompareInputError(f"{path} not found; `python -m jaxsurro.run` writes it when a run ends")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CompareInputError(f"{path} is not JSON: {exc}") from None
    values = []
    for key in ("final_validation_mse", "mean_field_validation_mse"):
        value = summary.get(key) if isinstance(summary, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CompareInputError(f"{path} field {key!r} should be a number, got {value!r}")
        values.append(float(value))
    return values[0], values[1]


def read_run(run_dir: Path) -> RunResult:
    """Simulations, validation curve and summary figures of one finished run directory."""
    if not run_dir.is_dir():
        raise CompareInputError(f"run directory {run_dir} does not exist; run without --from-runs to produce it")
    metrics_path = run_dir / plot.METRICS_FILE
    if not metrics_path.is_file():
        raise CompareInputError(f"{metrics_path} not found; is {run_dir} a run directory of `python -m jaxsurro.run`?")
    try:
        metrics = plot.parse_metrics(metrics_path.read_text(), str(metrics_path))
    except plot.PlotInputError as exc:
        raise CompareInputError(str(exc)) from None
    final, baseline = read_summary(run_dir / plot.SUMMARY_FILE)
    return RunResult(
        read_simulations(run_dir / "simulations.csv"), metrics.validation_batch, metrics.val_mse, final, baseline
    )


def validation_figure(runs: dict[str, RunResult]) -> Figure:
    """Validation MSE against batches for each run, log scale, with the mean-field baseline dashed."""
    figure = Figure(figsize=plot.FIGURE_SIZE, dpi=plot.DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.set(
        title="Validation MSE: Random against Breed (same budget and seeds)",
        xlabel="batch (training steps)",
        ylabel="validation MSE (normalized field units)",
    )
    axes.grid(True, alpha=0.3)
    for name, run in runs.items():
        axes.plot(
            run.validation_batch,
            run.val_mse,
            marker="o",
            markersize=3,
            color=COLORS[name],
            label=f"{name.capitalize()} (final {run.final_validation_mse:.3g})",
        )
    baselines = sorted({run.mean_field_mse for run in runs.values()})
    for baseline in baselines:  # one line: both runs share the cached validation set
        axes.axhline(baseline, color="gray", linestyle="--", label=f"mean-field baseline ({baseline:.3g})")
    if any(np.any(run.val_mse > 0) for run in runs.values()):
        axes.set_yscale("log")
    axes.legend()
    return figure


def _histograms(axes: Any, groups: dict[str, np.ndarray], bins: np.ndarray, title: str) -> None:
    """Overlaid, density-normalized histograms of each group with its mean as a vertical line."""
    for label, values in groups.items():
        color = COLORS[label.split()[0].lower()]
        if values.size == 0:
            axes.plot([], [], color=color, label=f"{label}: no points")
            continue
        mean = float(values.mean())
        axes.hist(
            values,
            bins=bins,
            density=True,
            alpha=0.45,
            color=color,
            label=f"{label} (n = {values.size}, mean {mean:.1f})",
        )
        axes.axvline(mean, color=color, linewidth=2, linestyle="--")
    axes.set(title=title, xlabel="parameter deviation: std of T0..T4 within a simulation (K)", ylabel="density")
    axes.grid(True, alpha=0.3)
    axes.legend(title="dashed: mean")


def deviation_figure(random_run: Simulations, breed_run: Simulations) -> Figure:
    """The Breed paper's Figure 4: (a) uniform against bred points of Breed, (b) Random against Breed."""
    random_deviation = parameter_deviation(random_run.parameters)
    breed_deviation = parameter_deviation(breed_run.parameters)
    top = max(random_deviation.max(), breed_deviation.max())
    bins = np.linspace(0.0, top * 1.02 if top > 0 else 1.0, N_BINS + 1)
    figure = Figure(figsize=(2 * plot.FIGURE_SIZE[0], plot.FIGURE_SIZE[1]), dpi=plot.DPI, layout="constrained")
    left, right = figure.subplots(1, 2, sharex=True)
    _histograms(
        left,
        {"uniform points": breed_deviation[~breed_run.bred], "bred points": breed_deviation[breed_run.bred]},
        bins,
        "(a) Breed run: uniform against bred",
    )
    _histograms(
        right, {"Random run": random_deviation, "Breed run": breed_deviation}, bins, "(b) Random run against Breed run"
    )
    figure.suptitle("Per-simulation parameter deviation (Breed paper, Figure 4)")
    return figure


def format_table(stats: DeviationStats, runs: dict[str, RunResult]) -> str:
    """The printed comparison: mean deviations, final validation MSEs and the baseline."""
    random_run, breed_run = runs["random"], runs["breed"]
    lines = [
        f"{'':40s}{'value':>12s}{'points':>8s}",
        f"{'mean deviation, Breed uniform points':40s}{stats.breed_uniform:12.2f}{stats.n_uniform:8d}",
        f"{'mean deviation, Breed bred points':40s}{stats.breed_bred:12.2f}{stats.n_bred:8d}",
        f"{'mean deviation, Random run':40s}{stats.random_all:12.2f}{len(random_run.simulations.bred):8d}",
        f"{'mean deviation, Breed run':40s}{stats.breed_all:12.2f}{len(breed_run.simulations.bred):8d}",
        f"{'final validation MSE, Random':40s}{random_run.final_validation_mse:12.4g}",
        f"{'final validation MSE, Breed':40s}{breed_run.final_validation_mse:12.4g}",
        f"{'mean-field baseline MSE':40s}{breed_run.mean_field_mse:12.4g}",
    ]
    left_out = {name: run.simulations.n_not_completed for name, run in runs.items() if run.simulations.n_not_completed}
    if left_out:
        lines.append(f"not completed, left out: {left_out}")
    return "\n".join(lines)


def draw(runs_dir: Path, out_dir: Path) -> tuple[DeviationStats, dict[str, RunResult], list[Path]]:
    """Reads ``runs_dir/random`` and ``runs_dir/breed`` and writes both figures into ``out_dir``."""
    runs = {name: read_run(runs_dir / name) for name in RUN_KINDS}
    if out_dir.exists() and not out_dir.is_dir():
        raise CompareInputError(f"output path {out_dir} exists and is not a directory; pass a directory to --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        VALIDATION_FIGURE: validation_figure(runs),
        DEVIATION_FIGURE: deviation_figure(runs["random"].simulations, runs["breed"].simulations),
    }
    paths = []
    for filename, figure in figures.items():
        path = out_dir / filename
        figure.savefig(path, format="png")
        paths.append(path)
    return deviation_stats(runs["random"].simulations, runs["breed"].simulations), runs, paths


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so the run's clean-up cancels every simulation job."""
    raise SystemExit(128 + signum)


def run_both(config_path: Path, overrides: Sequence[str], runs_dir: Path) -> None:
    """Runs the Random and the Breed study into ``runs_dir/random`` and ``runs_dir/breed``."""
    from jaxsurro.run import run  # JAX loads only when studies run, not to redraw
    from jaxsurro.rundir import console_logging

    configs = {name: load_config(config_path, [*overrides, f"sampler.kind={kind}"]) for name, kind in RUN_KINDS.items()}
    taken = [runs_dir / name for name in RUN_KINDS if (runs_dir / name).exists()]
    if taken:
        raise CompareInputError(
            f"{', '.join(map(str, taken))} already exist(s); remove them, pass another "
            "--runs-dir, or redraw their figures with --from-runs"
        )
    console_logging()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    for name, config in configs.items():
        print(
            f"[compare_breed] {name}: sampler.kind = {config.sampler.kind}, "
            f"{config.study.n_simulations} simulations -> {runs_dir / name}",
            flush=True,
        )
        _, summary = run(config, run_dir=runs_dir / name, show_progress=False)
        assert summary is not None  # a single process is server rank 0
        print(
            f"[compare_breed] {name}: validation MSE {summary['final_validation_mse']:.4g}, "
            f"{summary['simulations_finished']}/{summary['simulations_planned']} simulations, "
            f"{summary['wall_time_s']:.0f} s",
            flush=True,
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python scripts/compare_breed.py", description=__doc__.splitlines()[0])
    add_config_arguments(parser, "experiment TOML file; sampler.kind is set for each run", default=DEFAULT_CONFIG)
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=DEFAULT_RUNS_DIR,
        help=f"the runs go to RUNS_DIR/random and RUNS_DIR/breed (default {DEFAULT_RUNS_DIR})",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where the PNG files go (default {DEFAULT_OUT})")
    parser.add_argument(
        "--from-runs",
        action="store_true",
        help="run nothing: redraw the figures and the table from the existing run directories",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs both studies (unless --from-runs), draws the figures and prints the table; 2 on bad inputs."""
    args = parse_args(argv)
    try:
        if not args.from_runs:
            run_both(args.config, args.overrides, args.runs_dir)
        stats, runs, paths = draw(args.runs_dir, args.out)
    except (ConfigError, CompareInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[compare_breed] interrupted: every simulation job was cancelled", file=sys.stderr)
        return 130
    print(format_table(stats, runs))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
