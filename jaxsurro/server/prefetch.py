"""The next batch, ready before the trainer asks: host batch assembly off the step's path.

A :class:`Prefetcher` thread draws batch N+1 from the host buffer and prepares it as the step
takes it (``Trainer.prefetch``: weights, padding to the batch size and the mesh, and the sharded
transfer to the devices) while step N runs, and keeps at most ``depth`` such batches ready. The
trainer takes them with :meth:`Prefetcher.get`, so the host's share of a step (the buffer's lock and
gather, the padding, the transfer) overlaps the device's work. On a mesh of several CPU devices the
transfer stays in the trainer's thread (``Trainer.puts_from_any_thread``): XLA's CPU collectives
wait for every device's part of a step, and a transfer issued from another thread in the middle of a
step was seen to stall that rendezvous (docs/architecture.md, "Training"). Offline mode runs the
same thread over the epochs of its dataset on disk: any :class:`BatchSource` will do.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from jaxsurro.core.train import Batch
from jaxsurro.server.buffers import BufferClosed, SampleBatch

POLL_SECONDS = 0.01  # the longest the thread holds its lock waiting for the buffer, or sleeps before rechecking


class Ready(NamedTuple):
    """A batch as drawn from the buffer (its sample ids feed Breed) and as prepared for the step."""

    host: SampleBatch
    prepared: Batch
    drawn_at: float  # time.monotonic() when it was drawn from the buffer


class Prepare(Protocol):
    def __call__(self, batch: SampleBatch) -> Batch: ...


class BatchSource(Protocol):
    """Where batches come from: a host buffer (online), or the epochs over a dataset on disk (offline)."""

    def get_batch(self, batch_size: int, timeout: float | None = None) -> SampleBatch | None:
        """A batch; None once there will be none; TimeoutError when none came within ``timeout``."""


class Prefetcher:
    """A thread keeping up to ``depth`` batches drawn and prepared; use as a context manager.

    A batch is drawn under the draw lock and listed at once (as being prepared), then prepared
    outside every lock, so the trainer takes ready batches meanwhile and :meth:`paused` (which holds
    the draw lock) sees every drawn batch either in the buffer or among :meth:`pending`, never in
    between (checkpoints).
    """

    def __init__(self, buffer: BatchSource, prepare: Prepare, batch_size: int, depth: int = 2):
        self._buffer = buffer
        self._prepare = prepare
        self._batch_size = batch_size
        self._depth = depth
        self._draw_lock = threading.Lock()  # held while drawing; paused() holds it
        self._lock = threading.Lock()  # guards the queue and the batch being prepared
        self._changed = threading.Condition(self._lock)  # an item was queued or taken
        self._items: collections.deque[Ready] = collections.deque()
        self._preparing: SampleBatch | None = None  # drawn, not yet queued
        self._drained = False  # the buffer reported drained; handed out once the queue is empty
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the thread is still going."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._lock:
            self._changed.notify_all()
        self._thread.join(timeout)

    def get(self, timeout: float) -> Ready | None:
        """The next prepared batch; None once the buffer is drained; TimeoutError if none within ``timeout``.

        An error of the thread (the buffer's or the preparation's) is raised here, in the caller's thread.
        """
        with self._lock:
            ready = self._changed.wait_for(lambda: self._items or self._drained or self._error, timeout)
            if self._items:
                item = self._items.popleft()
                self._changed.notify_all()
                return item
            if self._error is not None:
                raise self._error
            if ready:  # drained, and every batch was handed out
                return None
        raise TimeoutError(f"no batch was ready within {timeout:g} s")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is drawn while the block runs; :meth:`pending` then lists every drawn batch not yet taken."""
        with self._draw_lock:
            yield

    def pending(self) -> list[SampleBatch]:
        """The host batches drawn and not yet taken by the trainer, oldest first (call inside :meth:`paused`)."""
        with self._lock:
            queued = [ready.host for ready in self._items]
            return queued if self._preparing is None else [*queued, self._preparing]

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    if len(self._items) >= self._depth:
                        self._changed.wait(POLL_SECONDS)  # releases the lock until the trainer takes one
                        continue
                with self._draw_lock:
                    try:
                        batch = self._buffer.get_batch(self._batch_size, timeout=POLL_SECONDS)
                    except TimeoutError:
                        continue
                    drawn_at = time.monotonic()
                    with self._lock:
                        if batch is None:
                            self._drained = True
                            self._changed.notify_all()
                            return
                        self._preparing = batch
                prepared = self._prepare(batch)  # no lock held: the trainer takes ready batches meanwhile
                with self._lock:
                    self._items.append(Ready(batch, prepared, drawn_at))
                    self._preparing = None
                    self._changed.notify_all()
        except BufferClosed:
            return  # the run is ending
        except BaseException as exc:  # handed to the trainer's thread by get()
            with self._lock:
                self._error = exc
                self._changed.notify_all()
