"""The SC23 paper's Tables 1 and 2, reproduced small: online buffers against offline training, over seeds.

Table 1 analogue (the paper: Offline 83.1, FIFO 391, FIRO 135, Reservoir 80.3 minimum validation MSE):
on the same simulations (the experiment's plan, ``study.seed`` = each seed of ``--seeds``), one epoch of
offline training (``study.mode = "offline"``: the ensemble is written to disk, then read in shuffled
batches) against online training with each buffer (``buffer.kind`` = fifo, firo, reservoir). Reported:
minimum and final validation MSE (mean ± std over seeds), batches, samples trained per second and
repetitions (samples trained per unique sample). One more row separates the two causes of a difference,
the order of the data and the number of batches: offline training on the same simulations for as many
epochs as it takes to match the Reservoir's batch count.

Table 2 analogue (the paper: 13.2 online against 25.1 offline, −47 %): offline training over many
epochs of a fixed dataset of ``n / --ratio`` simulations against the online Reservoir run on all ``n``
(``--ratio`` = 10: ten times the unique data), at an equal number of batches (the offline run takes
``ceil(B / batches per epoch)`` epochs, B the online run's batch count; both counts are reported).
Reported: final and minimum validation MSE and the relative change online vs offline, mean ± std over
seeds, and the validation curves against batches.

Every run goes through ``jaxsurro.run.run`` with the experiment file (default experiments/heat.toml)
and the ``--set`` overrides; only the keys above differ. Writes ``sc23_table1.md``, ``sc23_table2.md``,
``sc23_table1.png`` and ``sc23_table2.png`` into ``--out``. The default size finishes in about 10
minutes on a 2-core machine; ``--config experiments/heat_paper.toml`` is the papers' own size.

Usage: python scripts/reproduce_sc23.py [--config experiments/heat.toml] [--set KEY=VALUE ...]
       [--seeds 0 1 2] [--ratio 10] [--runs-dir runs/reproduce-sc23] [--out docs/results] [--from-runs]
"""

from __future__ import annotations

import argparse
import json
import math
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

from compare_breed import exit_on_sigterm  # noqa: E402

from jaxsurro import plot  # noqa: E402
from jaxsurro.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = ROOT / "experiments/heat.toml"
# Table 1's variants: run name -> overrides.
TABLE1 = {
    "offline": ["study.mode='offline'", "study.epochs=1"],
    "fifo": ["buffer.kind='fifo'"],
    "firo": ["buffer.kind='firo'"],
    "reservoir": ["buffer.kind='reservoir'"],
}
COLORS = {
    "matched": "tab:purple",
    "offline": "black",
    "fifo": "tab:orange",
    "firo": "tab:green",
    "reservoir": "tab:blue",
    "small": "gray",
}


class RunResult(NamedTuple):
    """What the tables read from one finished run."""

    final_mse: float
    min_mse: float
    batches: int
    samples_per_s: float
    repetitions: float  # samples trained per unique sample
    unique: int
    validation_batch: np.ndarray
    val_mse: np.ndarray


def read_run(run_dir: Path) -> RunResult:
    """The summary figures and the validation curve of one run directory."""
    if not (run_dir / plot.SUMMARY_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / plot.SUMMARY_FILE} not found: run without --from-runs to produce it")
    summary = json.loads((run_dir / plot.SUMMARY_FILE).read_text())
    metrics = plot.parse_metrics((run_dir / plot.METRICS_FILE).read_text(), str(run_dir / plot.METRICS_FILE))
    unique = int(summary.get("dataset_samples") or summary["unique_samples_received"])
    trained = float(summary["samples_trained"])
    phase = summary.get("training_phase_s") or summary["wall_time_s"]
    return RunResult(
        final_mse=float(summary["final_validation_mse"]),
        min_mse=float(summary["min_validation_mse"]),
        batches=int(summary["batches"]),
        samples_per_s=trained / max(float(phase), 1e-9),
        repetitions=trained / max(unique, 1),
        unique=unique,
        validation_batch=metrics.validation_batch,
        val_mse=metrics.val_mse,
    )


def batches_per_epoch(n_samples: int, batch_size: int) -> int:
    """Offline mode's batches per pass: the last one short rather than dropped."""
    return math.ceil(n_samples / batch_size)


def run_all(args: argparse.Namespace) -> None:
    """Table 1's four runs and Table 2's offline run for every seed, into ``runs_dir/seed<k>/<name>``."""
    from jaxsurro.run import run
    from jaxsurro.rundir import console_logging

    console_logging()
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # unwinds like Ctrl-C: every simulation job is cancelled

    def one(seed: int, name: str, overrides: list[str]) -> dict:
        target = args.runs_dir / f"seed{seed}" / name
        if (target / plot.SUMMARY_FILE).is_file():  # finished before: reused, so an interrupted script resumes
            return json.loads((target / plot.SUMMARY_FILE).read_text())
        if target.exists():
            raise FileExistsError(f"{target} holds an unfinished run; remove it or pass another --runs-dir")
        target.parent.mkdir(parents=True, exist_ok=True)
        config = load_config(args.config, [*args.overrides, f"study.seed={seed}", *overrides])
        _, summary = run(config, run_dir=target, show_progress=False)
        print(
            f"[reproduce_sc23] seed {seed} {name}: {summary['batches']} batches, final validation MSE "
            f"{summary['final_validation_mse']:.4g}, {summary['wall_time_s']:.0f} s",
            flush=True,
        )
        return summary

    base = load_config(args.config, args.overrides)
    small = max(1, base.study.n_simulations // args.ratio)
    per_epoch = batches_per_epoch(small * base.solver.n_steps, base.train.batch_size)
    per_epoch_all = batches_per_epoch(base.study.n_simulations * base.solver.n_steps, base.train.batch_size)
    for seed in args.seeds:
        for name, overrides in TABLE1.items():
            summary = one(seed, name, overrides)
        batches = summary["batches"]  # the Reservoir run is the last of TABLE1
        one(seed, "matched", ["study.mode='offline'", f"study.epochs={math.ceil(batches / per_epoch_all)}"])
        epochs = math.ceil(batches / per_epoch)
        one(seed, "small", ["study.mode='offline'", f"study.epochs={epochs}", f"study.n_simulations={small}"])


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` (ddof 1) over the seeds."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}g} ± {spread:.2g}"


def table1(results: dict[int, dict[str, RunResult]]) -> str:
    names = {
        "offline": "Offline (1 epoch)",
        "fifo": "FIFO",
        "firo": "FIRO",
        "reservoir": "Reservoir",
        "matched": "Offline, epochs to the Reservoir's batches",
    }
    lines = [
        "| method | min validation MSE | final validation MSE | batches | samples/s | repetitions |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in names.items():
        runs = [r[key] for r in results.values()]
        lines.append(
            f"| {label} | {mean_std([r.min_mse for r in runs])} | {mean_std([r.final_mse for r in runs])} | "
            f"{mean_std([r.batches for r in runs], 4)} | {mean_std([r.samples_per_s for r in runs])} | "
            f"{mean_std([r.repetitions for r in runs])} |"
        )
    lines += ["", f"Seeds: {', '.join(map(str, results))}; mean ± standard deviation over seeds."]
    return "\n".join(lines)


def table2(results: dict[int, dict[str, RunResult]], ratio: int) -> str:
    online = [r["reservoir"] for r in results.values()]
    offline = [r["small"] for r in results.values()]
    change_final = [100 * (a.final_mse - b.final_mse) / b.final_mse for a, b in zip(online, offline, strict=True)]
    change_min = [100 * (a.min_mse - b.min_mse) / b.min_mse for a, b in zip(online, offline, strict=True)]
    lines = [
        "| method | unique samples | batches | final validation MSE | min validation MSE |",
        "| --- | --- | --- | --- | --- |",
        f"| Offline, many epochs | {mean_std([r.unique for r in offline], 4)} | "
        f"{mean_std([r.batches for r in offline], 4)} | {mean_std([r.final_mse for r in offline])} | "
        f"{mean_std([r.min_mse for r in offline])} |",
        f"| Online Reservoir ({ratio}× the data) | {mean_std([r.unique for r in online], 4)} | "
        f"{mean_std([r.batches for r in online], 4)} | {mean_std([r.final_mse for r in online])} | "
        f"{mean_std([r.min_mse for r in online])} |",
        "",
        f"Relative change online vs offline: final validation MSE {mean_std(change_final)} %, "
        f"minimum {mean_std(change_min)} % (the paper: −47 %). Seeds: {', '.join(map(str, results))}.",
    ]
    return "\n".join(lines)


def curves(results: dict[int, dict[str, RunResult]], names: Sequence[str], title: str) -> Figure:
    """Validation MSE against batches, one line per (seed, run)."""
    figure = Figure(figsize=plot.FIGURE_SIZE, dpi=plot.DPI, layout="constrained")
    axes = figure.add_subplot()
    for seed, runs in results.items():
        for name in names:
            run = runs[name]
            label = name if seed == min(results) else None
            axes.plot(run.validation_batch, run.val_mse, color=COLORS[name], alpha=0.7, label=label)
    axes.set(title=title, xlabel="batch", ylabel="validation MSE (normalized)", yscale="log")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return figure


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python scripts/reproduce_sc23.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratio", type=int, default=10, help="online's unique data over Table 2's offline dataset")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs/reproduce-sc23")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    parser.add_argument("--from-runs", action="store_true", help="run nothing: tabulate the existing runs")
    args = parser.parse_args(argv)
    if args.ratio < 1:
        parser.error("--ratio must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.from_runs:
            run_all(args)
        names = [*TABLE1, "matched", "small"]
        results = {
            seed: {name: read_run(args.runs_dir / f"seed{seed}" / name) for name in names} for seed in args.seeds
        }
    except (ConfigError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    first = table1(results)
    second = table2(results, args.ratio)
    (args.out / "sc23_table1.md").write_text(first + "\n")
    (args.out / "sc23_table2.md").write_text(second + "\n")
    curves(results, [*TABLE1, "matched"], "Table 1: offline and the online buffers").savefig(
        args.out / "sc23_table1.png"
    )
    curves(
        results, ["small", "reservoir"], f"Table 2: offline many epochs vs online on {args.ratio}× the data"
    ).savefig(args.out / "sc23_table2.png")
    print(first, second, sep="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
