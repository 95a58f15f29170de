"""The live single-node OAR that scripts/setup_oar.sh brings up, for test_oar_cluster.py and test_oar_study.py.

OAR refuses jobs from root (an admission rule), and the tests run as root: they submit as the ordinary
user the set-up script creates, USER, through ``runuser``. The backend runs whole as that user, as the
server job runs it on a cluster: :class:`UserScheduler` starts this module as a script under ``runuser``,
where it serves one OarScheduler over stdin and stdout (one JSON request a line, one JSON answer a line).
So the scheduler writes its owner-only job scripts as the user who submits them, and nothing in the
backend has to know about the test's users.

Whether the live tests run: scripts/setup_oar.sh writes .cache/setup_oar.status, "ready", or
"unavailable: WHY" on a machine where it cannot bring OAR up (not root, no packages). The tests then
skip, printing WHY; except under CI=true as root with apt-get, where OAR can be brought up, so they fail.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STATUS_FILE = ROOT / ".cache" / "setup_oar.status"
USER = "jaxsurro-oar"  # the submitting user of scripts/setup_oar.sh
NODE = "localhost"
SETUP_HINT = "bring OAR up with `bash scripts/setup_oar.sh` (as root)"
TERMINAL_OAR_STATES = {"Terminated", "Error"}


def require_live_oar() -> None:
    """Returns when the live OAR is up and usable by these tests; otherwise skips saying why, or fails."""
    import pytest

    if not STATUS_FILE.exists():
        pytest.fail(f"{STATUS_FILE.relative_to(ROOT)} is missing: scripts/setup_oar.sh has not run here; {SETUP_HINT}")
    status = STATUS_FILE.read_text().strip()
    if status != "ready":
        reason = f"the live OAR tests do not run: scripts/setup_oar.sh says {status!r}"
        if os.environ.get("CI") == "true" and os.geteuid() == 0 and shutil.which("apt-get"):
            pytest.fail(
                f"{reason}; under CI=true, as root with apt-get, OAR can be brought up and these tests must run"
            )
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip(f"the live OAR tests submit as {USER} through runuser, which needs root; run them as root")
    alive = [r for r in resources().values() if r.get("state") == "Alive"]
    if not alive:
        pytest.fail(f"OAR lists no Alive resource on {NODE} (oarnodes -J: {resources()}); {SETUP_HINT}")


def run(
    argv: Sequence[str],
    *,
    as_user: bool = False,
    cwd: Path | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Runs a command, as USER when ``as_user``; with ``check``, raises with its whole output on failure."""
    command = ["runuser", "-u", USER, "--", *argv] if as_user else list(argv)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"`{' '.join(command)}` exited {result.returncode}\n--- stdout ---\n{result.stdout}"
            f"--- stderr ---\n{result.stderr}"
        )
    return result


def _json(text: str) -> dict[str, Any]:
    """oarstat/oarnodes -J output; both print a message, not JSON, when there is nothing to list."""
    text = text.strip()
    return json.loads(text) if text.startswith("{") else {}


def resources() -> dict[str, dict[str, Any]]:
    return _json(run(["oarnodes", "-J"]).stdout)


def oarstat(job_ids: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """``oarstat -f -J`` as root: the jobs asked for, or every current job of every user."""
    return _json(run(["oarstat", "-f", "-J", *(a for i in job_ids for a in ("-j", i))]).stdout)


def oar_state(job_id: str) -> str | None:
    return oarstat([job_id]).get(job_id, {}).get("state")


def current_jobs(prefix: str) -> dict[str, str]:
    """Job id -> state of the jobs OAR has not ended whose name starts with ``prefix``."""
    return {
        i: j["state"]
        for i, j in oarstat().items()
        if (j.get("name") or "").startswith(prefix) and j.get("state") not in TERMINAL_OAR_STATES
    }


def user_dir(*parts: str) -> Path:
    """A directory owned by USER under its home (OAR reads launching directories and scripts as USER)."""
    path = Path(pwd.getpwnam(USER).pw_dir).joinpath(*parts)
    run(["mkdir", "-p", str(path)], as_user=True)
    return path


def scratch_directory(request: Any, *parts: str) -> Iterator[Path]:
    """For a fixture: a fresh user_dir, removed after the test unless the test failed (kept to look into)."""
    failed_before = request.session.testsfailed
    path = user_dir(*parts)
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


class UserScheduler:
    """An OarScheduler in a child process run as USER; every method answers what the backend's would.

    ``commands`` after a call: how many times each OAR command ran for it (from a counting runner).
    """

    def __init__(self, log_dir: Path, options: Sequence[str] = (), poll_interval: float = 0.5):
        settings = json.dumps({"options": list(options), "poll_interval": poll_interval})
        self._stderr = open(log_dir / f"scheduler-{id(self)}.log", "w+")  # the backend's log, for errors
        self._process = subprocess.Popen(
            ["runuser", "-u", USER, "--", sys.executable, __file__, settings],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd="/",
            env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        )
        self.commands: dict[str, int] = {}

    def _call(self, **request: Any) -> Any:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise AssertionError(
                f"the scheduler child (as {USER}) exited {self._process.wait()} during "
                f"{request}:\n{self._stderr.read()}"
            )
        answer = json.loads(line)
        self.commands = answer.get("commands", {})
        if "error" in answer:
            raise SchedulerError(answer["error"])
        return answer["result"]

    def submit(self, name: str, argv: Sequence[str], directory: Path, env: dict[str, str] | None = None) -> str:
        return self._call(
            op="submit",
            name=name,
            argv=list(argv),
            env=env or {},
            log_path=str(directory / f"{name}.log"),
            cwd=str(directory),
        )

    def poll(self, job_ids: Sequence[str]) -> dict[str, tuple[str, int | None]]:
        return {i: (state, code) for i, (state, code) in self._call(op="poll", ids=list(job_ids)).items()}

    def cancel(self, job_ids: Sequence[str]) -> None:
        self._call(op="cancel", ids=list(job_ids))

    def close(self) -> None:
        """Ends the child (end of its input) and closes every pipe."""
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                pipe.close()
        self._process.wait(timeout=30)
        self._stderr.close()


class SchedulerError(AssertionError):
    """The backend raised in the child; the message is its type and text."""


def _serve(settings: dict[str, Any]) -> None:
    """The child: one OarScheduler, requests from stdin, answers to stdout."""
    sys.path.insert(0, str(ROOT))
    from jaxsurro.launcher.oar import OarScheduler
    from jaxsurro.launcher.scheduler import JobSpec

    calls: Counter[str] = Counter()

    def counting_runner(argv, **kwargs):
        calls[argv[0]] += 1
        return subprocess.run(argv, **kwargs)

    scheduler = OarScheduler(
        settings["options"],
        runner=counting_runner,
        poll_interval=settings["poll_interval"],
        retries=1,
        backoff=0.5,
        command_timeout=60.0,
    )
    for line in sys.stdin:
        request = json.loads(line)
        calls.clear()
        try:
            if request["op"] == "submit":
                result: Any = scheduler.submit(
                    JobSpec(
                        name=request["name"],
                        argv=tuple(request["argv"]),
                        env=request["env"],
                        log_path=Path(request["log_path"]),
                        cwd=Path(request["cwd"]),
                    )
                )
            elif request["op"] == "poll":
                result = {i: [s.state.value, s.exit_code] for i, s in scheduler.poll(request["ids"]).items()}
            elif request["op"] == "cancel":
                result = scheduler.cancel(request["ids"])
            else:
                raise ValueError(f"unknown request {request!r}")
            answer = {"result": result, "commands": dict(calls)}
        except Exception as exc:  # the test reports it
            answer = {"error": f"{type(exc).__name__}: {exc}", "commands": dict(calls)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
