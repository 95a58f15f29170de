"""Time the trainer's jitted step on a device-resident batch against the matrix products it cannot avoid.

What is measured (docs/architecture.md, "Performance"), on a ``Trainer.from_config`` built from an
experiment file (the first argument, e.g. experiments/heat.toml, at the paper's sizes: 5 parameters + time
-> 2x256 -> 64x64, batch 128; ``--set section.key=value`` overrides), data-parallel over the local
devices:

* ours: ``trainer.step_on_device(batch)`` on a batch put on the devices once (``trainer.to_device``),
  which is the server's step itself (same jitted function, sharding and donated state), each step
  timed with ``block_until_ready``;
* the limit: the step's dense-layer matrix products alone, as one jitted function of the same shapes
  and the same data sharding: for every kernel W [in, out], the forward product X @ W and the two
  backward products X^T @ G (the weight gradient) and G @ W^T (the gradient to the layer below, left
  out for the first layer, whose inputs need none). No activation, loss, optimizer update or
  metrics: it is the arithmetic (6 B sum(in x out) FLOP, less the first layer's input gradient) that
  any implementation of this step has to do.

The two alternate call by call after warm-up, so outside load on a shared machine hits both alike.
Printed: median milliseconds of each, the FLOP rate each reaches, and the last line
``ratio train_step_ours_over_limit <value>``: the step's speed over its matrix products' speed, i.e.
limit ms / ours ms (1 would mean that activations, loss, the Adam update over every parameter,
metrics and the dispatch cost nothing on top; higher is better).

Usage: python scripts/bench_train_step.py experiments/heat.toml [--set model.hidden=512 ...]
       [--batch-size 128] [--hidden 256] [--layers 2] [--grid-size 64] [--steps 200] [--warmup 10] [--budget-s 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsurro.config import Config, add_config_arguments, load_config
from jaxsurro.server.buffers import SampleBatch
from jaxsurro.server.trainer import Trainer, range_scaling

# The papers' size (SC23, Breed): 5 parameters + time -> 2x256 -> a 64x64 field, batch 128 (bench_lockstep.py too).
PAPER_SIZES = {"train.batch_size": 128, "model.hidden": 256, "model.layers": 2, "solver.grid_size": 64}


def parse_args() -> argparse.Namespace:
    """Command-line options: experiment file and overrides, the paper's sizes, step counts and a time budget."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(
        parser, "experiment TOML file, e.g. experiments/heat.toml (--set applies after the size options)"
    )
    parser.add_argument("--batch-size", type=int, default=PAPER_SIZES["train.batch_size"])
    parser.add_argument("--hidden", type=int, default=PAPER_SIZES["model.hidden"])
    parser.add_argument("--layers", type=int, default=PAPER_SIZES["model.layers"])
    parser.add_argument(
        "--grid-size", type=int, default=PAPER_SIZES["solver.grid_size"], help="the field is grid x grid"
    )
    parser.add_argument("--steps", type=int, default=200, help="timed steps (at most)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=8.0, help="stop timing after this")
    return parser.parse_args()


def host_batch(config: Config, batch_size: int, rng: np.random.Generator) -> SampleBatch:
    """Random inputs within the parameter bounds and random targets, as the host buffer hands them out."""
    solver = config.solver
    parameters = rng.uniform(solver.low, solver.high, size=(batch_size, len(solver.parameters)))
    times = rng.uniform(0.0, solver.n_steps * solver.dt, size=(batch_size, 1))
    field_size = solver.sample_size
    return SampleBatch(
        inputs=np.concatenate([parameters, times], axis=1).astype(np.float32),
        targets=rng.uniform(100.0, 500.0, size=(batch_size, field_size)).astype(np.float32),
        sample_ids=np.arange(batch_size, dtype=np.int64),
    )


def matmul_limit(
    trainer: Trainer, batch_size: int, input_dim: int, rng: np.random.Generator
) -> tuple[Callable[[], object], float]:
    """The step's dense-layer products as one jitted call on the trainer's mesh, and their FLOP count."""
    kernels = [leaf.shape for leaf in jax.tree.leaves(trainer.host_params()) if leaf.ndim == 2]
    if not kernels:
        raise SystemExit("the model has no dense kernels: this limit is for MLP-like models")
    mesh = trainer.mesh
    by_rows = NamedSharding(mesh, P(mesh.axis_names[0]))  # the batch is split over the devices, as in the step
    replicated = NamedSharding(mesh, P())
    operands, flop = [], 0
    for fan_in, fan_out in kernels:
        below = fan_in != input_dim  # the first layer's inputs need no gradient
        x = jax.device_put(rng.standard_normal((batch_size, fan_in), dtype=np.float32), by_rows)
        g = jax.device_put(rng.standard_normal((batch_size, fan_out), dtype=np.float32), by_rows)
        w = jax.device_put(rng.standard_normal((fan_in, fan_out), dtype=np.float32), replicated)
        operands.append((x, g, w, below))
        flop += 2 * batch_size * fan_in * fan_out * (3 if below else 2)
    arrays = [(x, g, w) for x, g, w, _ in operands]
    below_flags = tuple(below for *_, below in operands)

    @jax.jit
    def products(arrays):
        out = []
        for (x, g, w), below in zip(arrays, below_flags, strict=True):
            out += [x @ w, x.T @ g]
            if below:
                out.append(g @ w.T)
        return out

    return lambda: products(arrays), float(flop)


def timed_ms(call: Callable[[], object]) -> float:
    """Milliseconds of one call, blocking on its result."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    """Build the trainer, warm up both, time them alternately, print the medians and their ratio."""
    args = parse_args()
    sizes = [
        f"train.batch_size={args.batch_size}",
        f"model.hidden={args.hidden}",
        f"model.layers={args.layers}",
        f"solver.grid_size={args.grid_size}",
    ]
    config = load_config(args.config, [*sizes, *args.overrides])
    trainer = Trainer.from_config(config, range_scaling(config, min(config.solver.low), max(config.solver.high)))
    rng = np.random.default_rng(0)
    device_batch = trainer.to_device(host_batch(config, trainer.batch_size, rng))
    input_dim = len(config.solver.parameters) + 1
    limit, flop = matmul_limit(trainer, trainer.batch_size, input_dim, rng)
    last_metrics: list[dict] = []

    def step() -> object:
        metrics, _ = trainer.step_on_device(device_batch)
        last_metrics[:] = [metrics]
        return trainer.state, metrics

    first_call_ms = timed_ms(step)
    timed_ms(limit)
    for _ in range(args.warmup):
        timed_ms(step)
        timed_ms(limit)
    step_ms: list[float] = []
    limit_ms: list[float] = []
    deadline = time.perf_counter() + args.budget_s
    while len(step_ms) < args.steps and time.perf_counter() < deadline:
        step_ms.append(timed_ms(step))
        limit_ms.append(timed_ms(limit))

    parameter_count = sum(leaf.size for leaf in jax.tree.leaves(trainer.host_params()))
    devices = ", ".join(str(device) for device in trainer.mesh.devices.flat)
    ours, bound = statistics.median(step_ms), statistics.median(limit_ms)
    ratio = bound / ours
    solver = config.solver
    print(f"devices: {devices} (jax {jax.__version__}, backend {jax.default_backend()})")
    print(
        f"model: {config.model.name} {input_dim} -> {config.model.layers}x{config.model.hidden} -> "
        f"{'x'.join(map(str, next(iter(solver.field_shapes.values()))))} ({parameter_count:,} parameters), "
        f"batch {trainer.batch_size}"
    )
    print(f"first call (compile + run): {first_call_ms:.0f} ms")
    print(
        f"train step (ours):   median {ours:.2f} ms, min {min(step_ms):.2f} ms over {len(step_ms)} steps "
        f"({trainer.batch_size / ours * 1e3:,.0f} samples/s, {flop / ours / 1e6:,.1f} GFLOP/s of matmul work)"
    )
    print(
        f"matmuls only (limit): median {bound:.2f} ms, min {min(limit_ms):.2f} ms "
        f"({flop / 1e6:,.0f} MFLOP per step, {flop / bound / 1e6:,.1f} GFLOP/s)"
    )
    print(f"final loss (normalized units): {float(jax.device_get(last_metrics[0]['loss'])):.4g}")
    print(f"limit / ours = {ratio:.2f}: the share of the step's time its matrix products need")
    print(f"ratio train_step_ours_over_limit {ratio:.3f}")


if __name__ == "__main__":
    main()
