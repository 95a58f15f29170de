"""Breed steering: the training losses choose the parameters of the simulations not yet started.

Every training step feeds its per-sample losses into the loss-deviation statistics
(:mod:`jaxsurro.core.breed`), with the mean and standard deviation of the step's *global*
batch. In a server the statistics live in the :class:`~jaxsurro.server.trainer.Trainer` and its
jitted step updates them (on several ranks from the reduced sums, so each rank adds its rows'
deviations with the global moments): no extra forward pass, dispatch or transfer. Without a
trainer, :meth:`Steering.observe` adds losses computed elsewhere. Every P steps, once enough
simulations have completed, the ranks merge their statistics on rank 0, which draws children
around the simulations the network finds hard (AMIS), mixes them with uniform draws at the
ratio r(s), and replaces the parameters of every simulation never submitted, atomically with
respect to the launcher: a simulation starts either with its old parameters or with its new
ones, never half-updated. The other ranks receive the new parameters in the same collective,
before any of those simulations can start.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsurro.config import Config
from jaxsurro.core import breed
from jaxsurro.core.sampling import BoxSampler, derive_seed
from jaxsurro.server.distributed import World
from jaxsurro.server.parallel import DATA_AXIS
from jaxsurro.server.trainer import Trainer
from jaxsurro.table import SimState, SimulationTable

log = logging.getLogger("jaxsurro.server.steering")

# Steering.observe on several ranks: steps whose deviations wait for the ranks' summed batch moments;
# the wait ends at every resampling round and at least every this many steps (bounds the losses kept).
MOMENT_FLUSH_STEPS = 64


class Proposal(NamedTuple):
    """The proposal mixture of one round: r·(1/K)Σ_k TN(·|centre_k, σ_k) + (1 − r)·U (breed.proposal_density)."""

    centres: np.ndarray  # [K, d] float32, physical units: the parents of the round's K members
    sigmas: np.ndarray  # [K, d] float32, unit cube: each member's σ (as its child was accepted with)
    ratio: float  # r(s) of the round


class _PendingStep(NamedTuple):
    """One step's rows, kept on the devices until the ranks' summed moments are known."""

    losses: jax.Array
    ids: jax.Array
    weights: jax.Array
    moments: breed.LossMoments  # this rank's rows only


class Steering:
    """One rank's Breed: its loss statistics, and on rank 0 the resampling of pending simulations."""

    # Out-of-bounds rule of the AMIS draw (breed.amis_resample's ``boundary``): an exact truncated
    # normal; "retry" is the paper's shrink-and-redraw rule, whose shrunk σ is then passed on.
    boundary = "truncate"

    def __init__(self, config: Config, world: World, table: SimulationTable, mesh: Any, trainer: Trainer | None = None):
        """With ``trainer`` (its ``loss_stats`` set), the statistics are the trainer's, updated by its step."""
        self.config, self.world, self.table = config, world, table
        self._trainer = trainer
        self.settings = config.breed
        self.n_steps = config.solver.n_steps
        self.low = np.asarray(config.solver.low)
        self.high = np.asarray(config.solver.high)
        dim = len(self.low)
        # One unit-cube width per parameter (a physical σ is σ / span_i), and each simulation's own:
        # a bred simulation carries the σ of the proposal member it came from into later rounds.
        self.sigma_unit = np.broadcast_to(np.asarray(config.breed_sigma_unit, np.float32), (dim,)).copy()
        self.simulation_sigma = np.tile(self.sigma_unit, (len(table), 1))  # [S, d], used on rank 0
        self.proposal: Proposal | None = None  # the last round's proposal mixture (rank 0)
        if trainer is None:
            self._stats = breed.init_loss_stats(len(table), self.n_steps)
        elif trainer.loss_stats is None or trainer.loss_stats.delta_sum.shape != (len(table), self.n_steps):
            raise ValueError(
                f"Breed needs the trainer's loss statistics for {len(table)} simulations of {self.n_steps} "
                f"steps; the trainer has {None if trainer.loss_stats is None else trainer.loss_stats.delta_sum.shape}"
            )
        self._pending_steps: list[_PendingStep] = []
        self._sharding = NamedSharding(mesh, P(DATA_AXIS))
        self._update = jax.jit(breed.update_loss_stats)
        self._moments = jax.jit(breed.loss_moments)
        self._scores = jax.jit(breed.simulation_scores)
        self._window = jax.jit(breed.recent_window, static_argnames=("size",))
        self._resample = jax.jit(breed.amis_resample, static_argnames=breed.AMIS_STATIC_ARGNAMES)
        self._mix = jax.jit(breed.mix)
        # Jitted too, although scalar-sized: run eagerly, each costs a round ~0.5 ms of op-by-op dispatch.
        self._mixing_ratio = jax.jit(breed.mixing_ratio)
        self._split = jax.jit(lambda key: tuple(jax.random.split(key, 3)))
        self._key = jax.random.key(derive_seed(config.study.seed, "breed"))
        self._uniform = BoxSampler(
            self.settings.base_sampler,
            config.solver.low,
            config.solver.high,
            derive_seed(config.study.seed, "breed-uniform"),
        )
        self.uniform_draws = 0  # points drawn by the uniform sampler (a resumed run skips as many)
        self.round = 0  # resampling rounds done; round s = 1, 2, ... uses r(s)
        self.history: list[dict[str, Any]] = []  # one entry per resampling round (rank 0)

    @property
    def stats(self) -> breed.LossStatsState:
        """This rank's loss statistics (on the devices): the trainer's when steering one."""
        return self._stats if self._trainer is None else self._trainer.loss_stats

    @stats.setter
    def stats(self, value: breed.LossStatsState) -> None:
        if self._trainer is None:
            self._stats = value
        else:
            self._trainer.load_loss_stats(value)

    def observe(self, per_sample_loss: jax.Array, sample_ids: np.ndarray) -> None:
        """Adds a step's per-sample losses (padded rows, beyond ``sample_ids``, carry no weight).

        Only without a trainer: a trainer's step already adds them (a second call would count them
        twice); this is a separate jitted call and a transfer of the ids per step. δ uses the mean
        and standard deviation of the step's global batch (paper eq. 4: one batch b_i, one network
        state). On one rank that is this rank's batch, added at once. On several
        ranks, every rank calls this once per lockstep step (with an empty batch when it has none),
        so each rank keeps its rows and their three moments (Σw, Σw·l, Σw·l², computed on the
        devices, nothing fetched) until the next resampling round or MOMENT_FLUSH_STEPS steps,
        then one host all-reduce of 3 numbers per step gives every rank the global moments, with
        which it adds its rows' δ: one small collective per round instead of a device sync and an
        all-reduce per step. The merged statistics then equal those of one rank seeing every row.
        """
        if self._trainer is not None:
            raise RuntimeError("the trainer's step updates Breed's statistics; observe() would count the losses twice")
        padded = per_sample_loss.shape[0]
        ids = np.full(padded, -1, dtype=np.int32)
        ids[: len(sample_ids)] = sample_ids
        weights = (ids >= 0).astype(np.float32)
        ids_on_device, weights_on_device = jax.device_put((ids, weights), self._sharding)
        if not self.world.distributed:
            self.stats = self._update(self.stats, per_sample_loss, ids_on_device, weights_on_device)
            return
        moments = self._moments(per_sample_loss, weights_on_device)
        self._pending_steps.append(_PendingStep(per_sample_loss, ids_on_device, weights_on_device, moments))
        if len(self._pending_steps) >= MOMENT_FLUSH_STEPS:
            self._flush()

    def _flush(self) -> None:
        """A collective (every rank holds the same number of steps): global moments, then the deferred δ."""
        steps, self._pending_steps = self._pending_steps, []
        if not steps:
            return
        local = np.asarray(jax.device_get([tuple(step.moments) for step in steps]), np.float64)  # [n, 3]
        total = self.world.sum(local.ravel(), self.config.train.batch_timeout, "Breed's batch loss moments")
        for step, row in zip(steps, total.reshape(len(steps), 3), strict=True):
            moments = breed.LossMoments(*(np.float32(x) for x in row))
            self.stats = self._update(self.stats, step.losses, step.ids, step.weights, moments)

    def local_state(self) -> dict[str, np.ndarray]:
        """This rank's loss statistics as host arrays, for a checkpoint (a collective with several ranks)."""
        self._flush()
        return {name: np.asarray(value) for name, value in jax.device_get(self.stats)._asdict().items()}

    def root_state(self) -> dict[str, Any]:
        """Rank 0's resampling state (round, history, σ per simulation, last proposal, random streams), JSON-ready."""
        proposal = (
            None
            if self.proposal is None
            else {
                "centres": self.proposal.centres.tolist(),
                "sigmas": self.proposal.sigmas.tolist(),
                "ratio": float(self.proposal.ratio),
            }
        )
        return {
            "round": self.round,
            "history": self.history,
            "simulation_sigma": self.simulation_sigma.tolist(),
            "proposal": proposal,
            "key": np.asarray(jax.random.key_data(self._key)).tolist(),
            "uniform_draws": self.uniform_draws,
        }

    def restore(self, local: dict[str, np.ndarray] | None, root: dict[str, Any] | None) -> None:
        """Continues from :meth:`local_state` (every rank) and :meth:`root_state` (rank 0) of a checkpoint."""
        if local is not None:
            self.stats = breed.LossStatsState(
                **{name: jax.numpy.asarray(local[name]) for name in breed.LossStatsState._fields}
            )
        if root is None:
            return
        self.round, self.history = int(root["round"]), list(root["history"])
        self.simulation_sigma = np.asarray(root["simulation_sigma"], np.float32)
        if root["proposal"] is not None:
            self.proposal = Proposal(
                np.asarray(root["proposal"]["centres"], np.float32),
                np.asarray(root["proposal"]["sigmas"], np.float32),
                root["proposal"]["ratio"],
            )
        self._key = jax.random.wrap_key_data(np.asarray(root["key"], np.uint32))
        self._uniform.draw(int(root["uniform_draws"]))  # the same stream from where it was
        self.uniform_draws = int(root["uniform_draws"])

    def due(self, step: int) -> bool:
        return step % self.settings.period == 0

    def compile(self) -> float:
        """Compiles a resampling round's jitted functions (scores, window, AMIS, mixing) before any data; seconds.

        Rank 0 runs them once on inputs of a round's shapes (an empty window: nothing is drawn
        from the study's random streams, nothing changes); the other ranks do not resample.
        """
        if not self.world.is_root:
            return 0.0
        started = time.perf_counter()
        stats = jax.device_get(self.stats)
        scores = np.asarray(jax.device_get(self._scores(stats))[0])
        eligible = np.zeros(len(self.table), bool)
        window_ids, valid = (np.asarray(a) for a in self._window(stats, size=self.settings.window, eligible=eligible))
        locations = np.stack([self.table[int(i)].parameters for i in window_ids]).astype(np.float32)
        _, draw_key, mix_key = self._split(jax.random.key(0))  # a throwaway key of the study key's type
        draw = self._draw(draw_key, locations, scores[window_ids], window_ids, valid)
        ratio = self._ratio(1)
        uniform = np.zeros((len(self.table), len(self.low)), dtype=np.float32)
        jax.block_until_ready(self._mix(mix_key, draw.children, uniform, ratio))
        return time.perf_counter() - started

    def resample(self) -> None:
        """A collective round: merge the ranks' statistics, breed on rank 0, share the new parameters."""
        self._flush()
        local = jax.device_get(self.stats)
        gathered = self.world.gather(local, self.config.train.batch_timeout, "Breed's loss statistics")
        replacement = None
        if self.world.is_root:
            merged = breed.combine_loss_stats(gathered) if len(gathered) > 1 else gathered[0]
            with self.table.lock:  # the launcher cannot submit while we choose and replace
                replacement = self._breed(merged)
                self._share(replacement)
                if replacement is not None:
                    self._apply(replacement)
        else:
            replacement = self._share(None)
            if replacement is not None:
                self._apply(replacement)

    def _share(self, replacement: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        return self.world.broadcast(replacement, self.config.train.batch_timeout, "Breed's new parameters")

    def _apply(self, replacement: dict[str, np.ndarray]) -> None:
        changed = self.table.replace_pending(
            replacement["sim_ids"],
            replacement["parameters"],
            generation=replacement["generation"],
            bred=replacement["bred"],
            parent=replacement["parent"],
        )
        if changed != len(replacement["sim_ids"]):  # the table lock makes this impossible; say so if it happens
            raise RuntimeError(
                f"Breed replaced {changed} of {len(replacement['sim_ids'])} pending simulations: "
                "a simulation was submitted during steering"
            )

    def _breed(self, stats: breed.LossStatsState) -> dict[str, np.ndarray] | None:
        """Rank 0: new parameters for every simulation never submitted, or None when it is too early."""
        completed = np.array([r.state == SimState.COMPLETED for r in self.table])
        scores, has_score = (np.asarray(a) for a in jax.device_get(self._scores(stats)))
        for record in self.table:
            if has_score[record.sim_id]:
                record.score = float(scores[record.sim_id])
        pending = self.table.pending_ids()
        if completed.sum() < self.settings.min_finished or not pending:
            return None
        # The window: completed simulations with every time step seen (breed.recent_window).
        window_ids, valid = self._window(stats, size=self.settings.window, eligible=completed)
        window_ids, valid = np.asarray(window_ids), np.asarray(valid)
        if not valid.any():
            return None
        locations = np.stack([self.table[int(i)].parameters for i in window_ids]).astype(np.float32)
        self._key, draw_key, mix_key = self._split(self._key)
        n_children = len(self.table)
        draw = self._draw(draw_key, locations, scores[window_ids], window_ids, valid)
        k = len(pending)
        s = self.round + 1  # the paper's resampling iteration: s = 1 at the first round
        ratio = self._ratio(s)
        uniform = np.zeros((n_children, len(self.low)), dtype=np.float32)  # fixed shape: one compilation
        uniform[:k] = self._uniform.draw(k)
        self.uniform_draws += k
        mixed = self._mix(mix_key, draw.children, uniform, ratio)
        # One fetch, then the first k rows on the host (slicing on the devices would compile per k).
        (points, is_child), parents_drawn, sigma_drawn = jax.device_get((mixed, draw.parents, draw.sigma))
        points, is_child = np.asarray(points[:k], np.float64), np.asarray(is_child[:k])
        member_parents = np.asarray(parents_drawn[:k])
        member_sigma = np.asarray(sigma_drawn[:k], np.float32)  # [k, d]
        parents = np.where(is_child, window_ids[member_parents], -1)
        # Each pending simulation's σ: its member's (shrunk by retries under "retry"), or the base σ.
        self.simulation_sigma[pending] = np.where(is_child[:, None], member_sigma, self.sigma_unit[None])
        # The mixture the pending simulations were drawn from, for the next round's importance weights.
        self.proposal = Proposal(centres=locations[member_parents], sigmas=member_sigma, ratio=ratio)
        self.round = s
        self.history.append(
            {
                "round": self.round,
                "ratio": ratio,
                "pending": k,
                "bred": int(is_child.sum()),
                "window": int(valid.sum()),
                "uniform_fallback": bool(draw.uniform_fallback),
            }
        )
        log.info(
            "Breed round %d: %d pending simulations, %d bred (r = %.2f) from a window of %d",
            self.round,
            k,
            int(is_child.sum()),
            ratio,
            int(valid.sum()),
        )
        return {
            "sim_ids": np.asarray(pending),
            "parameters": points,
            "generation": [self.round] * k,
            "bred": [bool(b) for b in is_child],
            "parent": [int(p) for p in parents],
        }

    def _ratio(self, s: int) -> float:
        """r(s), the probability that round s gives a pending simulation a child (breed.mixing_ratio)."""
        return float(self._mixing_ratio(s, self.settings.r_start, self.settings.r_end, self.settings.r_cycles))

    def _draw(
        self, key: jax.Array, locations: np.ndarray, scores: np.ndarray, window_ids: np.ndarray, valid: np.ndarray
    ) -> breed.AmisDraw:
        """The AMIS draw of a round: len(table) children (a fixed size, so one compilation serves every round)."""
        return self._resample(
            key,
            locations,
            scores,
            len(self.table),
            self.simulation_sigma[window_ids],
            self.low.astype(np.float32),
            self.high.astype(np.float32),
            importance_weights=self.settings.importance_weights,
            proposal_density=self._density(locations) if self.settings.importance_weights else None,
            valid=valid,
            boundary=self.boundary,
        )

    def _density(self, locations: np.ndarray) -> np.ndarray:
        """Density at the window's points of the previous round's proposal mixture (uniform before any round).

        The previous round's K members (its parents with each member's σ) mixed with the uniform
        share at its ratio r (breed.proposal_density); before the first round every simulation came
        from the initial design, whose density is uniform, so every point gets 1.
        """
        if self.proposal is None:
            return np.ones(len(locations), np.float32)
        proposal = self.proposal
        return np.asarray(
            breed.proposal_density(locations, proposal.centres, proposal.sigmas, self.low, self.high, proposal.ratio)
        )
