"""Evaluation of a surrogate over a whole host dataset: the validation MSE, overall and per field.

One function serves the trainer (validation during a run) and ``python -m jaxsurro.predict
--validation`` (after it), so both report the same number for the same parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from jaxsurro.core.train import Batch, make_eval_step
from jaxsurro.server.parallel import jit_eval_step, make_data_mesh, put_batch

EVAL_CHUNK_ROWS = 1024  # rows per call; a fixed shape (short chunks are padded), so one compilation


class Evaluation(NamedTuple):
    mse: float  # the weighted mean per-sample loss: MSE in normalized units, fields mixed by their weights
    field_mse: tuple[float, ...]  # [F] each field's MSE in its normalized units


class Evaluator:
    """The jitted evaluation step of one model on a device mesh, applied chunk by chunk."""

    def __init__(self, model: nn.Module, field_weights: Sequence[float] | None = None, mesh: Mesh | None = None):
        self.mesh = mesh or make_data_mesh()
        self._step = jit_eval_step(make_eval_step(model, field_weights), self.mesh)

    def __call__(self, params: Any, inputs: np.ndarray, targets: np.ndarray) -> Evaluation:
        """Mean losses over every row of ``inputs [N, d+1]``, ``targets [N, sample_size]`` (host arrays)."""
        loss_sum = weight_sum = 0.0
        field_sums = None
        for start in range(0, len(inputs), EVAL_CHUNK_ROWS):
            stop = min(start + EVAL_CHUNK_ROWS, len(inputs))
            chunk = Batch(inputs[start:stop], targets[start:stop], np.ones(stop - start, dtype=np.float32))
            _, chunk_loss, chunk_weight, chunk_fields = jax.device_get(
                self._step(params, put_batch(chunk, self.mesh, min_size=EVAL_CHUNK_ROWS))
            )
            loss_sum += float(chunk_loss)
            weight_sum += float(chunk_weight)
            field_sums = np.asarray(chunk_fields, np.float64) + (0.0 if field_sums is None else field_sums)
        weight_sum = max(weight_sum, 1.0)
        fields = () if field_sums is None else tuple(float(v) / weight_sum for v in field_sums)
        return Evaluation(loss_sum / weight_sum, fields)


def validation_mse(
    model: nn.Module, params: Any, inputs: np.ndarray, targets: np.ndarray, field_weights: Sequence[float] | None = None
) -> float:
    """The validation MSE of ``params`` on a host dataset, as a run reports it."""
    return Evaluator(model, field_weights)(params, inputs, targets).mse
