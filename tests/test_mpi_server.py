"""A server of two MPI ranks (OpenMPI, oversubscribed on the CI's cores) running real studies end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun") or "mpirun (missing: run scripts/setup.sh, which installs OpenMPI)"
N_SIMS, N_STEPS = 10, 12


def mpirun(
    n_ranks: int,
    tmp_path: Path,
    *overrides: str,
    timeout: float = 240,
    devices_per_rank: int = 1,
    returncode: int = 0,
) -> dict:
    """Runs a tiny study with ``mpirun -n n_ranks python -m jaxsurro.run`` and returns its summary."""
    run_dir = tmp_path / f"run-{n_ranks}"
    settings = [
        f"study.n_simulations={N_SIMS}",
        f"solver.n_steps={N_STEPS}",
        "solver.grid_size=8",
        "train.n_validation=2",
        "train.batch_size=16",
        "buffer.capacity=60",
        "buffer.watermark=10",
        "model.hidden=32",
        "train.validation_every=25",
        f"study.cache_dir='{tmp_path / 'cache'}'",
        "train.batch_timeout=60.0",
        *overrides,
    ]
    env = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    }
    # One device per rank, as on a node with one GPU per rank, or several (sharded within the rank).
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_rank}"
    command = [
        MPIRUN,
        "-n",
        str(n_ranks),
        sys.executable,
        "-m",
        "jaxsurro.run",
        str(ROOT / "experiments/heat.toml"),
        "--no-progress",
        "--run-dir",
        str(run_dir),
        *[arg for o in settings for arg in ("--set", o)],
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == returncode, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert f"run directory: {run_dir}" in result.stdout
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("devices_per_rank", [1, 2])
def test_two_ranks_share_the_stream_and_keep_identical_parameters(tmp_path, devices_per_rank):
    summary = mpirun(2, tmp_path, devices_per_rank=devices_per_rank)
    assert summary["server_ranks"] == 2 and summary["devices_per_rank"] == devices_per_rank
    assert summary["simulations_finished"] == N_SIMS
    assert summary["unique_samples_received"] == N_SIMS * N_STEPS  # every time step exactly once, over ranks
    per_rank = [r["unique_samples_received"] for r in summary["ranks"]]
    assert sum(per_rank) == N_SIMS * N_STEPS and min(per_rank) > 0
    assert per_rank == [N_SIMS * N_STEPS // 2] * 2  # (j + t) mod 2 splits every simulation evenly
    assert summary["duplicates"] == 0 and summary["rejected"] == {}
    assert summary["batches"] > 0 and summary["samples_trained"] > 0
    digests = {r["parameter_digest"] for r in summary["ranks"]}
    assert len(digests) == 1, "parameters differ between ranks"


def test_a_starved_rank_neither_deadlocks_nor_drifts(tmp_path):
    command = (
        f'solver.command=["{{python}}", "{ROOT / "tests/solvers/skewed_heat.py"}", "{{grid_size}}", "{{n_steps}}"]'
    )
    # Validation uses the same solver: with a single receiving rank it still gets every step. The study's
    # simulations send half their steps, so every attempt is incomplete and the run reports them failed (exit 1).
    summary = mpirun(2, tmp_path, command, timeout=180, returncode=1)
    assert summary["simulations_failed"] == N_SIMS and summary["simulations_finished"] == 0
    per_rank = [r["unique_samples_received"] for r in summary["ranks"]]
    assert per_rank[1] == 0 and per_rank[0] == N_SIMS * N_STEPS // 2
    assert summary["ranks"][1]["samples_trained"] == 0  # it took part in every step with zero weight
    assert summary["batches"] > 0
    assert len({r["parameter_digest"] for r in summary["ranks"]}) == 1


@pytest.mark.parametrize("devices_per_rank", [1, 2])  # 2: Breed's statistics in the split step's update piece
def test_breed_across_two_ranks_keeps_ranks_in_step(tmp_path, devices_per_rank):
    summary = mpirun(
        2,
        tmp_path,
        "study.n_simulations=24",
        "sampler.kind=breed",
        "breed.period=3",
        "breed.window=10",
        "breed.min_finished=2",
        "launcher.max_concurrent=1",
        devices_per_rank=devices_per_rank,
    )
    assert summary["simulations_finished"] == 24
    assert summary["unique_samples_received"] == 24 * N_STEPS
    assert summary["breed_rounds"] and summary["simulations_bred"] > 0
    assert len({r["parameter_digest"] for r in summary["ranks"]}) == 1


def test_a_short_study_on_two_ranks_learns_because_the_step_is_compiled_before_the_stream(tmp_path):
    """30 simulations of the default experiment: all arrive within seconds, so training must not wait to compile."""
    summary = mpirun(
        2,
        tmp_path,
        "study.n_simulations=30",
        "solver.n_steps=50",
        "solver.grid_size=32",
        "train.n_validation=16",
        "train.batch_size=64",
        "buffer.capacity=2000",
        "buffer.watermark=300",
        "model.hidden=256",
        "train.validation_every=100",
        timeout=400,
    )
    assert summary["simulations_finished"] == 30 and summary["unique_samples_received"] == 30 * 50
    assert summary["first_step_delay_s"] is not None and summary["compile_s"] > 0
    assert summary["final_validation_mse"] < 0.1 * summary["mean_field_validation_mse"], summary
