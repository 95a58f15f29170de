"""The surrogate being trained: its model, state and the jitted steps, bound to a device mesh.

Batches arrive as NumPy from the host buffer and go to the devices by one explicit,
sharded ``device_put``; the step is jitted once with fixed shapes (short batches
are padded with zero-weight rows), so nothing recompiles during a run
(docs/architecture.md, "Training"). With Breed the trainer also holds Breed's loss statistics
on the mesh and updates them inside that one jitted step, from its own per-sample losses; the
rows' sample ids travel in the batch's transfer (docs/architecture.md, "Breed").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from flax import serialization
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsurro.config import Config
from jaxsurro.core import breed
from jaxsurro.core.fields import FieldSpec, sample_size, split_fields
from jaxsurro.core.model import Scaling, describe_model, make_model
from jaxsurro.core.sampling import derive_seed
from jaxsurro.core.train import Batch, BatchWithIds, ReduceFn, TrainState, init_train_state, make_optimizer
from jaxsurro.server.buffers import SampleBatch
from jaxsurro.server.evaluation import Evaluation, Evaluator
from jaxsurro.server.parallel import DATA_AXIS, jit_reduced_train_step, make_data_mesh, pad_batch, replicate


def field_layout(config: Config) -> tuple[FieldSpec, ...]:
    """The experiment's fields in sample order."""
    return tuple(FieldSpec(name, shape) for name, shape in config.solver.field_shapes.items())


def scaling_for(config: Config, validation_samples: np.ndarray) -> Scaling:
    """Inputs scaled by the parameter bounds and the time range; each field by its range in the validation set.

    ``model.output_range``, when given, is every field's range instead. A field that is constant
    over the validation set gets a unit-wide range around its value, so it still normalizes.
    """
    layout = field_layout(config)
    if config.model.output_range is not None:
        return range_scaling(config, *config.model.output_range)
    parts = split_fields(np.asarray(validation_samples).reshape(-1, sample_size(layout)), layout)
    lows, highs = [], []
    for spec in layout:
        low, high = float(np.min(parts[spec.name])), float(np.max(parts[spec.name]))
        if not high - low > 1e-6 * max(abs(low), abs(high), 1.0):
            low, high = low - 0.5, high + 0.5
        lows.append(low)
        highs.append(high)
    return _scaling(config, tuple(lows), tuple(highs))


def range_scaling(config: Config, low: float, high: float) -> Scaling:
    """The scaling with every field's range set to [low, high] (no data needed)."""
    n_fields = len(config.solver.fields)
    return _scaling(config, (float(low),) * n_fields, (float(high),) * n_fields)


def _scaling(config: Config, lows: tuple[float, ...], highs: tuple[float, ...]) -> Scaling:
    return Scaling(
        param_low=config.solver.low,
        param_high=config.solver.high,
        time_scale=config.solver.n_steps * config.solver.dt,
        field_low=lows,
        field_high=highs,
        field_sizes=tuple(spec.size for spec in field_layout(config)),
    ).validate()


def model_options(config: Config) -> dict[str, int]:
    """The ``model`` section's settings given to the architecture's constructor."""
    return {"hidden": config.model.hidden, "layers": config.model.layers}


class Trainer:
    """Holds the replicated train state (and Breed's statistics) on the local devices and runs the jitted steps."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: optax.GradientTransformation,
        state: TrainState,
        mesh: Mesh,
        batch_size: int,
        reduce_fn: ReduceFn | None = None,
        field_weights: Sequence[float] | None = None,
        loss_stats: breed.LossStatsState | None = None,
    ):
        """``state`` is replicated over ``mesh``; ``reduce_fn`` sums the gradient sums across processes.

        With ``loss_stats`` (Breed), the step is ``core.train.make_breed_train_step``'s: it updates
        ``self.loss_stats`` (replicated, donated like the state) in the same jitted call.
        """
        self.model = model
        self.mesh = mesh
        self.batch_size = batch_size
        self.state = replicate(state, mesh)
        self.loss_stats = None if loss_stats is None else replicate(loss_stats, mesh)
        self.train_step = jit_reduced_train_step(
            model, optimizer, reduce_fn, mesh, field_weights, loss_stats=loss_stats is not None
        )
        self.evaluator = Evaluator(model, field_weights, mesh)
        self._ones = np.ones(batch_size, dtype=np.float32)
        self._batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

    @classmethod
    def from_config(
        cls,
        config: Config,
        scaling: Scaling,
        reduce_fn: ReduceFn | None = None,
        devices: Sequence[jax.Device] | None = None,
    ) -> Trainer:
        """The experiment's model and optimizer, initialized from the study's seed, on ``devices`` (default: all).

        With ``sampler.kind = "breed"`` the trainer also keeps Breed's loss statistics (empty).
        """
        mesh = make_data_mesh(devices)
        model = make_model(config.model.name, fields=field_layout(config), scaling=scaling, **model_options(config))
        optimizer = make_optimizer(
            config.train.learning_rate, config.train.batch_size, config.train.halve_every_samples
        )
        key = jax.random.key(derive_seed(config.study.seed, "model"))
        state = init_train_state(key, model, optimizer, len(config.solver.parameters) + 1)
        loss_stats = None
        if config.sampler.kind == "breed":
            loss_stats = breed.init_loss_stats(config.study.n_simulations, config.solver.n_steps)
        return cls(
            model,
            optimizer,
            state,
            mesh,
            config.train.batch_size,
            reduce_fn,
            [field.weight for field in config.solver.fields],
            loss_stats,
        )

    def describe(self, config: Config) -> dict[str, Any]:
        """What ``model.json`` holds: the architecture, fields and scaling, and how to call the model."""
        return {
            **describe_model(config.model.name, self.model.fields, self.model.scaling, **model_options(config)),
            "parameter_names": list(config.solver.parameter_names),
            "dt": config.solver.dt,
            "n_steps": config.solver.n_steps,
            "field_weights": [f.weight for f in config.solver.fields],
        }

    def to_device(self, batch: SampleBatch) -> Batch | BatchWithIds:
        """A host batch as the step takes it: on the mesh, padded to ``batch_size`` with zero-weight rows."""
        return self.put(self.prepare(batch))

    def prepare(self, batch: SampleBatch) -> Batch | BatchWithIds:
        """The host half of :meth:`to_device`: weights, and padding to the batch size and the mesh (NumPy).

        With Breed, the rows' sample ids come along (int32, -1 on padding rows), for the same transfer.
        """
        n = len(batch.sample_ids)
        padded = pad_batch(Batch(batch.inputs, batch.targets, self._ones[:n]), self.mesh.devices.size, self.batch_size)
        if self.loss_stats is None:
            return padded
        ids = np.full(padded.weights.shape[0], -1, dtype=np.int32)
        ids[:n] = batch.sample_ids
        return BatchWithIds(padded, ids)

    def put(self, prepared: Batch | BatchWithIds) -> Batch | BatchWithIds:
        """The device half of :meth:`to_device`: one sharded transfer (asynchronous; a batch already
        on the mesh is returned as it is)."""
        return jax.device_put(prepared, self._batch_sharding)

    @property
    def puts_from_any_thread(self) -> bool:
        """Whether a batch may go to the devices from another thread than the step's: yes, except on a
        mesh of several CPU devices, where a transfer issued mid-step stalled XLA's collective
        rendezvous (docs/architecture.md, "Training")."""
        return self.mesh.devices.size == 1 or self.mesh.devices.flat[0].platform != "cpu"

    def prefetch(self, batch: SampleBatch) -> Batch | BatchWithIds:
        """What the prefetch thread does to a host batch: :meth:`prepare`, and :meth:`put` too where
        :attr:`puts_from_any_thread`, so the transfer overlaps the running step; the step's thread then
        calls :meth:`put`, which does nothing for a batch already on the mesh."""
        prepared = self.prepare(batch)
        return self.put(prepared) if self.puts_from_any_thread else prepared

    def step_on_device(self, device_batch: Batch | BatchWithIds) -> tuple[dict[str, jax.Array], jax.Array]:
        """One update from a batch already on the mesh (see to_device); returns device metrics and losses.

        One dispatch of the jitted step (three pieces on a multi-device mesh with an MPI reduction),
        Breed's statistics included.
        """
        if self.loss_stats is None:
            self.state, metrics, per_sample_loss = self.train_step(self.state, device_batch)
        else:
            self.state, self.loss_stats, metrics, per_sample_loss = self.train_step(
                self.state, self.loss_stats, device_batch
            )
        return metrics, per_sample_loss

    def step(self, batch: SampleBatch) -> tuple[dict[str, jax.Array], jax.Array]:
        """One update from a host batch; returns device metrics and per-sample losses (not fetched)."""
        return self.step_on_device(self.to_device(batch))

    def compile(self, input_dim: int, sample_size: int, evaluate: bool) -> float:
        """Compiles the train step (and the evaluation when ``evaluate``) before any data arrive; returns seconds.

        It runs the step once on an all-padding batch: a total weight of 0 leaves the state bitwise
        unchanged (core.train), so nothing is learnt, but every jitted piece is compiled, Breed's
        statistics and the cross-rank gradient reduction included (a collective: every rank calls
        this at the same point). The statistics are put back as they were (the padding step
        counted as an update).
        """
        started = time.perf_counter()
        empty = SampleBatch(
            np.zeros((0, input_dim), np.float32), np.zeros((0, sample_size), np.float32), np.zeros(0, np.int64)
        )
        kept = None if self.loss_stats is None else jax.device_get(self.loss_stats)
        jax.block_until_ready(self.step(empty))
        if kept is not None:
            self.load_loss_stats(kept)
        if evaluate:
            self.evaluate(np.zeros((1, input_dim), np.float32), np.zeros((1, sample_size), np.float32))
        return time.perf_counter() - started

    def evaluate(self, inputs: np.ndarray, targets: np.ndarray) -> Evaluation:
        """Validation MSE (normalized units), overall and per field, over a whole host dataset."""
        return self.evaluator(self.state.params, inputs, targets)

    def host_state(self) -> TrainState:
        """The whole train state (parameters, optimizer state, step) as host arrays: what a checkpoint saves."""
        return jax.device_get(self.state)

    def load_state(self, host_state: TrainState) -> None:
        """Replaces the train state by a saved one (same structure), replicated over the mesh."""
        self.state = replicate(
            TrainState(*host_state) if not isinstance(host_state, TrainState) else host_state, self.mesh
        )

    def load_loss_stats(self, host_stats: breed.LossStatsState) -> None:
        """Replaces Breed's statistics (e.g. from a checkpoint), replicated over the mesh."""
        if self.loss_stats is None:
            raise RuntimeError("this trainer keeps no Breed statistics (sampler.kind is not breed)")
        self.loss_stats = replicate(breed.LossStatsState(*host_stats), self.mesh)

    def host_params(self) -> Any:
        return jax.device_get(self.state.params)

    def params_bytes(self) -> bytes:
        """The trained parameters in flax's msgpack format (``flax.serialization.msgpack_restore``)."""
        return serialization.msgpack_serialize(self.host_params())
