"""Checkpoints of a run: everything needed to resume it, written atomically without stalling training.

A checkpoint is a directory ``<run_dir>/checkpoints/step-<N>/``:

- ``train_state/``: the train state (parameters, optimizer state, step) as an orbax checkpoint,
  written by rank 0 (every rank holds the same bits);
- ``rank-<r>.npz`` and ``rank-<r>.json``: each rank's host buffer (samples, use counts, counters,
  the draws' generator state), its receiver's deduplication record and counters, its share of
  the Breed statistics and, while ``train.after_reception`` batches run, its copy of the final buffer;
- ``meta.json`` (rank 0): the loop's position (steps, validation history, wall time, metrics lines),
  the simulation table and Breed's resampling state.

Each rank copies what it owns at one instant of the lockstep loop (a few milliseconds), then writes
the copy from a background thread while training goes on. The files go to ``.step-<N>.partial/``;
once every rank has reported its part written, rank 0 renames the directory to ``step-<N>`` (an
atomic rename: a directory named ``step-*`` is always whole) and keeps only the latest
``checkpoint.keep`` of them (docs/architecture.md, "Run directory").
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsurro import rundir
from jaxsurro.server.after_reception import FinalBufferState
from jaxsurro.server.buffers import BufferSnapshot, SampleBatch

PREFIX = rundir.CHECKPOINT_PREFIX
PARTIAL = ".partial"
TRAIN_STATE = "train_state"
META = "meta.json"


class RankState(NamedTuple):
    """One rank's part of a checkpoint, copied at one instant."""

    buffer: BufferSnapshot
    stored: np.ndarray  # [S, T] bool: the (simulation, step) pairs this rank's receiver stored
    receiver: dict[str, Any]  # its counters (JSON-ready)
    samples_trained: int
    breed: dict[str, np.ndarray] | None  # its Breed loss statistics, as NumPy arrays
    final_buffer: FinalBufferState | None = None  # train.after_reception = N: its copy, once the extra batches began


def with_pending(snapshot: BufferSnapshot, pending: list[SampleBatch]) -> BufferSnapshot:
    """The buffer as if the batches drawn but not yet trained on had not been drawn: their rows go back in front.

    A FIFO or FIRO buffer evicts what it hands out; a Reservoir keeps it (then its rows are already there).
    """
    present = set(snapshot.sample_ids.tolist())
    rows = [
        (batch.inputs[i], batch.targets[i], int(batch.sample_ids[i]))
        for batch in pending
        for i in range(len(batch.sample_ids))
        if int(batch.sample_ids[i]) not in present
    ]
    if not rows:
        return snapshot
    inputs, targets, ids = (np.stack(column) for column in zip(*rows, strict=True))
    return snapshot._replace(
        inputs=np.concatenate([inputs, snapshot.inputs]),
        targets=np.concatenate([targets, snapshot.targets]),
        sample_ids=np.concatenate([ids.astype(np.int64), snapshot.sample_ids]),
        use_counts=np.concatenate([np.zeros(len(rows), np.int32), snapshot.use_counts]),
    )


def directory_for(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"{PREFIX}{step:09d}"


def partial_for(checkpoints: Path, step: int) -> Path:
    return checkpoints / f".{PREFIX}{step:09d}{PARTIAL}"


def write_rank(directory: Path, rank: int, state: RankState) -> None:
    """Writes one rank's part (arrays in ``rank-<r>.npz``, the rest in ``rank-<r>.json``)."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"buffer_{name}": value for name, value in state.buffer._asdict().items() if isinstance(value, np.ndarray)
    }
    arrays["stored"] = state.stored
    for name, value in (state.breed or {}).items():
        arrays[f"breed_{name}"] = value
    final = None
    if state.final_buffer is not None:
        final = {"steps": state.final_buffer.steps, "rng_state": state.final_buffer.rng_state}
        for name, value in state.final_buffer._asdict().items():
            if isinstance(value, np.ndarray):
                arrays[f"final_{name}"] = value
    np.savez(directory / f"rank-{rank}.npz", **arrays)
    (directory / f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "buffer_kind": state.buffer.kind,
                "buffer_rng_state": state.buffer.rng_state,
                "receiver": state.receiver,
                "samples_trained": state.samples_trained,
                "breed_keys": sorted(state.breed) if state.breed is not None else None,
                "final_buffer": final,
            }
        )
    )


def read_rank(directory: Path, rank: int) -> RankState:
    """The part of ``rank`` in a complete checkpoint directory."""
    info = json.loads((directory / f"rank-{rank}.json").read_text())
    with np.load(directory / f"rank-{rank}.npz") as data:
        arrays = {name: data[name] for name in data.files}
    buffer = BufferSnapshot(
        kind=info["buffer_kind"],
        rng_state=info["buffer_rng_state"],
        **{name: arrays[f"buffer_{name}"] for name in BufferSnapshot._fields if f"buffer_{name}" in arrays},
    )
    breed = None if info["breed_keys"] is None else {name: arrays[f"breed_{name}"] for name in info["breed_keys"]}
    final = None
    if info.get("final_buffer") is not None:
        final = FinalBufferState(
            steps=int(info["final_buffer"]["steps"]),
            rng_state=info["final_buffer"]["rng_state"],
            **{name: arrays[f"final_{name}"] for name in FinalBufferState._fields if f"final_{name}" in arrays},
        )
    return RankState(buffer, arrays["stored"], info["receiver"], int(info["samples_trained"]), breed, final)


def write_train_state(directory: Path, host_state: Any) -> None:
    """The train state (a pytree of host arrays) as an orbax checkpoint, waiting until it is on disk."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((directory / TRAIN_STATE).absolute(), host_state)
        checkpointer.wait_until_finished()


def read_train_state(directory: Path, template: Any) -> Any:
    """The train state saved in ``directory``, restored into the structure and dtypes of ``template``."""
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), np.asarray(leaf).dtype), jax.device_get(template)
    )
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore((directory / TRAIN_STATE).absolute(), abstract)


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    (directory / META).write_text(json.dumps(meta, indent=1))


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / META).read_text())


def finalize(checkpoints: Path, step: int, keep: int) -> Path:
    """Makes the partial checkpoint of ``step`` complete (one rename) and deletes all but the latest ``keep``."""
    final = directory_for(checkpoints, step)
    partial_for(checkpoints, step).rename(final)
    complete = sorted(checkpoints.glob(f"{PREFIX}*"))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    complete = sorted(path for path in checkpoints.glob(f"{PREFIX}*") if path.is_dir())
    return complete[-1] if complete else None


class BackgroundWriter:
    """Runs one checkpoint write at a time in a thread; the loop polls :attr:`idle` and re-raises its error."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def idle(self) -> bool:
        """No write in progress (the last one finished, or none was started)."""
        return self._thread is None or not self._thread.is_alive()

    def start(self, write: Callable[[], None]) -> None:
        if not self.idle:
            raise RuntimeError("a checkpoint is still being written; wait until the writer is idle")

        def run() -> None:
            try:
                write()
            except BaseException as exc:  # re-raised by check() in the loop's thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing a checkpoint failed: {self._error}") from self._error

    def wait(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"a checkpoint was not written within {timeout:.0f} s")
        self.check()
