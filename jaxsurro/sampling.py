"""Seeded parameter samplers over box bounds: uniform, Halton and Latin hypercube.

Built on :mod:`scipy.stats.qmc`, which implements scrambled Halton and optimized
Latin hypercube designs correctly and fast; the same seed gives the same
parameter sequence, run after run and machine after machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy.stats import qmc

SamplerKind = Literal["uniform", "halton", "lhs"]
SAMPLER_KINDS: tuple[str, ...] = ("uniform", "halton", "lhs")


class BoxSampler:
    """Draws points in ``[low, high]^d`` in batches; successive draws continue one sequence.

    For Halton, successive draws continue the same low-discrepancy sequence; for
    Latin hypercube, each draw is its own stratified design of the requested size.
    """

    def __init__(self, kind: SamplerKind, low: Sequence[float], high: Sequence[float], seed: int):
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        if self.low.ndim != 1 or self.low.shape != self.high.shape or self.low.size == 0:
            raise ValueError(f"bounds must be two 1-D sequences of the same non-zero length, got "
                             f"low={list(low)} and high={list(high)}")
        if not np.all(self.low < self.high):
            bad = [i for i in range(self.low.size) if not self.low[i] < self.high[i]]
            raise ValueError(f"every low bound must be below its high bound; dimensions {bad} are not")
        if kind not in SAMPLER_KINDS:
            raise ValueError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLER_KINDS)}")
        self.kind = kind
        self.dim = self.low.size
        if kind == "uniform":
            self._rng = np.random.default_rng(seed)
        elif kind == "halton":
            self._engine = qmc.Halton(d=self.dim, scramble=True, seed=seed)
        else:
            self._engine = qmc.LatinHypercube(d=self.dim, seed=seed)

    def unit(self, n: int) -> np.ndarray:
        """``n`` points in the unit cube, shape ``[n, d]`` float64."""
        if n < 0:
            raise ValueError(f"cannot draw a negative number of points ({n})")
        if self.kind == "uniform":
            return self._rng.random((n, self.dim))
        return self._engine.random(n)

    def draw(self, n: int) -> np.ndarray:
        """``n`` points within the bounds, shape ``[n, d]`` float64."""
        return qmc.scale(self.unit(n), self.low, self.high) if n else np.empty((0, self.dim))


def sample(kind: SamplerKind, n: int, low: Sequence[float], high: Sequence[float], seed: int) -> np.ndarray:
    """``n`` points within ``[low, high]``, drawn by a fresh sampler of this kind and seed."""
    return BoxSampler(kind, low, high, seed).draw(n)
