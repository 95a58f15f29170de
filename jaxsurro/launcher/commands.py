"""What every cluster backend shares: running the scheduler's commands, and writing job scripts.

:class:`Commands` runs a scheduler's commands (``sbatch``, ``squeue``, ``oarsub``...) as argument
lists without a shell, each under a timeout, retrying transient failures with doubling pauses;
every error quotes the command and its whole output. :func:`write_job_script` writes a job script
readable by its owner only: a client's script holds its environment, and with it the run's token.
See docs/architecture.md, section "Launcher".
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger("jaxsurro.launcher")

Runner = Callable[..., subprocess.CompletedProcess]  # subprocess.run's signature; tests inject recorded answers

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CommandError(RuntimeError):
    """A scheduler command could not run, kept failing, or answered something a backend cannot read."""


def succeeded(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0


def describe(result: subprocess.CompletedProcess) -> str:
    """A command, its exit code and its whole output, for error messages."""
    args = result.args
    command = shlex.join(str(a) for a in args) if isinstance(args, list | tuple) else str(args)
    return (
        f"`{command}` exited with code {result.returncode}\n"
        f"--- stdout ---\n{(result.stdout or '').rstrip()}\n--- stderr ---\n{(result.stderr or '').rstrip()}"
    )


class Commands:
    """Runs one scheduler's commands: no shell, a timeout each, retries with doubling pauses.

    ``error`` is the backend's own error class; ``not_found`` says what to do when a command is
    not on the PATH, ``unreachable`` what to check once every try failed. ``environment``, when
    given, builds the commands' environment at each call (otherwise they inherit the launcher's).
    """

    def __init__(
        self,
        error: type[CommandError],
        *,
        not_found: str,
        unreachable: str = "",
        runner: Runner = subprocess.run,
        retries: int = 3,
        backoff: float = 1.0,
        timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        environment: Callable[[], Mapping[str, str]] | None = None,
    ):
        self.error = error
        self.not_found = not_found
        self.unreachable = unreachable
        self.runner = runner
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.sleep = sleep
        self.environment = environment

    def run(
        self,
        argv: Sequence[str],
        what: str,
        done: Callable[[subprocess.CompletedProcess], bool] = succeeded,
        *,
        cwd: Path | None = None,
        unsafe_to_repeat: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Runs ``argv`` until ``done`` takes its answer, at most 1 + retries times; raises ``error`` otherwise.

        ``done`` says whether an answer is final: a success, or a failure another try cannot fix.
        ``unsafe_to_repeat``: for a command whose timed-out try may still have acted (a submission),
        a timeout raises at once, with this hint, instead of trying again.
        """
        argv = [os.fspath(arg) for arg in argv]
        failures: list[str] = []
        for attempt in range(self.retries + 1):
            if attempt:
                pause = self.backoff * 2 ** (attempt - 1)
                log.warning(
                    "%s failed (try %d of %d); retrying in %.1f s:\n%s",
                    what,
                    attempt,
                    self.retries + 1,
                    pause,
                    failures[-1],
                )
                self.sleep(pause)
            env = None if self.environment is None else dict(self.environment())
            try:
                result = self.runner(
                    argv,
                    capture_output=True,
                    text=True,
                    check=False,
                    shell=False,
                    timeout=self.timeout,
                    cwd=cwd,
                    env=env,
                )
            except FileNotFoundError as exc:
                raise self.error(f"{what}: {argv[0]!r} is not on the PATH ({exc}); {self.not_found}") from exc
            except subprocess.TimeoutExpired as exc:
                failures.append(
                    f"`{shlex.join(argv)}` did not answer within {exc.timeout:.0f} s\n"
                    f"--- stdout ---\n{_text(exc.stdout).rstrip()}\n"
                    f"--- stderr ---\n{_text(exc.stderr).rstrip()}"
                )
                if unsafe_to_repeat is not None:
                    raise self.error(f"{what}: {failures[-1]}\n{unsafe_to_repeat}") from exc
                continue
            if done(result):
                return result
            failures.append(describe(result))
        tries = len(failures)
        raise self.error(
            f"{what} failed {tries} {'time' if tries == 1 else 'times'}; the last try: {failures[-1]}"
            + (f"\n{self.unreachable}" if self.unreachable else "")
        )


def _text(output: bytes | str | None) -> str:
    """A timed-out command's partial output as text (subprocess gives bytes even in text mode)."""
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


# -- job scripts -------------------------------------------------------------------------------------
def export_lines(job_name: str, env: Mapping[str, str]) -> list[str]:
    """``export NAME=VALUE`` lines for a bash job script, each value quoted; refuses names bash cannot take."""
    lines = []
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(
                f"environment variable name {name!r} of job {job_name!r} is not a valid shell name "
                f"(letters, digits and '_', not starting with a digit)"
            )
        lines.append(f"export {name}={shlex.quote(value)}")
    return lines


def write_job_script(path: str | os.PathLike, text: str, executable: bool) -> Path:
    """Writes a job script that only its owner can read: mode 0o600, or 0o700 when it is run as a program.

    A job script carries its job's environment, and so the run's token. The file is created under
    a temporary name in the same directory with its final mode (``os.open``; the umask can only
    narrow it, and ``fchmod`` on the still private file restores exactly that mode), then renamed
    over ``path``: at no moment can another user read it, and an older file at ``path``, whatever its
    mode, is replaced whole.
    """
    path = Path(path)
    mode = 0o700 if executable else 0o600
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path
