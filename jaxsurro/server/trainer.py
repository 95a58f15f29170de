"""The surrogate being trained: its model, state and the jitted steps, bound to a device mesh.

Batches arrive as NumPy from the host buffer and go to the devices by one explicit,
sharded ``device_put``; the step is jitted once with fixed shapes (short batches
are padded with zero-weight rows), so nothing recompiles during a run.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import serialization

from jaxsurro.server.buffers import SampleBatch
from jaxsurro.config import Config
from jaxsurro.core.model import Scaling, make_model
from jaxsurro.core.sampling import derive_seed
from jaxsurro.server.parallel import jit_eval_step, jit_reduced_train_step, make_data_mesh, put_batch, replicate
from jaxsurro.core.train import Batch, init_train_state, make_eval_step, make_optimizer

EVAL_CHUNK_ROWS = 1024  # rows per validation call; a fixed shape, so one compilation


def scaling_for(config: Config) -> Scaling:
    """Input and output scaling from the known bounds in the configuration, never from data."""
    low, high = config.output_range
    return Scaling(param_low=config.solver.low, param_high=config.solver.high,
                   time_scale=config.solver.n_steps * config.solver.dt, field_low=low, field_high=high).validate()


class Trainer:
    """Holds the replicated train state on the local devices and runs the jitted steps."""

    def __init__(self, config: Config, reduce_fn=None, devices=None):
        self.config = config
        self.batch_size = config.train.batch_size
        self.field_shape = config.solver.field_shape
        self.mesh = make_data_mesh(devices)
        self.scaling = scaling_for(config)
        self.model = make_model(config.model.name, hidden=config.model.hidden, layers=config.model.layers,
                                field_shape=self.field_shape, scaling=self.scaling)
        optimizer = make_optimizer(config.train.learning_rate, self.batch_size, config.train.halve_every_samples)
        key = jax.random.key(derive_seed(config.study.seed, "model"))
        state = init_train_state(key, self.model, optimizer, len(config.solver.parameters) + 1)
        self.state = replicate(state, self.mesh)
        self._train_step = jit_reduced_train_step(self.model, optimizer, reduce_fn, self.mesh)
        self._eval_step = jit_eval_step(make_eval_step(self.model), self.mesh)
        self._ones = np.ones(self.batch_size, dtype=np.float32)

    def step(self, batch: SampleBatch) -> tuple[dict[str, jax.Array], jax.Array]:
        """One update from a host batch; returns device metrics and per-sample losses (not fetched)."""
        n = len(batch.sample_ids)
        host = Batch(batch.inputs, batch.targets.reshape(n, *self.field_shape), self._ones[:n])
        device_batch = put_batch(host, self.mesh, min_size=self.batch_size)
        self.state, metrics, per_sample_loss = self._train_step(self.state, device_batch)
        return metrics, per_sample_loss

    def evaluate(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """Mean per-sample loss (MSE in normalized field units) over a whole host dataset."""
        loss_sum = weight_sum = 0.0
        for start in range(0, len(inputs), EVAL_CHUNK_ROWS):
            stop = min(start + EVAL_CHUNK_ROWS, len(inputs))
            chunk = Batch(inputs[start:stop], targets[start:stop], np.ones(stop - start, dtype=np.float32))
            _, chunk_loss, chunk_weight = self._eval_step(self.state.params,
                                                          put_batch(chunk, self.mesh, min_size=EVAL_CHUNK_ROWS))
            chunk_loss, chunk_weight = jax.device_get((chunk_loss, chunk_weight))
            loss_sum += float(chunk_loss)
            weight_sum += float(chunk_weight)
        return loss_sum / max(weight_sum, 1.0)

    def host_params(self) -> Any:
        return jax.device_get(self.state.params)

    def params_bytes(self) -> bytes:
        """The trained parameters in flax's msgpack format (``flax.serialization.msgpack_restore``)."""
        return serialization.msgpack_serialize(self.host_params())
