"""Benchmark one implicit-Euler heat step (solvers/heat.py) against a prefactored scipy splu solve.

For each grid size M, both sides compute the same step from the same field: the right-hand side
assembly (u + dt alpha b) is inside the timing for both; the LU factorisation is outside. Reports the
median time per step, the ratio ours/splu (target <= 1.0), the other sine-transform variant for
reference, the amortised per-step cost of simulate() (which iterates in sine space), and the
largest relative difference between the two fields. Exits 1 if the fields disagree beyond 1e-10.
splu uses the symmetric minimum-degree ordering (MMD_AT_PLUS_A): measured here its solve is 1.9x
(M = 64) to 2.7x (M = 255) faster than with scipy's default COLAMD, so it is the stronger reference.

Usage: python scripts/bench_heat.py [--sizes 64 255] [--budget 0.25]
"""

import os

# Before numpy loads BLAS: one thread, as solvers/heat.py uses when run as a script (ensemble members
# share the node's cores). Set OPENBLAS_NUM_THREADS yourself to measure another setting.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse.linalg

HEAT_PATH = Path(__file__).resolve().parents[1] / "solvers" / "heat.py"
PARAMETERS = np.array([300.0, 100.0, 500.0, 200.0, 400.0])  # (T0, T1, T2, T3, T4), the paper's range
DT, ALPHA = 0.01, 1.0
AGREEMENT = 1e-10  # max |ours - splu| / max |splu|
SIMULATE_STEPS = 20
SPLU_ORDERING = "MMD_AT_PLUS_A"


def load_heat() -> types.ModuleType:
    """Import solvers/heat.py by path (solvers/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("heat", HEAT_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_seconds(function: Callable[[], object], budget_s: float, min_repeats: int = 7) -> float:
    """Median wall time of ``function()`` over repeats filling about ``budget_s`` (after one warm-up)."""
    function()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_repeats or (time.perf_counter() < deadline and len(times) < 5000):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(heat: types.ModuleType, grid_size: int, budget_s: float) -> dict[str, float | str]:
    """Time ours (chosen transform and the other one), splu and simulate at one grid size."""
    boundary = PARAMETERS[1:]
    field = list(heat.simulate(PARAMETERS, grid_size, 10, DT, ALPHA))[-1]  # a realistic, non-constant field

    system = heat.assemble_system(grid_size, DT, ALPHA)
    start = time.perf_counter()
    factor = scipy.sparse.linalg.splu(system.matrix, permc_spec=SPLU_ORDERING)
    factor_s = time.perf_counter() - start

    def splu_step() -> np.ndarray:
        return factor.solve(system.rhs(field, boundary)).reshape(grid_size, grid_size)

    chosen = heat.make_stepper(grid_size, DT, ALPHA)
    other = heat.make_stepper(grid_size, DT, ALPHA, transform="fft" if chosen.transform == "matrix" else "matrix")
    reference = splu_step()
    difference = max(
        float(np.max(np.abs(stepper.step(field, boundary) - reference)) / np.max(np.abs(reference)))
        for stepper in (chosen, other)
    )

    splu_s = median_seconds(splu_step, budget_s)
    ours_s = median_seconds(lambda: chosen.step(field, boundary), budget_s)
    other_s = median_seconds(lambda: other.step(field, boundary), budget_s)
    simulate_s = (
        median_seconds(
            lambda: [None for _ in heat.simulate(PARAMETERS, grid_size, SIMULATE_STEPS, DT, ALPHA)], budget_s, 3
        )
        / SIMULATE_STEPS
    )
    return {
        "transform": chosen.transform,
        "other": other.transform,
        "factor_s": factor_s,
        "splu_s": splu_s,
        "ours_s": ours_s,
        "other_s": other_s,
        "simulate_s": simulate_s,
        "difference": difference,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, return 1 if any field disagrees with splu."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[64, 255], metavar="M", help="grid sizes (default 64 255)"
    )
    parser.add_argument(
        "--budget", type=float, default=0.25, metavar="S", help="seconds of repeats per timed quantity (default 0.25)"
    )
    args = parser.parse_args(argv)
    heat = load_heat()

    print(
        f"heat step, implicit Euler, dt={DT:g}, alpha={ALPHA:g}; one step incl. rhs assembly; median ms; "
        f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}"
    )
    header = (
        f"{'M':>5} {'ours':>7} {'ours ms':>9} {'splu ms':>9} {'ours/splu':>10} {'target':>7}"
        f" | {'other':>7} {'other ms':>9} {'simulate ms/step':>17} {'splu factor ms':>15} {'max rel diff':>13}"
    )
    print(header)
    print("-" * len(header))
    failed = False
    ratios = {}
    for grid_size in args.sizes:
        row = bench_size(heat, grid_size, args.budget)
        ratio = row["ours_s"] / row["splu_s"]
        ratios[grid_size] = ratio
        agrees = row["difference"] <= AGREEMENT
        failed |= not agrees
        print(
            f"{grid_size:>5} {row['transform']:>7} {row['ours_s'] * 1e3:>9.4f} {row['splu_s'] * 1e3:>9.4f}"
            f" {ratio:>10.3f} {'met' if ratio <= 1.0 else 'MISSED':>7}"
            f" | {row['other']:>7} {row['other_s'] * 1e3:>9.4f} {row['simulate_s'] * 1e3:>17.4f}"
            f" {row['factor_s'] * 1e3:>15.1f} {row['difference']:>13.1e}{'' if agrees else '  DISAGREE'}"
        )
    print(
        "ours = HeatStepper.step with the auto-chosen sine transform; other = the other transform; "
        f"splu = prefactored scipy splu ({SPLU_ORDERING} ordering) solve; "
        "simulate = amortised per step over a run (sine-space recurrence)."
    )
    if failed:
        print(f"error: a solver field differs from splu by more than {AGREEMENT:g} relative", file=sys.stderr)
        return 1
    for grid_size, ratio in ratios.items():
        print(f"ratio heat_step_{grid_size}_ours_over_splu {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
