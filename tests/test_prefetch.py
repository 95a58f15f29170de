"""The prefetch thread: every batch the buffer hands out reaches the trainer once, in order, then the end."""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from waiting import wait_until

from jaxsurro.config import load_config
from jaxsurro.server.buffers import FIFOBuffer
from jaxsurro.server.parallel import DATA_AXIS
from jaxsurro.server.prefetch import Prefetcher
from jaxsurro.server.trainer import Trainer, range_scaling

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 10.0


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


@pytest.mark.parametrize("n_devices", [1, 2])
def test_the_prefetch_thread_puts_batches_on_a_single_device_and_steps_agree(n_devices):
    """On one device the prefetch thread also transfers the batch (it arrives on the mesh, and the step's
    put leaves it as it is); on several CPU devices it leaves the transfer to the step's thread. Either
    way the step sees the batch the buffer drew."""
    config = load_config(ROOT / "experiments" / "heat.toml", ["study.n_simulations=4", "train.batch_size=4"])
    solver = config.solver
    buffer = FIFOBuffer(
        capacity=8, watermark=0, input_dim=len(solver.parameters) + 1, field_size=solver.sample_size, seed=0
    )
    rng = np.random.default_rng(0)
    for i in range(8):
        buffer.put(i, rng.random(len(solver.parameters) + 1), rng.random(solver.sample_size), timeout=1)
    buffer.end_reception()
    devices = jax.devices()[:n_devices]
    prefetched = Trainer.from_config(config, range_scaling(config, 0.0, 1.0), devices=devices)
    direct = Trainer.from_config(config, range_scaling(config, 0.0, 1.0), devices=devices)
    assert prefetched.puts_from_any_thread == (n_devices == 1)
    with Prefetcher(buffer, prefetched.prefetch, 4) as prefetcher:
        while (ready := prefetcher.get(timeout=WAIT_S)) is not None:
            on_mesh = isinstance(ready.prepared.inputs, jax.Array)
            assert on_mesh == (n_devices == 1)
            if on_mesh:
                assert ready.prepared.inputs.sharding.is_equivalent_to(
                    NamedSharding(prefetched.mesh, P(DATA_AXIS)), ready.prepared.inputs.ndim
                )
            metrics, _ = prefetched.step_on_device(prefetched.put(ready.prepared))
            expected, _ = direct.step(ready.host)
            np.testing.assert_array_equal(jax.device_get(metrics["loss"]), jax.device_get(expected["loss"]))


def test_a_batch_being_prepared_neither_blocks_the_trainer_nor_escapes_a_checkpoint():
    """The trainer takes a ready batch while the next one is still being prepared, and a pause lists
    that one among the pending batches (drawn from the buffer, not yet trained on)."""
    buffer = filled_fifo(10)
    release = threading.Event()
    prepared = []

    def prepare(batch):
        prepared.append(batch.sample_ids.tolist())
        if len(prepared) == 2:  # the second batch's preparation hangs until released
            assert release.wait(WAIT_S)
        return batch

    with Prefetcher(buffer, prepare, batch_size=2) as prefetcher:
        wait_until(lambda: len(prepared) == 2, WAIT_S, "the second batch's preparation to start")
        assert prefetcher.get(timeout=WAIT_S).host.sample_ids.tolist() == [0, 1]
        with prefetcher.paused():
            assert [batch.sample_ids.tolist() for batch in prefetcher.pending()] == [[2, 3]]
            assert buffer.stats().drawn == 4
        release.set()
        assert prefetcher.get(timeout=WAIT_S).host.sample_ids.tolist() == [2, 3]
