"""Chaos run: SIGKILL three clients, then the server, resume, and check that the study is whole.

    .venv/bin/python scripts/chaos.py                        # the default experiment (experiments/heat.toml)
    .venv/bin/python scripts/chaos.py --set study.n_simulations=24 --set solver.n_steps=20   # smaller

It runs the experiment once uninterrupted (the reference), then again: it SIGKILLs one running
client after each of --client-kills completed simulations, SIGKILLs the server (and everything in
its process group) once a checkpoint holds a third of the simulations completed, resumes with
``python -m jaxsurro.run RUN_DIR --resume`` and checks the accounting: every planned simulation
completed exactly once, unique samples received = simulations × steps, and the final validation MSE
within 2× of the reference. It prints the counts, the resume time (from the resume command to its
first training step) and both validation errors, and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxsurro.server import checkpoint  # noqa: E402

DEADLINE_S = 900.0  # for each phase; a chaos run that takes longer is a failure


def start(run_dir: Path, config: str, overrides: list[str]) -> subprocess.Popen:
    """The run command in its own process group (so that a SIGKILL of the group takes its local clients too)."""
    with open(f"{run_dir}.console", "w") as output:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxsurro.run",
                config,
                "--no-progress",
                "--run-dir",
                str(run_dir),
                *(f"--set={o}" for o in overrides),
            ],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the server's simulation jobs on the local backend)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status and "\nState:\tZ" not in status:  # a killed one is a zombie
                found.append(int(entry.name))
    return found


def completed(run_dir: Path, in_checkpoint: bool) -> int:
    """Completed simulations: as of the latest checkpoint, or as the latest metrics line says."""
    if in_checkpoint:
        latest = checkpoint.latest(run_dir / "checkpoints")
        return 0 if latest is None else sum(r["state"] == "completed" for r in checkpoint.read_meta(latest)["table"])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return json.loads(lines[-1])["simulations"]["done"] if lines else 0


def wait_for(condition, what: str, process: subprocess.Popen | None = None):
    """The first true value of ``condition()``, polled until DEADLINE_S; exits when ``process`` ends first."""
    deadline = time.monotonic() + DEADLINE_S
    while not (value := condition()):
        if process is not None and process.poll() is not None:
            raise SystemExit(f"chaos: the run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"chaos: gave up waiting {DEADLINE_S:.0f} s for {what}")
        time.sleep(0.05)  # polling a condition of another process
    return value


def first_step_after(log: Path, since: float) -> float | None:
    """Wall time of the first 'first training step' line of server.log written after ``since`` (epoch s)."""
    for line in log.read_text().splitlines():
        if "first training step done" in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if stamp >= since:
                return stamp
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/heat.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--client-kills", type=int, default=3)
    parser.add_argument("--every", type=float, default=2.0, help="checkpoint.every_seconds of the chaos run")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jaxsurro-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = [*args.overrides, f"checkpoint.every_seconds={args.every}", "launcher.max_attempts=3"]

    started = time.monotonic()
    reference = start(workdir / "reference", args.config, overrides)
    if reference.wait(timeout=DEADLINE_S) != 0:
        raise SystemExit(f"chaos: the reference run failed; see {workdir / 'reference.console'}")
    uninterrupted = json.loads((workdir / "reference" / "summary.json").read_text())
    print(
        f"reference: {uninterrupted['simulations_finished']} simulations, validation MSE "
        f"{uninterrupted['final_validation_mse']:.4g}, {time.monotonic() - started:.0f} s"
    )

    run_dir = workdir / "chaos"
    server = start(run_dir, args.config, overrides)
    planned = uninterrupted["simulations_planned"]
    killed_clients = []
    for kill in range(args.client_kills):

        def alive(k: int = kill) -> list[int]:
            """The server's running clients not killed yet, once 2 (k + 1) simulations completed."""
            if completed(run_dir, False) < 2 * (k + 1):
                return []
            return [pid for pid in children(server.pid) if pid not in killed_clients]

        def killed(k: int = kill) -> int | None:
            """SIGKILLs one running client; None when each candidate exited before the signal reached it."""
            for pid in alive(k):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it finished between the listing and the signal
                    continue
                return pid
            return None

        killed_clients.append(wait_for(killed, f"running client number {kill + 1}", server))
    wait_for(lambda: completed(run_dir, True) >= planned // 3, "a checkpoint with a third completed", server)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=60)
    at_kill = completed(run_dir, True)
    print(f"killed clients {killed_clients}, then the server with {at_kill}/{planned} completed in its checkpoint")

    resume_started = time.time()
    resumed = subprocess.run(
        [sys.executable, "-m", "jaxsurro.run", str(run_dir), "--resume", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    if resumed.returncode != 0:
        raise SystemExit(f"chaos: the resumed run failed (exit {resumed.returncode}):\n{resumed.stderr}")
    first_step = first_step_after(run_dir / "server.log", resume_started)
    summary = json.loads((run_dir / "summary.json").read_text())
    table = (run_dir / "simulations.csv").read_text().splitlines()
    checks = {
        "every planned simulation completed": summary["simulations_finished"] == planned,
        "each exactly once (no simulation completed twice)": len(table) - 1 == planned,
        "unique samples = simulations × steps": summary["unique_samples_received"]
        == summary["simulations_finished"] * summary["time_steps_per_simulation"],
        "validation MSE within 2× of the uninterrupted run": summary["final_validation_mse"]
        <= 2 * uninterrupted["final_validation_mse"],
    }
    print(
        f"resumed: status {summary['status']}, {summary['simulations_finished']}/{planned} simulations, "
        f"{summary['unique_samples_received']} unique samples, {summary['duplicates']} duplicates dropped, "
        f"{summary['batches']} batches"
    )
    if first_step is not None:
        print(f"resume time (command to first training step): {first_step - resume_started:.1f} s")
    print(
        f"validation MSE: chaos {summary['final_validation_mse']:.4g}, uninterrupted "
        f"{uninterrupted['final_validation_mse']:.4g} "
        f"(ratio {summary['final_validation_mse'] / uninterrupted['final_validation_mse']:.2f})"
    )
    for name, passed in checks.items():
        print(f"{'ok  ' if passed else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
