"""Breed against Random over several seeds, with a hard test set: the Breed paper's comparison, reproduced small.

For each seed of ``--seeds`` (default 0 1 2) it runs the experiment (default experiments/heat_breed.toml:
the Breed paper's Table 1 hyperparameters with the period and window scaled to the study) twice through
``jaxsurro.run.run``: ``sampler.kind = "uniform"`` (Random) and ``"breed"``, with ``study.seed`` = the seed;
nothing else differs (the same budget of simulations, the same first uniform draws). Then it scores:

- the uniform validation set (the run's own, cached, uniform over the parameter box): the final and the
  minimum validation MSE of each run, and the MSE at an equal number of batches (the last validation
  record at or below the batch count of the run that trained fewer, so that a slower run is not blamed
  for training less);
- a hard test set: ``--hard`` simulations of the highest parameter deviation (the standard deviation of
  T0..T4 within a simulation, the quantity of the paper's Figure 4: sharp contrasts between the initial
  and the boundary temperatures) among ``--pool`` uniform draws of a fixed seed, solved here with
  ``solvers/heat.py`` and scored exactly as a run scores its validation set (normalized units);
- the generalization gap, validation MSE minus training loss, over batches;
- the paper's Figure 4 histograms (parameter deviation of the points each run trained on, pooled over
  seeds).

It writes ``breed_seeds.png`` (validation curves and gaps), ``breed_deviation.png`` (Figure 4) and
``breed_table.md`` into ``--out`` and prints the table. Sizes: any ``--set`` override (up to
``--config experiments/heat_paper.toml``, the papers' own); the default finishes in about 15 minutes on
a 2-core machine.

Usage: python scripts/reproduce_breed.py [--config experiments/heat_breed.toml] [--set KEY=VALUE ...]
       [--seeds 0 1 2] [--runs-dir runs/reproduce-breed] [--out docs/results] [--from-runs]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from compare_breed import (  # noqa: E402  (scripts/compare_breed.py: reading runs, Figure 4)
    CompareInputError,
    Simulations,
    deviation_figure,
    exit_on_sigterm,
    parameter_deviation,
    read_simulations,
)

from jaxsurro import plot  # noqa: E402
from jaxsurro.config import Config, ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = ROOT / "experiments/heat_breed.toml"
RUN_KINDS = {"random": "uniform", "breed": "breed"}  # run name -> sampler.kind
HARD_SEED = 20231112  # the hard test set's draws: fixed, independent of every run's seed
COLORS = {"random": "tab:red", "breed": "tab:blue"}


class RunScores(NamedTuple):
    """What one run scores."""

    batches: int
    samples_per_s: float
    final_mse: float
    min_mse: float
    mse_at: float  # at the comparison's equal batch count
    hard_mse: float
    gap_final: float  # validation MSE - training loss at the last validation record
    validation_batch: np.ndarray
    val_mse: np.ndarray
    gap: np.ndarray  # validation MSE - training loss at each validation record
    simulations: Simulations


def hard_test_set(config: Config, pool: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """``keep`` of ``pool`` uniform parameter draws with the highest parameter deviation, and their
    solver trajectories as (inputs [keep·T, d+1], targets [keep·T, sample_size] float32)."""
    from solvers.heat import simulate

    solver = config.solver
    low, high = np.asarray(solver.low), np.asarray(solver.high)
    draws = np.random.default_rng(HARD_SEED).uniform(low, high, size=(pool, len(low)))
    chosen = draws[np.argsort(parameter_deviation(draws))[-keep:]]
    times = (np.arange(solver.n_steps) + 1) * solver.dt
    inputs = np.concatenate([np.column_stack([np.repeat(p[None], solver.n_steps, 0), times]) for p in chosen]).astype(
        np.float32
    )
    targets = np.concatenate(
        [
            np.stack([field.reshape(-1) for field in simulate(p, solver.grid_size, solver.n_steps, solver.dt)])
            for p in chosen
        ]
    ).astype(np.float32)
    return inputs, targets


def score_hard(run_dir: Path, inputs: np.ndarray, targets: np.ndarray) -> float:
    """The run's surrogate on the hard test set, scored as the run scores its validation set."""
    from jaxsurro import surrogate
    from jaxsurro.server.evaluation import validation_mse

    model = surrogate.load(run_dir)
    config = load_config(run_dir / "config.toml")
    weights = [field.weight for field in config.solver.fields]
    return validation_mse(model.model, model.params, inputs, targets, weights)


def read_scores(run_dir: Path, hard: tuple[np.ndarray, np.ndarray]) -> RunScores:
    """Scores of one finished run (``mse_at`` is set later, once both runs of a seed are read)."""
    summary = json.loads((run_dir / plot.SUMMARY_FILE).read_text())
    metrics = plot.parse_metrics((run_dir / plot.METRICS_FILE).read_text(), str(run_dir / plot.METRICS_FILE))
    finite = np.isfinite(metrics.train_loss)
    train_at_validation = np.interp(metrics.validation_batch, metrics.batch[finite], metrics.train_loss[finite])
    gap = metrics.val_mse - train_at_validation
    return RunScores(
        batches=int(summary["batches"]),
        samples_per_s=float(summary["samples_trained"]) / max(float(summary["wall_time_s"]), 1e-9),
        final_mse=float(summary["final_validation_mse"]),
        min_mse=float(summary.get("min_validation_mse", np.min(metrics.val_mse))),
        mse_at=float("nan"),
        hard_mse=score_hard(run_dir, *hard),
        gap_final=float(gap[-1]),
        validation_batch=metrics.validation_batch,
        val_mse=metrics.val_mse,
        gap=gap,
        simulations=read_simulations(run_dir / "simulations.csv"),
    )


def at_equal_batches(scores: dict[str, RunScores]) -> dict[str, RunScores]:
    """Each run's validation MSE at the last record at or below the smaller final batch count."""
    equal = min(s.batches for s in scores.values())
    out = {}
    for name, s in scores.items():
        index = np.flatnonzero(s.validation_batch <= equal)
        out[name] = s._replace(mse_at=float(s.val_mse[index[-1]]) if index.size else float("nan"))
    return out


def run_seeds(config_path: Path, overrides: Sequence[str], seeds: Sequence[int], runs_dir: Path) -> None:
    """Every (seed, kind) run into ``runs_dir/seed<k>/<kind>``; existing ones are refused."""
    from jaxsurro.run import run
    from jaxsurro.rundir import console_logging

    unfinished = [
        runs_dir / f"seed{s}" / k
        for s in seeds
        for k in RUN_KINDS
        if (runs_dir / f"seed{s}" / k).exists() and not (runs_dir / f"seed{s}" / k / plot.SUMMARY_FILE).is_file()
    ]
    if unfinished:
        raise CompareInputError(f"{unfinished[0]} holds an unfinished run; remove it or pass another --runs-dir")
    console_logging()
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # unwinds like Ctrl-C: every simulation job is cancelled
    for seed in seeds:
        for name, kind in RUN_KINDS.items():
            config = load_config(config_path, [*overrides, f"sampler.kind={kind}", f"study.seed={seed}"])
            target = runs_dir / f"seed{seed}" / name
            if (target / plot.SUMMARY_FILE).is_file():  # finished before: reused, so an interrupted script resumes
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            print(f"[reproduce_breed] seed {seed} {name}: {config.study.n_simulations} simulations -> {target}")
            _, summary = run(config, run_dir=target, show_progress=False)
            print(
                f"[reproduce_breed] seed {seed} {name}: final validation MSE {summary['final_validation_mse']:.4g}, "
                f"{summary['batches']} batches, {summary['wall_time_s']:.0f} s",
                flush=True,
            )


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (ddof 1) of the seeds' values."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {spread:.2g}"


def table(results: dict[int, dict[str, RunScores]]) -> str:
    """The markdown table: each metric as mean ± std over seeds, per run kind."""
    rows = [
        ("validation MSE, final (uniform set)", "final_mse"),
        ("validation MSE, minimum (uniform set)", "min_mse"),
        ("validation MSE at equal batches (uniform set)", "mse_at"),
        ("hard test set MSE (final model)", "hard_mse"),
        ("generalization gap at the end (val − train)", "gap_final"),
        ("batches trained", "batches"),
        ("samples trained per second", "samples_per_s"),
    ]
    lines = ["| metric | Random | Breed |", "| --- | --- | --- |"]
    for label, key in rows:
        cells = [mean_std([getattr(r[name], key) for r in results.values()]) for name in RUN_KINDS]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    deviations = {
        name: statistics.fmean(
            float(parameter_deviation(r[name].simulations.parameters).mean()) for r in results.values()
        )
        for name in RUN_KINDS
    }
    lines.append(
        f"| mean parameter deviation of the trained points (K) | {deviations['random']:.1f} | "
        f"{deviations['breed']:.1f} |"
    )
    wins = sum(r["breed"].hard_mse < r["random"].hard_mse for r in results.values())
    lines.append("")
    lines.append(
        f"Seeds: {', '.join(map(str, results))}. Breed below Random on the hard set in {wins} of {len(results)}."
    )
    return "\n".join(lines)


def curves_figure(results: dict[int, dict[str, RunScores]]) -> Figure:
    """Validation MSE and generalization gap against batches, one line per (seed, kind)."""
    figure = Figure(figsize=(2 * plot.FIGURE_SIZE[0], plot.FIGURE_SIZE[1]), dpi=plot.DPI, layout="constrained")
    left, right = figure.subplots(1, 2, sharex=True)
    for seed, runs in results.items():
        for name, s in runs.items():
            label = f"{name.capitalize()}" if seed == min(results) else None
            left.plot(s.validation_batch, s.val_mse, color=COLORS[name], alpha=0.7, label=label)
            right.plot(s.validation_batch, s.gap, color=COLORS[name], alpha=0.7, label=label)
    left.set(title="Validation MSE (uniform set)", xlabel="batch", ylabel="MSE (normalized)", yscale="log")
    right.set(title="Generalization gap: validation − training loss", xlabel="batch", ylabel="gap (normalized)")
    right.axhline(0.0, color="gray", linewidth=0.8)
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(f"Random against Breed, seeds {', '.join(map(str, results))}")
    return figure


def pooled(results: dict[int, dict[str, RunScores]], name: str) -> Simulations:
    """One run kind's trained points over every seed."""
    parts = [r[name].simulations for r in results.values()]
    return Simulations(
        np.concatenate([p.parameters for p in parts]),
        np.concatenate([p.bred for p in parts]),
        parts[0].names,
        sum(p.n_not_completed for p in parts),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python scripts/reproduce_breed.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pool", type=int, default=400, help="uniform draws the hard test set is chosen from")
    parser.add_argument("--hard", type=int, default=40, help="simulations in the hard test set")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs/reproduce-breed")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    parser.add_argument("--from-runs", action="store_true", help="run nothing: score the existing runs")
    args = parser.parse_args(argv)
    if len(args.seeds) < 1 or not 1 <= args.hard <= args.pool:
        parser.error("give at least one seed and 1 <= --hard <= --pool")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if not args.from_runs:
            run_seeds(args.config, args.overrides, args.seeds, args.runs_dir)
        hard = hard_test_set(config, args.pool, args.hard)
        results = {
            seed: at_equal_batches(
                {name: read_scores(args.runs_dir / f"seed{seed}" / name, hard) for name in RUN_KINDS}
            )
            for seed in args.seeds
        }
    except (ConfigError, CompareInputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    curves_figure(results).savefig(args.out / "breed_seeds.png")
    deviation_figure(pooled(results, "random"), pooled(results, "breed")).savefig(args.out / "breed_deviation.png")
    text = table(results)
    (args.out / "breed_table.md").write_text(text + "\n")
    print(text)
    for seed, runs in results.items():
        print(
            f"seed {seed}: hard set Random {runs['random'].hard_mse:.4g} Breed {runs['breed'].hard_mse:.4g}; "
            f"uniform final Random {runs['random'].final_mse:.4g} Breed {runs['breed'].final_mse:.4g}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
