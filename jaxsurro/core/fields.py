"""The layout of one training sample: the experiment's named fields, flattened and concatenated.

A time step carries every declared field; the server stores it as one flat float32 row
``[u_0.ravel(), u_1.ravel(), ...]`` in declaration order, and the surrogate predicts the
same row. :class:`FieldSpec` names one block of that row; the helpers below convert
between the flat row and a dict of shaped fields, for NumPy and JAX arrays alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = ["FieldSpec", "join_fields", "offsets", "sample_size", "split_fields"]

MAX_NDIM = 4  # the wire protocol carries shapes of rank 0 to 4


class FieldSpec(NamedTuple):
    """One named field of a time step: its name and shape (``()`` for a scalar)."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Elements of the field in the flat sample row (1 for a scalar)."""
        return math.prod(self.shape)


def sample_size(layout: Sequence[FieldSpec]) -> int:
    """Elements of one flat sample row: the sum of the fields' sizes."""
    return sum(spec.size for spec in layout)


def offsets(layout: Sequence[FieldSpec]) -> tuple[int, ...]:
    """Start of each field in the flat row, plus the row's end: ``len(layout) + 1`` entries."""
    starts = [0]
    for spec in layout:
        starts.append(starts[-1] + spec.size)
    return tuple(starts)


def split_fields(rows: Any, layout: Sequence[FieldSpec]) -> dict[str, Any]:
    """Flat rows ``[..., sample_size]`` -> ``{name: [..., *shape]}`` (views where the array allows)."""
    bounds = offsets(layout)
    lead = rows.shape[:-1]
    return {
        spec.name: rows[..., bounds[i] : bounds[i + 1]].reshape((*lead, *spec.shape)) for i, spec in enumerate(layout)
    }


def join_fields(fields: Mapping[str, Any], layout: Sequence[FieldSpec], xp: Any) -> Any:
    """``{name: [..., *shape]}`` -> flat rows ``[..., sample_size]``; ``xp`` is ``numpy`` or ``jax.numpy``."""
    missing = [spec.name for spec in layout if spec.name not in fields]
    if missing:
        raise ValueError(f"fields {missing} are missing; a sample holds {[spec.name for spec in layout]}")
    parts = []
    for spec in layout:
        value = fields[spec.name]
        lead = value.shape[: value.ndim - len(spec.shape)]
        if tuple(value.shape[len(lead) :]) != spec.shape:
            raise ValueError(f"field {spec.name!r} must end with shape {spec.shape}, got {tuple(value.shape)}")
        parts.append(value.reshape(*lead, spec.size))
    return xp.concatenate(parts, axis=-1)
