"""Breed steering on a real table: only never-submitted simulations change, atomically and traceably."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsurro.config import load_config
from jaxsurro.run import plan_simulations
from jaxsurro.server.distributed import World
from jaxsurro.server.parallel import make_data_mesh
from jaxsurro.server.steering import Steering
from jaxsurro.table import SimState

ROOT = Path(__file__).resolve().parents[1]
N_SIMS, N_STEPS = 40, 5


def setup(*overrides: str):
    config = load_config(
        ROOT / "experiments/heat.toml",
        [
            f"study.n_simulations={N_SIMS}",
            f"solver.n_steps={N_STEPS}",
            "sampler.kind=breed",
            "breed.window=20",
            "breed.period=1",
            "breed.min_finished=5",
            *overrides,
        ],
    )
    table = plan_simulations(config)
    steering = Steering(config, World(), table, make_data_mesh())
    return config, table, steering


def finish(table, sim_ids):
    for sim_id in sim_ids:
        record = table[sim_id]
        record.attempts, record.state = 1, SimState.COMPLETED


def observe_hard_simulations(steering, sim_ids, hard):
    """Losses for every time step of ``sim_ids``; the ``hard`` ones get large losses."""
    ids = np.array([s * N_STEPS + t for s in sim_ids for t in range(N_STEPS)], dtype=np.int64)
    losses = np.where(np.isin(ids // N_STEPS, hard), 10.0, 1.0).astype(np.float32)
    losses += np.random.default_rng(0).random(len(ids)).astype(np.float32) * 0.1
    padding = 2 + len(losses) % 2  # at least two padding rows, to an even length (two devices)
    padded = jnp.asarray(np.concatenate([losses, np.zeros(padding, np.float32)]))
    steering.observe(jax.device_put(padded, steering._sharding), ids)


def test_resampling_replaces_only_simulations_never_submitted():
    config, table, steering = setup()
    finish(table, range(10))
    for sim_id in (10, 11):  # submitted and running: must keep their parameters
        table[sim_id].attempts, table[sim_id].state = 1, SimState.SUBMITTED
    table[12].attempts, table[12].state = 1, SimState.PENDING  # waiting for a retry: same parameters
    before = np.stack([r.parameters for r in table])
    observe_hard_simulations(steering, range(10), hard=[3])
    steering.resample()

    after = np.stack([r.parameters for r in table])
    np.testing.assert_array_equal(after[:13], before[:13])
    assert all(r.generation == 0 and not r.bred for r in list(table)[:13])
    pending = list(table)[13:]
    assert all(r.generation == 1 for r in pending)
    assert not np.array_equal(after[13:], before[13:])
    assert np.all(after >= config.solver.low) and np.all(after <= config.solver.high)
    bred = [r for r in pending if r.bred]
    assert bred and all(0 <= r.parent < 10 for r in bred) and all(r.parent == -1 for r in pending if not r.bred)
    assert table[3].score > table[4].score  # the hard simulation scores higher
    # Bred children cluster around their parents (sigma = 5 on a span of 400), mostly around the hard one.
    parents = np.array([r.parent for r in bred])
    assert np.mean(parents == 3) > 0.5
    for r in bred:
        assert np.max(np.abs(r.parameters - table[r.parent].parameters)) < 60.0


def test_nothing_changes_before_enough_simulations_completed():
    _, table, steering = setup("breed.min_finished=20")
    finish(table, range(10))
    before = np.stack([r.parameters for r in table])
    observe_hard_simulations(steering, range(10), hard=[3])
    steering.resample()
    np.testing.assert_array_equal(np.stack([r.parameters for r in table]), before)
    assert steering.history == []


def test_padding_rows_do_not_enter_the_statistics():
    _, _, steering = setup()
    observe_hard_simulations(steering, range(3), hard=[])
    counts = np.asarray(steering.stats.delta_count)
    assert counts.sum() == 3 * N_STEPS and counts[3:].sum() == 0
