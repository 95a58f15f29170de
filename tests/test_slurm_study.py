"""Studies on the real single-node Slurm (scripts/setup_slurm.sh): the server as a 2-rank batch job, clients as
sbatch jobs or srun steps, and cancellation that leaves no client job behind."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
N_SIMS, N_STEPS = 5, 8
HINT = "is the cluster up? run `bash scripts/setup_slurm.sh` as root"


def slurm(*argv: str) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{' '.join(argv)} failed ({HINT}):\n{result.stderr}"
    return result.stdout


def job_names() -> list[str]:
    return slurm("squeue", "-h", "-o", "%j").split()


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return next((f.split("=", 1)[1] for f in out.stdout.split() if f.startswith("JobState=")), "UNKNOWN")


def submit(tmp_path: Path, name: str, *overrides: str) -> tuple[str, Path]:
    settings = [
        f"study.name={name}",
        f"study.n_simulations={N_SIMS}",
        f"solver.n_steps={N_STEPS}",
        "solver.grid_size=8",
        "train.n_validation=2",
        "train.batch_size=16",
        "buffer.capacity=60",
        "buffer.watermark=10",
        "model.hidden=32",
        f"study.cache_dir='{tmp_path / 'cache'}'",
        "launcher.scheduler=slurm",
        "launcher.server_ranks=2",
        "launcher.max_concurrent=2",
        'launcher.client_options=["--time=00:10:00"]',
        "server.client_timeout=60.0",
        *overrides,
    ]
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxsurro.submit",
            str(ROOT / "experiments/heat.toml"),
            "--run-dir",
            str(run_dir),
            *[arg for o in settings for arg in ("--set", o)],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, f"submit failed ({HINT}):\n{result.stdout}\n{result.stderr}"
    assert f"run directory: {run_dir}" in result.stdout
    job_id = result.stdout.split("job ", 1)[1].split()[0]
    return job_id, run_dir


def server_log(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in run_dir.glob("server*.log"))


@pytest.mark.parametrize("mode", ["jobs", "steps"])
def test_submitted_study_runs_to_the_end_and_leaves_no_job(tmp_path, mode):
    name = f"t{uuid.uuid4().hex[:8]}"
    job_id, run_dir = submit(tmp_path, name, f"launcher.slurm_mode={mode}")
    try:
        wait_until(
            lambda: job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
            240,
            f"server job {job_id} to end",
        )
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    assert job_state(job_id) == "COMPLETED", server_log(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["server_ranks"] == 2
    assert summary["simulations_finished"] == N_SIMS
    assert summary["unique_samples_received"] == N_SIMS * N_STEPS
    assert summary["rejected"] == {} and summary["duplicates"] == 0
    assert len({r["parameter_digest"] for r in summary["ranks"]}) == 1
    wait_until(lambda: not [n for n in job_names() if n.startswith(name)], 30, "the study's jobs to leave squeue")


def test_cancelling_the_server_cancels_every_client_job(tmp_path):
    name = f"t{uuid.uuid4().hex[:8]}"
    # Long simulations: clients are still queued or running when the server job is cancelled.
    job_id, run_dir = submit(
        tmp_path,
        name,
        "solver.n_steps=200000",
        "train.n_validation=1",
        "launcher.max_concurrent=3",
        "launcher.server_ranks=1",
    )
    try:
        wait_until(
            lambda: any(n.startswith(f"{name}-") and n != f"{name}-server" for n in job_names()),
            120,
            "client jobs to be submitted",
        )
        slurm("scancel", job_id)
        wait_until(
            lambda: not [n for n in job_names() if n.startswith(name)],
            60,
            "every client job to be cancelled with the server",
        )
    finally:
        leftovers = [n for n in job_names() if n.startswith(name)]
        if leftovers:
            subprocess.run(["scancel", "-n", ",".join(leftovers)], capture_output=True, timeout=30)
    assert "cancelled" in server_log(run_dir).lower() or (run_dir / "simulations.csv").exists()


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return next((f.split("=", 1)[1] for f in out.stdout.split() if f.startswith(f"{name}=")), "")


def test_a_warned_server_checkpoints_requeues_itself_and_resumes_to_the_end(tmp_path):
    name = f"t{uuid.uuid4().hex[:8]}"
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    # Simulation 3 hangs on its first attempt: the study is still running when the warning comes.
    solver = ["{python}", str(ROOT / "tests/solvers/faulty_heat.py"), "{grid_size}", "{n_steps}"]
    solver += ["--hang", "3", "--stamps", str(stamps)]
    job_id, run_dir = submit(tmp_path, name, f"solver.command={json.dumps(solver)}", "launcher.silence_timeout=600.0")
    try:
        wait_until(lambda: any(stamps.iterdir()), 120, "simulation 3 to hang in its first attempt")
        # What Slurm does launcher.warning_seconds before the time limit (#SBATCH --signal=B:USR1@...).
        slurm("scancel", "--signal=USR1", "--batch", job_id)
        wait_until(lambda: job_field(job_id, "Restarts") == "1", 60, "the server job to requeue itself")
        # Slurm holds a requeued job for its credential lifetime (120 s) before it may start again; a test
        # need not wait for that. The hold is set as the job turns pending again, so it is lifted while
        # the job is seen pending (an update made before then would not last).
        lifted = [0.0]

        def ended() -> bool:
            state = job_state(job_id)
            if state == "PENDING" and time.monotonic() - lifted[0] > 2.0:
                subprocess.run(
                    ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=30
                )
                lifted[0] = time.monotonic()
            return state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

        wait_until(ended, 300, f"the requeued server job {job_id} to end")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    assert job_state(job_id) == "COMPLETED", server_log(run_dir)
    job_log = (run_dir / f"server-{job_id}.log").read_text()
    assert "requeueing job" in job_log and "resuming the run from" in job_log, job_log
    assert "resumed from" in (run_dir / "server.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["simulations_finished"] == N_SIMS
    assert summary["unique_samples_received"] == N_SIMS * N_STEPS  # every step once, across the two runs
    assert summary["rejected"] == {}
    assert len({r["parameter_digest"] for r in summary["ranks"]}) == 1
    with open(run_dir / "simulations.csv", newline="") as handle:
        attempts = {int(r["sim_id"]): int(r["attempts"]) for r in csv.DictReader(handle)}
    assert attempts[3] == 2  # the hung attempt was cancelled with the server, the resumed run ran it again
    wait_until(lambda: not [n for n in job_names() if n.startswith(name)], 30, "the study's jobs to leave squeue")
