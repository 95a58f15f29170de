"""The next batch, ready on the devices before the trainer asks: host batch assembly off the step's path.

A :class:`Prefetcher` thread draws batch N+1 from the host buffer, converts it and puts it on the
devices with the step's sharding (``Trainer.to_device``) while step N runs, and keeps at most
``depth`` such batches ready. The trainer takes them with :meth:`Prefetcher.get`, so the host's
share of a step (the buffer's lock and gather, padding, the transfer) overlaps the device's work
(docs/architecture.md, "Training").
"""

from __future__ import annotations

import queue
import threading
import time
from typing import NamedTuple, Protocol

from jaxsurro.core.train import Batch
from jaxsurro.server.buffers import Buffer, BufferClosed, SampleBatch

POLL_SECONDS = 0.05  # how often the thread looks up from a wait to see whether it must stop


class Ready(NamedTuple):
    """A batch as drawn from the buffer (its sample ids feed Breed) and as the step takes it."""

    host: SampleBatch
    device: Batch
    drawn_at: float  # time.monotonic() when it was drawn from the buffer


class _Drained(NamedTuple):
    """Put in the queue when the buffer is drained after reception ended: training is over."""


class _Failed(NamedTuple):
    error: BaseException


class ToDevice(Protocol):
    def __call__(self, batch: SampleBatch) -> Batch: ...


class Prefetcher:
    """A thread keeping up to ``depth`` batches drawn and on the devices; use as a context manager."""

    def __init__(self, buffer: Buffer, to_device: ToDevice, batch_size: int, depth: int = 2):
        self._buffer = buffer
        self._to_device = to_device
        self._batch_size = batch_size
        self._ready: queue.Queue[Ready | _Drained | _Failed] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False  # the drained marker was handed out
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
        self._thread.join(timeout)

    def get(self, timeout: float) -> Ready | None:
        """The next batch on the devices; None once the buffer is drained; TimeoutError if none within ``timeout``.

        An error of the thread (the buffer's or the transfer's) is raised here, in the caller's thread.
        """
        if self._finished:
            return None
        try:
            item = self._ready.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no batch was ready within {timeout:g} s") from None
        if isinstance(item, _Failed):
            raise item.error
        if isinstance(item, _Drained):
            self._finished = True
            return None
        return item

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = self._buffer.get_batch(self._batch_size, timeout=POLL_SECONDS)
                except TimeoutError:
                    continue
                drawn_at = time.monotonic()
                item = _Drained() if batch is None else Ready(batch, self._to_device(batch), drawn_at)
                while not self._stop.is_set():
                    try:
                        self._ready.put(item, timeout=POLL_SECONDS)
                        break
                    except queue.Full:
                        continue
                if batch is None:
                    return
        except BufferClosed:
            return  # the run is ending
        except BaseException as exc:  # handed to the trainer's thread by get()
            self._ready.put(_Failed(exc))
