"""End to end on one machine: real solver processes stream through ZeroMQ into the training server."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_until

from jaxsurro.config import load_config
from jaxsurro.run import run

ROOT = Path(__file__).resolve().parents[1]
N_SIMS, N_STEPS = 6, 10


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides that shrink the default experiment to a few seconds."""
    return [
        f"study.n_simulations={N_SIMS}",
        f"solver.n_steps={N_STEPS}",
        "solver.grid_size=8",
        "train.n_validation=2",
        "train.batch_size=16",
        "train.validation_every=20",
        "buffer.capacity=40",
        "buffer.watermark=10",
        "model.hidden=32",
        f"study.output_dir='{tmp_path / 'runs'}'",
        f"study.cache_dir='{tmp_path / 'cache'}'",
        "server.receive_timeout=60.0",
        "train.batch_timeout=60.0",
        *extra,
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("buffer", ["fifo", "firo", "reservoir"])
def test_study_runs_to_the_end_with_every_buffer(tmp_path, buffer):
    config = load_config(ROOT / "experiments/heat.toml", tiny(tmp_path, f"buffer.kind={buffer}"))
    run_dir, summary = run(config, show_progress=False)

    assert summary["simulations_finished"] == N_SIMS
    assert summary["unique_samples_received"] == N_SIMS * N_STEPS
    assert summary["rejected"] == {} and summary["duplicates"] == 0
    histogram = {int(k): v for k, v in summary["repetition_histogram"].items()}
    assert sum(histogram.values()) == N_SIMS * N_STEPS  # every sample stored is accounted for
    assert sum(k * v for k, v in histogram.items()) == summary["samples_trained"]
    if buffer in ("fifo", "firo"):
        assert histogram == {1: N_SIMS * N_STEPS}  # each sample used exactly once
    else:
        assert summary["samples_trained"] >= N_SIMS * N_STEPS
    assert math.isfinite(summary["final_validation_mse"]) and summary["mean_field_validation_mse"] > 0

    for name in ("config.toml", "metrics.jsonl", "simulations.csv", "summary.json", "params.msgpack"):
        assert (run_dir / name).stat().st_size > 0, name
    assert load_config(run_dir / "config.toml") == config
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "validation"
    for key in ("train_loss", "received_per_s", "trained_per_s", "buffer_population", "rejected", "val_mse"):
        assert key in records[-1]
    rows = read_csv(run_dir / "simulations.csv")
    assert [int(r["sim_id"]) for r in rows] == list(range(N_SIMS))
    assert {r["state"] for r in rows} == {"completed"} and {r["exit_code"] for r in rows} == {"0"}


def test_default_experiment_learns_below_the_mean_field_baseline(tmp_path):
    config = load_config(
        ROOT / "experiments/heat.toml",
        tiny(
            tmp_path,
            "study.n_simulations=16",
            "model.hidden=64",
            "train.batch_size=32",
            "buffer.capacity=200",
            "buffer.watermark=40",
        ),
    )
    _, summary = run(config, show_progress=False)
    assert summary["final_validation_mse"] < 0.5 * summary["mean_field_validation_mse"]


def test_validation_set_is_produced_once_and_reused(tmp_path):
    config = load_config(ROOT / "experiments/heat.toml", tiny(tmp_path, "buffer.kind=fifo"))
    first_dir, first = run(config, show_progress=False)
    cached = list((tmp_path / "cache").glob("validation-*.npz"))
    assert len(cached) == 1 and list((first_dir / "logs").glob("validation-*.log"))
    second_dir, second = run(config, show_progress=False)
    assert not list((second_dir / "logs").glob("validation-*.log"))  # no validation simulation ran again
    assert list((tmp_path / "cache").glob("validation-*.npz")) == cached
    assert second["mean_field_validation_mse"] == first["mean_field_validation_mse"]
    # Anything that determines the set changes the key: a new grid gets its own cache entry.
    run(
        load_config(ROOT / "experiments/heat.toml", tiny(tmp_path, "buffer.kind=fifo", "solver.grid_size=6")),
        show_progress=False,
    )
    assert len(list((tmp_path / "cache").glob("validation-*.npz"))) == 2


def test_crashed_simulations_are_restarted_and_their_steps_counted_once(tmp_path, caplog):
    command = f'solver.command=["{{python}}", "{ROOT / "tests/solvers/flaky_heat.py"}", "{{grid_size}}", "{{n_steps}}"]'
    config = load_config(ROOT / "experiments/heat.toml", tiny(tmp_path, "buffer.kind=fifo", command))
    run_dir, summary = run(config, show_progress=False)

    flaky = [i for i in range(N_SIMS) if i % 3 == 0]
    assert summary["simulations_finished"] == N_SIMS
    assert summary["unique_samples_received"] == N_SIMS * N_STEPS
    assert summary["samples_trained"] == N_SIMS * N_STEPS  # FIFO: once each, duplicates never reach training
    rows = read_csv(run_dir / "simulations.csv")
    assert [int(r["attempts"]) for r in rows] == [2 if i in flaky else 1 for i in range(N_SIMS)]
    server_log = (run_dir / "server.log").read_text()
    assert "attempt 1/2 failed with exit code 3" in server_log
    assert "boom: simulated crash of simulation 0" in server_log  # the tail of the solver's output


def test_simulation_failing_every_attempt_is_reported(tmp_path):
    # A solver that always fails: the validation ensemble cannot complete and the run says why.
    command = 'solver.command=["{python}", "-c", "import sys; print(\'no licence for this solver\'); sys.exit(7)"]'
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxsurro.run",
            str(ROOT / "experiments/heat.toml"),
            "--no-progress",
            *[arg for o in tiny(tmp_path, command, "launcher.max_attempts=1") for arg in ("--set", o)],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "failed with exit code 7" in result.stderr
    assert "no licence for this solver" in result.stderr
    assert "validation simulation(s) did not complete" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupting_the_run_cancels_every_simulation(tmp_path, sig):
    # Long simulations (many steps, a reservoir that fills): the run is interrupted mid-study.
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxsurro.run",
            str(ROOT / "experiments/heat.toml"),
            "--no-progress",
            "--run-dir",
            str(run_dir),
            *[
                arg
                for o in tiny(
                    tmp_path,
                    "solver.n_steps=200000",
                    "train.n_validation=1",
                    "solver.grid_size=4",
                    "launcher.max_concurrent=2",
                )
                for arg in ("--set", o)
            ],
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The validation simulation is long too: interrupting during it must cancel it as well.
        wait_until(
            lambda: len(list((run_dir / "logs").glob("*.log"))) >= 1 if (run_dir / "logs").exists() else False,
            60,
            "a simulation to start",
        )
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == (128 + sig if sig == signal.SIGTERM else 130), stderr
    assert "cancelled" in stderr
    solver_pids = [int(pid) for pid in _solver_pids()]
    assert solver_pids == [], "solver processes outlived the run"


def _solver_pids() -> list[str]:
    """PIDs of heat solvers started with this test's huge step count that are still alive."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if b"200000" in cmdline and any(part.endswith(b"heat.py") for part in cmdline) and "State:\tZ" not in status:
            pids.append(entry.name)
    return pids


def test_breed_steers_pending_simulations_and_accounts_for_every_step(tmp_path):
    config = load_config(
        ROOT / "experiments/heat.toml",
        tiny(
            tmp_path,
            "study.n_simulations=12",
            "sampler.kind=breed",
            "breed.period=5",
            "breed.window=10",
            "breed.min_finished=2",
            "launcher.max_concurrent=1",
        ),
    )
    run_dir, summary = run(config, show_progress=False)
    assert summary["simulations_finished"] == 12
    assert summary["unique_samples_received"] == 12 * N_STEPS
    assert summary["breed_rounds"], "no resampling round happened"
    rows = read_csv(run_dir / "simulations.csv")
    bred = [r for r in rows if r["bred"] == "1"]
    assert bred and summary["simulations_bred"] == len(bred)
    for row in bred:  # a bred simulation started after its parent had completed
        assert int(row["parent"]) < int(row["sim_id"]) and int(row["generation"]) >= 1
    assert any(r["score"] for r in rows)


def test_two_persistent_clients_run_the_whole_study(tmp_path):
    """launcher.persistent_clients = 2: two solver processes (JAXSURRO_SIM_ID=any) run every simulation,
    each handed out once, with exact accounting."""
    config = load_config(ROOT / "experiments/heat.toml", tiny(tmp_path, "launcher.persistent_clients=2"))
    run_dir, summary = run(config, show_progress=False)

    assert summary["simulations_finished"] == N_SIMS
    assert summary["unique_samples_received"] == N_SIMS * N_STEPS
    assert summary["rejected"] == {} and summary["duplicates"] == 0
    rows = read_csv(run_dir / "simulations.csv")
    assert {r["state"] for r in rows} == {"completed"} and {r["attempts"] for r in rows} == {"1"}
    clients = {r["job_id"] for r in rows}
    assert 1 <= len(clients) <= 2, clients  # the two client jobs ran all six simulations
    logs = sorted(path.name for path in run_dir.rglob("sim-client*.log"))
    assert logs == ["sim-client0001.log", "sim-client0002.log"], logs


def test_an_encrypted_study_runs_to_the_end(tmp_path):
    """server.encryption = "curve": the clients get the server's public key from the launcher."""
    config = load_config(ROOT / "experiments/heat.toml", tiny(tmp_path, "server.encryption='curve'"))
    run_dir, summary = run(config, show_progress=False)
    assert summary["simulations_finished"] == N_SIMS
    assert summary["unique_samples_received"] == N_SIMS * N_STEPS and summary["rejected"] == {}
