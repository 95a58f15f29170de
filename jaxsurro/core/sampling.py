"""Seeded parameter samplers over box bounds, the study's initial plan, and every seed of a run.

Built on :mod:`scipy.stats.qmc`, which implements scrambled Halton and optimized
Latin hypercube designs correctly and fast; the same seed gives the same
parameter sequence, run after run and machine after machine.

:func:`derive_seed` is the one place a run's random streams get their seeds: each
stream (sampler, model, buffer of each rank, Breed's draws) is named, and its seed is
derived from ``study.seed`` and that name, so changing one stream never shifts another.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy.stats import qmc

SamplerKind = Literal["uniform", "halton", "lhs"]
SAMPLER_KINDS: tuple[str, ...] = ("uniform", "halton", "lhs")

# The random streams of a run, each seeded from study.seed by its name (see derive_seed).
SEED_STREAMS: tuple[str, ...] = (
    "sampler",
    "model",
    "buffer",
    "breed",
    "breed-uniform",
    "epoch",  # offline mode: the order of each pass over the dataset (index: the epoch)
    "after-reception",  # train.after_reception = N: the draws from the final buffer (index: the rank)
)
# The validation set's Halton scramble is fixed on purpose, not derived from study.seed: every
# seed of a study is then measured on the same validation simulations, and the set is cached once.
VALIDATION_SEED = 20231112


def derive_seed(study_seed: int, stream: str, index: int = 0) -> int:
    """The seed of one named random stream of a run (``index``: e.g. the server rank), a uint32.

    ``numpy.random.SeedSequence`` mixes the study seed, the stream's name and the index, so
    streams are independent of each other and reproducible from ``study.seed`` alone.
    """
    if stream not in SEED_STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; the streams of a run are {', '.join(SEED_STREAMS)}")
    if study_seed < 0 or index < 0:
        raise ValueError(f"seeds are non-negative integers, got study seed {study_seed} and index {index}")
    sequence = np.random.SeedSequence(study_seed, spawn_key=(zlib.crc32(stream.encode()), index))
    return int(sequence.generate_state(1, np.uint32)[0])


class BoxSampler:
    """Draws points in ``[low, high]^d`` in batches; successive draws continue one sequence.

    For Halton, successive draws continue the same low-discrepancy sequence; for
    Latin hypercube, each draw is its own stratified design of the requested size.
    """

    def __init__(self, kind: SamplerKind, low: Sequence[float], high: Sequence[float], seed: int):
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        if self.low.ndim != 1 or self.low.shape != self.high.shape or self.low.size == 0:
            raise ValueError(
                f"bounds must be two 1-D sequences of the same non-zero length, got "
                f"low={list(low)} and high={list(high)}"
            )
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


def plan_parameters(
    kind: SamplerKind, n: int, low: Sequence[float], high: Sequence[float], study_seed: int
) -> np.ndarray:
    """The study's initial plan: ``n`` simulation parameters ``[n, d]`` float64 from the sampler stream."""
    return sample(kind, n, low, high, derive_seed(study_seed, "sampler"))


def validation_parameters(n: int, low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """The parameters of the validation simulations: Halton points under the fixed ``VALIDATION_SEED``."""
    return sample("halton", n, low, high, VALIDATION_SEED)
