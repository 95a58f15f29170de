"""Time one Breed AMIS resampling (jitted) against a straightforward per-sample NumPy loop.

The limit (docs/architecture.md, "Performance") is a plain Python loop that draws one child at a time with
the same out-of-bounds rule (redraw with σ·0.3, at most 5 times, then the parent's location), as
the paper's O(K) implementation does; its parents are drawn in one vectorized call, which only
flatters the loop. Sizes: K = 800 children, a window of N = 1000 simulations, d = 5 parameters in
[100, 500], σ = 0.0125 (Table 1's 5.0 on that scale). The jitted draw is timed after a warm-up
with block_until_ready, on device-resident inputs and end to end (NumPy in, NumPy out); the
median of the repeats is printed in ms, with the ratio loop / jitted.
Usage: python scripts/bench_amis.py [--repeats 50] [--children 800] [--window 1000] [--dim 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxsurro.core import breed


def parse_args() -> argparse.Namespace:
    """Command-line options: sizes, σ and the number of timed repeats."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=800, help="K")
    parser.add_argument("--window", type=int, default=1000, help="N")
    parser.add_argument("--dim", type=int, default=5, help="d")
    parser.add_argument("--sigma", type=float, default=0.0125, help="unit-cube σ")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls of each version")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def median_ms(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(times)


def loop_resample(
    rng: np.random.Generator,
    locations: np.ndarray,
    scores: np.ndarray,
    count: int,
    sigma: float,
    low: np.ndarray,
    high: np.ndarray,
    max_retries: int = 5,
    shrink: float = 0.3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The straightforward version: one child at a time, each with its own retry loop."""
    weights = scores / scores.mean()
    parents = rng.choice(len(locations), size=count, p=weights / weights.sum())
    span = high - low
    children = np.empty((count, locations.shape[1]))
    sigmas = np.empty(count)
    for k in range(count):
        parent = (locations[parents[k]] - low) / span
        child_sigma = sigma
        child = None
        for attempt in range(max_retries + 1):
            if attempt:
                child_sigma *= shrink
            candidate = parent + child_sigma * rng.standard_normal(parent.shape[0])
            if np.all((candidate >= 0.0) & (candidate <= 1.0)):
                child = low + candidate * span
                break
        children[k] = locations[parents[k]] if child is None else child
        sigmas[k] = child_sigma
    return children, parents, sigmas


def main() -> None:
    """Warm up, time both versions in the same run, print absolute ms and the ratio."""
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    low = np.full(args.dim, 100.0, np.float32)
    high = np.full(args.dim, 500.0, np.float32)
    locations = rng.uniform(100.0, 500.0, (args.window, args.dim)).astype(np.float32)
    scores = rng.exponential(1.0, args.window).astype(np.float32)

    resample = jax.jit(breed.amis_resample, static_argnames=breed.AMIS_STATIC_ARGNAMES)
    device_inputs = [jax.device_put(x) for x in (locations, scores, low, high)]
    keys = [jax.random.fold_in(jax.random.key(args.seed), i) for i in range(args.repeats + 1)]
    key_iter = iter(keys * 3)

    def jitted_device() -> None:
        d_locations, d_scores, d_low, d_high = device_inputs
        jax.block_until_ready(resample(next(key_iter), d_locations, d_scores, args.children, args.sigma, d_low, d_high))

    def jitted_end_to_end() -> None:
        draw = resample(next(key_iter), locations, scores, args.children, args.sigma, low, high)
        jax.device_get(draw)

    jitted_device()  # warm-up: compiles once
    device_ms = median_ms(jitted_device, args.repeats)
    end_to_end_ms = median_ms(jitted_end_to_end, args.repeats)
    loop_rng = np.random.default_rng(args.seed + 1)
    loop_ms = median_ms(
        lambda: loop_resample(
            loop_rng,
            locations.astype(np.float64),
            scores.astype(np.float64),
            args.children,
            args.sigma,
            low.astype(np.float64),
            high.astype(np.float64),
        ),
        max(3, args.repeats // 5),
    )

    print(
        f"AMIS resampling, K={args.children} children, N={args.window} window, d={args.dim}, "
        f"sigma={args.sigma} (unit cube), backend {jax.default_backend()}"
    )
    print(f"  jitted, device-resident inputs : {device_ms:8.3f} ms (median of {args.repeats})")
    print(f"  jitted, NumPy in -> NumPy out  : {end_to_end_ms:8.3f} ms (median of {args.repeats})")
    print(f"  per-sample NumPy loop          : {loop_ms:8.3f} ms (median of {max(3, args.repeats // 5)})")
    print(f"  ratio loop / jitted (device)   : {loop_ms / device_ms:8.1f}x")
    print(f"  ratio loop / jitted (end to end): {loop_ms / end_to_end_ms:7.1f}x")
    print(f"ratio amis_loop_over_jitted {loop_ms / device_ms:.3f}")
    print(f"ratio amis_jitted_ms_over_2ms {device_ms / 2.0:.3f}")


if __name__ == "__main__":
    main()
