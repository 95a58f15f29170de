"""The prefetch thread: every batch the buffer hands out reaches the trainer once, in order, then the end."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsurro.server.buffers import FIFOBuffer
from jaxsurro.server.prefetch import Prefetcher


def filled_fifo(n: int) -> FIFOBuffer:
    buffer = FIFOBuffer(capacity=n, watermark=0, input_dim=2, field_size=3, seed=0)
    for i in range(n):
        buffer.put(i, np.full(2, i, np.float32), np.full(3, i, np.float32), timeout=1)
    return buffer


def test_every_batch_arrives_once_in_order_then_the_buffer_reports_drained():
    buffer = filled_fifo(10)
    buffer.end_reception()
    converted = []

    def prepare(batch):
        converted.append(batch.sample_ids.tolist())
        return batch.targets * 2  # stands in for the device batch

    with Prefetcher(buffer, prepare, batch_size=4, depth=2) as prefetcher:
        got = []
        while (ready := prefetcher.get(timeout=10)) is not None:
            np.testing.assert_array_equal(ready.prepared, ready.host.targets * 2)
            got.append(ready.host.sample_ids.tolist())
        assert prefetcher.get(timeout=10) is None  # drained stays drained
    assert got == converted == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_no_batch_yet_is_a_timeout_and_an_error_of_the_thread_is_raised_in_the_caller():
    buffer = FIFOBuffer(capacity=4, watermark=0, input_dim=2, field_size=3, seed=0)
    with Prefetcher(buffer, lambda batch: batch, batch_size=2) as prefetcher:
        with pytest.raises(TimeoutError, match="no batch was ready"):
            prefetcher.get(timeout=0.05)

    def broken(batch):
        raise ValueError("the transfer failed")

    with Prefetcher(filled_fifo(4), broken, batch_size=2) as prefetcher:
        with pytest.raises(ValueError, match="the transfer failed"):
            prefetcher.get(timeout=10)


def test_stopping_while_the_queue_is_full_or_the_buffer_empty_does_not_hang():
    prefetcher = Prefetcher(filled_fifo(8), lambda batch: batch, batch_size=1, depth=1)
    with prefetcher:
        prefetcher.get(timeout=10)
    assert not prefetcher.running
    empty = FIFOBuffer(capacity=4, watermark=0, input_dim=2, field_size=3, seed=0)
    with Prefetcher(empty, lambda batch: batch, batch_size=2) as idle:
        pass
    assert not idle.running
