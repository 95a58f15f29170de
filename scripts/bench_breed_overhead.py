"""Breed's cost in training throughput: trained samples/s of a Breed run over a Random run's, same step, same data.

What is measured (docs/architecture.md, "Performance"), with two ``Trainer.from_config`` built from one
experiment file (the first argument, default experiments/heat_breed.toml; ``--set section.key=value``
overrides): the file's Breed trainer (``sampler.kind = "breed"``: the step also updates Breed's loss
statistics) and the same with ``sampler.kind = "uniform"`` (Random). Both run the server's step,
``trainer.step_on_device``, on a few batches put on the devices once (``trainer.to_device``; the
Breed batches carry their sample ids, drawn with repeats over every (simulation, time step) as a
Reservoir draws them). The Breed run also does what a Breed server does every ``breed.period``
steps: a resampling round (``Steering.resample``: statistics fetched, scores, window, AMIS, mixing,
new parameters for the pending simulations) on a table where half the simulations have completed
and every time step has been seen (a warm-up pass over all sample ids).

For the record, a third run updates the statistics the way they were updated before they moved
into the step: the Random step, then ``Steering.observe`` (a separate jitted call and a transfer of
the ids per step; a Steering without a trainer).

The runs take turns in chunks of 20 steps, each chunk blocking on the state at its end, so outside
load hits them alike (which run goes first changes from one period to the next); after each
``breed.period`` steps the Breed run does its round. Each run's time per step is the median over
its chunks, and the Breed run's adds the median round's time
divided by the period. Printed: samples/s of each run, the round's median time,
``ratio breed_separate_update_over_random``, ``ratio breed_step_over_random`` (the step alone) and,
last, ``ratio breed_over_random`` (with the rounds; target >= 0.95).

Usage: python scripts/bench_breed_overhead.py [experiments/heat_breed.toml] [--set ...] [--blocks 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Sequence

import jax
import numpy as np

from jaxsurro.config import Config, add_config_arguments, load_config
from jaxsurro.run import plan_simulations
from jaxsurro.server.buffers import SampleBatch
from jaxsurro.server.distributed import World
from jaxsurro.server.steering import Steering
from jaxsurro.server.trainer import Trainer, range_scaling
from jaxsurro.table import SimState

TARGET_RATIO = 0.95
DEVICE_BATCHES = 8  # distinct device-resident batches each run cycles through
CHUNK_STEPS = 20  # steps of one run between two switches (short: outside load hits every run alike)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options: experiment file and overrides, number of blocks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(
        parser, "experiment TOML file with sampler.kind = breed", default="experiments/heat_breed.toml"
    )
    parser.add_argument("--blocks", type=int, default=10, help="timed blocks of breed.period steps per run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error("--blocks must be >= 1")
    return args


def host_batch(config: Config, ids: np.ndarray, rng: np.random.Generator) -> SampleBatch:
    """Random inputs within the bounds and random fields for the given sample ids."""
    solver = config.solver
    parameters = rng.uniform(solver.low, solver.high, size=(len(ids), len(solver.parameters)))
    times = (ids % solver.n_steps + 1)[:, None] * solver.dt
    return SampleBatch(
        inputs=np.concatenate([parameters, times], axis=1).astype(np.float32),
        targets=rng.uniform(min(solver.low), max(solver.high), size=(len(ids), solver.sample_size)).astype(np.float32),
        sample_ids=ids.astype(np.int64),
    )


def timed_block(trainer: Trainer, batches: list, steps: int, observe: Steering | None = None, ids: list = ()) -> float:
    """Seconds for ``steps`` steps on device-resident batches (then ``observe`` of the losses), blocking at the end."""
    start = time.perf_counter()
    for k in range(steps):
        _, losses = trainer.step_on_device(batches[k % len(batches)])
        if observe is not None:
            observe.observe(losses, ids[k % len(ids)])
    jax.block_until_ready((trainer.state, observe.stats if observe is not None else None))
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    """Build both trainers, warm them up, alternate blocks, print both rates and the ratios."""
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    if config.sampler.kind != "breed":
        raise SystemExit(f"{args.config}: sampler.kind is {config.sampler.kind!r}; this benchmark needs breed")
    solver = config.solver
    random_config = dataclasses.replace(config, sampler=dataclasses.replace(config.sampler, kind="uniform"))
    scaling = range_scaling(config, min(solver.low), max(solver.high))
    breed_trainer = Trainer.from_config(config, scaling)
    random_trainer = Trainer.from_config(random_config, scaling)
    table = plan_simulations(config)
    steering = Steering(config, World(), table, breed_trainer.mesh, breed_trainer)
    separate = Steering(config, World(), plan_simulations(config), random_trainer.mesh)  # the former path
    input_dim = len(solver.parameters) + 1
    compile_s = breed_trainer.compile(input_dim, solver.sample_size, evaluate=False)
    breed_compile_s = steering.compile()
    random_compile_s = random_trainer.compile(input_dim, solver.sample_size, evaluate=False)

    rng = np.random.default_rng(args.seed)
    n_ids = len(table) * solver.n_steps
    batch_size = config.train.batch_size
    for record in list(table)[: len(table) // 2]:  # half the study has completed
        record.attempts, record.state = 1, SimState.COMPLETED
    for start in range(0, n_ids, batch_size):  # warm-up: every time step seen once, so the window fills
        ids = np.arange(start, min(start + batch_size, n_ids))
        breed_trainer.step(host_batch(config, ids, rng))
        random_trainer.step(host_batch(config, ids, rng))
    draws = [host_batch(config, rng.integers(0, n_ids, batch_size), rng) for _ in range(DEVICE_BATCHES)]
    breed_batches = [breed_trainer.to_device(batch) for batch in draws]
    random_batches = [random_trainer.to_device(batch) for batch in draws]
    draw_ids = [batch.sample_ids for batch in draws]
    timed_block(random_trainer, random_batches, 2, separate, draw_ids)  # compiles the separate update
    steering.resample()  # a first round outside the timing (fills the proposal state)

    period = config.breed.period
    chunk = min(CHUNK_STEPS, period)
    per_step: dict[str, list[float]] = {"random": [], "separate": [], "breed": []}
    round_s: list[float] = []
    runs = {
        "random": lambda: timed_block(random_trainer, random_batches, chunk),
        "separate": lambda: timed_block(random_trainer, random_batches, chunk, separate, draw_ids),
        "breed": lambda: timed_block(breed_trainer, breed_batches, chunk),
    }
    for block in range(args.blocks):
        order = list(runs)[block % len(runs) :] + list(runs)[: block % len(runs)]  # each run first in turn
        for _ in range(-(-period // chunk)):  # the period in chunks, each run in turn
            for name in order:
                per_step[name].append(runs[name]() / chunk)
        started = time.perf_counter()
        steering.resample()
        round_s.append(time.perf_counter() - started)

    random_ms, separate_ms, breed_ms = (statistics.median(per_step[name]) * 1e3 for name in per_step)
    round_ms = statistics.median(round_s) * 1e3
    breed_run_ms = breed_ms + round_ms / period  # a round every `period` steps, spread over them
    ratio = random_ms / breed_run_ms
    devices = ", ".join(str(device) for device in breed_trainer.mesh.devices.flat)
    print(f"Breed overhead: {args.config} {' '.join(args.overrides)}".rstrip())
    print(
        f"  model {config.model.name} {input_dim} -> {config.model.layers}x{config.model.hidden} -> "
        f"{solver.sample_size} values, batch {batch_size}; statistics of {len(table)} simulations x "
        f"{solver.n_steps} steps; devices: {devices} (backend {jax.default_backend()})"
    )
    print(
        f"  compiled ahead: Breed step {compile_s:.2f} s, Breed's round {breed_compile_s:.2f} s, "
        f"Random step {random_compile_s:.2f} s"
    )
    print(
        f"  {args.blocks} periods of breed.period = {period} steps, each run in turn in chunks of {chunk} steps; "
        "medians over the chunks"
    )

    def rate(ms: float) -> str:
        return f"{batch_size / ms * 1e3:>10,.0f} samples/s ({ms:.3f} ms/step"

    print(f"  Random run           {rate(random_ms)})")
    print(f"  separate update      {rate(separate_ms)}, the Random step then Steering.observe)")
    print(f"  Breed, steps only    {rate(breed_ms)}, statistics in the step)")
    print(
        f"  Breed run            {rate(breed_run_ms)}, with a round every {period} steps: median {round_ms:.1f} ms, "
        f"window {steering.history[-1]['window']})"
    )
    print(
        f"  Breed / Random = {ratio:.3f}: {'meets' if ratio >= TARGET_RATIO else 'BELOW'} the target >= {TARGET_RATIO}"
    )
    print(f"ratio breed_separate_update_over_random {random_ms / separate_ms:.3f}")
    print(f"ratio breed_step_over_random {random_ms / breed_ms:.3f}")
    print(f"ratio breed_over_random {ratio:.3f}")


if __name__ == "__main__":
    main()
