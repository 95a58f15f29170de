"""Studies on the live single-node OAR (scripts/setup_oar.sh): the server submitted as an OAR job by
``python -m jaxsurro.submit``, as the ordinary user jaxsurro-oar from a directory in its home, and its
clients as OAR jobs; then stopping a study with oardel.

On OAR, a plain ``oardel`` of a running job kills its whole process tree with SIGKILL at once (oarexec's
kill_children), so the server cannot cancel its clients then: they end on their own once their server is
gone (after server.client_timeout). ``oardel -s SIGTERM`` signals the job instead, and the server cancels
every client job before it exits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_oar import (
    ROOT,
    TERMINAL_OAR_STATES,
    USER,
    current_jobs,
    oar_state,
    oarstat,
    require_live_oar,
    run,
    scratch_directory,
)
from waiting import wait_until

N_SIMS, N_STEPS, N_VALIDATION = 5, 8, 2  # the validation set is simulated by client jobs too


@pytest.fixture(scope="module", autouse=True)
def live_oar() -> None:
    require_live_oar()


@pytest.fixture
def study(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The study's directory in USER's home; its name is the study's name, a prefix of its OAR jobs' names."""
    yield from scratch_directory(request, "studies", f"t{uuid.uuid4().hex[:8]}")


def submit(study: Path, *overrides: str) -> tuple[str, Path]:
    """Submits a small heat study as USER from ``study``; returns the server's job id and the run directory."""
    name = study.name
    shutil.copy(ROOT / "experiments/heat.toml", study / "heat.toml")
    shutil.copytree(ROOT / "solvers", study / "solvers")  # the solver command runs solvers/heat.py from here
    run(["chown", "-R", f"{USER}:", str(study)])
    settings = [
        f"study.name={name}",
        f"study.n_simulations={N_SIMS}",
        f"solver.n_steps={N_STEPS}",
        "solver.grid_size=8",
        f"train.n_validation={N_VALIDATION}",
        "train.batch_size=16",
        "buffer.capacity=60",
        "buffer.watermark=10",
        "model.hidden=32",
        f"study.cache_dir='{study / 'cache'}'",
        "launcher.scheduler=oar",
        "launcher.max_concurrent=2",
        "server.client_timeout=60.0",
        *overrides,
    ]
    run_dir = study / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = run(
        [
            str(ROOT / ".venv/bin/python"),
            "-m",
            "jaxsurro.submit",
            "heat.toml",
            "--run-dir",
            str(run_dir),
            *[arg for o in settings for arg in ("--set", o)],
        ],
        as_user=True,
        cwd=study,
        env=env,
        check=False,
    )
    assert result.returncode == 0, f"submit failed:\n{result.stdout}\n{result.stderr}"
    assert f"run directory: {run_dir}" in result.stdout
    job_id = result.stdout.split("oar job ", 1)[1].split()[0]
    return job_id, run_dir


def server_log(run_dir: Path) -> str:
    logs = sorted(run_dir.glob("server*.log"))
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in logs)


def study_jobs(name: str) -> dict[str, dict]:
    """Every OAR job of the study, ended or not (oarstat --sql reads OAR's job table)."""
    output = run(["oarstat", "-f", "-J", "--sql", f"job_name LIKE '{name}-%'"]).stdout.strip()
    return json.loads(output) if output.startswith("{") else {}


def oardel(*argv: str) -> None:
    run(["oardel", *argv], as_user=True)


def test_submitted_study_runs_to_the_end_and_leaves_no_job(study: Path) -> None:
    name = study.name
    job_id, run_dir = submit(study)
    try:
        wait_until(lambda: oar_state(job_id) in TERMINAL_OAR_STATES, 240, f"server job {job_id} to end")
    finally:
        if oar_state(job_id) not in TERMINAL_OAR_STATES:
            subprocess.run(["runuser", "-u", USER, "--", "oardel", job_id], capture_output=True, timeout=30)
    server = oarstat([job_id])[job_id]
    assert (server["state"], server["exit_code"]) == ("Terminated", 0), server_log(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["simulations_finished"] == summary["simulations_planned"] == N_SIMS
    assert summary["unique_samples_received"] == N_SIMS * N_STEPS
    assert summary["rejected"] == {} and summary["duplicates"] == 0
    # The server and one OAR job per simulation (validation ones too), all the user's, all ended with
    # exit code 0; none left.
    wait_until(lambda: not current_jobs(name), 30, "the study's jobs to leave oarstat")
    jobs = study_jobs(name)
    assert jobs[job_id]["name"] == f"{name}-server"
    assert len(jobs) == 1 + N_SIMS + N_VALIDATION, sorted(j["name"] for j in jobs.values())
    assert {(j["owner"], j["state"], j["exit_code"]) for j in jobs.values()} == {(USER, "Terminated", 0)}


def wait_for_running_clients(name: str, server_id: str, run_dir: Path) -> set[str]:
    """Waits until the server's clients run as OAR jobs; returns their ids."""
    clients: set[str] = set()

    def running() -> bool:
        jobs = current_jobs(f"{name}-")
        clients.update(i for i in jobs if i != server_id)
        return any(state == "Running" for i, state in jobs.items() if i != server_id)

    try:
        wait_until(running, 180, "client jobs to run")
    except AssertionError:
        raise AssertionError(f"no client job ran; server job {oar_state(server_id)}:\n{server_log(run_dir)}") from None
    return clients


def test_sigterm_to_the_server_job_cancels_every_client_job(study: Path) -> None:
    name = study.name
    # Long simulations: clients are still queued or running when the server job is signalled.
    job_id, run_dir = submit(study, "solver.n_steps=200000", "train.n_validation=1", "launcher.max_concurrent=3")
    clients: set[str] = set()
    try:
        clients = wait_for_running_clients(name, job_id, run_dir)
        oardel("-s", "SIGTERM", job_id)
        wait_until(lambda: not current_jobs(name), 60, "the server to cancel every client job and end")
    finally:
        leftovers = current_jobs(name)
        if leftovers:
            subprocess.run(["runuser", "-u", USER, "--", "oardel", *leftovers], capture_output=True, timeout=30)
    # The server ended by itself (Terminated, not killed), after oardel-ing each client job.
    assert oar_state(job_id) == "Terminated", server_log(run_dir)
    for client_id, job in oarstat(sorted(clients)).items():
        assert job["state"] == "Error" and "FRAG_JOB_REQUEST" in {e["type"] for e in job["events"]}, job
    assert "cancel" in server_log(run_dir).lower(), server_log(run_dir)


def test_oardel_of_the_server_job_leaves_no_client_job_behind(study: Path) -> None:
    name = study.name
    # A short client timeout: a client that lost its server gives up after 10 s.
    job_id, run_dir = submit(
        study,
        "solver.n_steps=200000",
        "train.n_validation=1",
        "launcher.max_concurrent=3",
        "server.client_timeout=10.0",
    )
    try:
        wait_for_running_clients(name, job_id, run_dir)
        oardel(job_id)  # OAR kills the server's process tree with SIGKILL: it cannot cancel its clients
        wait_until(lambda: not current_jobs(name), 90, "every client job to end once its server is gone")
    finally:
        leftovers = current_jobs(name)
        if leftovers:
            subprocess.run(["runuser", "-u", USER, "--", "oardel", *leftovers], capture_output=True, timeout=30)
    server = oarstat([job_id])[job_id]
    assert server["state"] == "Error" and "FRAG_JOB_REQUEST" in {e["type"] for e in server["events"]}, server
