"""Breed steering: the training losses choose the parameters of the simulations not yet started.

Every training step feeds its per-sample losses into the loss-deviation statistics
(:mod:`jaxsurro.core.breed`, on the devices, no extra forward pass). Every P steps, once
enough simulations have completed, the ranks merge their statistics on rank 0, which
draws children around the simulations the network finds hard (AMIS), mixes them with
uniform draws at the ratio r(s), and replaces the parameters of every simulation never
submitted, atomically with respect to the launcher: a simulation starts either with its
old parameters or with its new ones, never half-updated. The other ranks receive the
new parameters in the same collective, before any of those simulations can start.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsurro.config import Config
from jaxsurro.core import breed
from jaxsurro.core.sampling import BoxSampler, derive_seed
from jaxsurro.server.distributed import World
from jaxsurro.server.parallel import DATA_AXIS
from jaxsurro.table import SimState, SimulationTable

log = logging.getLogger("jaxsurro.server.steering")


class Steering:
    """One rank's Breed: its loss statistics, and on rank 0 the resampling of pending simulations."""

    def __init__(self, config: Config, world: World, table: SimulationTable, mesh: Any):
        self.config, self.world, self.table = config, world, table
        self.settings = config.breed
        self.n_steps = config.solver.n_steps
        self.sigma_unit = config.breed_sigma_unit
        self.low = np.asarray(config.solver.low)
        self.high = np.asarray(config.solver.high)
        self.stats = breed.init_loss_stats(len(table), self.n_steps)
        self._sharding = NamedSharding(mesh, P(DATA_AXIS))
        self._update = jax.jit(breed.update_loss_stats)
        self._window = jax.jit(breed.recent_window, static_argnames=("size",))
        self._resample = jax.jit(breed.amis_resample, static_argnames=breed.AMIS_STATIC_ARGNAMES)
        self._mix = jax.jit(breed.mix)
        self._key = jax.random.key(derive_seed(config.study.seed, "breed"))
        self._uniform = BoxSampler(
            self.settings.base_sampler,
            config.solver.low,
            config.solver.high,
            derive_seed(config.study.seed, "breed-uniform"),
        )
        self.round = 0
        self.history: list[dict[str, Any]] = []  # one entry per resampling round (rank 0)

    def observe(self, per_sample_loss: jax.Array, sample_ids: np.ndarray) -> None:
        """Adds a step's per-sample losses (padded rows, beyond ``sample_ids``, carry no weight)."""
        padded = per_sample_loss.shape[0]
        ids = np.full(padded, -1, dtype=np.int32)
        ids[: len(sample_ids)] = sample_ids
        weights = (ids >= 0).astype(np.float32)
        ids_on_device, weights_on_device = jax.device_put((ids, weights), self._sharding)
        self.stats = self._update(self.stats, per_sample_loss, ids_on_device, weights_on_device)

    def due(self, step: int) -> bool:
        return step % self.settings.period == 0

    def resample(self) -> None:
        """A collective round: merge the ranks' statistics, breed on rank 0, share the new parameters."""
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
        scores, has_score = (np.asarray(a) for a in jax.device_get(breed.simulation_scores(stats)))
        for record in self.table:
            if has_score[record.sim_id]:
                record.score = float(scores[record.sim_id])
        pending = self.table.pending_ids()
        if completed.sum() < self.settings.min_finished or not pending:
            return None
        window_ids, valid = self._window(stats, size=self.settings.window, eligible=completed)
        window_ids, valid = np.asarray(window_ids), np.asarray(valid)
        if not valid.any():
            return None
        locations = np.stack([self.table[int(i)].parameters for i in window_ids]).astype(np.float32)
        self._key, draw_key, mix_key = jax.random.split(self._key, 3)
        n_children = len(self.table)  # a fixed size, so one compilation serves every round
        draw = self._resample(
            draw_key,
            locations,
            scores[window_ids],
            n_children,
            self.sigma_unit,
            self.low.astype(np.float32),
            self.high.astype(np.float32),
            importance_weights=self.settings.importance_weights,
            proposal_density=self._density(locations) if self.settings.importance_weights else None,
            valid=valid,
        )
        k = len(pending)
        ratio = breed.mixing_ratio(self.round, self.settings.r_start, self.settings.r_end, self.settings.r_cycles)
        uniform = np.zeros((n_children, len(self.low)), dtype=np.float32)  # fixed shape: one compilation
        uniform[:k] = self._uniform.draw(k)
        points, is_child = self._mix(mix_key, draw.children, uniform, ratio)
        points, is_child = np.asarray(points[:k], np.float64), np.asarray(is_child[:k])
        parents = np.where(is_child, window_ids[np.asarray(draw.parents[:k])], -1)
        self.round += 1
        self.history.append(
            {
                "round": self.round,
                "ratio": float(ratio),
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
            float(ratio),
            int(valid.sum()),
        )
        return {
            "sim_ids": np.asarray(pending),
            "parameters": points,
            "generation": [self.round] * k,
            "bred": [bool(b) for b in is_child],
            "parent": [int(p) for p in parents],
        }

    def _density(self, locations: np.ndarray) -> np.ndarray:
        """The mixture density the window's points were drawn from, approximated by the current proposal."""
        return np.asarray(breed.proposal_density(locations, locations, self.sigma_unit, self.low, self.high))
