"""Checkpoints and --resume: a run killed with SIGKILL continues from its last checkpoint, nothing lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from waiting import wait_until

from jaxsurro import surrogate
from jaxsurro.server import checkpoint

ROOT = Path(__file__).resolve().parents[1]
N_SIMS, N_STEPS = 24, 20


def settings(tmp_path: Path) -> list[str]:
    return [
        f"study.n_simulations={N_SIMS}",
        f"solver.n_steps={N_STEPS}",
        "solver.grid_size=16",
        "train.n_validation=4",
        "train.batch_size=32",
        "buffer.kind=fifo",
        "buffer.capacity=300",
        "buffer.watermark=0",
        "model.hidden=64",
        "train.validation_every=50",
        "checkpoint.every_seconds=1.0",
        f"study.cache_dir='{tmp_path / 'cache'}'",
    ]


def start(run_dir: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    """The run command in its own process group; its console output goes to <run_dir>.console."""
    arguments = [f"--set={item}" for item in settings(tmp_path)]
    with open(f"{run_dir}.console", "w") as output:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxsurro.run",
                "experiments/heat.toml",
                "--no-progress",
                "--run-dir",
                str(run_dir),
                *arguments,
                *extra,
            ],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def console(run_dir: Path) -> str:
    return Path(f"{run_dir}.console").read_text()


def completed(run_dir: Path) -> int:
    """Simulations completed as of the latest complete checkpoint."""
    latest = checkpoint.latest(run_dir / "checkpoints")
    if latest is None:
        return 0
    return sum(record["state"] == "completed" for record in checkpoint.read_meta(latest)["table"])


def test_a_run_killed_with_sigkill_resumes_from_its_checkpoint_with_exact_accounting(tmp_path):
    reference = start(tmp_path / "reference", tmp_path)  # the same study, uninterrupted
    assert reference.wait(timeout=300) == 0, console(tmp_path / "reference")
    uninterrupted = json.loads((tmp_path / "reference" / "summary.json").read_text())

    run_dir = tmp_path / "run"
    server = start(run_dir, tmp_path)
    wait_until(
        lambda: completed(run_dir) >= N_SIMS // 3 or server.poll() is not None,
        240,
        "a checkpoint with a third of the simulations completed",
    )
    os.killpg(server.pid, signal.SIGKILL)  # the server and every simulation it started
    server.wait(timeout=30)
    saved = checkpoint.latest(run_dir / "checkpoints")
    part = checkpoint.read_rank(saved, 0)
    assert completed(run_dir) >= N_SIMS // 3

    resumed = subprocess.run(
        [sys.executable, "-m", "jaxsurro.run", str(run_dir), "--resume", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["simulations_finished"] == N_SIMS  # every planned simulation, once
    assert summary["unique_samples_received"] == summary["simulations_finished"] * summary["time_steps_per_simulation"]
    assert summary["batches"] > int(saved.name.split("-")[1])  # training went on from the checkpointed step
    # Every sample the checkpoint held (trained on or not) went into the restored buffer.
    assert len(part.buffer.sample_ids) > 0 and part.stored.sum() >= len(part.buffer.sample_ids)
    assert summary["final_validation_mse"] <= 2 * uninterrupted["final_validation_mse"], (summary, uninterrupted)
    model = surrogate.load(run_dir)
    assert model.predict(np.full((1, 5), 300.0), [0.05])["temperature"].shape == (1, 1, 16, 16)


def test_sigterm_writes_a_checkpoint_an_interrupted_summary_and_loadable_parameters(tmp_path):
    run_dir = tmp_path / "run"
    server = start(run_dir, tmp_path, "--set=study.n_simulations=200")
    wait_until(
        lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size > 0,
        240,
        "training to start",
    )
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=120)
    stderr = console(run_dir)
    assert server.returncode == 128 + signal.SIGTERM, stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["simulations_finished"] < 200
    assert checkpoint.latest(run_dir / "checkpoints") is not None
    assert "--resume" in stderr
    model = surrogate.load(run_dir)
    assert np.isfinite(model.predict(np.full((1, 5), 300.0), [0.05])["temperature"]).all()
