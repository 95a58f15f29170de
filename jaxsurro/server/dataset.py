"""Offline mode's dataset on disk: one file per simulation, written as its steps arrive, read back in epochs.

Layout of ``<run_dir>/dataset/`` (docs/architecture.md, "Offline mode"):

- ``dataset.json``: what every file holds (steps, sample size, dt, parameter and field names), written first;
- ``sim-000042.partial.npy``: a simulation being received, a NumPy ``.npy`` file of ``[n_steps, sample_size]``
  float32 mapped in memory (``numpy.lib.format.open_memmap``); each time step is written to its row as it
  arrives, in whatever order;
- ``sim-000042.json``: its parameters, written (by an atomic rename) once every step is there;
- ``sim-000042.npy``: the same ``.npy`` file renamed, after its parameters are written: a name
  without ``.partial`` is always a whole simulation, whenever the run was killed.

The rows go to the file through the page cache (a shared memory map), so what a killed process
wrote stays written; nothing is synced to the device on the receiver's path (an ``msync`` per
simulation stalled it for milliseconds), so a crash of the machine itself may lose what the
kernel had not yet written back, as for every other file of the run.

:class:`DatasetWriter` is the receiver's sink, as ``BufferSink`` is online. :class:`Dataset` reads the
complete simulations through memory maps, one batch's rows at a time, and :class:`EpochBatches` hands
out every sample once per epoch in an order reshuffled each epoch, as the prefetch thread asks for
batches. Nothing holds the dataset in memory: the reader keeps a bounded number of files mapped and
the operating system's page cache does the rest.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxsurro.config import Config
from jaxsurro.core.sampling import derive_seed
from jaxsurro.server.buffers import SampleBatch
from jaxsurro.table import SimulationTable

log = logging.getLogger("jaxsurro.server.dataset")

META = "dataset.json"
PARTIAL = ".partial.npy"
DTYPE = np.dtype(np.float32)
MAX_OPEN_FILES = 4096  # files the reader keeps mapped at most (each map holds a file descriptor)


def simulation_name(sim_id: int) -> str:
    """The stem of a simulation's files: ``sim-000042``."""
    return f"sim-{sim_id:06d}"


def _write_atomically(path: Path, text: str) -> None:
    """``path`` holds either its old content or all of ``text``, never part of it."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


@dataclasses.dataclass
class _Receiving:
    """A simulation whose steps are arriving: its mapped file and which rows hold a step."""

    rows: np.memmap  # [n_steps, sample_size] float32
    written: np.ndarray  # [n_steps] bool
    count: int
    parameters: np.ndarray  # a copy of the parameters the steps were computed with
    source: np.ndarray  # the table's array they were copied from (a redraw puts a new one there)


class DatasetWriter:
    """The receiver's sink in offline mode: each time step into its simulation's file, each whole file renamed.

    Called from the receiver thread only. A simulation whose parameters change while its steps
    arrive (``launcher.on_exhausted = "redraw"``) starts its file over: a complete file never mixes two draws.
    """

    def __init__(
        self,
        directory: Path,
        table: SimulationTable,
        *,
        n_steps: int,
        sample_size: int,
        dt: float,
        parameter_names: Sequence[str],
        field_shapes: dict[str, tuple[int, ...]] | None = None,
    ):
        self.directory = Path(directory)
        self.table = table
        self.n_steps, self.sample_size = n_steps, sample_size
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "n_steps": n_steps,
            "sample_size": sample_size,
            "dtype": DTYPE.name,
            "dt": dt,
            "parameter_names": list(parameter_names),
            "fields": {name: list(shape) for name, shape in (field_shapes or {}).items()},
        }
        _write_atomically(self.directory / META, json.dumps(meta, indent=1) + "\n")
        self._receiving: dict[int, _Receiving] = {}
        self._completed: set[int] = set()
        self.completed_count = 0  # read by other threads (an int: one atomic store)

    @classmethod
    def from_config(cls, config: Config, table: SimulationTable, directory: Path) -> DatasetWriter:
        solver = config.solver
        return cls(
            directory,
            table,
            n_steps=solver.n_steps,
            sample_size=solver.sample_size,
            dt=solver.dt,
            parameter_names=solver.parameter_names,
            field_shapes=solver.field_shapes,
        )

    def accept(self, sim_id: int, time_step: int, sample: np.ndarray, timeout: float) -> bool:
        """Writes one time step to its row (as float32); completes the simulation with its last missing step."""
        if sim_id in self._completed:
            log.warning("simulation %d sent step %d after its file was complete; ignored", sim_id, time_step)
            return True
        parameters = self.table[sim_id].parameters  # frozen once submitted; replaced by a redraw
        receiving = self._receiving.get(sim_id)
        if receiving is None:
            receiving = self._receiving[sim_id] = self._open(sim_id, parameters)
        elif parameters is not receiving.source:
            receiving.source = parameters
            if not np.array_equal(receiving.parameters, parameters):  # a redraw: the rows so far are another draw's
                receiving.written[:] = False
                receiving.count = 0
                receiving.parameters = np.array(parameters, copy=True)
        receiving.rows[time_step] = sample.reshape(self.sample_size)
        if not receiving.written[time_step]:
            receiving.written[time_step] = True
            receiving.count += 1
            if receiving.count == self.n_steps:
                self._complete(sim_id, receiving)
        return True

    def wait_for_room(self, timeout: float) -> None:
        return  # the disk is the limit: always room

    def completed(self) -> list[int]:
        """The simulations whose file is complete, in id order."""
        return sorted(self._completed)

    def close(self) -> None:
        """Unmaps the files still being received; they stay ``.partial`` and are never read."""
        self._receiving.clear()

    def _open(self, sim_id: int, parameters: np.ndarray) -> _Receiving:
        path = self.directory / (simulation_name(sim_id) + PARTIAL)
        rows = np.lib.format.open_memmap(path, mode="w+", dtype=DTYPE, shape=(self.n_steps, self.sample_size))
        return _Receiving(rows, np.zeros(self.n_steps, dtype=bool), 0, np.array(parameters, copy=True), parameters)

    def _complete(self, sim_id: int, receiving: _Receiving) -> None:
        """The parameters, then the rename that marks the file whole."""
        del self._receiving[sim_id]  # the map closes with its last reference
        name = simulation_name(sim_id)
        record = {"sim_id": sim_id, "parameters": [float(p) for p in receiving.parameters]}
        _write_atomically(self.directory / f"{name}.json", json.dumps(record) + "\n")
        os.replace(self.directory / (name + PARTIAL), self.directory / f"{name}.npy")
        self._completed.add(sim_id)
        self.completed_count += 1


def _default_max_open() -> int:
    """A quarter of this process's file descriptor limit, at most :data:`MAX_OPEN_FILES`."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_FILES
    return max(16, min(MAX_OPEN_FILES, soft // 4))


class Dataset:
    """The complete simulations of a dataset directory, read by rows through memory maps.

    Sample ``k`` is time step ``k mod n_steps`` of the ``k // n_steps``-th complete simulation (in
    id order). Its inputs are built as ``BufferSink`` builds them online: the parameters, then the
    time ``(t + 1) · dt``, in float32. At most ``max_open`` files are mapped at once (least recently
    used first out), so a dataset of any number of simulations stays within the descriptor limit.
    """

    def __init__(self, directory: Path, max_open: int | None = None):
        self.directory = Path(directory)
        meta = json.loads((self.directory / META).read_text())
        self.n_steps, self.sample_size, self.dt = int(meta["n_steps"]), int(meta["sample_size"]), float(meta["dt"])
        self.parameter_names = tuple(meta["parameter_names"])
        ids, parameters = [], []
        for path in self.directory.glob("sim-*.npy"):
            if path.name.endswith(PARTIAL):
                continue
            record = json.loads(path.with_suffix(".json").read_text())
            ids.append(int(record["sim_id"]))
            parameters.append(record["parameters"])
        order = np.argsort(ids, kind="stable")
        self.sim_ids = np.asarray(ids, dtype=np.int64)[order]
        self.parameters = np.asarray(parameters, dtype=np.float64).reshape(len(ids), len(self.parameter_names))[order]
        self.max_open = _default_max_open() if max_open is None else max(1, max_open)
        self._maps: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def __len__(self) -> int:
        """Samples: every time step of every complete simulation."""
        return len(self.sim_ids) * self.n_steps

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._maps.clear()

    def rows(self, index: int) -> np.ndarray:
        """The ``[n_steps, sample_size]`` rows of the ``index``-th complete simulation (a read-only map)."""
        rows = self._maps.get(index)
        if rows is not None:
            self._maps.move_to_end(index)
            return rows
        path = self.directory / f"{simulation_name(int(self.sim_ids[index]))}.npy"
        rows = np.load(path, mmap_mode="r")
        if rows.shape != (self.n_steps, self.sample_size) or rows.dtype != DTYPE:
            raise ValueError(
                f"{path} holds {rows.dtype} {rows.shape}; {META} says float32 ({self.n_steps}, {self.sample_size})"
            )
        rows = rows.view(np.ndarray)  # a plain array over the same map: indexing it skips np.memmap's overhead
        if len(self._maps) >= self.max_open:
            self._maps.popitem(last=False)
        self._maps[index] = rows
        return rows

    def gather(self, indices: np.ndarray) -> SampleBatch:
        """Samples ``indices`` as a batch the caller owns: one row read from its file per sample."""
        indices = np.asarray(indices, dtype=np.int64)
        sims, steps = np.divmod(indices, self.n_steps)
        inputs = np.empty((len(indices), len(self.parameter_names) + 1), dtype=np.float32)
        inputs[:, :-1] = self.parameters[sims]
        inputs[:, -1] = (steps + 1) * self.dt
        targets = np.empty((len(indices), self.sample_size), dtype=np.float32)
        for row, (sim, step) in enumerate(zip(sims.tolist(), steps.tolist(), strict=True)):
            targets[row] = self.rows(sim)[step]
        return SampleBatch(inputs, targets, self.sim_ids[sims] * self.n_steps + steps)


def epoch_order(seed: int, epoch: int, n_samples: int) -> np.ndarray:
    """The order of pass ``epoch`` over ``n_samples`` samples: a permutation from study.seed's "epoch" stream."""
    return np.random.default_rng(derive_seed(seed, "epoch", epoch)).permutation(n_samples)


def batches_per_epoch(n_samples: int, batch_size: int) -> int:
    """ceil(n_samples / batch_size): an epoch's last batch is short when the division is not exact."""
    return -(-n_samples // batch_size)


class EpochBatches:
    """Every sample of a dataset once per epoch, ``epochs`` times, as the prefetch thread draws batches.

    Each epoch walks its own permutation (:func:`epoch_order`) in batches of ``batch_size``; the last
    batch of an epoch holds the remainder (the trainer pads it with zero-weight rows), so an epoch is
    :func:`batches_per_epoch` batches and never mixes with the next. ``uses`` counts each sample's draws.
    """

    def __init__(self, dataset: Dataset, epochs: int, seed: int):
        self.dataset, self.epochs, self.seed = dataset, epochs, seed
        self.epoch = 0
        self.uses = np.zeros(len(dataset), dtype=np.int32)
        self._order = epoch_order(seed, 0, len(dataset))
        self._next = 0

    def get_batch(self, batch_size: int, timeout: float | None = None) -> SampleBatch | None:
        """The next batch of the current epoch; None once the last epoch is over. Never waits."""
        if self._next >= len(self._order):
            if self.epoch + 1 >= self.epochs or len(self._order) == 0:
                self.epoch = self.epochs
                return None
            self.epoch += 1
            self._order = epoch_order(self.seed, self.epoch, len(self.dataset))
            self._next = 0
        indices = self._order[self._next : self._next + batch_size]
        self._next += len(indices)
        self.uses[indices] += 1
        return self.dataset.gather(indices)
