"""Offline mode (the dataset on disk, its epochs, a whole run) and training after reception (online mode)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jaxsurro.config import config_from_dict, disk_problem, load_config
from jaxsurro.run import run
from jaxsurro.server import checkpoint
from jaxsurro.server.after_reception import FinalBuffer, repetition_histogram
from jaxsurro.server.buffers import FIFOBuffer
from jaxsurro.server.dataset import Dataset, DatasetWriter, EpochBatches, batches_per_epoch
from jaxsurro.server.offline import check_single_rank
from jaxsurro.server.prefetch import Prefetcher
from jaxsurro.server.receiver import BufferSink
from jaxsurro.table import SimulationTable

ROOT = Path(__file__).resolve().parents[1]
HEAT = ROOT / "experiments/heat.toml"
N_SIMS, N_STEPS, GRID, BATCH = 6, 10, 16, 16
DT = 0.01


def special_values() -> np.ndarray:
    """float32 values whose bits a conversion would change: -0, a subnormal, infinities, a NaN with a payload."""
    nan = np.frombuffer(np.uint32(0x7FC01234).tobytes(), np.float32)[0]
    return np.array([-0.0, 1e-45, np.inf, -np.inf, nan], dtype=np.float32)


def written(directory: Path, parameters: np.ndarray, n_steps: int, size: int) -> tuple[SimulationTable, DatasetWriter]:
    table = SimulationTable(parameters)
    names = [f"p{i}" for i in range(parameters.shape[1])]
    return table, DatasetWriter(directory, table, n_steps=n_steps, sample_size=size, dt=DT, parameter_names=names)


# -- the dataset on disk ---------------------------------------------------------------------------


def test_the_dataset_reads_back_bitwise_what_the_clients_sent_and_only_whole_simulations(tmp_path):
    rng = np.random.default_rng(0)
    n_sims, n_steps, size = 4, 5, 7
    parameters = rng.uniform(100.0, 500.0, (n_sims, 2))
    sent = rng.standard_normal((n_sims, n_steps, size)).astype(np.float32)
    sent[0, 0, :5] = special_values()
    table, writer = written(tmp_path / "dataset", parameters, n_steps, size)
    order = [(s, t) for s in range(n_sims) for t in range(n_steps) if (s, t) != (3, 2)]  # simulation 3 stays short
    for index in rng.permutation(len(order)):  # steps of every simulation interleaved, in any order
        sim_id, step = order[index]
        assert writer.accept(sim_id, step, sent[sim_id, step], timeout=0)
    writer.close()

    names = {path.name for path in (tmp_path / "dataset").iterdir()}
    assert {"sim-000003.partial.npy"} <= names and not {"sim-000003.npy", "sim-000003.json"} & names
    assert writer.completed() == [0, 1, 2]
    dataset = Dataset(tmp_path / "dataset")
    assert dataset.sim_ids.tolist() == [0, 1, 2] and len(dataset) == 3 * n_steps
    batch = dataset.gather(np.arange(len(dataset)))
    assert batch.targets.tobytes() == sent[:3].reshape(-1, size).tobytes()

    # The inputs and sample ids are those the online path builds for the same time steps.
    buffer = FIFOBuffer(capacity=len(dataset), watermark=0, input_dim=3, field_size=size, seed=0)
    sink = BufferSink(buffer, table, n_steps, DT)
    for sim_id in range(3):
        for step in range(n_steps):
            sink.accept(sim_id, step, sent[sim_id, step], timeout=0)
    buffer.end_reception()
    online = buffer.get_batch(len(dataset))
    assert batch.inputs.tobytes() == online.inputs.tobytes()
    assert batch.sample_ids.tolist() == online.sample_ids.tolist()


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
import numpy as np
from jaxsurro.server.dataset import DatasetWriter
from jaxsurro.table import SimulationTable

rows = np.random.default_rng(1).standard_normal((2, 6, 3)).astype(np.float32)
table = SimulationTable(np.array([[1.0, 2.0], [3.0, 4.0]]))
writer = DatasetWriter(Path(sys.argv[1]), table, n_steps=6, sample_size=3, dt=0.5, parameter_names=["a", "b"])
for step in range(6):
    writer.accept(0, step, rows[0, step], timeout=0)
for step in range(4):
    writer.accept(1, step, rows[1, step], timeout=0)
os.kill(os.getpid(), signal.SIGKILL)  # no close, no clean-up: as a killed server
"""


def test_a_killed_writer_leaves_whole_files_readable_and_half_written_ones_unread(tmp_path):
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=ROOT, timeout=120)
    assert result.returncode == -signal.SIGKILL
    rows = np.random.default_rng(1).standard_normal((2, 6, 3)).astype(np.float32)
    assert (tmp_path / "sim-000001.partial.npy").is_file()
    dataset = Dataset(tmp_path)
    assert dataset.sim_ids.tolist() == [0]
    assert dataset.gather(np.arange(6)).targets.tobytes() == rows[0].tobytes()
    assert dataset.parameters.tolist() == [[1.0, 2.0]]


def test_a_simulation_redrawn_while_arriving_starts_its_file_over(tmp_path):
    table, writer = written(tmp_path, np.array([[1.0, 2.0]]), 4, 2)
    for step in range(3):
        writer.accept(0, step, np.full(2, -1.0, np.float32), timeout=0)
    table[0].parameters = np.array([5.0, 6.0])  # as SimulationTable.apply_redraws does
    writer.accept(0, 3, np.full(2, 3.0, np.float32), timeout=0)
    assert writer.completed() == []  # three of its four rows are the abandoned draw's
    for step in range(3):
        writer.accept(0, step, np.full(2, float(step), np.float32), timeout=0)
    assert writer.completed() == [0]
    dataset = Dataset(tmp_path)
    assert dataset.gather(np.arange(4)).targets[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert dataset.parameters.tolist() == [[5.0, 6.0]]


def test_each_epoch_visits_every_sample_once_in_a_new_order(tmp_path):
    n_sims, n_steps, size, batch_size, epochs = 5, 7, 3, 8, 3
    sent = np.random.default_rng(2).standard_normal((n_sims, n_steps, size)).astype(np.float32)
    _, writer = written(tmp_path, np.arange(2.0 * n_sims).reshape(n_sims, 2), n_steps, size)
    for sim_id in range(n_sims):
        for step in range(n_steps):
            writer.accept(sim_id, step, sent[sim_id, step], timeout=0)
    dataset = Dataset(tmp_path, max_open=2)  # fewer maps than files: they are reopened as needed
    n_samples = n_sims * n_steps
    per_epoch = batches_per_epoch(n_samples, batch_size)
    assert per_epoch == 5  # 35 samples: four batches of 8, then the remaining 3

    source = EpochBatches(dataset, epochs, seed=7)
    orders, sizes = [], []
    for _ in range(epochs):
        order = []
        for _ in range(per_epoch):
            batch = source.get_batch(batch_size)
            ids = batch.sample_ids
            assert batch.targets.tobytes() == sent[ids // n_steps, ids % n_steps].tobytes()
            sizes.append(len(ids))
            order += ids.tolist()
        orders.append(order)
    assert source.get_batch(batch_size) is None and source.get_batch(batch_size) is None
    assert sizes == [8, 8, 8, 8, 3] * epochs
    for order in orders:
        assert sorted(order) == list(range(n_samples))  # every sample exactly once per epoch
    assert len({tuple(order) for order in orders}) == epochs  # reshuffled every epoch
    assert source.uses.tolist() == [epochs] * n_samples

    # The orders come from study.seed alone; through the prefetch thread the trainer sees the same sequence.
    with Prefetcher(EpochBatches(dataset, epochs, seed=7), lambda batch: batch, batch_size) as prefetcher:
        seen = []
        while (ready := prefetcher.get(timeout=10)) is not None:
            seen += ready.host.sample_ids.tolist()
    assert seen == [i for order in orders for i in order]
    other = EpochBatches(dataset, 1, seed=8).get_batch(n_samples).sample_ids.tolist()
    assert other != orders[0]


def test_offline_mode_refuses_several_server_ranks():
    check_single_rank(SimpleNamespace(size=1))
    with pytest.raises(RuntimeError, match='study.mode = "offline" runs on one server rank, not 2'):
        check_single_rank(SimpleNamespace(size=2))


def test_offline_mode_needs_the_dataset_s_room_on_disk(tmp_path):
    raw = {
        "study": {"mode": "offline", "n_simulations": 100, "output_dir": str(tmp_path)},
        "solver": {
            "command": ["{python}", "x.py"],
            "parameters": {"a": [0.0, 1.0]},
            "fields": [{"name": "u", "shape": [256]}],
            "n_steps": 50,
        },
    }
    config = config_from_dict(raw)
    needed = 100 * 50 * 256 * 4
    assert disk_problem(config, tmp_path, available=needed) is None
    problem = disk_problem(config, tmp_path, available=needed - 1)
    assert "study.n_simulations × solver.n_steps × sample size × 4 B = 100 × 50 × 256 × 4 B" in problem
    raw["study"]["mode"] = "online"
    assert disk_problem(config_from_dict(raw), tmp_path, available=0) is None


# -- the copy of the final buffer (train.after_reception = N) -------------------------------------


def test_the_final_buffer_copy_draws_its_own_rows_counts_them_and_resumes_from_a_checkpoint(tmp_path):
    buffer = FIFOBuffer(capacity=10, watermark=0, input_dim=1, field_size=1, seed=0)
    for i in range(10):
        buffer.put(i, np.full(1, i, np.float32), np.full(1, i, np.float32), timeout=1)
    buffer.get_batch(4)  # trained while streaming: samples 0-3
    buffer.end_reception()
    final = FinalBuffer.from_snapshot(buffer.snapshot(), seed=3)  # samples 4-9, never used yet
    while buffer.get_batch(4) is not None:  # the drain uses each of them once
        pass
    drawn = [final.draw(4).sample_ids for _ in range(3)]
    assert set(np.concatenate(drawn).tolist()) <= set(range(4, 10))
    assert final.extra_uses.sum() == 12
    histogram = repetition_histogram(buffer.repetition_histogram(), final.drained_uses, final.extra_uses)
    assert histogram.sum() == 10 and np.dot(np.arange(len(histogram)), histogram) == 10 + 12
    assert histogram[1] == 4 + int((final.extra_uses == 0).sum())

    # A checkpoint in the middle of the extra batches: the resumed copy draws what the original would have.
    final.steps = 3
    part = checkpoint.RankState(buffer.snapshot(), np.zeros((1, 1), bool), {}, 16, None, final.state())
    checkpoint.write_rank(tmp_path, 0, part)
    resumed = FinalBuffer(checkpoint.read_rank(tmp_path, 0).final_buffer)
    assert resumed.steps == 3 and resumed.extra_uses.tolist() == final.extra_uses.tolist()
    assert resumed.draw(4).sample_ids.tolist() == final.draw(4).sample_ids.tolist()
    assert FinalBuffer.from_snapshot(buffer.snapshot(), seed=3).draw(4) is None  # an empty copy has nothing


# -- whole runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One validation set for the runs of this module (the same solver, sizes and validation count)."""
    return tmp_path_factory.mktemp("cache")


def small(tmp_path: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        f"study.n_simulations={N_SIMS}",
        f"solver.n_steps={N_STEPS}",
        f"solver.grid_size={GRID}",
        "train.n_validation=2",
        f"train.batch_size={BATCH}",
        "train.validation_every=5",
        "model.hidden=32",
        f"study.output_dir='{tmp_path / 'runs'}'",
        f"study.cache_dir='{cache_dir}'",
        "server.receive_timeout=60.0",
        "train.batch_timeout=60.0",
        *extra,
    ]


def test_an_offline_run_writes_its_dataset_then_trains_its_epochs(tmp_path, cache_dir):
    epochs, run_dir = 2, tmp_path / "run"
    overrides = small(tmp_path, cache_dir, "study.mode=offline", f"study.epochs={epochs}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxsurro.run",
            str(HEAT),
            "--no-progress",
            "--run-dir",
            str(run_dir),
            *[arg for value in overrides for arg in ("--set", value)],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,  # a few seconds alone; a loaded 2-core machine takes much longer
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    n_samples = N_SIMS * N_STEPS
    assert summary["status"] == "completed" and summary["mode"] == "offline"
    assert summary["simulations_finished"] == N_SIMS and summary["unique_samples_received"] == n_samples
    # 60 samples in batches of 16: 3 full batches and one of 12 per epoch (a short batch is padded with
    # zero-weight rows, never dropped nor filled from the next epoch).
    assert summary["batches"] == epochs * math.ceil(n_samples / BATCH) == 8
    assert summary["samples_trained"] == epochs * n_samples
    assert summary["repetition_histogram"] == {str(epochs): n_samples}  # each sample once per epoch
    assert math.isfinite(summary["final_validation_mse"])
    assert summary["min_validation_mse"] <= summary["final_validation_mse"]
    for name in ("metrics.jsonl", "params.msgpack", "model.json", "simulations.csv"):
        assert (run_dir / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "validation" and records[-1]["batch"] == 8
    assert [r["batch"] for r in records if r["kind"] == "validation"][:1] == [5]

    dataset = run_dir / "dataset"
    assert sorted(p.name for p in dataset.glob("sim-*.npy")) == [f"sim-{i:06d}.npy" for i in range(N_SIMS)]
    # The stored steps are the solver's own, as its client sent them (float32 on the wire).
    parameters = json.loads((dataset / "sim-000000.json").read_text())["parameters"]
    reference = tmp_path / "reference.npy"
    subprocess.run(
        [
            sys.executable,
            "solvers/heat.py",
            "--parameters",
            *map(repr, parameters),
            "--grid-size",
            str(GRID),
            "--steps",
            str(N_STEPS),
            "--dt",
            str(DT),
            "--output",
            str(reference),
            "--mpi",
            "off",
        ],
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    stored = np.load(dataset / "sim-000000.npy")
    assert stored.tobytes() == np.load(reference).astype(np.float32).reshape(N_STEPS, -1).tobytes()


def test_after_reception_trains_exactly_n_more_batches_from_the_final_buffer(tmp_path, cache_dir):
    extra = 5
    config = load_config(
        HEAT,
        small(
            tmp_path,
            cache_dir,
            "buffer.kind=fifo",
            "buffer.capacity=40",
            "buffer.watermark=10",
            f"train.after_reception={extra}",
        ),
    )
    run_dir, summary = run(config, show_progress=False)
    n_samples = N_SIMS * N_STEPS
    drained = math.ceil(n_samples / BATCH)  # FIFO: 3 full batches while streaming, the last 12 once reception ends
    assert summary["status"] == "completed"
    assert summary["after_reception_batches"] == extra
    assert summary["batches"] == drained + extra
    assert summary["samples_trained"] == n_samples + extra * BATCH  # the extra batches are full
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The record written when the buffers had drained and the extra batches began, then the final one.
    assert any(r["batch"] == drained and r["samples_trained"] == n_samples for r in records)
    assert records[-1]["batch"] == drained + extra
    assert records[-1]["samples_trained"] == n_samples + extra * BATCH
    histogram = {int(k): v for k, v in summary["repetition_histogram"].items()}
    assert sum(histogram.values()) == n_samples and 0 not in histogram  # every sample used at least once
    assert sum(k * v for k, v in histogram.items()) == summary["samples_trained"]
