"""``python -m jaxsurro.predict RUN_DIR``: the trained surrogate's fields, or its validation error.

    python -m jaxsurro.predict runs/heat-... --parameters 300 100 500 200 400 --time 0.1 0.5
    python -m jaxsurro.predict runs/heat-... --parameters 300 100 500 200 400 --step 0 49 --out pred/
    python -m jaxsurro.predict runs/heat-... --validation      # MSE on the run's cached validation set

Predictions are written as ``<out>/<field>.npy`` arrays ``[parameter sets, times, *field shape]``
in physical units; ``--parameters`` may be repeated for several parameter sets.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxsurro import rundir, surrogate
from jaxsurro.config import ConfigError, load_config
from jaxsurro.server import validation as validation_cache
from jaxsurro.server.evaluation import validation_mse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxsurro.predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by python -m jaxsurro.run")
    parser.add_argument(
        "--parameters",
        type=float,
        nargs="+",
        action="append",
        metavar="VALUE",
        help="one parameter set, in the experiment's order; repeatable",
    )
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--time", type=float, nargs="+", help="physical times to predict")
    when.add_argument("--step", type=int, nargs="+", help="0-based time steps to predict (time (t + 1) * dt)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for <field>.npy (default: here)")
    parser.add_argument(
        "--validation", action="store_true", help="print the validation MSE on the run's cached validation set instead"
    )
    args = parser.parse_args(argv)
    try:
        model = surrogate.load(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.validation:
        return _report_validation(args.run_dir, model)
    if not args.parameters:
        parser.error("give --parameters (repeatable) with --time or --step, or --validation")
    try:
        times = model.step_times(args.step) if args.step is not None else np.asarray(args.time or model.step_times())
        fields = model.predict(np.asarray(args.parameters), times)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name, values in fields.items():
        path = args.out / f"{name}.npy"
        np.save(path, values)
        print(f"{path}: {name} {list(values.shape)} (parameter sets, times, *shape)")
    return 0


def _report_validation(run_dir: Path, model: surrogate.Surrogate) -> int:
    try:
        config = load_config(run_dir / rundir.CONFIG)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    validation = validation_cache.load_cached(config)
    if validation is None:
        print(
            f"error: the validation set of {run_dir} is not in the cache ({validation_cache.cache_path(config)}); "
            "run the study again to produce it",
            file=sys.stderr,
        )
        return 1
    mse = validation_mse(
        model.model,
        model.params,
        validation.inputs(config.solver.dt),
        validation.targets(),
        [f.weight for f in config.solver.fields],
    )
    line = f"validation MSE {mse:.9g}"
    summary_path = run_dir / rundir.SUMMARY
    if summary_path.is_file():
        reported = json.loads(summary_path.read_text()).get("final_validation_mse")
        if reported is not None:
            line += f" (summary.json: {reported:.9g}, difference {abs(mse - reported):.3g})"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
