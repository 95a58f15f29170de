"""Training after reception (``train.after_reception = N``): more batches drawn from the final buffer.

When reception ends, each rank copies what its buffer holds, with the batches drawn but not yet
trained on (``checkpoint.with_pending``). The buffer then drains as with ``"drain"``, so every sample
is still used at least once; then the ranks train N more batches, each rank drawing ``batch_size`` rows
uniformly with replacement from its copy (a rank whose copy is empty joins the steps with no rows).
A drain draws every row of the final buffer exactly once more (FIFO and FIRO evict what they hand
out; a Reservoir's draws after reception are distinct and evicting), so a row's uses once drained
are its uses at the copy plus one; :func:`repetition_histogram` moves the copied rows from that count
to their total, and the run's histogram counts the extra draws too (docs/architecture.md, "Buffers").
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np

from jaxsurro.server.buffers import BufferSnapshot, SampleBatch


class FinalBufferState(NamedTuple):
    """A rank's copy of its final buffer and its draws so far: what a checkpoint keeps of the extra phase."""

    inputs: np.ndarray  # [m, input_dim] float32
    targets: np.ndarray  # [m, field_size] float32
    sample_ids: np.ndarray  # [m] int64
    drained_uses: np.ndarray  # [m] int32: each row's uses once the buffer has drained
    extra_uses: np.ndarray  # [m] int32: its draws in the extra batches so far
    steps: int  # extra batches trained so far (global steps: the same on every rank)
    rng_state: dict  # the draws' generator state (numpy bit generator)


class FinalBuffer:
    """The copy of a rank's buffer at the end of reception, drawn from uniformly with replacement."""

    def __init__(self, state: FinalBufferState):
        self._state = state
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = copy.deepcopy(state.rng_state)
        self.extra_uses = np.array(state.extra_uses, dtype=np.int32)
        self.steps = int(state.steps)

    @classmethod
    def from_snapshot(cls, snapshot: BufferSnapshot, seed: int) -> FinalBuffer:
        """The copy taken when reception ended (use counts as of then); ``seed`` seeds its draws."""
        return cls(
            FinalBufferState(
                inputs=snapshot.inputs,
                targets=snapshot.targets,
                sample_ids=snapshot.sample_ids,
                drained_uses=np.asarray(snapshot.use_counts, dtype=np.int32) + 1,
                extra_uses=np.zeros(len(snapshot.sample_ids), dtype=np.int32),
                steps=0,
                rng_state=np.random.default_rng(seed).bit_generator.state,
            )
        )

    def __len__(self) -> int:
        return len(self._state.sample_ids)

    @property
    def drained_uses(self) -> np.ndarray:
        return self._state.drained_uses

    def draw(self, batch_size: int) -> SampleBatch | None:
        """``batch_size`` rows drawn uniformly with replacement (fresh arrays); None when the copy is empty."""
        if len(self) == 0:
            return None
        rows = self._rng.integers(len(self), size=batch_size)
        np.add.at(self.extra_uses, rows, 1)
        state = self._state
        return SampleBatch(
            state.inputs.take(rows, axis=0), state.targets.take(rows, axis=0), state.sample_ids.take(rows)
        )

    def state(self) -> FinalBufferState:
        """A copy of the state now, for a checkpoint (the stored rows are shared: they never change)."""
        return self._state._replace(
            extra_uses=self.extra_uses.copy(),
            steps=self.steps,
            rng_state=copy.deepcopy(self._rng.bit_generator.state),
        )


def repetition_histogram(buffer_histogram: np.ndarray, drained_uses: np.ndarray, extra_uses: np.ndarray) -> np.ndarray:
    """The buffer's repetition histogram with the copied rows counted at their drained uses plus their extra draws.

    ``buffer_histogram[k]``: samples the buffer saw used k times, the copied rows among them at their
    ``drained_uses``. Returns the same histogram (int64) after moving each copied row to
    ``drained_uses + extra_uses``.
    """
    totals = drained_uses.astype(np.int64) + extra_uses
    length = max(len(buffer_histogram), int(totals.max(initial=0)) + 1)
    histogram = np.zeros(length, dtype=np.int64)
    histogram[: len(buffer_histogram)] = buffer_histogram
    histogram -= np.bincount(drained_uses, minlength=length)
    histogram += np.bincount(totals, minlength=length)
    if (histogram < 0).any():
        raise ValueError("the copied rows' drained uses are not in the buffer's repetition histogram")
    return histogram
