"""Breed steering on a real table: only never-submitted simulations change, atomically and traceably."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compiles import count_backend_compiles
from scipy import stats as scipy_stats

from jaxsurro.config import load_config
from jaxsurro.core import breed
from jaxsurro.core.model import Scaling
from jaxsurro.run import plan_simulations
from jaxsurro.server.buffers import SampleBatch
from jaxsurro.server.distributed import World
from jaxsurro.server.parallel import make_data_mesh
from jaxsurro.server.steering import MOMENT_FLUSH_STEPS, Steering
from jaxsurro.server.trainer import Trainer, range_scaling
from jaxsurro.server.validation import ValidationSet, mean_field_mse, parameter_mean_mse, per_step_mean_field_mse
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


# ----------------------------------------------------------------------------------------------
# Fidelity to the Breed paper (§3)
# ----------------------------------------------------------------------------------------------


def spy_on_resample(steering):
    """Records the (args, kwargs) of every AMIS draw the steering makes."""
    calls = []
    original = steering._resample

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    steering._resample = spy
    return calls


def truncated_mixture_density(points_unit, centres_unit, sigmas, ratio):
    """scipy reference: r·mean_k Π_i truncnorm(x_i | c_ki, σ_ki on [0, 1]) + (1 − r), in the unit cube."""
    members = []
    for c, s in zip(centres_unit, np.broadcast_to(sigmas, centres_unit.shape), strict=True):
        members.append(np.prod(scipy_stats.truncnorm(-c / s, (1 - c) / s, loc=c, scale=s).pdf(points_unit), axis=1))
    return ratio * np.mean(members, axis=0) + (1 - ratio)


def test_the_first_round_uses_r_of_s_equal_one():
    config, table, steering = setup()
    finish(table, range(10))
    observe_hard_simulations(steering, range(10), hard=[3])
    steering.resample()
    steering.resample()
    settings = config.breed
    step = (settings.r_end - settings.r_start) / settings.r_cycles
    ratios = [entry["ratio"] for entry in steering.history]
    np.testing.assert_allclose(ratios, [settings.r_start + step, settings.r_start + 2 * step], rtol=1e-6)
    assert [entry["round"] for entry in steering.history] == [1, 2]


def test_a_simulation_with_an_unseen_time_step_is_never_a_parent():
    """The window is the paper's Λ_J^(i'): every time step of a simulation must have a loss deviation."""
    _, table, steering = setup()
    finish(table, range(10))
    # Simulation 3 is by far the hardest, but its last time step was never in a batch.
    ids = np.array([s * N_STEPS + t for s in range(10) for t in range(N_STEPS) if (s, t) != (3, N_STEPS - 1)])
    losses = np.where(ids // N_STEPS == 3, 10.0, 1.0) + np.random.default_rng(0).random(len(ids)) * 0.1
    padded = np.concatenate([losses, np.zeros(2 + len(losses) % 2)]).astype(np.float32)
    steering.observe(jax.device_put(jnp.asarray(padded), steering._sharding), ids)
    steering.resample()
    assert table[3].score > 5 * max(table[s].score for s in range(10) if s != 3)  # scored, yet not eligible
    bred = [r for r in table if r.bred]
    assert bred and all(r.parent != 3 for r in bred)
    assert steering.history[0]["window"] == 9


def test_a_shrunk_sigma_is_carried_by_the_child_into_the_next_round():
    """boundary="retry" (the paper's rule): a child accepted after retries keeps σ·0.3^r as its proposal member's σ."""
    config, table, steering = setup()
    steering.boundary = "retry"
    calls = spy_on_resample(steering)
    base = steering.sigma_unit.copy()
    np.testing.assert_allclose(base, 5.0 / 400.0)
    finish(table, range(10))
    table[3].parameters = np.asarray(config.solver.low, np.float64)  # a corner: most first draws leave the box
    observe_hard_simulations(steering, range(10), hard=[3])
    steering.resample()
    np.testing.assert_array_equal(calls[0][0][4], np.tile(base, (20, 1)))  # the window's σ: all base so far
    pending = list(range(10, N_SIMS))
    sigma = steering.simulation_sigma
    shrunk = [s for s in pending if table[s].bred and np.all(sigma[s] < base)]
    assert shrunk, "no child of the corner parent needed a retry"
    for sim_id in pending:
        if not table[sim_id].bred:
            np.testing.assert_array_equal(sigma[sim_id], base)  # uniform draws start again from σ
            continue
        ratio = sigma[sim_id] / base
        retries = np.round(np.log(ratio) / np.log(0.3))
        assert np.all(retries == retries[0]) and 0 <= retries[0] <= 5
        np.testing.assert_allclose(ratio, 0.3 ** retries[0], rtol=1e-5)
    # Those children run; in the next round their own members use the σ they carry.
    finish(table, shrunk)
    observe_hard_simulations(steering, shrunk, hard=shrunk)
    windows = []
    window_of = steering._window
    steering._window = lambda *a, **k: windows.append(window_of(*a, **k)) or windows[-1]
    steering.resample()
    window_ids, valid = (np.asarray(x) for x in windows[0])
    window_sigma = np.asarray(calls[1][0][4])
    assert set(shrunk) & set(window_ids[valid].tolist())  # the window holds some of them (it takes 20)
    for row, sim_id in enumerate(window_ids):
        np.testing.assert_array_equal(window_sigma[row], sigma[sim_id])
    assert np.all(window_sigma[np.isin(window_ids, shrunk)] < base)


def test_importance_weights_use_the_previous_rounds_proposal_mixture():
    """Q_j is divided by r·(1/K)Σ_k TN(λ_j | parent_k, σ_k) + (1 − r) of the previous round, at each window point."""
    config, table, steering = setup("breed.importance_weights=true")
    calls = spy_on_resample(steering)
    finish(table, range(10))
    observe_hard_simulations(steering, range(10), hard=[3])
    steering.resample()
    # Before any round every simulation came from the uniform initial design: density 1.
    np.testing.assert_array_equal(calls[0][1]["proposal_density"], 1.0)
    proposal = steering.proposal
    pending = list(range(10, N_SIMS))
    assert proposal.centres.shape == (len(pending), 5) and proposal.ratio == steering.history[0]["ratio"]
    for i, sim_id in enumerate(pending):  # a member is centred on its parent, with the σ its child carries
        if table[sim_id].bred:
            np.testing.assert_allclose(proposal.centres[i], table[table[sim_id].parent].parameters, rtol=1e-6)
            np.testing.assert_array_equal(proposal.sigmas[i], steering.simulation_sigma[sim_id])
    # Some of those simulations run; the next round weighs its window by the density they were drawn from.
    finish(table, pending[:8])
    observe_hard_simulations(steering, pending[:8], hard=[])
    steering.resample()
    args, kwargs = calls[1]
    low, high = np.asarray(config.solver.low), np.asarray(config.solver.high)
    window_unit = (np.asarray(args[1], np.float64) - low) / (high - low)
    valid = np.asarray(kwargs["valid"])
    expected = truncated_mixture_density(
        window_unit[valid], (proposal.centres - low) / (high - low), proposal.sigmas, proposal.ratio
    )
    np.testing.assert_allclose(np.asarray(kwargs["proposal_density"])[valid], expected, rtol=1e-3)
    # The bred points sit where the proposal is dense, the old uniform ones mostly where it is not.
    bred_rows = [
        np.flatnonzero(np.all(args[1] == table[s].parameters.astype(np.float32), axis=1))[0]
        for s in pending[:8]
        if table[s].bred
    ]
    assert bred_rows and np.min(expected[bred_rows]) > np.median(expected)


class ThreadHub:
    """Two ranks in one process, on two threads: the World collectives over a barrier."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: list = [None] * size


class ThreadWorld:
    """The World interface Steering uses (sum, gather, broadcast), for ranks that are threads."""

    def __init__(self, hub: ThreadHub, rank: int):
        self.hub, self.rank, self.size = hub, rank, hub.size

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return True

    def _exchange(self, value):
        self.hub.slots[self.rank] = value
        self.hub.barrier.wait()
        values = list(self.hub.slots)
        self.hub.barrier.wait()
        return values

    def sum(self, values, timeout, what):
        return np.sum(self._exchange(np.asarray(values)), axis=0)

    def gather(self, value, timeout, what):
        values = self._exchange(value)
        return values if self.is_root else None

    def broadcast(self, value, timeout, what):
        return self._exchange(value)[0]


def test_two_ranks_use_the_global_batch_moments():
    """Each step's batch is split over two ranks with very different losses: δ must use the global μ and σ."""
    config = setup()[0]
    mesh = make_data_mesh()
    reference = Steering(config, World(), plan_simulations(config), mesh)
    hub = ThreadHub(2)
    ranks = [Steering(config, ThreadWorld(hub, r), plan_simulations(config), mesh) for r in range(2)]
    rng = np.random.default_rng(1)
    n_batches = MOMENT_FLUSH_STEPS + 6  # one flush on the way, the rest at the round
    all_ids = np.array([s * N_STEPS + t for s in range(12) for t in range(N_STEPS)], dtype=np.int64)
    batches = []
    for _ in range(n_batches):
        ids = rng.choice(all_ids, 24, replace=False)
        on_rank_1 = rng.random(24) < 0.5
        losses = np.where(on_rank_1, 5.0, 0.0) + rng.exponential(1.0, 24)  # rank 1's rows are much harder
        batches.append((ids, losses.astype(np.float32), on_rank_1))

    def device_losses(steering, losses):
        padded = np.concatenate([losses, np.zeros(2 + len(losses) % 2, np.float32)])
        return jax.device_put(jnp.asarray(padded), steering._sharding)

    for ids, losses, _ in batches:
        reference.observe(device_losses(reference, losses), ids)
    reference.resample()

    def run(rank: int) -> None:
        steering = ranks[rank]
        for ids, losses, on_rank_1 in batches:
            mine = on_rank_1 if rank == 1 else ~on_rank_1
            steering.observe(device_losses(steering, losses[mine]), ids[mine])
        steering.resample()

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(run, r) for r in range(2)]:
            future.result()
    expected = np.array([reference.table[s].score for s in range(12)])
    merged = np.array([ranks[0].table[s].score for s in range(12)])
    np.testing.assert_allclose(merged, expected, rtol=1e-4, atol=1e-6)
    assert np.ptp(expected) > 0.1  # the scores do differ between simulations


# ----------------------------------------------------------------------------------------------
# Breed inside the train step: one dispatch, no transfer, the same statistics
# ----------------------------------------------------------------------------------------------

SMALL = ("solver.grid_size=4", "model.hidden=16", "train.batch_size=8")


def host_batches(config, count: int, rows: int = 6) -> list[SampleBatch]:
    """Batches of ``rows`` real rows (the trainer pads them to 8), ids with repeats as a Reservoir draws them."""
    rng = np.random.default_rng(3)
    solver = config.solver
    batches = []
    for _ in range(count):
        inputs = np.concatenate(
            [rng.uniform(solver.low, solver.high, (rows, 5)), rng.uniform(0, N_STEPS * solver.dt, (rows, 1))], axis=1
        )
        targets = rng.uniform(100.0, 500.0, (rows, solver.sample_size))
        ids = rng.integers(0, 12 * N_STEPS, rows)
        batches.append(SampleBatch(inputs.astype(np.float32), targets.astype(np.float32), ids))
    return batches


def counting_jit(monkeypatch) -> list[str]:
    """From now on every jax.jit function counts its calls (the name of the function, once per call)."""
    calls: list[str] = []
    jit = jax.jit

    def counted_jit(fun, *args, **kwargs):
        jitted = jit(fun, *args, **kwargs)
        name = getattr(fun, "__name__", repr(fun))

        def call(*call_args, **call_kwargs):
            calls.append(name)
            return jitted(*call_args, **call_kwargs)

        return call

    monkeypatch.setattr(jax, "jit", counted_jit)
    return calls


def test_a_breed_step_is_one_jitted_dispatch_with_no_transfer_and_separate_statistics_agree(monkeypatch):
    config, table, _ = setup(*SMALL)
    scaling = range_scaling(config, 100.0, 500.0)
    calls = counting_jit(monkeypatch)
    trainer = Trainer.from_config(config, scaling)  # sampler.kind = breed: the trainer keeps the statistics
    random_config = dataclasses.replace(config, sampler=dataclasses.replace(config.sampler, kind="uniform"))
    random_trainer = Trainer.from_config(random_config, scaling)
    steering = Steering(config, World(), table, trainer.mesh, trainer)
    trainer.compile(6, config.solver.sample_size, evaluate=False)
    assert int(jax.device_get(steering.stats.n_updates)) == 0  # the compile step left no trace
    batches = host_batches(config, 4)
    on_device = [trainer.to_device(batch) for batch in batches]
    calls.clear()
    with jax.transfer_guard("disallow_explicit"):  # no transfer at all, explicit ones included
        outputs = [trainer.step_on_device(batch) for batch in on_device]
    assert calls == ["breed_train_step"] * len(batches)  # one jitted call per step, nothing else
    # The same statistics as the separate update (the old path), from the step's own losses.
    expected = breed.init_loss_stats(len(table), N_STEPS)
    for batch, (_, losses) in zip(batches, outputs, strict=True):
        ids = np.full(8, -1, np.int32)
        ids[: len(batch.sample_ids)] = batch.sample_ids
        expected = breed.update_loss_stats(expected, jax.device_get(losses), ids, (ids >= 0).astype(np.float32))
    got, want = jax.device_get(steering.stats), jax.device_get(expected)
    np.testing.assert_array_equal(got.delta_count, want.delta_count)
    np.testing.assert_allclose(got.delta_sum, want.delta_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.last_update, want.last_update)
    assert int(got.n_updates) == len(batches) and got.delta_count.sum() == 6 * len(batches)
    # Breed changes nothing in the training: the same parameters as a Random run on the same batches.
    for batch in batches:
        random_trainer.step(batch)
    for a, b in zip(jax.tree.leaves(trainer.host_params()), jax.tree.leaves(random_trainer.host_params()), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="twice"):
        steering.observe(outputs[0][1], batches[0].sample_ids)


def test_the_first_resampling_round_compiles_nothing_after_steering_compile():
    config, table, _ = setup(*SMALL)
    trainer = Trainer.from_config(config, range_scaling(config, 100.0, 500.0))
    steering = Steering(config, World(), table, trainer.mesh, trainer)
    trainer.compile(6, config.solver.sample_size, evaluate=False)
    assert steering.compile() > 0
    finish(table, range(10))
    ids = np.array([s * N_STEPS + t for s in range(10) for t in range(N_STEPS)])
    with count_backend_compiles() as compiles:
        for start in range(0, len(ids), 6):
            rows = ids[start : start + 6]
            trainer.step(SampleBatch(*host_batches(config, 1, len(rows))[0][:2], rows))
        before = np.stack([r.parameters for r in table])
        steering.resample()
        steering.resample()
    assert steering.history and steering.history[0]["window"] == 10
    assert not np.array_equal(np.stack([r.parameters for r in table]), before)
    assert compiles == [], f"{len(compiles)} compilation(s) during training and two Breed rounds"


# ----------------------------------------------------------------------------------------------
# Validation baselines
# ----------------------------------------------------------------------------------------------


def test_per_step_mean_field_mse_is_the_time_resolved_mean_field_baseline():
    rng = np.random.default_rng(0)
    n_sims, n_steps = 4, 3
    # Two fields of 2 and 3 elements; field 0 in [0, 2], field 1 in [-1, 1].
    scaling = Scaling((0.0,), (1.0,), 1.0, (0.0, -1.0), (2.0, 1.0), (2, 3))
    samples = rng.uniform(-1.0, 1.0, (n_sims, n_steps, 5)).astype(np.float32)
    samples[:, :, :2] += 1.0 + np.arange(n_steps)[None, :, None] * 0.3  # field 0 drifts in time
    validation = ValidationSet(rng.uniform(0, 1, (n_sims, 1)), samples)
    weights = (1.0, 3.0)
    # Straightforward reference: predict, for every simulation at step t, the mean over simulations at step t.
    normalized = (samples.astype(np.float64) - np.array([0, 0, -1, -1, -1])) / np.array([2, 2, 2, 2, 2])
    prediction = normalized.mean(axis=0, keepdims=True)
    errors = (normalized - prediction) ** 2
    per_field = [errors[..., :2].mean(), errors[..., 2:].mean()]
    expected = (per_field[0] * 1.0 + per_field[1] * 3.0) / 4.0
    assert per_step_mean_field_mse(validation, scaling, weights) == pytest.approx(expected, rel=1e-12)
    # It never loses to the single mean field, and wins when the field moves in time.
    assert per_step_mean_field_mse(validation, scaling, weights) < mean_field_mse(validation, scaling, weights)
    constant = ValidationSet(validation.parameters, np.repeat(samples[:, :1], n_steps, axis=1))
    assert per_step_mean_field_mse(constant, scaling, weights) == pytest.approx(
        mean_field_mse(constant, scaling, weights)
    )


def test_parameter_mean_mse_scores_the_field_filled_with_the_mean_of_the_parameters():
    rng = np.random.default_rng(1)
    n_sims, n_steps = 3, 4
    scaling = Scaling((0.0, 0.0), (10.0, 10.0), 1.0, (0.0, -1.0), (2.0, 1.0), (2, 3))
    parameters = rng.uniform(0.0, 2.0, (n_sims, 2))
    samples = rng.uniform(-1.0, 1.0, (n_sims, n_steps, 5)).astype(np.float32)
    validation = ValidationSet(parameters, samples)
    weights = (2.0, 1.0)
    guess = parameters.mean(axis=1)[:, None, None]  # [V, 1, 1]
    errors = ((samples.astype(np.float64) - guess) / 2.0) ** 2  # both fields span 2
    expected = (errors[..., :2].mean() * 2.0 + errors[..., 2:].mean() * 1.0) / 3.0
    assert parameter_mean_mse(validation, scaling, weights) == pytest.approx(expected, rel=1e-12)
    exact = ValidationSet(parameters, np.broadcast_to(guess, samples.shape).astype(np.float32))
    assert parameter_mean_mse(exact, scaling, weights) == pytest.approx(0.0, abs=1e-12)
