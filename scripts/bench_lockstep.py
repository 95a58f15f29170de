"""The MPI lockstep's cost per training step (control exchange + gradient reduction) against the step itself.

Run under MPI, e.g. ``mpirun -n 2 --oversubscribe .venv/bin/python scripts/bench_lockstep.py``
(optional: an experiment file, default experiments/heat.toml, and ``--set section.key=value``).

What is measured (docs/architecture.md, "MPI lockstep" and "Performance"), on every rank, for the
experiment's model ("default") and the papers' size ("paper": ``bench_train_step.PAPER_SIZES``,
6 -> 2x256 -> 64x64, batch 128), each rank stepping on its own device-resident batch of the batch size:

* the step: ``Trainer.from_config`` without a cross-rank reduction, as one rank alone would train;
* the lockstep step, as ``jaxsurro.server.online``'s loop runs it: the control vector summed over the
  ranks (``World.sum`` of ``online.CONTROL_SIZE`` int64, on the host) then the step whose gradient sums
  are reduced across ranks inside (``Trainer.from_config(reduce_fn=distributed.gradient_allreduce(world))``,
  i.e. ``parallel.jit_reduced_train_step``: mpi4jax reduce to rank 0 and broadcast);
* for the diagnosis, each part alone: the control exchange, and the reduced step.

The variants alternate in blocks of ``--block`` steps, each block starting together on every rank
(a 1-element sum) and ending on the state; a variant's time per step is the median over its
blocks, averaged over the ranks. The overhead per step
is (lockstep − step) / steps; printed with its parts, and one line per size,
``ratio lockstep_overhead_<size> <overhead / step time>`` (lower is better). With ranks
oversubscribing the cores (mpirun --oversubscribe on a small machine), they also share the CPU
that computes the steps, which is part of what a lockstep costs there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from bench_train_step import PAPER_SIZES

from jaxsurro.config import Config, add_config_arguments, load_config
from jaxsurro.server.buffers import SampleBatch
from jaxsurro.server.distributed import World, gradient_allreduce
from jaxsurro.server.online import CONTROL_SIZE
from jaxsurro.server.trainer import Trainer, range_scaling

TIMEOUT_S = 120.0  # for any one collective
VARIANTS = ("step", "control", "reduced step", "lockstep")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options: experiment file and overrides, block size and count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, "experiment TOML file", default="experiments/heat.toml")
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=15, help="timed blocks per variant")
    args = parser.parse_args(argv)
    if args.block < 1 or args.blocks < 1:
        parser.error("--block and --blocks must be >= 1")
    return args


def host_batch(config: Config, rank: int) -> SampleBatch:
    """A full batch of random inputs and fields (each rank its own)."""
    solver = config.solver
    rng = np.random.default_rng(rank)
    rows = config.train.batch_size
    parameters = rng.uniform(solver.low, solver.high, size=(rows, len(solver.parameters)))
    times = rng.uniform(0.0, solver.n_steps * solver.dt, size=(rows, 1))
    return SampleBatch(
        np.concatenate([parameters, times], axis=1).astype(np.float32),
        rng.uniform(min(solver.low), max(solver.high), size=(rows, solver.sample_size)).astype(np.float32),
        np.arange(rows, dtype=np.int64),
    )


def measure(world: World, config: Config, block: int, blocks: int) -> dict[str, float]:
    """Seconds per step of each variant, averaged over the ranks."""
    scaling = range_scaling(config, min(config.solver.low), max(config.solver.high))
    alone = Trainer.from_config(config, scaling)
    reduced = Trainer.from_config(config, scaling, reduce_fn=gradient_allreduce(world))
    input_dim, sample_size = len(config.solver.parameters) + 1, config.solver.sample_size
    alone.compile(input_dim, sample_size, evaluate=False)
    reduced.compile(input_dim, sample_size, evaluate=False)  # a collective
    batch = host_batch(config, world.rank)
    alone_batch, reduced_batch = alone.to_device(batch), reduced.to_device(batch)
    control = np.zeros(CONTROL_SIZE, dtype=np.int64)
    control[0] = 1  # HAVE_BATCH: every rank has data

    def exchange() -> None:
        world.sum(control, TIMEOUT_S, "the next training step")

    def lockstep() -> None:
        exchange()
        reduced.step_on_device(reduced_batch)

    calls: dict[str, tuple[Callable[[], object], Trainer | None]] = {
        "step": (lambda: alone.step_on_device(alone_batch), alone),
        "control": (exchange, None),
        "reduced step": (lambda: reduced.step_on_device(reduced_batch), reduced),
        "lockstep": (lockstep, reduced),
    }
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for timed in (False, *[True] * blocks):  # a first, untimed round warms every variant up
        for name in VARIANTS:
            call, trainer = calls[name]
            world.sum(np.zeros(1, np.int64), TIMEOUT_S, "the start of a block")
            start = time.perf_counter()
            for _ in range(block):
                call()
            if trainer is not None:
                jax.block_until_ready(trainer.state)
            if timed:
                seconds[name].append((time.perf_counter() - start) / block)
    per_step = np.array([statistics.median(seconds[name]) for name in VARIANTS], np.float64)
    mean = world.sum(per_step, TIMEOUT_S, "the timings") / world.size
    return dict(zip(VARIANTS, mean.tolist(), strict=True))


def main(argv: Sequence[str] | None = None) -> None:
    """Measure both sizes on every rank; rank 0 prints the table and the ratios."""
    args = parse_args(argv)
    world = World.detect()
    if not world.distributed:
        raise SystemExit("run it under MPI with 2 ranks or more: mpirun -n 2 python scripts/bench_lockstep.py")
    sizes = {"default": [], "paper": [f"{key}={value}" for key, value in PAPER_SIZES.items()]}
    results = {}
    for size, overrides in sizes.items():
        config = load_config(args.config, [*overrides, *args.overrides])
        results[size] = (config, measure(world, config, args.block, args.blocks))
    if not world.is_root:
        return
    print(
        f"lockstep over {world.size} ranks ({jax.local_devices()[0].platform}, {jax.local_device_count()} device(s) "
        f"per rank), {args.blocks} blocks of {args.block} steps per variant, ms per step (median block, mean over the "
        "ranks):"
    )
    print(f"  {'size':<8} {'model':<28} {'step':>7} {'control':>8} {'reduced':>8} {'lockstep':>9} {'overhead':>9}")
    ratios = {}
    for size, (config, ms) in results.items():
        solver = config.solver
        model = f"6->{config.model.layers}x{config.model.hidden}->{solver.sample_size}, B {config.train.batch_size}"
        overhead = ms["lockstep"] - ms["step"]
        ratios[size] = overhead / ms["step"]
        print(
            f"  {size:<8} {model:<28} {ms['step'] * 1e3:>7.2f} {ms['control'] * 1e3:>8.3f} "
            f"{ms['reduced step'] * 1e3:>8.2f} {ms['lockstep'] * 1e3:>9.2f} {overhead * 1e3:>9.2f}"
        )
    print("  overhead = lockstep - step: the control exchange and the gradient reduction, per step")
    for size, ratio in ratios.items():
        print(f"ratio lockstep_overhead_{size} {ratio:.3f}")


if __name__ == "__main__":
    main()
