"""Breed against Random over several seeds, with a hard test set: the Breed paper's comparison, reproduced small.

For each seed of ``--seeds`` (default 0 1 2) it runs the experiment (default experiments/heat_breed.toml:
the Breed paper's Table 1 hyperparameters with the period and window scaled to the study) twice through
``jaxsurro.run.run``: ``sampler.kind = "uniform"`` (Random) and ``"breed"``, with ``study.seed`` = the seed;
nothing else differs (the same budget of simulations, the same first uniform draws). Then it scores:

- the uniform validation set (the run's own, cached, uniform over the parameter box): the final and the
  minimum validation MSE of each run, and the MSE at an equal number of batches (the last validation
  record at or below the batch count of the run that trained fewer, so that a slower run is not blamed
  for training less);
- two hard test sets, each ``--hard`` of ``--pool`` uniform draws of a fixed seed, solved here with
  ``solvers/heat.py`` and scored exactly as a run scores its validation set (normalized units): the
  *parameter* hard set, the draws of highest parameter deviation (the standard deviation of T0..T4
  within a simulation, the quantity of the paper's Figure 4: sharp contrasts between the initial and
  the boundary temperatures), and the *loss* hard set, the draws of highest Breed score Q (mean excess
  loss over the simulation's steps, ``core.breed``'s δ with the pool as one batch) under the Random
  runs' final models: what a network trained on uniform draws finds hard;
- why: the share of each run's simulations in the parameter hard region, and how well its ensemble
  covers each hard set (mean distance from a hard-set point to the nearest simulation, unit cube);
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

import jax
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
    hard_mse: float  # on the parameter-deviation hard set
    loss_hard_mse: float  # on the loss hard set (highest Breed score under the Random models)
    gap_final: float  # validation MSE - training loss at the last validation record
    validation_batch: np.ndarray
    val_mse: np.ndarray
    gap: np.ndarray  # validation MSE - training loss at each validation record
    simulations: Simulations
    hard_region_share: float  # share of the run's simulations as deviant as the parameter hard set
    parameter_hard_distance: float  # mean distance of a parameter hard set point to the nearest simulation
    loss_hard_distance: float  # the same for the loss hard set


class Pool(NamedTuple):
    """``pool`` uniform parameter draws of a fixed seed and their solver trajectories (rows sim-major)."""

    parameters: np.ndarray  # [P, d]
    low: np.ndarray  # [d]
    high: np.ndarray  # [d]
    inputs: np.ndarray  # [P·T, d+1] float32: parameters and time
    targets: np.ndarray  # [P·T, sample_size] float32
    n_steps: int


class HardSets(NamedTuple):
    """The two hard test sets, as indices into the pool: by parameter deviation, and by Breed's loss score."""

    parameter: np.ndarray  # [keep] int
    loss: np.ndarray  # [keep] int
    deviation_threshold: float  # K: the lowest parameter deviation in the parameter hard set


def solve_pool(config: Config, pool: int) -> Pool:
    """``pool`` uniform draws (seed HARD_SEED, independent of every run) solved by ``solvers/heat.py``."""
    from solvers.heat import simulate

    solver = config.solver
    low, high = np.asarray(solver.low), np.asarray(solver.high)
    draws = np.random.default_rng(HARD_SEED).uniform(low, high, size=(pool, len(low)))
    times = (np.arange(solver.n_steps) + 1) * solver.dt
    inputs = np.concatenate([np.column_stack([np.repeat(p[None], solver.n_steps, 0), times]) for p in draws])
    targets = np.concatenate(
        [
            np.stack([field.reshape(-1) for field in simulate(p, solver.grid_size, solver.n_steps, solver.dt)])
            for p in draws
        ]
    )
    return Pool(draws, low, high, inputs.astype(np.float32), targets.astype(np.float32), solver.n_steps)


def pool_losses(run_dir: Path, pool: Pool) -> np.ndarray:
    """The run's surrogate's loss on every row of the pool, [P, T], in the units of its validation MSE
    (the mean over a set's rows is that set's validation MSE)."""
    from jaxsurro import surrogate
    from jaxsurro.core.train import Batch, make_eval_step
    from jaxsurro.server.evaluation import EVAL_CHUNK_ROWS
    from jaxsurro.server.parallel import jit_eval_step, make_data_mesh, put_batch

    model = surrogate.load(run_dir)
    config = load_config(run_dir / "config.toml")
    mesh = make_data_mesh()
    step = jit_eval_step(make_eval_step(model.model, [field.weight for field in config.solver.fields]), mesh)
    losses = []
    for start in range(0, len(pool.inputs), EVAL_CHUNK_ROWS):
        stop = min(start + EVAL_CHUNK_ROWS, len(pool.inputs))
        chunk = Batch(pool.inputs[start:stop], pool.targets[start:stop], np.ones(stop - start, dtype=np.float32))
        per_sample = jax.device_get(step(model.params, put_batch(chunk, mesh, min_size=EVAL_CHUNK_ROWS))[0])
        losses.append(np.asarray(per_sample)[: stop - start])
    return np.concatenate(losses).reshape(-1, pool.n_steps)


def breed_scores(losses: np.ndarray) -> np.ndarray:
    """Breed's score Q of each pool simulation [P] from its losses [P, T]: δ = max(l − μ, 0)/σ over all rows
    (core.breed.update_loss_stats with the pool as one batch), averaged over the simulation's steps."""
    delta = np.maximum(losses - losses.mean(), 0.0) / max(float(losses.std()), 1e-30)
    return delta.mean(axis=1)


def hard_sets(pool: Pool, keep: int, reference_losses: Sequence[np.ndarray]) -> HardSets:
    """The ``keep`` pool simulations of highest parameter deviation, and the ``keep`` of highest Breed
    score Q under the reference (Random) runs' final models (their pool losses), averaged over them:
    what a network trained on uniform draws finds hard, the region Breed is meant to move the ensemble to."""
    deviation = parameter_deviation(pool.parameters)
    by_deviation = np.argsort(deviation)[-keep:]
    by_loss = np.argsort(np.mean([breed_scores(losses) for losses in reference_losses], axis=0))[-keep:]
    return HardSets(by_deviation, by_loss, float(deviation[by_deviation].min()))


def nearest_distance(points: np.ndarray, simulations: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    """Mean over ``points`` of the distance to the nearest of ``simulations``, in the unit cube: how well a
    run's ensemble covers a test set (the same budget spread wider covers it better)."""
    span = high - low
    a, b = (points - low) / span, (simulations - low) / span
    return float(np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1).mean())


def read_scores(run_dir: Path, pool: Pool, hard: HardSets, losses: np.ndarray) -> RunScores:
    """Scores of one finished run, ``losses`` its pool losses (``mse_at`` is set later, once both runs of a
    seed are read)."""
    summary = json.loads((run_dir / plot.SUMMARY_FILE).read_text())
    metrics = plot.parse_metrics((run_dir / plot.METRICS_FILE).read_text(), str(run_dir / plot.METRICS_FILE))
    finite = np.isfinite(metrics.train_loss)
    train_at_validation = np.interp(metrics.validation_batch, metrics.batch[finite], metrics.train_loss[finite])
    gap = metrics.val_mse - train_at_validation
    simulations = read_simulations(run_dir / "simulations.csv")
    return RunScores(
        batches=int(summary["batches"]),
        samples_per_s=float(summary["samples_trained"]) / max(float(summary["wall_time_s"]), 1e-9),
        final_mse=float(summary["final_validation_mse"]),
        min_mse=float(summary.get("min_validation_mse", np.min(metrics.val_mse))),
        mse_at=float("nan"),
        hard_mse=float(losses[hard.parameter].mean()),
        loss_hard_mse=float(losses[hard.loss].mean()),
        gap_final=float(gap[-1]),
        validation_batch=metrics.validation_batch,
        val_mse=metrics.val_mse,
        gap=gap,
        simulations=simulations,
        hard_region_share=float(np.mean(parameter_deviation(simulations.parameters) >= hard.deviation_threshold)),
        parameter_hard_distance=nearest_distance(
            pool.parameters[hard.parameter], simulations.parameters, pool.low, pool.high
        ),
        loss_hard_distance=nearest_distance(pool.parameters[hard.loss], simulations.parameters, pool.low, pool.high),
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
        ("hard test set MSE, parameter deviation (final model)", "hard_mse"),
        ("hard test set MSE, loss score (final model)", "loss_hard_mse"),
        ("share of simulations in the parameter hard region", "hard_region_share"),
        ("parameter hard set: distance to the nearest simulation (unit cube)", "parameter_hard_distance"),
        ("loss hard set: distance to the nearest simulation (unit cube)", "loss_hard_distance"),
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
    loss_wins = sum(r["breed"].loss_hard_mse < r["random"].loss_hard_mse for r in results.values())
    lines.append("")
    lines.append(
        f"Seeds: {', '.join(map(str, results))}. Breed below Random on the parameter hard set in {wins} of "
        f"{len(results)}, on the loss hard set in {loss_wins} of {len(results)}."
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
        pool = solve_pool(config, args.pool)
        runs = {(seed, name): args.runs_dir / f"seed{seed}" / name for seed in args.seeds for name in RUN_KINDS}
        losses = {key: pool_losses(run_dir, pool) for key, run_dir in runs.items()}  # each surrogate once
        hard = hard_sets(pool, args.hard, [losses[seed, "random"] for seed in args.seeds])
        results = {
            seed: at_equal_batches(
                {name: read_scores(runs[seed, name], pool, hard, losses[seed, name]) for name in RUN_KINDS}
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
            f"seed {seed}: parameter hard set Random {runs['random'].hard_mse:.4g} Breed {runs['breed'].hard_mse:.4g}; "
            f"loss hard set Random {runs['random'].loss_hard_mse:.4g} Breed {runs['breed'].loss_hard_mse:.4g}; "
            f"uniform final Random {runs['random'].final_mse:.4g} Breed {runs['breed'].final_mse:.4g}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
