"""Time the jitted paper-sized training step on device-resident batches (the trainer's limit).

Model 6 → 2×256 → 64×64 (5 parameters + time), batch 128, data-parallel over the local
devices. Prints the median milliseconds per step after warm-up, each step timed with
block_until_ready. Usage: python scripts/bench_train_step.py [--steps 200] [--warmup 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from jaxsurro.core.model import heat_equation_scaling, make_model
from jaxsurro.server.parallel import jit_train_step, make_data_mesh, put_batch, replicate
from jaxsurro.core.train import Batch, init_train_state, make_optimizer, make_train_step

NUM_PARAMS = 5
FIELD_SHAPE = (64, 64)


def parse_args() -> argparse.Namespace:
    """Command-line options: batch size, hidden width, step counts and a time budget."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="timed steps (at most)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=8.0, help="stop timing after this")
    return parser.parse_args()


def main() -> None:
    """Build the step, warm it up, time it, print the median."""
    args = parse_args()
    scaling = heat_equation_scaling((100.0,) * NUM_PARAMS, (500.0,) * NUM_PARAMS, time_scale=1.0)
    model = make_model(
        "mlp", field_shape=FIELD_SHAPE, scaling=scaling, hidden=args.hidden, layers=args.layers
    )
    optimizer = make_optimizer(1e-3, batch_size=args.batch_size, halve_every_samples=1_000_000)
    mesh = make_data_mesh()
    step = jit_train_step(make_train_step(model, optimizer), mesh)
    state = replicate(
        init_train_state(jax.random.key(0), model, optimizer, input_dim=NUM_PARAMS + 1), mesh
    )

    rng = np.random.default_rng(0)
    params = rng.uniform(100.0, 500.0, size=(args.batch_size, NUM_PARAMS))
    times = rng.uniform(0.0, 1.0, size=(args.batch_size, 1))
    batch = put_batch(
        Batch(
            inputs=np.concatenate([params, times], axis=1).astype(np.float32),
            targets=rng.uniform(100.0, 500.0, size=(args.batch_size, *FIELD_SHAPE)).astype(
                np.float32
            ),
            weights=np.ones(args.batch_size, dtype=np.float32),
        ),
        mesh,
    )

    compile_start = time.perf_counter()
    state, metrics, _ = step(state, batch)
    jax.block_until_ready((state, metrics))
    first_call_s = time.perf_counter() - compile_start
    for _ in range(args.warmup):
        state, metrics, _ = step(state, batch)
    jax.block_until_ready((state, metrics))

    durations_ms: list[float] = []
    deadline = time.perf_counter() + args.budget_s
    while len(durations_ms) < args.steps and time.perf_counter() < deadline:
        start = time.perf_counter()
        state, metrics, _ = step(state, batch)
        jax.block_until_ready((state, metrics))
        durations_ms.append((time.perf_counter() - start) * 1e3)

    parameter_count = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    devices = ", ".join(str(device) for device in mesh.devices.flat)
    print(f"devices: {devices} (jax {jax.__version__}, backend {jax.default_backend()})")
    print(
        f"model: {NUM_PARAMS + 1} -> {args.layers}x{args.hidden} -> {FIELD_SHAPE[0]}x"
        f"{FIELD_SHAPE[1]} ({parameter_count:,} parameters), batch {args.batch_size}"
    )
    print(f"first call (compile + run): {first_call_s * 1e3:.0f} ms")
    print(
        f"train step: median {statistics.median(durations_ms):.2f} ms, "
        f"min {min(durations_ms):.2f} ms over {len(durations_ms)} steps "
        f"({args.batch_size / statistics.median(durations_ms) * 1e3:,.0f} samples/s)"
    )
    print(f"final loss (normalized units): {float(jax.device_get(metrics['loss'])):.4g}")


if __name__ == "__main__":
    main()
